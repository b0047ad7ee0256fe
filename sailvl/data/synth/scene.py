"""Shape scenes: the object spec, random non-overlapping layouts, drawing, and the words for them.

An object is a shape of one colour with an integer centre (x, y) and half-extent r: it covers the pixel
square [x - r, x + r] (inclusive), so its box in continuous pixel coordinates is [x - r, x + r + 1).
Shapes are drawn to fill that box (circle inscribed, full square, triangle apex-up on the bottom edge,
diamond, plus-shaped cross). "small" / "large" are radius ranges far enough apart that the size order of
two objects is visible (vqa_compare additionally requires the areas to agree).

Within one scene every (colour, shape) pair is unique, so "the red circle" always names one object.
Words are fixed: positions come from a 3 x 3 grid (top / bottom, left / right, centre), captions list
objects left to right as "a large red circle at the top left", counts are digits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from .world import BACKGROUND, COLOURS, SHAPES, World, join_words

GAP = 2  # minimum free pixels between two objects (at 64 px)


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str  # "small" | "large"
    x: int
    y: int
    r: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        """Pixel box [x1, y1, x2, y2), continuous coordinates."""
        return (self.x - self.r, self.y - self.r, self.x + self.r + 1, self.y + self.r + 1)

    def area(self) -> float:
        """Approximate painted area; used to keep size comparisons unambiguous across shapes."""
        side = 2 * self.r + 1
        factor = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 0.5}
        return factor[self.shape] * side * side

    def bounding_radius(self) -> float:
        return self.r if self.shape in ("circle", "diamond") else self.r * math.sqrt(2)

    def to_dict(self) -> dict:
        return {"shape": self.shape, "colour": self.colour, "size": self.size, "x": self.x, "y": self.y,
                "r": self.r}

    @staticmethod
    def from_dict(d: dict) -> Obj:
        return Obj(**d)


def grounding_box(obj: Obj, image_size: int) -> list[int]:
    """The object's box in 0-1000 integer coordinates (SAIL-VL2 grounding format)."""
    return [round(v * 1000 / image_size) for v in obj.box()]


def format_box(box: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in box) + "]"


# ---------------------------------------------------------------- layout

def _apart(a: Obj, b: Obj, gap: int) -> bool:
    """True when the two objects cannot touch: their boxes are separated on one axis, or their
    bounding circles are (either is sufficient; together they allow diagonal packing)."""
    ax1, ay1, ax2, ay2 = a.box()
    bx1, by1, bx2, by2 = b.box()
    if ax2 + gap <= bx1 or bx2 + gap <= ax1 or ay2 + gap <= by1 or by2 + gap <= ay1:
        return True
    return math.hypot(a.x - b.x, a.y - b.y) >= a.bounding_radius() + b.bounding_radius() + gap


def fits(obj: Obj, others: list[Obj], world: World) -> bool:
    s = world.image_size
    if obj.x - obj.r < 1 or obj.y - obj.r < 1 or obj.x + obj.r > s - 2 or obj.y + obj.r > s - 2:
        return False
    gap = world.px(GAP)
    return all(_apart(obj, o, gap) for o in others)


def place(rng: random.Random, world: World, shape: str, colour: str, size: str, others: list[Obj],
          r: int | None = None, tries: int = 40) -> Obj | None:
    """The object at a random position inside the image and apart from `others` (the same test as
    `fits`, inlined for speed); None when `tries` positions all failed."""
    if r is None:
        r = world.radius(size, rng)
    lo, hi = r + 1, world.image_size - 2 - r
    if lo > hi:
        return None
    gap = world.px(GAP)
    br = r if shape in ("circle", "diamond") else r * math.sqrt(2)
    # per other object: the centre distances that separate the boxes, and the bounding-circle distance
    near = [(o.x, o.y, r + o.r + 1 + gap, br + o.bounding_radius() + gap) for o in others]
    randint = rng.randint
    for _ in range(tries):
        x, y = randint(lo, hi), randint(lo, hi)
        for ox, oy, box_d, circ_d in near:
            dx, dy = abs(x - ox), abs(y - oy)
            if dx < box_d and dy < box_d and dx * dx + dy * dy < circ_d * circ_d:
                break
        else:
            return Obj(shape, colour, size, x, y, r)
    return None


