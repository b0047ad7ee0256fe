"""Rendered text worlds: words and numbers (OCR), equations, bar / line charts and small tables.

Each `make_*` function draws one image from a spec it samples itself and returns (spec, image); the
spec is a plain JSON-able dict that holds everything needed to recompute any answer about the image,
and `describe_*` turns a spec into the dense transcript used by caption-style pretraining samples.
Text uses Pillow's bundled scalable font (cached per size in world.font); text is placed by its ink
box, so the whole glyph run is always inside the image. With `World.text_grid` > 0, OCR words, equations,
table cells (and chart values / labels with `World.chart_typeset`) are typeset (`typeset`): one glyph per
fixed-pitch cell, cells on the pixel grid.
"""

from __future__ import annotations

import random
import string
from functools import lru_cache

from PIL import Image, ImageDraw

from .world import BACKGROUND, COLOURS, INK, World, font, join_words, text_bbox

WORDS = ("CAT", "DOG", "SUN", "RED", "BOX", "HAT", "CUP", "PEN", "MAP", "KEY", "BUS", "CAR", "EGG",
         "FOX", "OWL", "BED", "TOY", "JAM", "ICE", "SKY", "GO", "UP", "NO", "OK", "HI", "ON", "TREE",
         "FISH", "BIRD", "STAR", "MOON", "BOOK", "DOOR", "LAMP", "SHIP", "CAKE", "MILK", "RAIN")
LETTERS = string.ascii_uppercase
DIGITS = string.digits
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
OP_GLYPH = {"+": "+", "-": "-", "*": "x"}  # how the image and the text write each operation


def fit_size(text: str, lo: int, hi: int, max_w: int, max_h: int, rng: random.Random, grid: int = 0) -> int:
    """A random font size in [lo, hi], shrunk until the text's box (`text_size`) fits max_w x max_h."""
    size = rng.randint(lo, hi)
    while size > 6:
        w, h = text_size(text, size, grid)
        if w <= max_w and h <= max_h:
            return size
        size -= 1
    return size


# the glyphs typeset text (text_grid > 0) holds: numbers and equations take the pitch of the narrower numeric set
NUMERIC = string.digits + "+x-=?"
TYPESET_GLYPHS = string.ascii_uppercase + NUMERIC


@lru_cache(maxsize=256)
def _widest(size: int, numeric: bool) -> int:
    return max(text_bbox(ch, size)[2] - text_bbox(ch, size)[0] for ch in (NUMERIC if numeric else TYPESET_GLYPHS))


