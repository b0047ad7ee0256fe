"""SAIL-VL2 checkpoint layout: exact round trips, sharding, strict loading with named errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sailvl import SailVL
from sailvl.checkpoint.hf import CheckpointError

from .conftest import make_model


def _same(a: SailVL, b: SailVL) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


@pytest.mark.parametrize("kw", [{}, {"moe": True}, {"native": True}])
def test_round_trip_is_bit_exact(tmp_path, kw):
    model = make_model(**kw)
    model.save_pretrained(tmp_path)
    again = SailVL.from_pretrained(tmp_path)
    assert _same(model, again)
    assert again.config.to_dict() == model.config.to_dict()


def test_layout_key_names_and_config(tmp_path):
    make_model(moe=True).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["SAILVLModel"]
    assert cfg["llm_config"]["model_type"] == "qwen3_moe" and cfg["llm_config"]["architectures"] == ["Qwen3MoeForCausalLM"]
    for k in ("vision_config", "downsample_ratio", "select_layer", "force_image_size", "template",
              "dynamic_image_size", "use_thumbnail", "min_dynamic_patch", "max_dynamic_patch", "ps_version"):
        assert k in cfg
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for k in ("vision_model.preprocessor.patchifier.proj.weight", "vision_model.preprocessor.patchifier.proj.bias",
              "vision_model.preprocessor.patchifier.norm.weight", "vision_model.preprocessor.pos_embed",
              "vision_model.trunk.blocks.0.norm_1.weight", "vision_model.trunk.blocks.1.attn.qkv.weight",
              "vision_model.trunk.blocks.1.attn.proj.weight", "vision_model.trunk.blocks.0.mlp.fc3.weight",
              "vision_model.trunk.post_trunk_norm.weight", "mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight",
              "mlp1.3.bias", "language_model.model.embed_tokens.weight",
              "language_model.model.layers.1.self_attn.q_norm.weight", "language_model.model.layers.0.mlp.gate.weight",
              "language_model.model.layers.0.mlp.experts.7.down_proj.weight", "language_model.model.norm.weight",
              "language_model.lm_head.weight"):
        assert k in keys, k
    assert not any(k.endswith("experts.gate_proj") for k in keys)


def test_tied_model_has_no_head_key_and_bf16_round_trip(tmp_path):
    model = make_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert "language_model.lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    again = SailVL.from_pretrained(tmp_path)
    assert again.dtype == torch.bfloat16 and _same(model, again)
    as32 = SailVL.from_pretrained(tmp_path, dtype="float32")
    assert as32.dtype == torch.float32
    assert torch.equal(as32.mlp1[1].weight, model.mlp1[1].weight.float())


def test_sharded_save_has_index_and_loads(tmp_path):
    model = make_model(moe=True)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert _same(model, SailVL.from_pretrained(tmp_path))
    # re-saving unsharded removes the stale shards
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists() and not list(tmp_path.glob("model-0*"))


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_key_is_named(tmp_path):
    make_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("mlp1.3.weight"))
    with pytest.raises(CheckpointError, match=r"missing keys: \['mlp1.3.weight'\]"):
        SailVL.from_pretrained(tmp_path)


def test_renamed_key_is_named(tmp_path):
    make_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("vision_model.trunk.blocks.0.attn.qkv_renamed.weight",
                                               t.pop("vision_model.trunk.blocks.0.attn.qkv.weight")))
    with pytest.raises(CheckpointError) as e:
        SailVL.from_pretrained(tmp_path)
    assert "vision_model.trunk.blocks.0.attn.qkv.weight" in str(e.value)
    assert "unexpected keys: ['vision_model.trunk.blocks.0.attn.qkv_renamed.weight']" in str(e.value)


def test_missing_expert_is_named(tmp_path):
    make_model(moe=True).save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("language_model.model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        SailVL.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    make_model().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("mlp1.1.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"mlp1\.1\.bias has shape \(3,\)"):
        SailVL.from_pretrained(tmp_path)


def test_truncated_file_and_pickle_only_dir(tmp_path):
    make_model().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        SailVL.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle files are never loaded"):
        SailVL.from_pretrained(tmp_path)


def test_bad_config_is_a_clear_error(tmp_path):
    make_model().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["llm_config"]["model_type"] = "llama"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type must be 'qwen3' or 'qwen3_moe'"):
        SailVL.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        SailVL.from_pretrained(tmp_path / "nope")
