"""VLMEvalKit TSV files (MMStar.tsv, OCRBench.tsv, ChartQA_TEST.tsv, DocVQA_VAL.tsv, TextVQA_VAL.tsv, ...)
read into `EvalItem`s, following VLMEvalKit's `ImageBaseDataset` conventions:

  - tab-separated with a header, quoted as pandas writes it (fields with tabs / newlines / quotes are in
    double quotes); one row per question; `index` identifies the row;
  - `image`: base64 of the encoded image; a value of at most 64 characters is not an image but the
    `index` of another row whose image it shares; a value written as a list ("['<b64>', '<b64>']" or
    JSON) holds several images; rows with an empty `image` are skipped, as VLMEvalKit does. Without an
    `image` column, `image_path` gives file paths (relative to the TSV), also possibly a list;
  - `question`, `answer` (a list literal such as "['a', 'b']" means several ground truths), option
    columns `A`..`Z` (empty cells are absent options), `hint`, `category` (else `split`) and others kept
    in `meta`.
Bad files raise ValueError naming the file, line and problem. (VLMEvalKit reads with pandas, which turns
cells such as "NA" or "None" into NaN; we keep every cell's text as written.)
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import string
import sys
from pathlib import Path

from .items import EvalItem, check_unique_ids

POINTER_MAX_LEN = 64  # VLMEvalKit: an image cell this short names another row's index
_META_SKIP = {"index", "image", "image_path", "question", "answer", "hint", "category"} | set(string.ascii_uppercase)


def _raise_field_limit() -> None:
    """Base64 images are far larger than csv's default 128 KiB field limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 2


def parse_list_cell(cell: str) -> list[str] | None:
    """A cell holding a list literal (Python repr or JSON) -> list of strings; None when it is not one."""
    s = cell.strip()
    if not (s.startswith("[") and s.endswith("]")):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(s)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list):
            return [str(v) for v in value]
    return None


def read_rows(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(columns, [(line number, {column: cell})]) of a TSV with a header row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such TSV file: {path}")
    _raise_field_limit()
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            header = next(reader)
        except StopIteration:
            raise ValueError(f"{path} is empty (a VLMEvalKit TSV starts with a header row)") from None
        except csv.Error as e:
            raise ValueError(f"{path}: unreadable header: {e}") from None
        dup = sorted({c for c in header if header.count(c) > 1})
        if dup:
            raise ValueError(f"{path}: duplicate columns {dup}")
        for col in ("index", "question"):
            if col not in header:
                raise ValueError(f"{path}: no {col!r} column (columns: {header}); is this a VLMEvalKit TSV?")
        line = reader.line_num
        try:
            for cells in reader:
                if cells and any(c.strip() for c in cells):
                    if len(cells) != len(header):
                        raise ValueError(f"{path}, line {line + 1}: {len(cells)} fields, the header has "
                                         f"{len(header)}")
                    rows.append((line + 1, dict(zip(header, cells))))
                line = reader.line_num
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: {e}") from None
    return header, rows


def _b64(cell: str, where: str) -> bytes:
    try:
        return base64.b64decode(cell, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{where}: the image is not valid base64 ({e})") from None


def _resolve_pointer(index: str, by_index: dict[str, str], where: str) -> str:
    """Follow short `image` cells to the row holding the image; VLMEvalKit allows one hop, we allow chains."""
    seen, cell = [index], by_index[index]
    while len(cell) <= POINTER_MAX_LEN:
        if cell not in by_index:
            raise ValueError(f"{where}: image {cell!r} is a reference to row index {cell!r}, which does not exist")
        if cell in seen:
            raise ValueError(f"{where}: image references loop: {' -> '.join(seen + [cell])}")
        seen.append(cell)
        cell = by_index[cell]
    return cell


def read_vlmeval_tsv(path: str | Path) -> tuple[list[EvalItem], list[dict]]:
    """Items of a VLMEvalKit TSV and the skipped rows [{"id", "reason"}]."""
    path = Path(path)
    header, rows = read_rows(path)
    if "answer" not in header:
        raise ValueError(f"{path}: no 'answer' column; VLMEvalKit test splits without answers cannot be "
                         f"scored locally")
    has_image, has_path = "image" in header, "image_path" in header
    by_index = {r["index"]: r.get("image", "") for _, r in rows}
    options_cols = [c for c in string.ascii_uppercase if c in header]
    items, skipped = [], []
    for line, r in rows:
        where = f"{path}, line {line} (index {r['index']})"
        if not r["index"].strip():
            raise ValueError(f"{path}, line {line}: empty 'index'")
        if has_image:
            if not r["image"].strip():
                skipped.append({"id": r["index"], "reason": "no image"})
                continue
            cell = _resolve_pointer(r["index"], by_index, where)
            cells = parse_list_cell(cell) or [cell]
            images = [_b64(c, where) for c in cells]
        elif has_path:
            refs = parse_list_cell(r["image_path"]) or ([r["image_path"]] if r["image_path"].strip() else [])
            images = [str(p if Path(p).is_absolute() else path.parent / p) for p in refs]
            missing = [p for p in images if not Path(p).is_file()]
            if missing:
                skipped.append({"id": r["index"], "reason": f"missing image file {missing[0]}"})
                continue
        else:
            images = []
        answer = r["answer"]
        answers = parse_list_cell(answer) or [answer]
        options = {c: r[c] for c in options_cols if r[c] != ""}
        category = r.get("category") or r.get("split") or None
        meta = {k: v for k, v in r.items() if k not in _META_SKIP and v != ""}
        items.append(EvalItem(id=r["index"], question=r["question"], answers=answers, images=images,
                              options=options, category=category, hint=r.get("hint") or None, meta=meta))
    if not items:
        raise ValueError(f"{path}: no usable rows ({len(skipped)} skipped)")
    check_unique_ids(items, path)
    return items, skipped
