"""Typed configs for the SAIL-VL2 model, and their mapping to the checkpoint's config.json.

The on-disk format is the SAIL-VL2 layout (shared/SAILVL2.md section 2): a top-level dict with
`architectures: ["SAILVLModel"]`, a `vision_config` (AIMv2-style field names) and an `llm_config` that is a
complete transformers-style Qwen3 / Qwen3-MoE config. `from_dict` accepts the field spellings that
different transformers versions write (`num_experts` / `num_local_experts`, `rope_theta` /
`rope_parameters`), `to_dict` writes one canonical form.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VisionConfig", "LLMConfig", "SailVLConfig", "apply_overrides"]


def _known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class VisionConfig:
    """SAIL-ViT / AIMv2 vision tower. `position_embedding` picks the mode:
    "learned": fixed grid of learned absolute embeddings (bicubic-interpolated for other grids);
    "rope2d": native any-resolution, 2D rotary embedding on the head dim, packed variable-size images."""

    hidden_size: int = 1536
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    use_bias: bool = False  # bias on attn proj and MLP linears
    position_embedding: str = "learned"
    rope_theta: float = 10000.0
    # rope2d only: grids larger than this (in patches per side) get positions scaled into it.
    rope_max_grid: int | None = None
    initializer_range: float = 0.02  # std of the normal init of a fresh model (HF's name)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.position_embedding not in ("learned", "rope2d"):
            raise ValueError(f"vision position_embedding must be 'learned' or 'rope2d', got {self.position_embedding!r}")
        if self.position_embedding == "rope2d" and self.head_dim % 4:
            raise ValueError(f"rope2d needs a vision head_dim divisible by 4, got {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "aimv2", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        d = dict(d)
        if d.get("is_native") and "position_embedding" not in d:
            raise ValueError(
                "AIMv2 'native' checkpoints use fixed 2D sin-cos embeddings, which sailvl does not implement; "
                "use a fixed-resolution AIMv2 (is_native=false) or a rope2d SAIL-ViT config"
            )
        if "mlp_bias" in d and "use_bias" not in d:
            d["use_bias"] = d["mlp_bias"]
        return cls(**_known(cls, d))


@dataclass
class LLMConfig:
    """Qwen3 decoder; `num_experts > 0` makes it Qwen3-MoE (sparse blocks per `decoder_sparse_step`)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 6144
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02  # std of the normal init of a fresh model (HF's name)
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # Mixture of experts (Qwen3-MoE); dense when num_experts == 0.
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {self.hidden_act!r}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} must be in 1..{self.num_experts}")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, i: int) -> bool:
        return self.is_moe and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def to_dict(self) -> dict[str, Any]:
        """A transformers-style Qwen3 / Qwen3-MoE config dict."""
        d = dataclasses.asdict(self)
        if self.is_moe:
            d.update(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
        else:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                      "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "router_z_loss_coef"):
                d.pop(k)
            d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMConfig:
        d = dict(d)
        model_type = d.get("model_type", "qwen3")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"llm_config model_type must be 'qwen3' or 'qwen3_moe', got {model_type!r}")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"unsupported RoPE scaling {rope!r}; only the default RoPE is implemented")
        if "rope_theta" not in d and "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if d.get("use_sliding_window"):
            raise ValueError("sliding-window attention is not supported (use_sliding_window=true)")
        if model_type == "qwen3_moe":
            d.setdefault("num_experts", d.get("num_local_experts", 0))
            if not d["num_experts"]:
                raise ValueError("a qwen3_moe llm_config needs num_experts > 0")
        else:
            d["num_experts"] = 0
        if d.get("head_dim") is None:
            d["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        return cls(**_known(cls, d))


@dataclass
class SailVLConfig:
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    llm_config: LLMConfig = field(default_factory=LLMConfig)
    downsample_ratio: float = 0.5
    # Which ViT hidden state feeds the adapter: -1 is the final (post-norm) output; any other index picks
    # from [embeddings, block 1, ..., block L] without the final norm (InternVL / SAIL-VL convention).
    select_layer: int = -1
    ps_version: str = "v2"
    template: str = "sailvl2"
    force_image_size: int | None = None
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 10
    img_context_token_id: int | None = None
    torch_dtype: str = "float32"
    # sailvl's own option, not in SAIL-VL2 (0 = off, the published models): add a fixed 2-D code of each visual
    # token's place to the adapter's output, at this share of the token's RMS (sailvl.model.adapter.adapt). The
    # tiny recipe's from-scratch tower does not tell the LLM where things are; SAIL-VL2's pretrained one does.
    visual_position_code: float = 0.0

    def __post_init__(self):
        if self.visual_position_code < 0:
            raise ValueError(f"visual_position_code must be >= 0, got {self.visual_position_code}")
        if self.downsample_ratio != 0.5:
            raise ValueError(f"only downsample_ratio 0.5 (2x2 pixel shuffle) is supported, got {self.downsample_ratio}")
        if self.ps_version != "v2":
            raise ValueError(f"only ps_version 'v2' is supported, got {self.ps_version!r}")
        n = self.vision_config.num_hidden_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"select_layer {self.select_layer} out of range for a {n}-block ViT")
        if self.force_image_size is None:
            self.force_image_size = self.vision_config.image_size

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision_config.grid_size**2 * self.downsample_ratio**2)

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in (f.name for f in dataclasses.fields(self))}
        d["vision_config"] = self.vision_config.to_dict()
        d["llm_config"] = self.llm_config.to_dict()
        return {"architectures": ["SAILVLModel"], "model_type": "sailvl", **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SailVLConfig:
        arch = d.get("architectures") or ["SAILVLModel"]
        if "SAILVLModel" not in arch:
            raise ValueError(f"config.json architectures {arch} is not SAILVLModel")
        for key in ("vision_config", "llm_config"):
            if key not in d:
                raise ValueError(f"config.json has no {key!r}")
        rest = _known(cls, d)
        rest["vision_config"] = VisionConfig.from_dict(d["vision_config"])
        rest["llm_config"] = LLMConfig.from_dict(d["llm_config"])
        if "torch_dtype" not in d and "dtype" in d:
            rest["torch_dtype"] = d["dtype"]
        return cls(**rest)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SailVLConfig:
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)


