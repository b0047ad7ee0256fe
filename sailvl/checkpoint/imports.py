"""Import the parts users start from, with strict key maps:
a transformers-format Qwen3 / Qwen3-MoE LLM directory and an AIMv2 vision directory (transformers'
Aimv2VisionModel or Aimv2Model naming), composed into a SAIL-VL2 model directory with a freshly
initialised adapter and the LLM's tokenizer (image special tokens added when missing).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..config import LLMConfig, SailVLConfig, VisionConfig
from ..data.tokenizer import TOKENIZER_FILES
from .hf import CheckpointError, from_checkpoint, load_state_strict, read_safetensors

IMAGE_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")


def _read_config(path: Path) -> dict:
    f = path / "config.json"
    if not f.exists():
        raise CheckpointError(f"{path} has no config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from None


def _check_keys(where: str, got: set[str], expected: set[str]) -> None:
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise CheckpointError(f"{where}: missing keys {missing[:50]}; unexpected keys {unexpected[:50]}")


def import_qwen3(path: str | Path) -> tuple[LLMConfig, dict[str, torch.Tensor]]:
    """A transformers Qwen3 / Qwen3-MoE directory -> (LLMConfig, our `language_model.*` state dict)."""
    path = Path(path)
    cfg = LLMConfig.from_dict(_read_config(path))
    tensors = read_safetensors(path)
    out = {}
    for key, t in tensors.items():
        m = re.match(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$", key)
        if m and t.dim() == 3:  # fused expert layout some transformers versions write
            if m.group(2) == "gate_up_proj":
                g, u = t.chunk(2, dim=1)
                for e in range(t.shape[0]):
                    out[f"{m.group(1)}.{e}.gate_proj.weight"], out[f"{m.group(1)}.{e}.up_proj.weight"] = g[e], u[e]
            else:
                for e in range(t.shape[0]):
                    out[f"{m.group(1)}.{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return cfg, {f"language_model.{k}": v for k, v in from_checkpoint(out).items()}


def import_aimv2(path: str | Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """A transformers AIMv2 directory -> (VisionConfig, our `vision_model.*` state dict). The attention
    pooling head and any text tower are not part of SAIL-ViT and are dropped."""
    path = Path(path)
    raw = _read_config(path)
    vraw = raw.get("vision_config", raw)
    if vraw.get("qkv_bias") and not vraw.get("mlp_bias"):
        raise CheckpointError("AIMv2 with qkv_bias but no mlp_bias is not supported")
    cfg = VisionConfig.from_dict(vraw)
    tensors = read_safetensors(path)
    if any(k.startswith("vision_model.") for k in tensors):
        tensors = {k[len("vision_model."):]: v for k, v in tensors.items() if k.startswith("vision_model.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("head.")}
    rename = {
        "embeddings.patch_embed.weight": "preprocessor.patchifier.proj.weight",
        "embeddings.patch_embed.bias": "preprocessor.patchifier.proj.bias",
        "embeddings.rms_norm.weight": "preprocessor.patchifier.norm.weight",
        "rms_norm.weight": "trunk.post_trunk_norm.weight",
    }
    block = {"rms_norm1": "norm_1", "rms_norm2": "norm_2", "attention.out_proj": "attn.proj",
             "ffn.gate_proj": "mlp.fc1", "ffn.up_proj": "mlp.fc3", "ffn.down_proj": "mlp.fc2"}
    out, used = {}, set()
    for src, dst in rename.items():
        if src in tensors:
            out[dst] = tensors[src]
            used.add(src)
    if "embeddings.position_embedding.weight" in tensors:
        out["preprocessor.pos_embed"] = tensors["embeddings.position_embedding.weight"][None]
        used.add("embeddings.position_embedding.weight")
    for i in range(cfg.num_hidden_layers):
        pre = f"encoder.layers.{i}."
        for src, dst in block.items():
            for kind in ("weight", "bias"):
                k = f"{pre}{src}.{kind}"
                if k in tensors:
                    out[f"trunk.blocks.{i}.{dst}.{kind}"] = tensors[k]
                    used.add(k)
        for kind in ("weight", "bias"):
            qkv = [f"{pre}attention.{n}_proj.{kind}" for n in "qkv"]
            if all(k in tensors for k in qkv):
                out[f"trunk.blocks.{i}.attn.qkv.{kind}"] = torch.cat([tensors[k] for k in qkv])
                used.update(qkv)
    leftover = sorted(set(tensors) - used)
    if leftover:
        raise CheckpointError(f"{path}: unexpected keys {leftover[:50]}")
    return cfg, {f"vision_model.{k}": v for k, v in out.items()}


def _add_image_tokens(llm_dir: Path, out: Path) -> tuple[dict[str, int], int]:
    """Copy tokenizer files, adding the image special tokens when missing. Returns (ids, vocab size)."""
    from tokenizers import AddedToken, Tokenizer

    for name in TOKENIZER_FILES:
        if (llm_dir / name).exists():
            shutil.copy2(llm_dir / name, out / name)
    if not (llm_dir / "tokenizer.json").exists():
        raise CheckpointError(f"{llm_dir} has no tokenizer.json; a model directory needs one")
    tok = Tokenizer.from_file(str(llm_dir / "tokenizer.json"))
    missing = [t for t in IMAGE_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok.save(str(out / "tokenizer.json"))
        cfg_file = out / "tokenizer_config.json"
        tcfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        decoder = tcfg.setdefault("added_tokens_decoder", {})
        for t in missing:
            decoder[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
        cfg_file.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False))
    ids = {t: tok.token_to_id(t) for t in IMAGE_TOKENS}
    return ids, tok.get_vocab_size(with_added_tokens=True)


def _grow_vocab(state: dict[str, torch.Tensor], cfg: LLMConfig, vocab: int) -> None:
    """Grow embedding (and untied head) rows to `vocab`; new rows start at the mean of the old ones."""
    if vocab <= cfg.vocab_size:
        return
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in state:
            w = state[key]
            state[key] = torch.cat([w, w.float().mean(0, keepdim=True).to(w.dtype).expand(vocab - w.shape[0], -1)])
    cfg.vocab_size = vocab


def compose(vision_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, *, select_layer: int = -1,
            seed: int = 0, **config_overrides) -> Path:
    """Build a SAIL-VL2 directory from an AIMv2 vision directory and a Qwen3 LLM directory."""
    from ..model.vlm import SailVL

    vision_dir, llm_dir, out = Path(vision_dir), Path(llm_dir), Path(out_dir)
    vcfg, vstate = import_aimv2(vision_dir)
    lcfg, lstate = import_qwen3(llm_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids, vocab = _add_image_tokens(llm_dir, out)
    _grow_vocab(lstate, lcfg, vocab)
    cfg = SailVLConfig(vision_config=vcfg, llm_config=lcfg, select_layer=select_layer,
                       img_context_token_id=ids["<IMG_CONTEXT>"], **config_overrides)
    torch.manual_seed(seed)
    model = SailVL(cfg)  # random init; the adapter keeps it, the towers are overwritten below
    dtype = next(iter(lstate.values())).dtype
    adapter = {k: v.to(dtype) for k, v in model.state_dict().items() if k.startswith("mlp1.")}
    load_state_strict(model, {**vstate, **lstate, **adapter}, where="composed model", dtype=dtype)
    model.save_pretrained(out)
    return out
