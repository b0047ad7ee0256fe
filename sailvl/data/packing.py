"""Online stream packing (SAIL-VL2 section "stream packing"): samples from a loader are packed into rows of
exactly `max_len` tokens with per-sample positions and block-diagonal attention, so no compute is spent on
padding and no sample sees another.

    packer = StreamPacker(loader, max_len=4096, rows_per_step=1, buffer_size=64, loss_weighting="sqrt")
    for batch in packer:                                  # one PackedBatch per optimizer micro-step
        batch = batch.to("cuda", torch.bfloat16)
        out = model(batch.input_ids, pixel_values=batch.pixel_values, position_ids=batch.position_ids,
                    cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        loss = weighted_lm_loss(out.logits, batch.labels, batch.loss_weights, batch.cu_seqlens)
    state = packer.state_dict()                           # JSON-serialisable; load_state_dict resumes exactly

Packing rule (deterministic): before every row the buffer is refilled from `loader.with_refs()` up to
`buffer_size` samples. A row starts with a leader: the oldest buffered sample if it has waited
`max_wait_rows` rows or more since it entered the buffer (so no sample waits forever), else the LONGEST
buffered sample (so long samples never starve: a long sample leads the very next row after it enters the
buffer unless an overdue sample leads that row, and then it is the best fit of the rest of that row or
leads a later one). The rest of the row is filled best-fit: repeatedly the longest buffered sample that
fits the remaining space (ties: the oldest). What is left of the row becomes one padding segment at its
end (pad_id, labels -100, weight 0, positions from 0, its own `cu_seqlens` entry, so padding and real
tokens never attend to each other). Only the last rows of a stream can be mostly padding; the last step
of a finite stream may have fewer than `rows_per_step` rows.

A step's rows are concatenated into ONE packed sequence [1, rows_per_step * max_len]; `cu_seqlens` marks
every sample and every padding segment. Every row is exactly `max_len` tokens and no segment crosses a row
end, so `t.reshape(-1, max_len)` gives the same data as [rows, max_len] with the same `cu_seqlens` (cheaper
for a dense-mask attention: rows * max_len^2 instead of (rows * max_len)^2). Images follow the sequence order of their `<IMG_CONTEXT>` tokens
(tiles: one [tiles, 3, S, S] tensor; native resolution: a list of [3, H, W]), which is the order SailVL
scatters image features in.

Loss weighting (InternVL's averaging rules): `loss_weights` holds a per-token weight, 0 on every token
that is not trained, on the first token of every sample (nothing in the sample predicts it) and on
padding. With the step loss sum(w * ce) / sum(w) (`weighted_lm_loss`): "token" (w = 1) averages over
tokens, "sample" (w = 1/n, n = the sample's trained tokens) gives every sample the same total weight,
"sqrt" (w = 1/sqrt(n)) is in between.

Resume format (`state_dict`, JSON-serialisable): {"version", "max_len", "rows_per_step", "buffer_size",
"max_wait_rows", "loss_weighting", "pad_id", "loader": loader.state_dict(), "buffer": [{"ref": [source,
index], "born": row}...] in arrival order, "counters": {...}}. `load_state_dict` restores the loader and
rebuilds the buffered items with `loader.reread(ref)`, so a fresh packer over a fresh loader yields exactly
the batches the uninterrupted packer would have yielded next (the item processing must be deterministic).

Visual packing (`assign_rows_to_ranks`): rows of a global step are spread over data-parallel ranks greedily,
most vision tokens first, onto the least-loaded rank, so the ViT work per device is balanced. With
`balance=(rank, world_size)` every rank packs the same global stream (its loader must be the unsharded one,
identical on every rank) into `rows_per_step * world_size` rows per step and assembles only its share; the
rows of all ranks together are exactly the rows one unbalanced packer with `rows_per_step * world_size`
yields. The price is that every rank reads and preprocesses the whole global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .processor import IGNORE_INDEX

STATE_VERSION = 1
WEIGHTINGS = ("token", "sample", "sqrt")


# ------------------------------------------------------------------------------------------------ batch
@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, N] long
    labels: torch.Tensor  # [1, N] long, -100 where not trained and on padding
    position_ids: torch.Tensor  # [1, N] long, from 0 in every sample and padding segment
    cu_seqlens: torch.Tensor  # [S+1] int32, boundaries of every sample and padding segment
    max_seqlen: int
    loss_weights: torch.Tensor  # [1, N] float32
    pixel_values: torch.Tensor | list[torch.Tensor] | None
    num_samples: int
    num_pad: int
    num_tokens: int  # real (non-pad) tokens
    num_image_tokens: int
    refs: list[tuple[int, int]] = field(default_factory=list)  # loader refs of the samples, in sequence order
    token_mask: torch.Tensor | None = None  # [1, N] bool, True on sample tokens, False on padding
    focus: torch.Tensor | None = None  # [1, N] int8 attention-supervision marks (data.focus), None if no sample has any

    def to(self, device, dtype: torch.dtype | None = None) -> PackedBatch:
        """A copy on `device`; `dtype` (if given) applies to pixel_values only."""
        def move(t: torch.Tensor, cast: bool = False) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if cast and dtype is not None else t.dtype)

        pv = self.pixel_values
        if isinstance(pv, torch.Tensor):
            pv = move(pv, True)
        elif pv is not None:
            pv = [move(p, True) for p in pv]
        return PackedBatch(move(self.input_ids), move(self.labels), move(self.position_ids), move(self.cu_seqlens),
                           self.max_seqlen, move(self.loss_weights), pv, self.num_samples, self.num_pad,
                           self.num_tokens, self.num_image_tokens, list(self.refs),
                           None if self.token_mask is None else move(self.token_mask),
                           None if self.focus is None else move(self.focus))

    @property
    def segment_lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()


# ------------------------------------------------------------------------------------------- loss weights
def loss_weights_for(labels: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-token weights [L] (float32) of ONE sample's labels [L]: "token" 1, "sample" 1/n, "sqrt" 1/sqrt(n)
    on each of its n trained tokens, 0 elsewhere. The first token counts as untrained: no token of the
    sample predicts it (a packed loss never predicts across samples)."""
    if mode not in WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {mode!r}")
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels of one sample must be 1-D, got shape {tuple(labels.shape)}")
    trained = labels != IGNORE_INDEX
    if trained.numel():
        trained[0] = False
    n = int(trained.sum())
    w = trained.to(torch.float32)
    if n and mode == "sample":
        w /= n
    elif n and mode == "sqrt":
        w /= math.sqrt(n)
    return w


