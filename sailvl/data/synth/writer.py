"""Writing synthetic shards: `generate` (one split) and `generate_splits` (train / val / test).

Layout under out_dir:
    {split}.jsonl                      one record per line, paths relative to out_dir
    images/{split}/000123.png          single image
    images/{split}/000123_0.png, _1    several images ("images": [...])
    images/{split}/000123_f0.png, ...  video frames ("video": [...])
    synth.json                         (generate_splits only) seed, world and per-split summaries

A split's JSONL and images are overwritten; image files left over from an earlier, larger run of the
same split stay on disk but are not referenced (the JSONL is the dataset).

Reproducibility: each split's tasks are assigned round-robin (equal counts, +-1) in an order shuffled by a
random.Random seeded by sha256("sailvl-synth", seed, split); the split is drawn in chunks of CHUNK samples, the
first from that RNG, chunk c > 0 from its own (sha256 of seed, split and c), so `workers` processes can draw the
chunks at once. PNGs are written by Pillow with fixed settings and no metadata, and JSON is dumped with fixed key
order; the same arguments therefore give byte-identical files, whatever the number of workers.

Disjoint splits: every sample has a content hash (blake2b over task, prompt, answer and the raw
pixels of each image). `generate_splits` writes train first and keeps its hashes; a val sample whose
hash is in train is redrawn, and a test sample whose hash is in train or val is redrawn, so no
identical (task, question, answer, image) sample is in two splits. Identical questions with different
renderings (e.g. "3+4" drawn in another colour or place) are allowed: the world is small on purpose,
and what val / test measure is generalisation over renderings and compositions. Text-only tasks have
a small content space, so in val / test their common items are redrawn more often than rare ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Callable

from PIL import Image

from .record import TEXT_KEYS, is_text_record, media_key, prompt_of
from .registry import check_tasks, draw
from .world import World, resolve_world

MAX_REDRAWS = 1000
# samples per chunk of a split, the unit one worker draws (a split of at most CHUNK samples is one chunk, drawn from
# the split's RNG alone)
CHUNK = 2000
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def split_rng(seed: int, split: str) -> random.Random:
    """The RNG of one split, derived from (seed, split name)."""
    h = hashlib.sha256(f"sailvl-synth\0{seed}\0{split}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def chunk_rng(seed: int, split: str, chunk: int) -> random.Random:
    """The RNG of chunk > 0 of a split (chunk 0 draws on from `split_rng` after the task order's shuffle)."""
    h = hashlib.sha256(f"sailvl-synth\0{seed}\0{split}\0{chunk}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _pool(workers: int | None, n: int):
    """A process pool of `workers` (None: one per CPU) when n samples make more than one chunk, else a null
    context (drawn in this process). Workers fork where the platform can, so generators registered at run time
    (`registry.GENERATORS`) draw there too."""
    workers = _cpus() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if workers == 1 or n <= CHUNK:
        return nullcontext()
    ctx = get_context("fork" if "fork" in get_all_start_methods() else None)
    return ProcessPoolExecutor(workers, mp_context=ctx)


def content_hash(record: dict, images: list[Image.Image]) -> int:
    """64-bit hash of (task, prompt, answer, every image's size / mode / pixels)."""
    h = hashlib.blake2b(digest_size=8)
    for part in (record["task"], prompt_of(record), record["answer"]):
        h.update(part.encode())
        h.update(b"\0")
    for img in images:
        h.update(f"{img.mode}{img.size}".encode())
        h.update(img.tobytes())
    return int.from_bytes(h.digest(), "little")


def _check_args(n: int, seed: int, split: str) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if not isinstance(split, str) or not _SPLIT_NAME.match(split):
        raise ValueError(f"split must be a plain name (letters, digits, _ or -), got {split!r}")


def _save_png(img: Image.Image, path: Path) -> None:
    with open(path, "wb") as f:
        img.save(f, format="PNG", compress_level=1)


def _draw_chunk(job: tuple) -> tuple[list[str], set[int], Counter, int, int]:
    """Draw one chunk of a split (samples first .. first + len(order) - 1) and write its images: returns its JSONL
    lines, content hashes (when kept), per-task counts, image files written and redraws."""
    out_dir, split, first, order, rng, world, exclude, keep_hashes, width = job
    img_dir = out_dir / "images" / split
    lines: list[str] = []
    hashes: set[int] = set()
    counts: Counter = Counter()
    n_files = rejected = 0
    for i, task in enumerate(order, start=first):
        for _ in range(MAX_REDRAWS):
            record, images = draw(task, rng, world)
            h = content_hash(record, images) if (exclude is not None or keep_hashes) else 0
            if exclude is None or h not in exclude:
                break
            rejected += 1
        else:
            raise RuntimeError(f"{split}: could not draw a {task} sample absent from the earlier splits in "
                               f"{MAX_REDRAWS} tries; its content space is too small for this many samples")
        if keep_hashes:
            hashes.add(h)
        stem = f"{i:0{width}d}"
        key = media_key(record, len(images))
        if key == "image":
            names = [f"{stem}.png"]
        elif key == "images":
            names = [f"{stem}_{k}.png" for k in range(len(images))]
        elif key == "video":
            names = [f"{stem}_f{k}.png" for k in range(len(images))]
        else:
            names = []
        for img, name in zip(images, names):
            _save_png(img, img_dir / name)
        rel = [f"images/{split}/{name}" for name in names]
        out = {"id": f"{split}-{stem}", "task": record["task"], "answer": record["answer"]}
        if key == "image":
            out["image"] = rel[0]
        elif key is not None:
            out[key] = rel
        if is_text_record(record):
            out.update((k, record[k]) for k in TEXT_KEYS if k in record)
        else:
            out["conversations"] = record["conversations"]
        if "focus" in record:
            out["focus"] = record["focus"]
        out["meta"] = record["meta"]
        lines.append(json.dumps(out, ensure_ascii=False) + "\n")
        counts[task] += 1
        n_files += len(names)
    return lines, hashes, counts, n_files, rejected


def _write_split(out_dir: Path, split: str, n: int, seed: int, tasks: list[str], world: World,
                 exclude: set[int] | None, keep_hashes: bool, pool: Executor | None = None,
                 tick: Callable[[int, str], None] | None = None) -> tuple[dict, set[int]]:
    """One split's JSONL and images; `tick(samples, split)` after each chunk is written."""
    rng = split_rng(seed, split)
    order = [tasks[i % len(tasks)] for i in range(n)]
    rng.shuffle(order)
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    jsonl = out_dir / f"{split}.jsonl"
    tmp = jsonl.with_name(jsonl.name + ".tmp")
    width = max(6, len(str(max(n - 1, 0))))
    # chunk 0 draws on from the split's RNG, chunk c > 0 from its own (`chunk_rng`): the bytes do not depend on how
    # many processes draw them
    jobs = [(out_dir, split, c * CHUNK, order[c * CHUNK:(c + 1) * CHUNK], rng if c == 0 else chunk_rng(seed, split, c),
             world, exclude, keep_hashes, width) for c in range(max(1, -(-n // CHUNK)))]
    results = pool.map(_draw_chunk, jobs) if pool is not None and len(jobs) > 1 else map(_draw_chunk, jobs)
    hashes: set[int] = set()
    counts: Counter = Counter()
    n_files = rejected = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for lines, h, c, files, redrawn in results:
            f.writelines(lines)
            hashes |= h
            counts += c
            n_files += files
            rejected += redrawn
            if tick is not None:
                tick(len(lines), split)
    os.replace(tmp, jsonl)
    summary = {"split": split, "jsonl": str(jsonl), "n": n, "tasks": {t: counts[t] for t in tasks if counts[t]},
               "images": n_files, "redrawn": rejected}
    return summary, hashes


def generate(out_dir, n: int, seed: int = 0, split: str = "train", tasks: list[str] | None = None,
             image_size: int = 64, *, world: World | None = None, workers: int | None = None) -> dict:
    """Write `n` samples of `tasks` (default: all; a task listed twice gets twice the share) to
    out_dir/{split}.jsonl and out_dir/images/{split}/. Returns {"split", "jsonl", "n", "tasks": {name:
    count}, "images": files written, "redrawn": 0}. `world` sets the difficulty (default World(image_size));
    `workers` processes draw it (None: one per CPU; the same bytes whatever the number)."""
    _check_args(n, seed, split)
    tasks = check_tasks(tasks)
    world = resolve_world(world, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _pool(workers, n) as pool:
        summary, _ = _write_split(out, split, n, seed, tasks, world, exclude=None, keep_hashes=False, pool=pool)
    return summary


def _ticker(total: int) -> Callable[[int, str], None]:
    """A `tick(samples, split)` that counts samples written towards `total` on a progress line (on a terminal at
    every chunk, else at about every tenth of the total and at the end)."""
    from ...train.progress import Progress

    bar = Progress(total, "synth", every=1)
    done = shown = 0

    def tick(n: int, split: str) -> None:
        nonlocal done, shown
        done += n
        if bar.tty or done - shown >= total / 10 or done == total:
            bar.update(done, split=split)
            shown = done

    return tick


def generate_splits(out_dir, n_train: int, n_val: int, n_test: int, seed: int = 0,
                    tasks: list[str] | None = None, image_size: int = 64, *, world: World | None = None,
                    extra_train: dict[str, tuple[int, list[str], World]] | None = None,
                    workers: int | None = None, progress: bool = False) -> dict:
    """Write train / val / test with disjoint content (see the module docstring) and out_dir/synth.json.
    `extra_train` adds training splits {name: (n, tasks, world)} written right after train (e.g. a curriculum
    of an easier world); val and test are disjoint from them too. `workers` processes draw the chunks of each
    split (None: one per CPU; the same bytes whatever the number). `progress`: a progress line on stderr (samples
    written of all splits', redrawn in place on a terminal, about every tenth of them otherwise).
    Returns {"train": summary, "val": summary, "test": summary, **extra}."""
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"{name} must be an int >= 0, got {n!r}")
    _check_args(0, seed, "train")
    tasks = check_tasks(tasks)
    world = resolve_world(world, image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = dict(extra_train or {})
    for name, spec in extra.items():
        if name in ("train", "val", "test"):
            raise ValueError(f"extra training split {name!r} would overwrite a standard split")
        n, extra_tasks, extra_world = spec
        _check_args(n, seed, name)
        extra[name] = (n, check_tasks(extra_tasks), resolve_world(extra_world, image_size))
    plan = [("train", n_train, tasks, world), *((k, *v) for k, v in extra.items()),
            ("val", n_val, tasks, world), ("test", n_test, tasks, world)]
    seen: set[int] = set()
    result = {}
    tick = _ticker(sum(p[1] for p in plan)) if progress else None
    with _pool(workers, max(p[1] for p in plan)) as pool:
        for split, n, split_tasks, split_world in plan:
            summary, hashes = _write_split(out, split, n, seed, split_tasks, split_world,
                                           exclude=seen if seen else None, keep_hashes=split != "test", pool=pool,
                                           tick=tick)
            seen |= hashes
            result[split] = summary
    manifest = {"generator": "sailvl.data.synth", "seed": seed, "tasks": tasks, "world": world.to_dict(),
                "splits": {k: {kk: vv for kk, vv in v.items() if kk != "jsonl"} for k, v in result.items()},
                "extra_train": {k: {"tasks": v[1], "world": v[2].to_dict()} for k, v in extra.items()}}
    (out / "synth.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return result
