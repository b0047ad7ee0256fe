"""A weighted, deterministic, sharded and exactly resumable stream of samples over several `Source`s.

Notable features:
  - mixture: each step picks a source with probability proportional to its weight (numpy PCG64 generator
    seeded by (seed, rank, worker); its state is part of `state_dict`), then takes that source's next record;
  - shuffling: a source's order in epoch e is a permutation seeded by (seed, source name, e), the same on
    every rank; a source that runs out starts its next epoch with a new permutation;
  - sharding: rank r / worker w of R ranks x W workers takes every (R*W)-th element of each permutation,
    starting at r*W + w, so the shards of one epoch together cover each record exactly once;
  - skips: SkipSample raised by a source (bad record) or by `process` (too long, corrupt image, ...) is
    caught, counted and reported, and the loader moves on; `stats` always has read == used + skipped;
  - resume: `state_dict()` after k items (JSON-serialisable) and `load_state_dict` on a fresh loader yields
    exactly what the uninterrupted run would have yielded next, across epoch boundaries and skips;
  - no endless loops: a source that completes an epoch (of its shard) without one used record leaves the
    mixture with a warning; when no source is left, iteration ends.

Epoch rule: with `epochs=None` the stream is endless (sources restart as they run out). With `epochs=N`, a
source leaves the mixture as soon as its shard has completed N epochs, the remaining sources keep their
relative weights, and iteration ends once every source with a positive weight has left. So every record
of every source is read exactly N times over all shards; the mixture proportions hold until the first
source finishes. Sources of weight 0 are never read.

Skip report: with `report_dir`, each skip appends one JSON line {"source", "key", "reason", "epoch"} to
`report_dir/skipped.jsonl` (world_size 1, one worker), `skipped.rank{r}.jsonl` (several ranks, one worker
each) or `skipped.rank{r}.worker{w}.jsonl` (several workers), so no two processes share a file. After a
resume, skips between the checkpoint and the interruption are reported again (at-least-once).

`stats["skipped_by_reason"]` groups reasons by kind: the reason up to its first ':' with digit runs
replaced by 'N' ("missing image: a.png" -> "missing image"); the report keeps the full reason.
"""

from __future__ import annotations

import bisect
import copy
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np

from sailvl.data.schema import Sample, SkipSample
from sailvl.data.sources import Source

STATE_VERSION = 1
_ACTIVE, _FINISHED, _UNUSABLE = "active", "finished", "unusable"


@dataclass
class _Cursor:
    """Where one source stands in this shard: its epoch, the position in the epoch's shard order and its
    counters."""

    epoch: int = 0
    pos: int = 0
    used_in_epoch: int = 0
    status: str = _ACTIVE
    read: int = 0
    used: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)