def weighted_lm_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, weights_BL: torch.Tensor,
                     cu_seqlens: torch.Tensor | None = None, reduction: str = "mean"):
    """sum(w * ce) / sum(w) of next-token cross-entropy, label t (and its weight) predicted at t-1, never
    across packed samples. reduction="sum" returns (sum(w * ce), sum(w)) for accumulation over micro-steps
    and ranks (divide the global sums)."""
    target = labels_BL[:, 1:]
    w = weights_BL[:, 1:].to(torch.float32) * (target != IGNORE_INDEX)
    if cu_seqlens is not None:
        from ..model.attention import segment_ids

        seg = segment_ids(cu_seqlens, labels_BL.shape[1])
        w = w * (seg[1:] == seg[:-1])
    ce = F.cross_entropy(logits_BLV[:, :-1].float().flatten(0, 1), target.clamp_min(0).flatten(), reduction="none")
    total, weight = (ce * w.flatten()).sum(), w.sum()
    if reduction == "sum":
        return total, weight
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    return total / weight.clamp_min(torch.finfo(torch.float32).tiny)


# -------------------------------------------------------------------------------------------- bin packing
def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """First-fit-decreasing: item indices per row (rows in opening order; within a row, longest first).
    Every index is placed once; a length > max_len is a ValueError."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    for i, n in enumerate(lengths):
        if n > max_len:
            raise ValueError(f"item {i} has length {n} > max_len {max_len}")
        if n < 0:
            raise ValueError(f"item {i} has negative length {n}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        for r, space in enumerate(free):
            if lengths[i] <= space:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max_len - lengths[i])
    return rows


def assign_rows_to_ranks(rows_vision_tokens: list[int], world_size: int) -> list[list[int]]:
    """Visual packing: row indices per rank, greedy most-vision-tokens-first onto the least-loaded rank
    (ties: the lower rank) among ranks that still have room; every rank gets ceil(n / world_size) or
    fewer rows so each does the same number of micro-steps when n is a multiple of world_size. Each
    rank's rows come back in increasing index order."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n = len(rows_vision_tokens)
    cap = -(-n // world_size) if n else 0
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(n), key=lambda j: (-rows_vision_tokens[j], j)):
        r = min((r for r in range(world_size) if len(out[r]) < cap), key=lambda r: (load[r], r))
        out[r].append(i)
        load[r] += rows_vision_tokens[i]
    return [sorted(x) for x in out]


