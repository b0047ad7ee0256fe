"""SailVL: ViT -> pixel shuffle + MLP adapter -> scatter into the `<IMG_CONTEXT>` embedding rows -> Qwen3 LLM.

Letters: B batch, L length, E LLM width, V vocab, P image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SailVLConfig
from .adapter import adapt, make_mlp1
from .attention import KVCache, segment_ids
from .llm import Qwen3ForCausalLM
from .moe import Experts, expert_load, load_balancing_loss, router_z_loss
from .vit import VisionTransformer

IGNORE_INDEX = -100


@dataclass
class SailVLOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    router_logits: list[torch.Tensor] = field(default_factory=list)
    hidden: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None  # the tokens the router statistics count (None: all)

    def expert_load(self, num_experts: int, top_k: int):
        """Per-layer expert-load fractions [layers, E] and normalised entropies [layers] (padding excluded)."""
        return expert_load(self.router_logits, num_experts, top_k, self.token_mask)


class SailVL(nn.Module):
    def __init__(self, config: SailVLConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision_config)
        self.mlp1 = make_mlp1(config.vision_config.hidden_size, config.llm_config.hidden_size, config.downsample_ratio)
        self.language_model = Qwen3ForCausalLM(config.llm_config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None) -> None:
        """Normal(0, std) linears / convs / embeddings / experts, unit norms, zero biases; `std` defaults to each
        tower's `initializer_range` (the adapter takes the LLM's)."""
        if std is None:
            v, lm = self.config.vision_config.initializer_range, self.config.llm_config.initializer_range
            self._init_modules(self.vision_model, v)
            self._init_modules(self.mlp1, lm)
            self._init_modules(self.language_model, lm)
            if hasattr(self.vision_model.preprocessor, "pos_embed"):
                nn.init.normal_(self.vision_model.preprocessor.pos_embed, std=v)
            return
        self._init_modules(self, std)
        if hasattr(self.vision_model.preprocessor, "pos_embed"):
            nn.init.normal_(self.vision_model.preprocessor.pos_embed, std=std)

    @staticmethod
    @torch.no_grad()
    def _init_modules(root: nn.Module, std: float) -> None:
        for m in root.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, Experts):
                for p in m.parameters():
                    nn.init.normal_(p, std=std)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight), nn.init.zeros_(m.bias)
            elif hasattr(m, "weight") and isinstance(m.weight, nn.Parameter) and m.weight.dim() == 1:
                nn.init.ones_(m.weight)  # RMSNorm

    # ----------------------------------------------------------------------------------------- vision
    def encode_images(self, pixel_values: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """Images -> LLM-space tokens [P, E], in image order.

        pixel_values: [N, C, H, W] tiles of one size, or (native-resolution ViT) a list of [C, H_i, W_i]."""
        vit, sel, ratio = self.vision_model, self.config.select_layer, self.config.downsample_ratio
        pos = self.config.visual_position_code
        p = self.config.vision_config.patch_size
        dtype = self.mlp1[1].weight.dtype
        if isinstance(pixel_values, torch.Tensor):
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be [N, C, H, W], got shape {tuple(pixel_values.shape)}")
            feats = vit(pixel_values.to(dtype), select_layer=sel)
            grid = (pixel_values.shape[2] // p, pixel_values.shape[3] // p)
            return adapt(self.mlp1, feats, grid, ratio, pos).reshape(-1, self.config.llm_config.hidden_size)
        feats_PD, grids = vit.forward_packed([img.to(dtype) for img in pixel_values], select_layer=sel)
        out, start = [], 0
        for h, w in grids:
            out.append(adapt(self.mlp1, feats_PD[start:start + h * w][None], (h, w), ratio, pos)[0])
            start += h * w
        return torch.cat(out)

    def embed(self, input_ids: torch.Tensor, pixel_values=None, image_embeds: torch.Tensor | None = None):
        x_BLE = self.language_model.model.embed_tokens(input_ids)
        if pixel_values is None and image_embeds is None:
            return x_BLE
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        ctx_id = self.config.img_context_token_id
        if ctx_id is None:
            raise ValueError("images were given but config.img_context_token_id is not set")
        is_img = input_ids == ctx_id
        n_slots = int(is_img.sum())
        if n_slots != image_embeds.shape[0]:
            raise ValueError(
                f"the prompt has {n_slots} <IMG_CONTEXT> tokens but the images give {image_embeds.shape[0]} tokens"
            )
        return x_BLE.masked_scatter(is_img[..., None], image_embeds.to(x_BLE.dtype))

    # ---------------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | list[torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cache: KVCache | None = None,
        image_embeds: torch.Tensor | None = None,
        logits_to_keep: int | None = None,
        compute_logits: bool = True,
        token_mask: torch.Tensor | None = None,
    ) -> SailVLOutput:
        """Token ids [B, L] (+ images) -> logits [B, L, V]; `labels` (aligned with input_ids, -100 = ignore)
        give the next-token cross-entropy `loss` (plus the MoE aux / z losses). `attention_mask` [B, L]
        marks real tokens of a padded batch; `cu_seqlens` marks the samples of packed rows (cumulative lengths
        over the B*L tokens, row-major; no sample crosses a row end). `compute_logits=False` returns only the
        final hidden states (training computes the head at labelled positions: `labelled_token_losses`).
        `token_mask` [B, L] (packed rows: False on padding) keeps padding out of the MoE router statistics."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids, pixel_values, image_embeds)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()
            if position_ids is None and cache is None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        lm = self.language_model
        out = lm(inputs_embeds=x, position_ids=position_ids, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                 key_mask_BS=key_mask, cache=cache, logits_to_keep=None if labels is not None else logits_to_keep,
                 compute_logits=compute_logits or labels is not None)
        result = SailVLOutput(logits=out.logits, router_logits=out.router_logits, hidden=out.hidden)
        cfg = self.config.llm_config
        if labels is not None:
            result.lm_loss = self.lm_loss(out.logits, labels, cu_seqlens)
            result.loss = result.lm_loss
        if out.router_logits:
            mask = attention_mask if attention_mask is not None else token_mask
            mask = mask.reshape(-1) if mask is not None else None
            result.token_mask = mask
            result.aux_loss = load_balancing_loss(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, mask)
            result.z_loss = router_z_loss(out.router_logits)
            if result.loss is not None:
                result.loss = result.loss + cfg.router_aux_loss_coef * result.aux_loss
                if cfg.router_z_loss_coef:
                    result.loss = result.loss + cfg.router_z_loss_coef * result.z_loss
        return result

    @staticmethod
    def token_losses(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """Next-token cross-entropy per position [B, L-1] (0 where ignored); position t predicts labels[t+1].
        Never predicts across packed samples."""
        target = labels_BL[:, 1:].clone()
        if cu_seqlens is not None:
            seg = segment_ids(cu_seqlens, labels_BL.numel()).view(labels_BL.shape)
            target[seg[:, 1:] != seg[:, :-1]] = IGNORE_INDEX
        ce = F.cross_entropy(logits_BLV[:, :-1].float().flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
        return ce.view(target.shape), target != IGNORE_INDEX

    def labelled_token_losses(self, hidden_BLD: torch.Tensor, labels_BL: torch.Tensor,
                              cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`token_losses` computed from the final hidden states at the labelled positions only: the LM head
        and the softmax run on those N positions instead of all B*L (in SFT most tokens carry no label).
        Returns (cross-entropy [N], the positions' mask [B, L-1]); the values equal token_losses' at the mask."""
        target = labels_BL[:, 1:].clone()
        if cu_seqlens is not None:
            seg = segment_ids(cu_seqlens, labels_BL.numel()).view(labels_BL.shape)
            target[seg[:, 1:] != seg[:, :-1]] = IGNORE_INDEX
        valid = target != IGNORE_INDEX
        logits_NV = F.linear(hidden_BLD[:, :-1][valid], self.language_model.head_weight)
        return F.cross_entropy(logits_NV.float(), target[valid], reduction="none"), valid

    @classmethod
    def lm_loss(cls, logits_BLV: torch.Tensor, labels_BL: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
        """Mean next-token cross-entropy over labelled tokens; never predicts across packed samples."""
        ce, valid = cls.token_losses(logits_BLV, labels_BL, cu_seqlens)
        return ce.sum() / valid.sum().clamp_min(1)

    # ------------------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB") -> None:
        from ..checkpoint.hf import save_pretrained

        save_pretrained(self, path, max_shard_size=max_shard_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> SailVL:
        from ..checkpoint.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.mlp1[1].weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mlp1[1].weight.dtype
