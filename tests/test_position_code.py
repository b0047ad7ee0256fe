"""The visual position code (SailVLConfig.visual_position_code): a fixed 2-D code of each visual token's place,
added to the adapter's output at a share of the token's RMS; off (0) it is SAIL-VL2's adapter exactly."""

import math

import pytest
import torch

from sailvl.config import SailVLConfig
from sailvl.model.adapter import POSITION_FREQS, adapt, position_code

from .conftest import make_model


def test_code_names_every_place_and_nothing_else():
    h, w, width = 3, 5, 64
    code = position_code(h, w, width)
    assert code.shape == (h * w, width)
    assert torch.allclose(code.pow(2).mean(-1), torch.ones(h * w))  # unit RMS per token
    n = 4 * POSITION_FREQS
    assert torch.equal(code[:, n:], torch.zeros(h * w, width - n))
    assert len({tuple(row.tolist()) for row in code}) == h * w  # every place its own code
    grid = code.view(h, w, width)
    rows, cols = grid[..., : n // 2], grid[..., n // 2: n]
    assert torch.equal(rows, rows[:, :1].expand_as(rows))  # the row channels depend on the row only
    assert torch.equal(cols, cols[:1].expand_as(cols))  # the column channels on the column only
    # channel k of the row code is sin(k * pi / 2 * row / h): fractions of the grid
    assert grid[2, 0, 0].item() == pytest.approx(math.sin(math.pi / 2 * 2 / 3) * math.sqrt(width / n / 0.5), rel=1e-6)
    with pytest.raises(ValueError, match="LLM width >= 32"):
        position_code(2, 2, 16)


def test_adapt_adds_the_code_at_a_share_of_each_tokens_rms():
    torch.manual_seed(0)
    model = make_model()
    feats = torch.randn(2, 4 * 6, model.config.vision_config.hidden_size)  # a non-square 4 x 6 patch grid
    with torch.no_grad():
        plain = adapt(model.mlp1, feats, (4, 6))
        coded = adapt(model.mlp1, feats, (4, 6), position=0.7)
    assert plain.shape == coded.shape == (2, 6, model.config.llm_config.hidden_size)
    rms = plain.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(coded, plain + 0.7 * rms * position_code(2, 3, plain.shape[-1]))
    with torch.no_grad():  # whatever scale the adapter learns, the code keeps its share of each token
        model.mlp1[3].weight.mul_(3), model.mlp1[3].bias.mul_(3)
        torch.testing.assert_close(adapt(model.mlp1, feats, (4, 6), position=0.7), 3 * coded)


def test_model_option_is_off_by_default_and_round_trips(tmp_path):
    assert SailVLConfig().visual_position_code == 0.0  # published SAIL-VL2 configs do not have it
    with pytest.raises(ValueError, match="visual_position_code must be >= 0"):
        make_model(visual_position_code=-1.0)
    pixels = torch.randn(2, 3, 64, 64)
    off, on = make_model(), make_model(visual_position_code=0.5)
    on.load_state_dict(off.state_dict())  # the same weights: the code has none of its own
    with torch.no_grad():
        a, b = off.encode_images(pixels), on.encode_images(pixels)
    n = on.config.tokens_per_tile
    side = int(math.isqrt(n))
    rms = a.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(b, a + 0.5 * rms * position_code(side, side, a.shape[-1]).repeat(2, 1))
    on.save_pretrained(tmp_path / "m")
    back = type(on).from_pretrained(tmp_path / "m")
    assert back.config.visual_position_code == 0.5
    with torch.no_grad():
        torch.testing.assert_close(back.encode_images(pixels), b)


def test_native_resolution_images_get_the_code_of_their_own_grid():
    off, on = make_model(native=True), make_model(native=True, visual_position_code=1.0)
    on.load_state_dict(off.state_dict())
    images = [torch.randn(3, 32, 64), torch.randn(3, 48, 32)]  # 4 x 8 and 6 x 4 patches -> 2 x 4 and 3 x 2 tokens
    with torch.no_grad():
        a, b = off.encode_images(images), on.encode_images(images)
    code = torch.cat([position_code(2, 4, a.shape[-1]), position_code(3, 2, a.shape[-1])])
    rms = a.pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(b, a + rms * code)