# ------------------------------------------------------------------------------------------------ packer
@dataclass
class _Entry:
    ref: tuple[int, int]
    born: int  # rows emitted when it entered the buffer
    item: dict
    length: int


class StreamPacker:
    """Packs `loader.with_refs()` items (Processor dicts) into PackedBatches; see the module doc."""

    def __init__(self, loader, max_len: int, rows_per_step: int = 1, buffer_size: int = 64,
                 loss_weighting: str = "token", pad_id: int = 0, max_wait_rows: int = 32,
                 balance: tuple[int, int] | None = None):
        for name, v in (("max_len", max_len), ("rows_per_step", rows_per_step), ("buffer_size", buffer_size),
                        ("max_wait_rows", max_wait_rows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if loss_weighting not in WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {WEIGHTINGS}, got {loss_weighting!r}")
        self.loader = loader
        self.max_len, self.rows_per_step, self.buffer_size = max_len, rows_per_step, buffer_size
        self.loss_weighting, self.pad_id, self.max_wait_rows = loss_weighting, int(pad_id), max_wait_rows
        if balance is not None:
            rank, world = balance
            if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
                raise ValueError(f"balance must be (rank, world_size) with 0 <= rank < world_size, got {balance!r}")
        self.balance = balance
        self._buffer: list[_Entry] = []
        self._source: Iterator | None = None
        self._exhausted = False
        self._counters = {"steps": 0, "rows": 0, "samples": 0, "tokens": 0, "pad_tokens": 0, "image_tokens": 0}

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[PackedBatch]:
        """Yields from the current position (a packer is one stream; a second `iter` continues it)."""
        world = self.balance[1] if self.balance is not None else 1
        while True:
            rows = []
            for _ in range(self.rows_per_step * world):
                self._refill()
                if not self._buffer:
                    break
                rows.append(self._next_row())
            if not rows:
                return
            full = len(rows) == self.rows_per_step * world
            if len(rows) < world:  # a finite stream's last rows cannot give every rank one: all ranks stop
                return
            if self.balance is not None:  # visual packing: this rank's share of the global step's rows
                vision = [sum(int(e.item.get("num_image_tokens", 0) or 0) for e in row) for row in rows]
                rows = [rows[i] for i in assign_rows_to_ranks(vision, world)[self.balance[0]]]
            yield self._assemble(rows)
            if not full:
                return

    def _refill(self) -> None:
        if self._source is None:
            self._source = iter(self.loader.with_refs())
        while not self._exhausted and len(self._buffer) < self.buffer_size:
            try:
                ref, item = next(self._source)
            except StopIteration:
                self._exhausted = True
                break
            self._buffer.append(self._entry(ref, item, self._counters["rows"]))

    def _entry(self, ref, item: dict, born: int) -> _Entry:
        n = len(item["input_ids"])
        if n > self.max_len:
            raise ValueError(f"sample {tuple(ref)} has {n} tokens > packing max_len {self.max_len}; set the "
                             f"processor's max_length ({n} here) to at most max_len {self.max_len}")
        if n == 0:
            raise ValueError(f"sample {tuple(ref)} has no tokens")
        return _Entry((int(ref[0]), int(ref[1])), born, item, n)

    def _next_row(self) -> list[_Entry]:
        """Take one row's samples out of the buffer (leader, then best-fit)."""
        buf, now = self._buffer, self._counters["rows"]
        if now - buf[0].born >= self.max_wait_rows:  # buffer is in arrival order: buf[0] is the oldest
            lead = 0
        else:
            lead = max(range(len(buf)), key=lambda i: (buf[i].length, -i))
        row = [buf.pop(lead)]
        space = self.max_len - row[0].length
        while space and buf:
            best = -1
            for i, e in enumerate(buf):
                if e.length <= space and (best < 0 or e.length > buf[best].length):
                    best = i
                    if e.length == space:
                        break
            if best < 0:
                break
            space -= buf[best].length
            row.append(buf.pop(best))
        self._counters["rows"] += 1
        return row

    def _assemble(self, rows: list[list[_Entry]]) -> PackedBatch:
        ids, labels, pos, weights, seglens, pixels, real, focus = [], [], [], [], [], [], [], []
        mode, n_img, n_pad, n_real, n_samples, refs = None, 0, 0, 0, 0, []
        for row in rows:
            used = 0
            for e in row:
                it = e.item
                refs.append(e.ref)
                lab = torch.as_tensor(it["labels"], dtype=torch.long)
                ids.append(torch.as_tensor(it["input_ids"], dtype=torch.long))
                labels.append(lab)
                pos.append(torch.arange(e.length))
                marks = it.get("focus")
                focus.append((e.length, None if marks is None else torch.as_tensor(marks, dtype=torch.int8)))
                weights.append(loss_weights_for(lab, self.loss_weighting))
                seglens.append(e.length)
                used += e.length
                n_img += int(it.get("num_image_tokens", 0) or 0)
                pv = it.get("pixel_values")
                if pv is not None:
                    kind = "tiles" if isinstance(pv, torch.Tensor) else "native"
                    if mode is not None and kind != mode:
                        raise ValueError("cannot pack tiles-mode and native-mode pixel_values together")
                    mode = kind
                    pixels.extend([pv] if kind == "tiles" else list(pv))
            n_real += used
            n_samples += len(row)
            real.append(torch.ones(used, dtype=torch.bool))
            if pad := self.max_len - used:
                real.append(torch.zeros(pad, dtype=torch.bool))
                ids.append(torch.full((pad,), self.pad_id, dtype=torch.long))
                labels.append(torch.full((pad,), IGNORE_INDEX, dtype=torch.long))
                pos.append(torch.arange(pad))
                focus.append((pad, None))
                weights.append(torch.zeros(pad))
                seglens.append(pad)
                n_pad += pad
        cu = torch.zeros(len(seglens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seglens).cumsum(0)
        pixel_values = None if mode is None else (torch.cat(pixels) if mode == "tiles" else pixels)
        marks = None  # only built when some sample has marks (the usual batch has none)
        if any(m is not None for _, m in focus):
            marks = torch.cat([torch.zeros(n, dtype=torch.int8) if m is None else m for n, m in focus])[None]
        c = self._counters
        c["steps"] += 1
        c["samples"] += n_samples
        c["tokens"] += n_real
        c["pad_tokens"] += n_pad
        c["image_tokens"] += n_img
        return PackedBatch(torch.cat(ids)[None], torch.cat(labels)[None], torch.cat(pos)[None], cu, max(seglens),
                           torch.cat(weights)[None], pixel_values, n_samples, n_pad, n_real, n_img, refs,
                           torch.cat(real)[None], marks)

    # ------------------------------------------------------------------------------------------ stats / state
    @property
    def stats(self) -> dict:
        """{"steps", "rows", "samples", "tokens" (real), "pad_tokens", "image_tokens", "padding_fraction",
        "buffered"} over everything yielded so far."""
        c = dict(self._counters)
        total = c["tokens"] + c["pad_tokens"]
        c["padding_fraction"] = c["pad_tokens"] / total if total else 0.0
        c["buffered"] = len(self._buffer)
        return c

    def state_dict(self) -> dict:
        """Where the stream stands after the last yielded batch (JSON-serialisable; see the module doc)."""
        return {"version": STATE_VERSION, **self._settings(), "loader": self.loader.state_dict(),
                "buffer": [{"ref": list(e.ref), "born": e.born} for e in self._buffer],
                "exhausted": self._exhausted, "counters": dict(self._counters)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (the packing settings must match; the loader must be the same mixture)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a StreamPacker state (version {STATE_VERSION})")
        for k, v in self._settings().items():
            if state.get(k) != v:
                raise ValueError(f"packer state has {k}={state.get(k)!r}, this packer {k}={v!r}")
        try:
            buffer_spec = [(tuple(b["ref"]), int(b["born"])) for b in state["buffer"]]
            counters = {k: int(state["counters"][k]) for k in self._counters}
            exhausted = bool(state.get("exhausted", False))
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"malformed packer state: {e}") from None
        self.loader.load_state_dict(state["loader"])
        self._buffer = [self._entry(ref, self.loader.reread(ref), born) for ref, born in buffer_spec]
        self._counters, self._exhausted, self._source = counters, exhausted, None

    def _settings(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "rows_per_step": self.rows_per_step, "buffer_size": self.buffer_size,
                "max_wait_rows": self.max_wait_rows, "loss_weighting": self.loss_weighting, "pad_id": self.pad_id}
