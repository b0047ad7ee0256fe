"""Model soup: weighted averages of homologous checkpoints, refusals, complete output directories."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sailvl.checkpoint.hf import CheckpointError
from sailvl.model.vlm import SailVL
from sailvl.train.soup import soup
from tests.conftest import make_model

TOKENIZER_FILES = {"tokenizer.json": '{"fake": true}', "tokenizer_config.json": '{"model_max_length": 8}',
                   "special_tokens_map.json": "{}", "preprocessor_config.json": '{"mode": "tiles"}'}


def _save(model, path, tokenizer=False, **kw):
    model.save_pretrained(path, **kw)
    if tokenizer:
        for name, text in TOKENIZER_FILES.items():
            (path / name).write_text(text)
    return path


def _seeded(seed, **kw):
    torch.manual_seed(seed)
    return make_model(**kw)


@pytest.fixture
def pair(tmp_path):
    a, b = _seeded(1), _seeded(2)
    return a, b, _save(a, tmp_path / "a", tokenizer=True), _save(b, tmp_path / "b")


def _check_average(out, models, weights):
    souped = SailVL.from_pretrained(out).state_dict()
    states = [m.state_dict() for m in models]
    assert souped.keys() == states[0].keys()
    for key, t in souped.items():
        expected = sum(w * s[key].float() for w, s in zip(weights, states))
        assert torch.allclose(t.float(), expected, atol=1e-6, rtol=0), key


def test_equal_soup_is_the_mean_and_a_complete_model_dir(pair, tmp_path):
    a, b, da, db = pair
    assert not torch.equal(a.mlp1[1].weight, b.mlp1[1].weight)
    out = soup([da, db], tmp_path / "soup")
    assert out == tmp_path / "soup"
    _check_average(out, [a, b], [0.5, 0.5])
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "config.json").read_text() == (da / "config.json").read_text()
    assert json.loads((out / "soup.json").read_text())["weights"] == [0.5, 0.5]
    model = SailVL.from_pretrained(out)  # strict loading: loads and runs
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids).logits).all()


def test_weighted_moe_soup_three_models(tmp_path):
    models = [_seeded(s, moe=True) for s in (1, 2, 3)]
    dirs = [_save(m, tmp_path / f"m{i}") for i, m in enumerate(models)]
    out = soup(dirs, tmp_path / "soup", weights=[2, 1, 1], max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").exists()  # sharded output
    _check_average(out, models, [0.5, 0.25, 0.25])


def test_dtype_of_first_model_float32_accumulation(tmp_path):
    a, b = _seeded(1).to(torch.bfloat16), _seeded(2)
    da, db = _save(a, tmp_path / "a"), _save(b, tmp_path / "b")  # torch_dtype differs: allowed
    out = soup([da, db], tmp_path / "soup", weights=[1, 3])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    got = load_file(str(out / "model.safetensors"))
    ta, tb = load_file(str(da / "model.safetensors")), load_file(str(db / "model.safetensors"))
    for key, t in got.items():
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, (ta[key].float() * 0.25 + tb[key].float() * 0.75).to(torch.bfloat16)), key


def test_single_directory_is_a_bit_exact_copy(pair, tmp_path):
    _, _, da, _ = pair
    out = soup([da], tmp_path / "copy")
    ref, got = load_file(str(da / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert (out / "tokenizer.json").exists()


def test_refuses_different_configs(tmp_path):
    da = _save(_seeded(1), tmp_path / "a")
    dm = _save(_seeded(2, moe=True), tmp_path / "moe")
    with pytest.raises(ValueError, match=r"llm_config\.num_experts") as e:
        soup([da, dm], tmp_path / "out")
    assert str(da) in str(e.value) and str(dm) in str(e.value)
    db = tmp_path / "b"
    shutil.copytree(da, db)
    cfg = json.loads((db / "config.json").read_text())
    cfg["select_layer"] = -2
    (db / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"select_layer \(-1 vs -2\)"):
        soup([da, db], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on refusal


def test_refuses_different_tensor_sets_or_shapes(pair, tmp_path):
    _, _, da, db = pair
    tensors = load_file(str(db / "model.safetensors"))
    key = "mlp1.1.weight"
    dropped = {k: v for k, v in tensors.items() if k != key}
    save_file(dropped, str(db / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing in .*{key}"):
        soup([da, db], tmp_path / "out")
    save_file({**dropped, key: torch.zeros(3, 3)}, str(db / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key} has shape"):
        soup([da, db], tmp_path / "out")


@pytest.mark.parametrize("weights, message", [
    ([1.0], "1 weights for 2"),
    ([1.0, float("nan")], "finite"),
    ([1.0, float("inf")], "finite"),
    ([-1.0, 2.0], ">= 0"),
    ([0.0, 0.0], "positive sum"),
    (["a", 1.0], "numbers"),
])
def test_bad_weights(pair, tmp_path, weights, message):
    _, _, da, db = pair
    with pytest.raises(ValueError, match=message):
        soup([da, db], tmp_path / "out", weights=weights)


def test_output_directory_checks(pair, tmp_path):
    _, _, da, db = pair
    with pytest.raises(ValueError, match="one of the inputs"):
        soup([da, db], da)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="overwrite"):
        soup([da, db], busy)
    soup([da, db], busy, overwrite=True)
    assert SailVL.from_pretrained(busy) is not None
    with pytest.raises(ValueError, match="no config.json"):
        soup([da, tmp_path / "nowhere"], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one"):
        soup([], tmp_path / "out")
