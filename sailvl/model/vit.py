"""SAIL-ViT / AIMv2-style vision encoder.

Features:
  - Conv2d patchify (with bias) -> RMSNorm -> learned absolute position embedding, bicubic-interpolated
    when the patch grid differs from the trained one ("learned" mode);
  - native any-resolution ("rope2d" mode): no absolute embedding, 2D RoPE on the head dim (row half,
    column half), images of different sizes packed into one sequence with block-diagonal attention;
  - pre-norm blocks: fused qkv + proj, SwiGLU MLP (silu(fc1 x) * fc3 x -> fc2), final RMSNorm;
  - the adapter's feature is taken at `select_layer`; blocks after it are not computed.

Module names follow the SAIL-VL2 checkpoint (`preprocessor.patchifier.proj`, `trunk.blocks.{i}.attn.qkv`, ...).
Letters: N images, T tokens per image, D width, H heads, K head dim, P packed tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from .attention import attention
from .norm import RMSNorm
from .rope import apply_rope2d, grid_positions, rope2d_cos_sin


class Patchifier(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=True)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(pixels_NCHW).flatten(2).transpose(1, 2))


class Preprocessor(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patchifier = Patchifier(cfg)
        if cfg.position_embedding == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, cfg.hidden_size))

    def position_embedding(self, h: int, w: int) -> torch.Tensor:
        g = self.cfg.grid_size
        if (h, w) == (g, g):
            return self.pos_embed
        grid_1DGG = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid_1Dhw = F.interpolate(grid_1DGG.float(), size=(h, w), mode="bicubic", align_corners=False)
        return grid_1Dhw.to(self.pos_embed.dtype).flatten(2).transpose(1, 2)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        x_NTD = self.patchifier(pixels_NCHW)
        if self.cfg.position_embedding == "learned":
            p = self.cfg.patch_size
            x_NTD = x_NTD + self.position_embedding(pixels_NCHW.shape[2] // p, pixels_NCHW.shape[3] // p)
        return x_NTD


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x_BTD, rope=None, cu_seqlens=None, max_seqlen=None):
        B, T, D = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope2d(q, *rope), apply_rope2d(k, *rope)
        out_BHTK = attention(q, k, v, causal=False, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.proj(out_BHTK.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.use_bias)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.use_bias)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # under autocast these emit bf16 themselves: their only consumers are Linear layers (qkv; fc1 and fc3)
        self.norm_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, autocast_output=True)
        self.attn = Attention(cfg)
        self.norm_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, autocast_output=True)
        self.mlp = MLP(cfg)

    def forward(self, x, rope=None, cu_seqlens=None, max_seqlen=None):
        x = x + self.attn(self.norm_1(x), rope, cu_seqlens, max_seqlen)
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.post_trunk_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_ckpt = False  # activation checkpointing per block (training only)
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Trunk(cfg)

    def _run(self, x, select_layer, rope=None, cu_seqlens=None, max_seqlen=None, all_hidden=False):
        """Run blocks; return the selected feature (or every hidden state when all_hidden)."""
        n = len(self.trunk.blocks)
        # hidden states are indexed [embeddings, block 1, ..., block n]; -1 means the final normed output.
        stop = n if (all_hidden or select_layer == -1) else select_layer % (n + 1)
        hidden = [x]
        ckpt = self.grad_ckpt and torch.is_grad_enabled()
        for block in self.trunk.blocks[:stop]:
            if ckpt:
                x = checkpoint(block, x, rope, cu_seqlens, max_seqlen, use_reentrant=False)
            else:
                x = block(x, rope, cu_seqlens, max_seqlen)
            if all_hidden:
                hidden.append(x)
        if all_hidden:
            return hidden, self.trunk.post_trunk_norm(x)
        return self.trunk.post_trunk_norm(x) if select_layer == -1 else x

    def forward(self, pixels_NCHW: torch.Tensor, select_layer: int = -1, all_hidden: bool = False):
        """Same-size images [N, C, H, W] -> features [N, T, D] (T = patches, row-major)."""
        p = self.cfg.patch_size
        if pixels_NCHW.shape[2] % p or pixels_NCHW.shape[3] % p:
            raise ValueError(f"image size {tuple(pixels_NCHW.shape[2:])} is not a multiple of patch size {p}")
        x = self.preprocessor(pixels_NCHW)
        rope = None
        if self.cfg.position_embedding == "rope2d":
            rope = self._rope(pixels_NCHW.shape[2] // p, pixels_NCHW.shape[3] // p, x)
        return self._run(x, select_layer, rope=rope, all_hidden=all_hidden)

    def _rope(self, h, w, x):
        rows, cols = grid_positions(h, w, self.cfg.rope_max_grid, device=x.device)
        return rope2d_cos_sin(rows, cols, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)

    def forward_packed(self, images: list[torch.Tensor], select_layer: int = -1):
        """Native resolution: a list of [C, H_i, W_i] images -> (features [P, D], grids [(h_i, w_i)]).

        All images share one packed sequence; attention is block-diagonal per image, so each image's
        features equal those of the image run alone."""
        if self.cfg.position_embedding != "rope2d":
            raise ValueError("forward_packed needs a rope2d (native-resolution) vision config")
        p = self.cfg.patch_size
        tokens, grids, cos, sin = [], [], [], []
        for img in images:
            if img.dim() != 3 or img.shape[1] % p or img.shape[2] % p:
                raise ValueError(f"each image must be [C, H, W] with H, W multiples of {p}, got {tuple(img.shape)}")
            x = self.preprocessor(img[None])
            h, w = img.shape[1] // p, img.shape[2] // p
            c, s = self._rope(h, w, x)
            tokens.append(x[0]), grids.append((h, w)), cos.append(c[0]), sin.append(s[0])
        lengths = torch.tensor([h * w for h, w in grids], device=tokens[0].device)
        cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        x_1PD = torch.cat(tokens)[None]
        rope = (torch.cat(cos)[None], torch.cat(sin)[None])
        out = self._run(x_1PD, select_layer, rope=rope, cu_seqlens=cu_seqlens, max_seqlen=int(lengths.max()))
        return out[0], grids
