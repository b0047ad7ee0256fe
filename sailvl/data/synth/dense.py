"""Dense per-patch labels for SAIL-ViT pretraining on the synthetic world (generated in memory).

SAIL-VL2's vision tower starts from a pretrained AIMv2; the tiny recipe has no pretrained tower, and a ViT
learnt from scratch only through the LLM's answer tokens sees too little signal (one label per image) to
learn shapes and characters in minutes (CALIBRATION.md; measured again in docs/demo_log.md). This stream gives
the ViT direct supervision instead: images drawn like the world's own (scenes of objects, text, tables,
charts) with a label for every patch of the ViT's grid: what covers it (colour, shape or "char" / "bar",
size, which character), and for images with text an image-level transcript (IMAGE_TEXT). The "read" kinds are
the world's own OCR / equation / chart / table images with their transcript only. `DenseStream(world,
seed).batch(step, n)` is a pure function of (seed, step), so a resumed run regenerates exactly the batches it
would have seen.

Heads and loss live in `sailvl.train.vision`; the label vocabularies are here (`HEADS`).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..image import to_tensor
from .render import (chart_axis, chart_grid, draw_table_grid, fit_size, make_chart, make_equation_image, make_table,
                     make_text_image, place_text, text_size, typeset)
from .scene import draw_obj, random_scene
from .world import BACKGROUND, COLOURS, INK, SHAPES, World, font, text_bbox

CHARS = string.ascii_uppercase + string.digits + "+x-=?"
# Label vocabularies per head; index 0 is "nothing here" (background) everywhere.
HEADS: dict[str, tuple[str, ...]] = {
    "colour": ("none", *COLOURS),
    "shape": ("none", *SHAPES, "char", "bar"),
    "size": ("none", "small", "large"),
    "char": ("none", *CHARS),
}
# Binding heads (vision option "bind": their loss weight; 0 = none): which item a patch of a chart or table belongs
# to, labelled on every patch of it. Chart: the item's label letter ("key"), its value ("value") and whether it is
# the highest / lowest ("rank"), on the label, the bar and the value text alike; table: a cell's column and row
# header letters ("key", "row_key"). The other heads say only what covers a patch, so a chart's label and its bar
# are unrelated to them; these ask the tower to join them, so that the LLM finds an item's value (or a cell) by
# one lookup instead of two. Measured alone (demo log, session 24): table 0.575 -> 0.72 from that tower, chart 0.28 ->
# 0.30; the whole tiny recipe 0.644 / 0.646 against 0.664 / 0.656 (the char head's accuracy 0.72 -> 0.66), so unused.
BIND_HEADS: dict[str, tuple[str, ...]] = {
    "key": ("none", *CHARS),
    "row_key": ("none", *CHARS),
    "value": ("none", *string.digits),
    "rank": ("none", "highest", "lowest", "other"),
}
# each head's label -> class index
_LABEL_INDEX = {name: {v: i for i, v in enumerate(vocab)} for name, vocab in (HEADS | BIND_HEADS).items()}
DENSE_KINDS = ("scene", "text", "table", "chart", "glyph")
# "Read" kinds: images drawn by the world's own task renderers (OCR, equation, chart, table images exactly as the
# VLM tasks show them), labelled only with their transcript (no per-patch labels).
READ_KINDS = ("read_ocr", "read_equation", "read_chart", "read_table")
KINDS = DENSE_KINDS + READ_KINDS
# Image-level label: the image's text in reading order (OCR / equation text; chart: label, value per item, left to
# right; table: column headers, then each row's header and cells), one HEADS["char"] index per slot, then 0
# ("end") up to TEXT_SLOTS; IGNORE for images without one (the dense kinds other than glyph). Predicted from the
# mean of all patch features, so every patch must carry what the image says. Measured: a ViT trained on single
# character images this way lets the VLM learn single-character OCR in 300 steps (0.43-0.45), per-patch labels
# alone do not (0.06); transcripts of the read kinds after vit_dense: 2-character OCR 0.02 -> 0.19 in the same
# probe (docs/demo_log.md).
IMAGE_TEXT = "image_text"
TEXT_SLOTS = 8
IGNORE = -100  # a label no loss counts
MIN_PIXELS = 3  # a patch is labelled with the element that paints the most of its pixels, if >= this many


@dataclass(frozen=True)
class Element:
    colour: str
    shape: str  # a SHAPES name, "char" or "bar"
    size: str = "none"
    char: str = "none"
    # BIND_HEADS' labels
    key: str = "none"
    row_key: str = "none"
    value: str = "none"
    rank: str = "none"


@dataclass
class DenseStream:
    """Images of the world with per-patch labels. `kinds` weights the image kinds."""

    world: World = field(default_factory=World)
    patch_size: int = 8
    seed: int = 0
    kinds: dict[str, float] = field(default_factory=lambda: {"scene": 2.0, "text": 2.0, "table": 1.0, "chart": 1.0})

    def __post_init__(self):
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown dense image kinds {sorted(unknown)}; known: {list(KINDS)}")
        if not self.kinds or min(self.kinds.values()) < 0 or sum(self.kinds.values()) <= 0:
            raise ValueError(f"dense image kind weights must be >= 0 and not all 0, got {self.kinds}")
        if self.world.image_size % self.patch_size:
            raise ValueError(f"image_size {self.world.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid(self) -> int:
        return self.world.image_size // self.patch_size

    def sample(self, rng: random.Random) -> tuple[Image.Image, dict[str, np.ndarray]]:
        """One image and its labels: {head: [grid, grid] int64} per patch (HEADS and BIND_HEADS), and IMAGE_TEXT:
        [TEXT_SLOTS]."""
        names, weights = zip(*self.kinds.items())
        kind = rng.choices(names, weights)[0]
        if kind in READ_KINDS:
            img, text = self._read(rng, kind)
            g = self.grid
            labels = {name: np.full((g, g), IGNORE, dtype=np.int64) for name in (*HEADS, *BIND_HEADS)}
        else:
            img = Image.new("RGB", (self.world.image_size,) * 2, BACKGROUND)
            canvas = _Canvas(img)
            text = getattr(self, f"_{kind}")(rng, canvas)
            labels = canvas.labels(self.patch_size)
        labels[IMAGE_TEXT] = transcript_label(text)
        return img, labels

    def batch(self, step: int, n: int, offset: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images offset .. offset + n - 1 of step `step`: pixels [n, 3, S, S], labels {head: [n, G, G]} and
        {IMAGE_TEXT: [n, TEXT_SLOTS]}.
        Each image is a pure function of (seed, step, index), so ranks can draw disjoint slices of a step."""
        images, labels = [], {h: [] for h in (*HEADS, *BIND_HEADS, IMAGE_TEXT)}
        for i in range(offset, offset + n):
            img, lab = self.sample(random.Random(((self.seed * 1_000_003 + step) << 20) + i))
            images.append(to_tensor(img))
            for h in labels:
                labels[h].append(torch.from_numpy(lab[h]))
        return torch.stack(images), {h: torch.stack(v) for h, v in labels.items()}

    # ------------------------------------------------------------------------------------------ kinds
    def _read(self, rng: random.Random, kind: str) -> tuple[Image.Image, str]:
        """An image exactly as the world's OCR / math / chart / table tasks draw it, and its transcript."""
        w = self.world
        if kind == "read_ocr":
            spec, img = make_text_image(rng, w)
            return img, spec["text"]
        if kind == "read_equation":
            spec, img = make_equation_image(rng, w)
            return img, spec["text"]
        if kind == "read_chart":
            spec, img = make_chart(rng, w)
            return img, "".join(f"{lab}{v}" for lab, v in zip(spec["labels"], spec["values"]))
        spec, img = make_table(rng, w)
        return img, "".join(spec["cols"]) + "".join(r + "".join(map(str, row))
                                                    for r, row in zip(spec["rows"], spec["cells"]))

    def _glyph(self, rng: random.Random, c: _Canvas) -> str:
        """One character, drawn by render.make_text_image exactly as the world's OCR images are."""
        spec, img = make_text_image(rng, replace(self.world, ocr_max_chars=1))
        c.paint(lambda d: c.img.paste(img), Element(spec["colour"], "char", char=spec["text"]))
        return spec["text"]

    def _scene(self, rng: random.Random, c: _Canvas) -> None:
        for o in random_scene(rng, self.world, rng.randint(1, self.world.max_objects)):
            c.paint(lambda d, o=o: draw_obj(d, o), Element(o.colour, o.shape, o.size))

    def _text(self, rng: random.Random, c: _Canvas) -> None:
        w = self.world
        s, margin = w.image_size, w.px(2)
        text = "".join(rng.choice(CHARS) for _ in range(rng.randint(1, 4)))
        g = w.text_grid
        if g:  # typeset text comes in the world's sizes only, on its grid
            size = fit_size(text, *map(w.px, rng.choice((w.ocr_font, w.equation_font))), s - 2 * margin,
                            s - 2 * margin, rng, g)
            x, y = place_text(rng, text, size, s, margin, g)
        else:
            size = rng.randint(w.px(10), w.px(30))
            while size > 6 and _ink_width(text, size) > s - 2 * margin:
                size -= 1
            x0, y0, x1, y1 = text_bbox(text, size)
            x = rng.randint(margin, max(margin, s - margin - _ink_width(text, size)))
            y = rng.randint(margin, max(margin, s - margin - (y1 - y0)))
        _write(c, text, (x, y), size, rng.choice(INK), g)

    def _table(self, rng: random.Random, c: _Canvas) -> None:
        """A grid like render.make_table's: header row / column shaded, one character per cell."""
        w = self.world
        s = w.image_size
        n_rows, n_cols = w.table_shape
        cw, ch = s / (n_cols + 1), s / (n_rows + 1)
        fs = w.px(13)
        while fs > 6 and (text_bbox("8", fs)[2] - text_bbox("8", fs)[0] > cw - 3
                          or text_bbox("Q", fs)[3] - text_bbox("Q", fs)[1] > ch - 3):
            fs -= 1

        c.paint(lambda d: draw_table_grid(d, s, n_rows, n_cols), None)  # background to every head
        text = [[""] * (n_cols + 1) for _ in range(n_rows + 1)]  # (the headers are drawn before the cells they key)
        for j in range(n_rows + 1):
            for i in range(n_cols + 1):
                if i == j == 0:
                    continue
                ch_ = text[j][i] = rng.choice(string.ascii_uppercase if i == 0 or j == 0 else string.digits)
                tw, th = text_size(ch_, fs, w.text_grid)
                xy = (round((i + 0.5) * cw - tw / 2), round((j + 0.5) * ch - th / 2))
                # a cell (and a header) is keyed by its column's and its row's header letters
                bind = {"key": text[0][i] or "none", "row_key": text[j][0] or "none"}
                _write(c, ch_, xy, fs, "blue" if i == 0 or j == 0 else "black", w.text_grid, bind)

    def _chart(self, rng: random.Random, c: _Canvas) -> None:
        """Bars like render.make_chart's (bar kind), a letter under each and a digit above it."""
        w = self.world
        s, k = w.image_size, w.chart_items
        fs = w.px(w.chart_font)
        label_h = text_bbox("A", fs)[3] - text_bbox("A", fs)[1]
        axis_y, label_y = chart_axis(w, fs)
        g = chart_grid(w)
        top = label_h + w.px(4)
        unit = (axis_y - top) / 9.0
        slot = (s - w.px(4)) / k
        colour = rng.choice(("red", "green", "blue", "purple", "orange"))
        c.paint(lambda d: d.line((0, axis_y, s - 1, axis_y), fill=COLOURS["gray"], width=1), None)
        half = max(2, int(slot * 0.3))
        labels, values = rng.sample(string.ascii_uppercase, k), rng.sample(range(1, 10), k)
        for i, (lab, v) in enumerate(zip(labels, values)):
            x, y = int(w.px(2) + slot * (i + 0.5)), round(axis_y - v * unit)
            rank = "highest" if v == max(values) else "lowest" if v == min(values) else "other"
            bind = {"key": lab, "value": str(v), "rank": rank}  # the bar, its value and its label alike
            c.paint(lambda d, x=x, y=y: d.rectangle((x - half, y, x + half, axis_y - 1), fill=COLOURS[colour]),
                    Element(colour, "bar", **bind))
            if g:  # typeset as render.make_chart sets it (anchored centre-bottom / centre-top, snapped)
                (vw, vh), lw = text_size(str(v), fs, g), text_size(lab, fs, g)[0]
                _write(c, str(v), (x - vw / 2, y - w.px(2) - vh), fs, "black", g, bind)
                _write(c, lab, (x - lw / 2, label_y), fs, "black", g, bind)
                continue
            _write(c, str(v), (x - _ink_width(str(v), fs) // 2, y - w.px(2) - _ink_height(str(v), fs)), fs, "black",
                   bind=bind)
            _write(c, lab, (x - _ink_width(lab, fs) // 2, axis_y + w.px(2)), fs, "black", bind=bind)


def transcript_label(text: str | None) -> np.ndarray:
    """`text` -> [TEXT_SLOTS] char indices then 0 ("end"), cut at TEXT_SLOTS; None -> all IGNORE."""
    if text is None:
        return np.full(TEXT_SLOTS, IGNORE, dtype=np.int64)
    unknown = sorted(set(text) - set(CHARS))
    if unknown:
        raise ValueError(f"transcript {text!r} has characters outside the char head's vocabulary: {unknown}")
    ids = [HEADS["char"].index(ch) for ch in text[:TEXT_SLOTS]]
    return np.array(ids + [0] * (TEXT_SLOTS - len(ids)), dtype=np.int64)


class _Canvas:
    """Draws elements one at a time and records which element painted each pixel last."""

    def __init__(self, img: Image.Image):
        self.img, self.draw = img, ImageDraw.Draw(img)
        self.owner = np.full((img.height, img.width), -1, dtype=np.int64)
        self.elements: list[Element] = []
        self._seen = np.asarray(img)  # a snapshot (PIL copies its buffer out) of the image before the next paint

    def paint(self, fn, element: Element | None) -> None:
        fn(self.draw)
        now = np.asarray(self.img)
        diff = now != self._seen
        self._seen = now
        changed = diff[..., 0] | diff[..., 1] | diff[..., 2]  # (three ors: cheaper than .any(-1) here)
        self.owner[changed] = -1 if element is None else len(self.elements)
        if element is not None:
            self.elements.append(element)

    def labels(self, patch: int) -> dict[str, np.ndarray]:
        h, w = self.owner.shape
        g_h, g_w = h // patch, w // patch
        n = len(self.elements)
        out = {name: np.zeros((g_h, g_w), dtype=np.int64) for name in (*HEADS, *BIND_HEADS)}
        if n == 0:
            return out
        # pixels per (patch, owner): one bincount over patch * (n + 1) + owner + 1 (owner -1, nobody, is column 0)
        blocks = self.owner.reshape(g_h, patch, g_w, patch).transpose(0, 2, 1, 3).reshape(g_h * g_w, -1)
        slots = np.arange(g_h * g_w)[:, None] * (n + 1) + blocks + 1
        counts = np.bincount(slots.ravel(), minlength=g_h * g_w * (n + 1)).reshape(g_h, g_w, n + 1)[..., 1:]
        best = counts.argmax(-1)  # ties: the first element drawn, as before
        hit = counts.max(-1) >= MIN_PIXELS
        for name, index in _LABEL_INDEX.items():
            ids = np.array([index[getattr(e, name)] for e in self.elements], dtype=np.int64)
            out[name] = np.where(hit, ids[best], 0)
        return out


def _ink_width(text: str, size: int) -> int:
    return round(font(size).getlength(text[:-1])) + text_bbox(text[-1], size)[2] - text_bbox(text[0], size)[0]


def _ink_height(text: str, size: int) -> int:
    x0, y0, x1, y1 = text_bbox(text, size)
    return y1 - y0


def _write(c: _Canvas, text: str, xy: tuple[int, int], size: int, ink: str, grid: int = 0,
           bind: dict[str, str] | None = None) -> None:
    """Draw `text` character by character so each is its own element: advance = the font's advance widths, or
    (grid > 0) at `xy` on the grid, one glyph per fixed-pitch cell exactly as render.typeset sets it. `bind`: the
    characters' BIND_HEADS labels."""
    bind = bind or {}
    if grid:
        for i, ch in enumerate(text):
            c.paint(lambda d, i=i: typeset(d, xy, text, size, COLOURS[ink], grid, only=i),
                    Element(ink, "char", char=ch, **bind))
        return
    x, y = xy
    left = text_bbox(text[0], size)[0]
    top = min(text_bbox(ch, size)[1] for ch in text)
    for i, ch in enumerate(text):
        gx = x - left + round(font(size).getlength(text[:i]))
        c.paint(lambda d, ch=ch, gx=gx: d.text((gx, y - top), ch, font=font(size), fill=COLOURS[ink]),
                Element(ink, "char", char=ch, **bind))