class MixtureLoader:
    """Iterate `process(sample)` (or the Sample) over a weighted mixture of sources; see the module doc."""

    def __init__(self, sources: list[tuple[Source, float]], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 worker_id: int = 0, num_workers: int = 1, process: Callable[[Sample], Any] | None = None,
                 report_dir: str | Path | None = None, epochs: int | None = None):
        _check_layout(seed, rank, world_size, worker_id, num_workers, epochs)
        self.sources = [s for s, _ in sources]
        self.weights = _check_weights(self.sources, [w for _, w in sources])
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.worker_id, self.num_workers, self.epochs = worker_id, num_workers, epochs
        self.process = process
        self._shard, self._num_shards = rank * num_workers + worker_id, world_size * num_workers
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x4D4958, rank, worker_id])))
        self._cursors = [_Cursor() for _ in self.sources]
        self._orders: dict[int, tuple[int, np.ndarray]] = {}
        self._cumulative: dict[tuple[int, ...], list[float]] = {}  # active sources -> cumulative weights
        self.report_path = _report_path(report_dir, rank, world_size, worker_id, num_workers)

    # ------------------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[Any]:
        """Yields from the current position: a loader is one stream, a second `iter` continues it."""
        for _, item in self.with_refs():
            yield item

    def with_refs(self) -> Iterator[tuple[tuple[int, int], Any]]:
        """Like iteration, but yields (ref, item); `reread(ref)` rebuilds the item later (so a consumer that
        buffers items, like the packer, can checkpoint references instead of tensors)."""
        while (i := self._pick()) is not None:
            cur = self._cursors[i]
            index = int(self._order(i)[cur.pos])
            cur.pos += 1
            item, ok = self._fetch(i, index)
            self._settle(i)
            if ok:
                yield (i, index), item

    def reread(self, ref: tuple[int, int]) -> Any:
        """The item for a ref from `with_refs` again (no counting, no reporting)."""
        i, index = ref
        sample = self.sources[i].read(index)
        return sample if self.process is None else self.process(sample)

    def _fetch(self, i: int, index: int) -> tuple[Any, bool]:
        """(item, True), or (None, False) after counting and reporting a skip."""
        src, cur = self.sources[i], self._cursors[i]
        cur.read += 1
        try:
            sample = src.read(index)
            item = sample if self.process is None else self.process(sample)
        except SkipSample as e:
            self._skip(i, src.key(index), e.reason)
            return None, False
        cur.used += 1
        cur.used_in_epoch += 1
        return item, True

    def _pick(self) -> int | None:
        """The next source to read from (weighted draw over the active ones), or None when none is left."""
        live = [i for i in range(len(self.sources)) if self.weights[i] > 0]
        for i in live:
            self._settle(i)
        active = tuple(i for i in live if self._cursors[i].status == _ACTIVE)
        if not active:
            return None
        if (cum := self._cumulative.get(active)) is None:
            cum = self._cumulative[active] = list(accumulate(float(self.weights[i]) for i in active))
        j = bisect.bisect_right(cum, self._rng.random() * cum[-1])
        return active[min(j, len(active) - 1)]

    def _order(self, i: int) -> np.ndarray:
        """This shard's slice of source i's permutation for its current epoch (cached per epoch)."""
        epoch = self._cursors[i].epoch
        cached = self._orders.get(i)
        if cached is None or cached[0] != epoch:
            name_hash = int.from_bytes(hashlib.sha256(self.sources[i].name.encode()).digest()[:8], "little")
            perm = np.random.default_rng([self.seed, name_hash, epoch]).permutation(len(self.sources[i]))
            self._orders[i] = cached = (epoch, perm[self._shard::self._num_shards].copy())
        return cached[1]

    def _settle(self, i: int) -> None:
        """Close source i's epoch when its shard order is used up: next epoch, finished, or unusable."""
        cur = self._cursors[i]
        if cur.status != _ACTIVE or cur.pos < len(self._order(i)):
            return
        had_records, used = cur.pos > 0, cur.used_in_epoch
        cur.epoch, cur.pos, cur.used_in_epoch = cur.epoch + 1, 0, 0
        if used == 0:
            cur.status = _UNUSABLE
            if had_records or self.epochs is None:
                what = "no usable record" if had_records else "no record" + (" in this shard" * (self._num_shards > 1))
                warnings.warn(f"source {self.sources[i].name!r}: {what} in epoch {cur.epoch - 1} "
                              f"(rank {self.rank}, worker {self.worker_id}); dropped from the mixture",
                              RuntimeWarning, stacklevel=3)
        elif self.epochs is not None and cur.epoch >= self.epochs:
            cur.status = _FINISHED

    def _skip(self, i: int, key: str, reason: str) -> None:
        cur = self._cursors[i]
        cur.skipped += 1
        kind = reason_kind(reason)
        cur.skipped_by_reason[kind] = cur.skipped_by_reason.get(kind, 0) + 1
        if self.report_path is not None:
            line = {"source": self.sources[i].name, "key": key, "reason": reason, "epoch": cur.epoch}
            with open(self.report_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------------------------------------ stats / state
    @property
    def stats(self) -> dict:
        """{"read", "used", "skipped", "skipped_by_reason", "sources": {name: same + "epoch", "status"}}."""
        per = {s.name: {"read": c.read, "used": c.used, "skipped": c.skipped,
                        "skipped_by_reason": dict(c.skipped_by_reason), "epoch": c.epoch, "status": c.status}
               for s, c in zip(self.sources, self._cursors)}
        total = {k: sum(p[k] for p in per.values()) for k in ("read", "used", "skipped")}
        by_reason: dict[str, int] = {}
        for p in per.values():
            for k, n in p["skipped_by_reason"].items():
                by_reason[k] = by_reason.get(k, 0) + n
        return {**total, "skipped_by_reason": by_reason, "sources": per}

    def state_dict(self) -> dict:
        """Everything needed to continue exactly where the last yielded item left off (JSON-serialisable)."""
        return {"version": STATE_VERSION, **self._layout(),
                "sources": [{"name": s.name, "len": len(s), **asdict(c)} for s, c in zip(self.sources, self._cursors)],
                "rng": copy.deepcopy(self._rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`. Seed, shard layout, epochs and the sources (names, order, lengths) must
        match; weights may differ (then the continuation follows the new weights, no longer exact)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a MixtureLoader state (version {STATE_VERSION})")
        for k, v in self._layout().items():
            if state.get(k) != v:
                raise ValueError(f"loader state has {k}={state.get(k)!r}, this loader {k}={v!r}")
        saved = state.get("sources", [])
        mine = [(s.name, len(s)) for s in self.sources]
        theirs = [(c.get("name"), c.get("len")) for c in saved]
        if theirs != mine:
            raise ValueError(f"loader state is for sources {theirs} (name, records), this loader has {mine}")
        try:
            cursors = [_Cursor(**{k: v for k, v in c.items() if k not in ("name", "len")}) for c in saved]
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = state["rng"]
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"malformed loader state: {e}") from None
        self._cursors, self._rng, self._orders = cursors, rng, {}

    def _layout(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "worker_id": self.worker_id,
                "num_workers": self.num_workers, "epochs": self.epochs}


def reason_kind(reason: str) -> str:
    """A skip reason's kind for counting: up to the first ':' with digit runs as 'N'."""
    return re.sub(r"\d+", "N", reason.split(":", 1)[0]).strip()


def _check_layout(seed: Any, rank: Any, world_size: Any, worker_id: Any, num_workers: Any, epochs: Any) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not is_int(world_size) or world_size < 1 or not is_int(rank) or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
    if not is_int(num_workers) or num_workers < 1 or not is_int(worker_id) or not 0 <= worker_id < num_workers:
        raise ValueError(f"need 0 <= worker_id < num_workers, got worker_id={worker_id!r}, "
                         f"num_workers={num_workers!r}")
    if epochs is not None and (not is_int(epochs) or epochs < 1):
        raise ValueError(f"epochs must be None or an int >= 1, got {epochs!r}")


def _check_weights(sources: list[Source], weights: list[Any]) -> np.ndarray:
    if not sources:
        raise ValueError("MixtureLoader needs at least one source")
    for s in sources:
        if not isinstance(getattr(s, "name", None), str) or not hasattr(s, "read") or not hasattr(s, "key"):
            raise ValueError(f"{s!r} is not a Source (needs name, __len__, read, key)")
    names = [s.name for s in sources]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"source names must be unique (they seed the shuffles), repeated: {dupes}")
    try:
        w = np.array([float(x) for x in weights], dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"source weights must be numbers, got {weights!r}") from None
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"source weights must be finite, >= 0 and not all 0, got {weights!r}")
    return w


def _report_path(report_dir: str | Path | None, rank: int, world_size: int, worker_id: int,
                 num_workers: int) -> Path | None:
    if report_dir is None:
        return None
    d = Path(report_dir)
    d.mkdir(parents=True, exist_ok=True)
    if num_workers > 1:
        return d / f"skipped.rank{rank}.worker{worker_id}.jsonl"
    return d / (f"skipped.rank{rank}.jsonl" if world_size > 1 else "skipped.jsonl")
