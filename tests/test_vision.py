"""ViT modes and the adapter: native-resolution packing, position interpolation, pixel shuffle ordering."""

import pytest
import torch

from sailvl.config import tiny_config
from sailvl.model.adapter import pixel_shuffle
from sailvl.model.vit import VisionTransformer

from .conftest import make_model


def internvl_pixel_shuffle(x, scale_factor=0.5):
    """InternVL's pixel_shuffle (ps_version v2), transcribed from its published formula, square grids."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    return x.permute(0, 2, 1, 3).contiguous()


def test_pixel_shuffle_matches_internvl_v2_and_groups_2x2():
    x = torch.randn(3, 8, 8, 5)
    assert torch.equal(pixel_shuffle(x), internvl_pixel_shuffle(x))
    grid = torch.arange(6 * 4).float().reshape(1, 6, 4, 1)  # non-square: token value = row * 4 + col
    out = pixel_shuffle(grid)
    assert out.shape == (1, 3, 2, 4)
    assert out[0, 1, 1].tolist() == [10, 11, 14, 15]  # rows 2-3, cols 2-3
    with pytest.raises(ValueError, match="not divisible"):
        pixel_shuffle(torch.randn(1, 5, 4, 2))


@torch.no_grad()
def test_native_resolution_packed_equals_each_alone():
    vit = VisionTransformer(tiny_config(native=True).vision_config).eval()
    images = [torch.randn(3, 32, 48), torch.randn(3, 64, 16), torch.randn(3, 16, 16)]
    packed, grids = vit.forward_packed(images, select_layer=-1)
    assert grids == [(4, 6), (8, 2), (2, 2)] and packed.shape == (24 + 16 + 4, 64)
    start = 0
    for img, (h, w) in zip(images, grids):
        alone = vit(img[None])[0]
        assert (packed[start:start + h * w] - alone).abs().max() <= 1e-5
        start += h * w
    # changing one image never changes another's features
    images[0] = torch.randn(3, 32, 48)
    again, _ = vit.forward_packed(images)
    assert torch.allclose(again[24:], packed[24:], atol=1e-6)
    assert not torch.allclose(again[:24], packed[:24])


@torch.no_grad()
def test_native_vlm_encodes_variable_sizes():
    model = make_model(native=True)
    images = [torch.randn(3, 32, 48), torch.randn(3, 64, 16)]
    tokens = model.encode_images(images)
    assert tokens.shape == ((4 * 6 + 8 * 2) // 4, 64)
    assert torch.allclose(tokens[:6], model.encode_images([images[0]]), atol=1e-5)


@torch.no_grad()
def test_learned_position_embedding_interpolates_other_grids():
    vit = VisionTransformer(tiny_config().vision_config).eval()
    torch.nn.init.normal_(vit.preprocessor.pos_embed)
    assert vit.preprocessor.position_embedding(8, 8) is vit.preprocessor.pos_embed
    pe = vit.preprocessor.position_embedding(12, 6)
    assert pe.shape == (1, 72, 64)
    out = vit(torch.randn(2, 3, 96, 48))
    assert out.shape == (2, 72, 64) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple of patch size"):
        vit(torch.randn(1, 3, 60, 64))
    with pytest.raises(ValueError, match="rope2d"):
        vit.forward_packed([torch.randn(3, 64, 64)])