def pitch(size: int, grid: int, text: str = "") -> int:
    """Cell width of fixed-pitch `text` at `size` on a `grid` px grid: the widest glyph of its set (numeric, or all
    typeset glyphs), rounded up to the grid."""
    return -(-_widest(size, set(text) <= set(NUMERIC)) // grid) * grid


def text_size(text: str, size: int, grid: int = 0) -> tuple[int, int]:
    """(width, height) of the ink box of `text` (proportional, grid 0) or of its cells (typeset on `grid`)."""
    x0, y0, x1, y1 = text_bbox(text, size)
    return (x1 - x0 if grid == 0 else len(text) * pitch(size, grid, text)), y1 - y0


def snap(v: float, grid: int) -> int:
    """`v` rounded to a multiple of `grid` (> 0)."""
    return int(round(v / grid)) * grid


def grid_positions(lo: int, hi: int, grid: int) -> list[int]:
    """Positions in [lo, hi] (grid 0: every pixel; else multiples of grid); [lo] when the range is empty."""
    if grid == 0:
        return list(range(lo, hi + 1)) or [lo]
    return list(range(-(-lo // grid) * grid, hi + 1, grid)) or [-(-lo // grid) * grid]


def place_text(rng: random.Random, text: str, size: int, s: int, margin: int, grid: int) -> tuple[int, int]:
    """A random left-top corner for `text`'s box inside an s x s image with `margin` (on the grid when grid > 0)."""
    w, h = text_size(text, size, grid)
    return rng.choice(grid_positions(margin, s - margin - w, grid)), rng.choice(grid_positions(margin, s - margin - h, grid))


def typeset(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill,
            grid: int = 0, anchor: str = "lt", only: int | None = None) -> tuple[int, int, int, int]:
    """Draw `text` with its box's left-top (anchor 'lt'), centre-top ('mt') or centre-bottom ('mb') at xy; grid 0:
    proportional (`draw_text`). grid > 0: the box's corner is snapped to the grid and each glyph is centred in its
    own cell of width `pitch(size, grid)`, so a glyph always lands at the same offset from the patch grid;
    `only=i` draws glyph i alone, where the whole text would put it. Returns the box (x0, y0, x1, y1)."""
    if grid == 0:
        return draw_text(draw, xy, text, size, fill, anchor)
    w, h = text_size(text, size, grid)
    x, y = xy
    if anchor[0] == "m":
        x -= w / 2
    if anchor[1] == "b":
        y -= h
    W, H = draw.im.size
    x = min(max(0, snap(x, grid)), (W - w) // grid * grid)
    y = min(max(0, snap(y, grid)), (H - h) // grid * grid)
    top = min(text_bbox(ch, size)[1] for ch in text)
    cell = pitch(size, grid, text)
    for i, ch in enumerate(text):
        if only is not None and i != only:
            continue
        gx0, gy0, gx1, _ = text_bbox(ch, size)
        draw.text((x + i * cell + (cell - (gx1 - gx0)) // 2 - gx0, y - top), ch, font=font(size), fill=fill)
    return (x, y, x + w, y + h)


def draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int, fill,
              anchor: str = "lt") -> tuple[int, int, int, int]:
    """Draw so the ink box's left-top (anchor 'lt'), centre-top ('mt') or centre-bottom ('mb') is at xy;
    returns the ink box."""
    x0, y0, x1, y1 = text_bbox(text, size)
    w, h = x1 - x0, y1 - y0
    x, y = xy
    if anchor[0] == "m":
        x -= w // 2
    if anchor[1] == "b":
        y -= h
    draw.text((x - x0, y - y0), text, font=font(size), fill=fill)
    return (x, y, x + w, y + h)


# ---------------------------------------------------------------- words (OCR)

def random_text(rng: random.Random, max_chars: int) -> str:
    n = rng.randint(1, max_chars)
    kind = rng.choice(("word", "number", "letters"))
    if kind == "word":
        words = [w for w in WORDS if len(w) == n]
        if words:
            return rng.choice(words)
    if kind == "number":
        first = rng.choice(DIGITS[1:]) if n > 1 else rng.choice(DIGITS)
        return first + "".join(rng.choice(DIGITS) for _ in range(n - 1))
    return "".join(rng.choice(LETTERS) for _ in range(n))


def make_text_image(rng: random.Random, world: World, text: str | None = None) -> tuple[dict, Image.Image]:
    s = world.image_size
    text = text or random_text(rng, world.ocr_max_chars)
    margin = world.px(3)
    g = world.text_grid
    size = fit_size(text, world.px(world.ocr_font[0]), world.px(world.ocr_font[1]), s - 2 * margin,
                    s - 2 * margin, rng, g)
    x, y = place_text(rng, text, size, s, margin, g)
    colour = rng.choice(INK)
    img = Image.new("RGB", (s, s), BACKGROUND)
    box = typeset(ImageDraw.Draw(img), (x, y), text, size, COLOURS[colour], g)
    return {"text": text, "colour": colour, "font_size": size, "box": list(box)}, img


def describe_text(spec: dict) -> str:
    return f'The text "{spec["text"]}" written in {spec["colour"]}.'


# ---------------------------------------------------------------- equations

def random_problem(rng: random.Random, world: World) -> tuple[int, str, int, int]:
    op = rng.choice(world.math_ops)
    a, b = rng.randint(0, world.max_operand), rng.randint(0, world.max_operand)
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b, OPS[op](a, b)


def make_equation_image(rng: random.Random, world: World) -> tuple[dict, Image.Image]:
    a, op, b, result = random_problem(rng, world)
    text = f"{a}{OP_GLYPH[op]}{b}=?"
    s, margin, g = world.image_size, world.px(2), world.text_grid
    size = fit_size(text, world.px(world.equation_font[0]), world.px(world.equation_font[1]), s - 2 * margin,
                    s - 2 * margin, rng, g)
    x, y = place_text(rng, text, size, s, margin, g)
    colour = rng.choice(INK)
    img = Image.new("RGB", (s, s), BACKGROUND)
    typeset(ImageDraw.Draw(img), (x, y), text, size, COLOURS[colour], g)
    return {"a": a, "op": op, "b": b, "result": result, "text": text, "colour": colour}, img


def describe_equation(spec: dict) -> str:
    return f'The problem "{spec["a"]} {OP_GLYPH[spec["op"]]} {spec["b"]} = ?" written in {spec["colour"]}.'


# ---------------------------------------------------------------- charts

def make_chart(rng: random.Random, world: World, kind: str | None = None) -> tuple[dict, Image.Image]:
    """A bar or line chart of k items: distinct letter labels under the axis (World.chart_letters), distinct values 1-9
    printed above each bar / point, heights proportional to the values."""
    kind = kind or rng.choice(("bar", "line"))
    k = world.chart_items
    labels = rng.sample(LETTERS, k) if world.chart_letters is None else sorted(rng.sample(world.chart_letters, k))
    values = rng.sample(range(1, 10), k)
    s = world.image_size
    fs = world.px(world.chart_font)
    label_h = text_bbox("A", fs)[3] - text_bbox("A", fs)[1]
    axis_y, label_y = chart_axis(world, fs)
    top = label_h + world.px(4)          # room for the value text above the tallest item
    unit = (axis_y - top) / 9.0
    slot = (s - world.px(4)) / k
    xs = [int(world.px(2) + slot * (i + 0.5)) for i in range(k)]
    ys = [round(axis_y - v * unit) for v in values]
    colour = rng.choice(("red", "green", "blue", "purple", "orange"))
    img = Image.new("RGB", (s, s), BACKGROUND)
    d = ImageDraw.Draw(img)
    d.line((0, axis_y, s - 1, axis_y), fill=COLOURS["gray"], width=1)
    if kind == "bar":
        half = max(2, int(slot * 0.3))
        for x, y in zip(xs, ys):
            d.rectangle((x - half, y, x + half, axis_y - 1), fill=COLOURS[colour])
    else:
        d.line(list(zip(xs, ys)), fill=COLOURS[colour], width=max(1, world.px(2)))
        pr = max(1, world.px(2))
        for x, y in zip(xs, ys):
            d.ellipse((x - pr, y - pr, x + pr, y + pr), fill=COLOURS[colour])
    g = chart_grid(world)
    for x, y, lab, v in zip(xs, ys, labels, values):  # typeset (g > 0): a value lands within 2 px of its bar
        typeset(d, (x, y - world.px(2)), str(v), fs, COLOURS["black"], g, anchor="mb")
        typeset(d, (x, label_y), lab, fs, COLOURS["black"], g, anchor="mt")
    return {"kind": kind, "labels": labels, "values": values, "colour": colour}, img


def chart_grid(world: World) -> int:
    """The grid chart text is typeset on (0: proportional, at any pixel)."""
    return world.text_grid if world.chart_typeset else 0


def chart_axis(world: World, fs: int) -> tuple[int, int]:
    """(axis y, label top y) of a chart with text at font size fs. Typeset, the labels sit on the lowest grid row
    every letter (Q's tail included) fits in, the axis 2 px above them."""
    g, s = chart_grid(world), world.image_size
    if g == 0:
        axis_y = s - (text_bbox("A", fs)[3] - text_bbox("A", fs)[1]) - world.px(4)
        return axis_y, axis_y + world.px(2)
    label_y = (s - max(text_size(ch, fs, g)[1] for ch in LETTERS)) // g * g
    return label_y - world.px(2), label_y


def describe_chart(spec: dict) -> str:
    pairs = join_words([f"{lab} {v}" for lab, v in zip(spec["labels"], spec["values"])])
    return f"A {spec['colour']} {spec['kind']} chart: {pairs}."


# ---------------------------------------------------------------- tables

def make_table(rng: random.Random, world: World) -> tuple[dict, Image.Image]:
    """A grid with a header row of column letters (from A-H), a header column of row letters (from P-W)
    and numbers 0..table_max_value in the cells."""
    n_rows, n_cols = world.table_shape
    cols = sorted(rng.sample("ABCDEFGH", n_cols))
    rows = sorted(rng.sample("PQRSTUVW", n_rows))
    cells = [[rng.randint(0, world.table_max_value) for _ in range(n_cols)] for _ in range(n_rows)]
    s = world.image_size
    cw, ch = s / (n_cols + 1), s / (n_rows + 1)
    widest = str(world.table_max_value)
    fs = world.px(13)
    while fs > 6 and (text_bbox(widest, fs)[2] - text_bbox(widest, fs)[0] > cw - 3
                      or text_bbox("Q", fs)[3] - text_bbox("Q", fs)[1] > ch - 3):
        fs -= 1
    img = Image.new("RGB", (s, s), BACKGROUND)
    d = ImageDraw.Draw(img)
    draw_table_grid(d, s, n_rows, n_cols)

    def put(text: str, ci: int, rj: int, ink: str) -> None:
        w, h = text_size(text, fs, world.text_grid)
        typeset(d, (round((ci + 0.5) * cw - w / 2), round((rj + 0.5) * ch - h / 2)), text, fs, COLOURS[ink],
                world.text_grid)

    for i, c in enumerate(cols):
        put(c, i + 1, 0, "blue")
    for j, r in enumerate(rows):
        put(r, 0, j + 1, "blue")
        for i in range(n_cols):
            put(str(cells[j][i]), i + 1, j + 1, "black")
    return {"cols": cols, "rows": rows, "cells": cells}, img


def draw_table_grid(d: ImageDraw.ImageDraw, s: int, n_rows: int, n_cols: int) -> None:
    """Shaded header row and column and the grid lines of an s x s table with n_rows x n_cols data cells."""
    cw, ch = s / (n_cols + 1), s / (n_rows + 1)
    d.rectangle((0, 0, s - 1, int(ch)), fill=(225, 232, 245))
    d.rectangle((0, 0, int(cw), s - 1), fill=(225, 232, 245))
    for i in range(1, n_cols + 1):
        d.line((int(i * cw), 0, int(i * cw), s - 1), fill=COLOURS["gray"])
    for j in range(1, n_rows + 1):
        d.line((0, int(j * ch), s - 1, int(j * ch)), fill=COLOURS["gray"])
    d.rectangle((0, 0, s - 1, s - 1), outline=COLOURS["gray"])


def describe_table(spec: dict) -> str:
    lines = [f"row {r}: " + ", ".join(f"{c} {v}" for c, v in zip(spec["cols"], row))
             for r, row in zip(spec["rows"], spec["cells"])]
    return f"A table with columns {join_words(spec['cols'])}; " + "; ".join(lines) + "."