def _children(obj: Any) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    if isinstance(obj, dict):
        return [str(k) for k in obj]
    if isinstance(obj, list):
        return [str(i) for i in range(len(obj))] + [str(getattr(x, "name")) for x in obj if hasattr(x, "name")]
    return []


def _unknown(path: str, part: str, obj: Any) -> ValueError:
    import difflib

    close = difflib.get_close_matches(part, _children(obj), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; known: {_children(obj)[:20]}"
    return ValueError(f"unknown config key {path!r} (no {part!r}){hint}")


def _child(obj: Any, part: str, path: str) -> Any:
    if isinstance(obj, list):
        if part.lstrip("-").isdigit() and -len(obj) <= int(part) < len(obj):
            return obj[int(part)]
        for x in obj:  # list items with a name (stages) are addressable by it
            if getattr(x, "name", None) == part:
                return x
        raise _unknown(path, part, obj)
    if isinstance(obj, dict):
        if part not in obj:
            raise _unknown(path, part, obj)
        return obj[part]
    if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
        raise _unknown(path, part, obj)
    return getattr(obj, part)


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply dotted `a.b.c=value` overrides in place. Values parse as JSON (numbers, booleans, lists, null),
    else stay strings. Path parts address dataclass fields, dict keys (a new key may be added to a dict),
    list indices, or list items by their `name` (e.g. `stages.warmup.steps=10`). An unknown key is a
    ValueError suggesting the closest known ones."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = path.split(".")
        obj = cfg
        for part in parents:
            obj = _child(obj, part, path)
        if isinstance(obj, dict):
            obj[leaf] = value
        elif isinstance(obj, list):
            target = _child(obj, leaf, path)
            obj[obj.index(target)] = value
        else:
            _child(obj, leaf, path)  # existence check with suggestions
            setattr(obj, leaf, value)
    return cfg


def tiny_config(vocab_size: int = 512, moe: bool = False, native: bool = False, **overrides) -> SailVLConfig:
    """A few-hundred-thousand-parameter model for tests and the CPU demo (64 px tiles, patch 8 -> 16 tokens)."""
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          image_size=64, patch_size=8,
                          position_embedding="rope2d" if native else "learned", rope_max_grid=16 if native else None)
    llm = LLMConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                    max_position_embeddings=4096, tie_word_embeddings=not moe)
    if moe:
        llm.num_experts, llm.num_experts_per_tok, llm.moe_intermediate_size = 8, 2, 32
    return SailVLConfig(vision_config=vision, llm_config=llm, **overrides)
