"""Random-access record sources (JSONL, WebDataset tar shards, parquet) that yield `Sample`s.

Notable features:
  - random access: a cheap index built at open (JSONL line offsets, tar member offsets, parquet row-group
    sizes) makes `read(i)` a seek, so the loader can shuffle, shard and resume exactly;
  - records in LLaVA / InternVL or OpenAI form, parsed by `records.parse_record`;
  - images are not decoded here: local paths are checked to exist, tar members / parquet cells are bytes;
  - a bad record raises only `SkipSample(reason)`, and `key(i)` names it without reading it; every sample
    passes `Sample.validate()`;
  - a corrupt or truncated tar is indexed up to the damage, which is warned about and kept in `.errors`;
  - sources pickle, and reopen their files lazily in each process (safe for forked loader workers);
  - `open_source` picks the reader from the extension or a {"path", "weight", "name", ...} spec.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import posixpath
import tarfile
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sailvl.data.records import IMAGE_EXTENSIONS, Lookup, as_list, parse_record
from sailvl.data.schema import Sample, SkipSample


def _local_lookup(root: Path) -> Lookup:
    def lookup(name: str, kind: str) -> str:
        p = Path(name)
        p = p if p.is_absolute() else root / p
        if not (p.is_file() if kind == "image" else p.exists()):
            raise SkipSample(f"missing {kind}: {p}")
        return str(p)

    return lookup


# --------------------------------------------------------------------------------------------- base
class Source:
    """Random access to a dataset's records: `len(src)`, `src.read(i) -> Sample`, `src.key(i) -> str`."""

    name: str = ""
    weight: float = 1.0

    def __len__(self) -> int:
        raise NotImplementedError

    def key(self, index: int) -> str:
        """Where record `index` lives (line number, tar key, parquet row), without reading it."""
        raise NotImplementedError

    def _load(self, index: int) -> Sample:
        raise NotImplementedError

    def read(self, index: int) -> Sample:
        """Record `index` as a validated Sample; raises SkipSample(reason) for a bad record."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: record {index} out of range (0..{len(self) - 1})")
        try:
            sample = self._load(index)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:  # a shape not foreseen
            raise SkipSample(f"malformed record: {type(e).__name__}: {e}") from None
        sample.source, sample.key = self.name, self.key(index)
        return sample.validate()

    def _handle(self, key: Any, opener: Callable[[], Any] | None = None) -> Any:
        """A per-process resource (by default: the file `key` opened for reading); a forked child or an
        unpickled copy opens its own."""
        if getattr(self, "_pid", None) != os.getpid():
            self._pid, self._handles = os.getpid(), {}
        if key not in self._handles:
            self._handles[key] = opener() if opener else open(key, "rb")
        return self._handles[key]

    def close(self) -> None:
        for h in getattr(self, "_handles", {}).values():
            if hasattr(h, "close"):
                h.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_handles", "_pid")}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, records={len(self)})"


# --------------------------------------------------------------------------------------------- JSONL
class JsonlSource(Source):
    """One JSON record per line; blank lines are not records; keys are "line N" (1-based)."""

    def __init__(self, path: str | Path, image_root: str | Path | None = None, name: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such JSONL file: {path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.name = name or self.path.stem
        self._starts, self._lengths, self._lines = _index_lines(self.path)

    def __len__(self) -> int:
        return len(self._starts)

    def key(self, index: int) -> str:
        return f"line {self._lines[index]}"

    def _load(self, index: int) -> Sample:
        f = self._handle(self.path)
        f.seek(int(self._starts[index]))
        raw = f.read(int(self._lengths[index]))
        try:
            rec = json.loads(raw.decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipSample(f"malformed JSON: {e}") from None
        return parse_record(rec, _local_lookup(self.image_root))


def _index_lines(path: Path, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start offsets, byte lengths, 1-based line numbers) of the non-blank lines of a file."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = np.frombuffer(mm, dtype=np.uint8)
        newlines = np.concatenate([np.flatnonzero(buf[o:o + chunk] == 10) + o for o in range(0, size, chunk)])
        del buf  # release the export before the mmap closes
        starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
        lengths = np.concatenate([newlines, [size]]).astype(np.int64) - starts
        keep = lengths > 0
        for i in np.flatnonzero(keep & (lengths <= 8)):  # whitespace-only lines are short in practice
            keep[i] = bool(mm[starts[i]:starts[i] + lengths[i]].strip())
    lines = np.arange(1, len(starts) + 1, dtype=np.int64)
    return starts[keep], lengths[keep], lines[keep]


# --------------------------------------------------------------------------------------------- tar
class WebDatasetSource(Source):
    """WebDataset shards: members grouped by key (path up to the basename's first dot), one record per
    group from its `.json` member; the json names its images by member name ("000001.png") or extension
    ("png", "0.png"); a json naming none gets all the group's image members. Keys "shard.tar:000001".
    Uncompressed tars only (random access)."""

    def __init__(self, path_or_glob: str | Path | Iterable[str | Path], name: str | None = None):
        self.shards = _expand_shards(path_or_glob)
        self.name = name or _default_name(path_or_glob, ".tar")
        self.errors: list[str] = []
        self._groups: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for i, shard in enumerate(self.shards):
            self._index_shard(i, shard)
        if self.errors and not self._groups:
            raise ValueError(f"nothing readable in {path_or_glob}: " + "; ".join(self.errors))
        if self.errors:
            warnings.warn(f"{self.name}: damaged tar data, indexed what was readable: " + "; ".join(self.errors),
                          RuntimeWarning, stacklevel=2)

    def __len__(self) -> int:
        return len(self._groups)

    def key(self, index: int) -> str:
        shard, key, _ = self._groups[index]
        return f"{self.shards[shard].name}:{key}"

    def _index_shard(self, i: int, path: Path) -> None:
        size, groups = path.stat().st_size, {}
        try:
            with tarfile.open(path, mode="r:") as tf:
                end = self._scan(tf, path, size, groups)
        except tarfile.TarError as e:
            with open(path, "rb") as f:
                compressed = f.read(2) == b"\x1f\x8b"
            why = "gzip-compressed tars are not supported (no random access)" if compressed else str(e)
            self.errors.append(f"{path.name}: not a readable tar ({why})")
            return
        if end is not None and end >= size:
            self.errors.append(f"{path.name}: no end-of-archive marker, the shard may be truncated")
        elif end is not None and _nonzero_after(path, end):
            self.errors.append(f"{path.name}: unreadable data at byte {end}, later members lost")
        self._groups += [(i, k, m) for k, m in groups.items()]

    def _scan(self, tf: tarfile.TarFile, path: Path, size: int, groups: dict) -> int | None:
        """Index members into groups; returns where a clean scan stopped (None after a recorded error)."""
        while True:
            try:
                m = tf.next()
            except (tarfile.TarError, EOFError, OSError) as e:
                self.errors.append(f"{path.name}: {e} at byte {tf.offset}")
                return None
            if m is None:
                return tf.offset
            tf.members = []  # keep memory flat on large shards
            if m.offset_data + m.size > size:
                self.errors.append(f"{path.name}: member {m.name} truncated")
                return None
            name = m.name.removeprefix("./")
            folder, base = posixpath.split(name)
            if m.isfile() and base and not base.startswith("."):
                groups.setdefault(posixpath.join(folder, base.split(".", 1)[0]), {})[base] = (m.offset_data, m.size)

    def _load(self, index: int) -> Sample:
        shard, key, members = self._groups[index]
        stem = posixpath.basename(key)
        if f"{stem}.json" not in members:
            raise SkipSample("no .json member")
        try:
            rec = json.loads(self._member(shard, members[f"{stem}.json"]).decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipSample(f"malformed JSON: {e}") from None

        def lookup(ref: str, kind: str) -> bytes:
            base = posixpath.basename(ref)
            where = members.get(base) or members.get(f"{stem}.{ref.lstrip('.').lower()}")
            if where is None:
                raise SkipSample(f"missing {kind}: {ref}")
            return self._member(shard, where)

        images = sorted(b for b in members if b.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
        return parse_record(rec, lookup, default_images=images)

    def _member(self, shard: int, where: tuple[int, int]) -> bytes:
        f = self._handle(self.shards[shard])
        f.seek(where[0])
        data = f.read(where[1])
        if len(data) != where[1]:
            raise SkipSample("truncated tar member")
        return data


def _expand_shards(spec: str | Path | Iterable[str | Path]) -> list[Path]:
    """A glob, a folder (its *.tar), one path, or a list of paths -> existing shard paths."""
    if not isinstance(spec, (str, Path)):
        paths = [str(p) for p in spec]
    elif any(c in str(spec) for c in "*?["):
        paths = sorted(glob.glob(str(spec)))
    else:
        paths = sorted(glob.glob(os.path.join(spec, "*.tar"))) if Path(spec).is_dir() else [str(spec)]
    if not paths:
        raise FileNotFoundError(f"no tar shards match {spec}")
    if missing := [p for p in paths if not Path(p).is_file()]:
        raise FileNotFoundError(f"no such tar shard: {missing[0]}")
    return [Path(p) for p in paths]


def _nonzero_after(path: Path, offset: int, chunk: int = 1 << 20) -> bool:
    """Whether anything but end-of-archive zero padding follows `offset`."""
    with open(path, "rb") as f:
        f.seek(offset)
        while block := f.read(chunk):
            if block.strip(b"\0"):
                return True
    return False


def _default_name(spec: Any, ext: str) -> str:
    first = str(spec) if isinstance(spec, (str, Path)) else str(next(iter(spec), "source"))
    base = os.path.basename(first.rstrip("/")) or "source"
    return base[: -len(ext)] if base.endswith(ext) else base


# --------------------------------------------------------------------------------------------- parquet
class ParquetSource(Source):
    """Rows with a `conversations` or `messages` column (JSON string or list) and images as bytes in
    `image` (bytes or an HF {"bytes", "path"} struct) and/or `images` (a list of those); optional `task`,
    `answer`, `id` columns. Keys "file.parquet:row N" (0-based). Reads whole row groups (the parquet unit
    of random access) and keeps the last few in memory."""

    COLUMNS = ("image", "images", "video", "task", "answer", "id")

    def __init__(self, path: str | Path, name: str | None = None, cache_row_groups: int = 2):
        pq = _pyarrow_parquet()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such parquet file: {path}")
        self.name = name or self.path.stem
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for non-parquet files
            raise ValueError(f"{path} is not a readable parquet file: {e}") from None
        names = set(pf.schema_arrow.names)
        conv = [c for c in ("conversations", "messages") if c in names]
        if not conv:
            raise ValueError(f"{path} has neither a 'conversations' nor a 'messages' column")
        self._conv = conv[0]
        self._columns = [self._conv] + [c for c in self.COLUMNS if c in names]
        rows = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        self._offsets = np.cumsum([0] + rows)
        self._cache_size = max(1, cache_row_groups)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def key(self, index: int) -> str:
        return f"{self.path.name}:row {index}"

    def _load(self, index: int) -> Sample:
        group = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = self._row_group(group).slice(index - int(self._offsets[group]), 1).to_pylist()[0]
        turns = row[self._conv]
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except json.JSONDecodeError as e:
                raise SkipSample(f"malformed JSON: {e}") from None
        rec = {k: v for k, v in row.items() if k not in (self._conv, "image", "images")}
        rec["messages"] = turns
        rec["images"] = as_list(row.get("image")) + as_list(row.get("images"))
        return parse_record(rec, _local_lookup(self.path.parent))

    def _row_group(self, group: int):
        cache = self._handle("row groups", OrderedDict)
        if group not in cache:
            pf = self._handle("parquet", lambda: _pyarrow_parquet().ParquetFile(self.path))
            try:
                cache[group] = pf.read_row_group(group, columns=self._columns)
            except Exception as e:  # a corrupt row group: its records are bad, not the run
                raise SkipSample(f"unreadable row group {group}: {e}") from None
            while len(cache) > self._cache_size:
                cache.popitem(last=False)
        cache.move_to_end(group)
        return cache[group]


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet needs pyarrow: pip install 'sailvl[data]'") from None
    return pq


# --------------------------------------------------------------------------------------------- open
_READERS = {".jsonl": JsonlSource, ".tar": WebDatasetSource, ".parquet": ParquetSource}
_SPEC_KEYS = {"path", "weight", "name", "image_root", "type"}


def open_source(spec: str | Path | dict | Source) -> Source:
    """A Source from a path (reader chosen by extension: .jsonl, .tar incl. globs, .parquet) or a dict
    {"path", "weight" (default 1), "name", "image_root" (JSONL only), "type" ("jsonl" | "tar" | "parquet",
    overriding the extension)}. The weight is stored as `source.weight`."""
    if isinstance(spec, Source):
        return spec
    if isinstance(spec, (str, Path)):
        spec = {"path": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"a source spec is a path or a dict, not {type(spec).__name__}")
    if unknown := set(spec) - _SPEC_KEYS:
        raise ValueError(f"unknown source spec keys {sorted(unknown)} (known: {sorted(_SPEC_KEYS)})")
    if not spec.get("path"):
        raise ValueError(f"source spec {spec} has no 'path'")
    reader = _reader_for(spec["path"], spec.get("type"))
    try:
        weight = float(spec.get("weight", 1.0))
    except (TypeError, ValueError):
        weight = float("nan")
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"source weight must be a finite number >= 0, got {spec.get('weight')!r}")
    kwargs = {"name": spec.get("name")}
    if spec.get("image_root") is not None:
        if reader is not JsonlSource:
            raise ValueError("'image_root' applies to JSONL sources only")
        kwargs["image_root"] = spec["image_root"]
    src = reader(spec["path"], **kwargs)
    src.weight = weight
    return src


def open_sources(specs: Iterable[str | Path | dict | Source]) -> list[tuple[Source, float]]:
    """[(source, weight)] for MixtureLoader."""
    return [(s, s.weight) for s in map(open_source, specs)]


def _reader_for(path: Any, kind: str | None) -> type[Source]:
    if kind is not None:
        if f".{kind}" not in _READERS:
            raise ValueError(f"unknown source type {kind!r} (known: jsonl, tar, parquet)")
        return _READERS[f".{kind}"]
    s = str(path).lower()
    for ext, reader in _READERS.items():
        if s.endswith(ext):
            return reader
    raise ValueError(f"cannot tell the format of {path}: expected a .jsonl, .tar or .parquet path, or a 'type'")