def unused_kind(rng: random.Random, world: World, scene: list[Obj]) -> tuple[str, str]:
    """A (colour, shape) pair not yet in the scene."""
    used = {(o.colour, o.shape) for o in scene}
    free = [(c, s) for c in world.colours for s in world.shapes if (c, s) not in used]
    if not free:
        raise ValueError("every colour x shape pair is already in the scene")
    return rng.choice(free)


def random_scene(rng: random.Random, world: World, n: int,
                 kinds: list[tuple[str, str]] | None = None) -> list[Obj]:
    """n non-overlapping objects with unique (colour, shape): `kinds` when given (n pairs, placed in
    that order), else random. Each object is small or large at random; a large one that does not fit
    becomes small, and a layout where even that fails is redrawn."""
    for _ in range(200):
        scene: list[Obj] = []
        for k in range(n):
            colour, shape = kinds[k] if kinds else unused_kind(rng, world, scene)
            size = rng.choice(("small", "large"))
            o = place(rng, world, shape, colour, size, scene)
            if o is None and size == "large":
                o = place(rng, world, shape, colour, "small", scene)
            if o is None:
                break
            scene.append(o)
        if len(scene) == n:
            return scene
    raise ValueError(f"cannot fit {n} objects into a {world.image_size} px image; lower max_objects or the radii")


# ---------------------------------------------------------------- drawing

def draw_obj(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    c = COLOURS[o.colour]
    x, y, r = o.x, o.y, o.r
    if o.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=c)
    elif o.shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=c)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=c)
    elif o.shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=c)
    elif o.shape == "cross":
        t = max(1, round(r * 0.35))
        draw.rectangle((x - r, y - t, x + r, y + t), fill=c)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=c)
    else:  # pragma: no cover - World validates shape names
        raise ValueError(f"unknown shape {o.shape!r}")


def render(scene: list[Obj], world: World) -> Image.Image:
    img = Image.new("RGB", (world.image_size, world.image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene:
        draw_obj(d, o)
    return img


# ---------------------------------------------------------------- words

def position(o: Obj, image_size: int) -> tuple[str, str]:
    """(row, column) on a 3 x 3 grid: row in top/middle/bottom, column in left/centre/right."""
    def third(v: int) -> int:
        f = (v + 0.5) / image_size
        return 0 if f < 0.4 else (2 if f > 0.6 else 1)
    return ("top", "middle", "bottom")[third(o.y)], ("left", "centre", "right")[third(o.x)]


def position_phrase(o: Obj, image_size: int) -> str:
    row, col = position(o, image_size)
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"at the {row} {col}"


def describe(o: Obj, image_size: int) -> str:
    return f"a {o.size} {o.colour} {o.shape} {position_phrase(o, image_size)}"


def caption(scene: list[Obj], image_size: int) -> str:
    """'2 objects: a large red circle on the left and a small blue square at the top right.'"""
    if not scene:
        return "An empty image."
    objs = sorted(scene, key=lambda o: (o.x, o.y))
    n = len(objs)
    return f"{n} object{'s' if n != 1 else ''}: " + join_words([describe(o, image_size) for o in objs]) + "."


REF_ORDERS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour"),
              ("size", "colour", "shape"))


def refer(scene: list[Obj], i: int, avoid: tuple[str, ...] = ()) -> str | None:
    """The shortest phrase naming scene[i] uniquely without the attributes in `avoid`, e.g. "circle",
    "red object", "large square"; None when there is none."""
    target = scene[i]
    for attrs in REF_ORDERS:
        if any(a in avoid for a in attrs):
            continue
        key = tuple(getattr(target, a) for a in attrs)
        if sum(tuple(getattr(o, a) for a in attrs) == key for o in scene) == 1:
            words = list(key)
            return " ".join(words) if "shape" in attrs else " ".join(words) + " object"
    return None


def relation(a: Obj, b: Obj, image_size: int) -> str | None:
    """Where a is relative to b: 'left' / 'right' / 'above' / 'below', or None when neither axis clearly
    dominates (the larger offset must be >= 1.5x the other and >= 12% of the image)."""
    dx, dy = a.x - b.x, a.y - b.y
    min_d = 0.12 * image_size
    if abs(dx) >= 1.5 * abs(dy) and abs(dx) >= min_d:
        return "left" if dx < 0 else "right"
    if abs(dy) >= 1.5 * abs(dx) and abs(dy) >= min_d:
        return "above" if dy < 0 else "below"
    return None


def plural(shape: str) -> str:
    return SHAPES[shape]
