"""The knobs and the fixed vocabulary of the synthetic world.

`World` is the difficulty dial: image size, objects per scene, object radii, OCR length, arithmetic
range, chart / table sizes, video length. Its defaults are the world that CALIBRATION.md measured as
learnable by a tiny ViT (patch 8) trained from scratch on a CPU: 64 px images, <= 3 objects of radius
about 10-17 px, OCR of 1-3 large characters, single-digit arithmetic. Pixel quantities are given for
64 px and scaled linearly with `image_size`.

The answer vocabulary is small and fixed (colour names, shape names, digits, left/right/above/below,
yes/no) so every answer is exact-match scorable. The prompt suffixes are the ones SAIL-VL2 uses (and that
`sailvl.data.template` defines) so that synthetic training data matches evaluation prompts.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from functools import cache, lru_cache

from PIL import ImageFont

from ..template import SHORT_ANSWER_SUFFIX, THINK_SUFFIX  # noqa: F401  (re-exported for the task modules)

# Colour name -> RGB; chosen to be far apart from each other and from the white background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 40, 180),
    "orange": (250, 130, 0),
    "pink": (250, 110, 190),
    "brown": (130, 80, 30),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
    "cyan": (0, 190, 210),
}
# Shape name -> plural; geometry lives in scene.py.
SHAPES: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "diamond": "diamonds",
    "cross": "crosses",
}
BACKGROUND = (255, 255, 255)
# Text colours: dark enough to read on white (yellow, pink and cyan are not).
INK = ("black", "red", "green", "blue", "purple", "brown", "orange")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclass(frozen=True)
class World:
    """Difficulty dial of the synthetic world (pixel values are for 64 px and scale with image_size)."""

    image_size: int = 64
    max_objects: int = 3
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    small_radius: tuple[int, int] = (10, 11)   # inclusive range of the half-extent of "small" objects
    large_radius: tuple[int, int] = (15, 17)   # ... of "large" objects
    ocr_max_chars: int = 3
    ocr_font: tuple[int, int] = (20, 30)       # font size range (shrunk to fit the image)
    equation_font: tuple[int, int] = (16, 22)  # ... of equations
    # 0: text is set in the font's proportional widths at any pixel position. N > 0: typeset in fixed-pitch cells
    # on an N px grid (every glyph's cell starts at a multiple of N, the pitch is a multiple of N), like a page
    # rendered at a fixed resolution. Measured with a patch-8 ViT learnt from scratch to name single characters
    # (300 steps of 64 images, 600 held out): any position and size 0.37; fixed size 0.58; fixed size on a 4 px
    # grid 0.98 (benchmarks/typeset_glyphs.py) - sub-patch offsets are what a from-scratch tower learns slowest.
    text_grid: int = 0
    # typeset chart values and labels too (with text_grid > 0). Off by default: on the tiny demo (seed 0) it took
    # chart 0.20 -> 0.30 but the whole 0.55 -> 0.51 (table 0.60 -> 0.44, math_cot 0.76 -> 0.42), one run each; with
    # chart_font=20 (data, tokenizer, tower anew; seeds 0 / 1 / 2) 0.649 / 0.659 / 0.633 against 0.664 / 0.656 / 0.658,
    # chart 0.26 / 0.22 / 0.18, table 0.34 / 0.32 / 0.32 against 0.44 (demo log, session 23)
    chart_typeset: bool = False
    max_operand: int = 9                       # arithmetic operands are 0..max_operand
    math_ops: tuple[str, ...] = ("+",)         # any of "+", "-", "*"
    chart_items: int = 3                       # bars / points per chart
    # font size of chart labels and values. 16 on the tiny demo (data, tokenizer, towers anew; seed 0): the tower read
    # the labels 0.28-0.34 not 0.18-0.23, yet chart stayed 0.22 and the whole 0.579 vs 0.574 (demo log, session 20)
    chart_font: int = 11
    # the letters chart labels come from: None, any of A-Z in any order; a string, a sorted sample of its letters
    # (left to right), as table headers are. "ABCDEF" on the tiny demo (data anew, one tower, seed 0): chart 0.22
    # against 0.14 / 0.20 (two seeds), the whole within noise (demo log, session 21)
    chart_letters: str | None = None
    # "read": chart questions ask for thinking, and the reply first reads the chart left to right inside <think>
    # ("Y=5, N=8, B=4."), then repeats each label the question names with its value ("B=4."; for a difference also the
    # subtraction), then gives the answer in \\boxed{} (the question without the short-answer suffix); "none": direct
    # answers. Measured alone (session-22 tower, 400
    # held out): the model's transcripts are exactly right 0.93-0.98, yet the values it writes after a named label are
    # a random pick among the chart's (0.26-0.42 by run) and chart stays 0.27-0.34 against 0.28 direct (demo log,
    # session 26): what it lacks is the lookup, even in text, so the demo keeps direct answers
    chart_trace: str = "none"
    # text_drill's chart conversations also ask for each label by its place ("Which label is on the left?"): the
    # labels read on their own, which the whole mixture's chart transcripts got wrong (demo log, session 28). Off in the
    # demo: the VLM stages from one tower (seed 0) 0.659 against 0.646, chart 0.16 against 0.12, the label by its
    # place 0.17 on fresh charts (0.97 when trained alone; demo log, session 29)
    chart_label_drill: bool = False
    # the most objects in a scene that a spatial-relation question asks about (vqa_spatial, vqa_yesno's relation
    # questions, the drills' and scene_qa's; None: max_objects, else at least 2). The tiny LLM compares two named
    # objects' places where the scene holds just those two (vqa_spatial alone: 0.77 on 2-object scenes, 0.39 on the
    # world's 2-3-object ones, demo log, session 21); finding both among three as well it does not learn in the budget
    spatial_max_objects: int | None = None
    # where a vqa_spatial question (and the drills' and scene_qa's) names the object it asks about: "first" ("Is the
    # A left of, right of, above or below the B?") or "last" ("Relative to the B, is the A left, right, above or
    # below?"), next to the answer, which a causal LLM reads last
    spatial_subject: str = "first"
    table_shape: tuple[int, int] = (2, 2)      # data rows, data columns
    table_max_value: int = 99
    video_frames: int = 4
    # math_cot's thinking trace: "steps" reads the problem, then counts up / down / adds repeatedly, one number at a
    # time (up to ~12 numbers); "short" reads the problem, then states the result. Measured on the tiny demo
    # (seed 0): the model answers the same problems 1.00 directly yet 0.22 through the "steps" trace, whose long
    # number lists it copies wrongly (e.g. it writes the first operand twice)
    math_trace: str = "steps"
    # where the image / video placeholders stand in the first user turn: "first" (before the question, the usual
    # InternVL / SAIL-VL2 order) or "last" (after the question, before a trailing thinking instruction), so that
    # in a causal LLM the vision tokens can attend to the question. Measured on the tiny demo (seed 0, same day):
    # "last" 0.52 vs "first" 0.55 (math_cot 0.76 -> 0.98, text_instruct 0.22 -> 0.32, but vqa_count 0.72 -> 0.54,
    # vqa_shape 0.78 -> 0.68, scene_qa 0.76 -> 0.66, multi_change 0.28 -> 0.14), so the demo keeps "first"
    image_position: str = "first"
    # "caption": the single-image scene questions (colour, shape, count, spatial, compare, yes/no, grounding) and
    # multi_change ask for thinking, and the reply first describes the scene(s) as the caption task does inside
    # <think>, then gives the answer in \\boxed{} (a describe-then-answer trace); "none": direct answers. Measured
    # on the tiny demo's VLM stages (seed 0, one tower): 0.553 vs 0.546 direct; the model's own descriptions are
    # exactly right in only 8-24% of the traced questions, so the demo keeps direct answers
    scene_trace: str = "none"
    # the SAIL-VL2 short-answer instruction after every short-answer question; off, questions end at "?"
    # (the tiny demo: 11 fewer tokens in a ~45-token sample, the same tasks)
    answer_suffix: bool = True
    # records of the single-question scene tasks name the boxes of the objects their answer is about (`focus`,
    # sailvl.data.focus), for attention supervision in training (Stage.focus); the questions stay the same. Off in
    # the tiny demo: supervising head 0 of LLM layers 1 and 2 with them (the VLM stages from one tower, seed 0) gave
    # 0.535 at weight 0.5 and 0.487 at weight 2 against 0.533 without (demo log, session 18)
    focus: bool = False

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.max_objects <= 8:
            raise ValueError(f"max_objects must be in 1..8, got {self.max_objects}")
        for name in self.colours:
            if name not in COLOURS:
                raise ValueError(f"unknown colour {name!r}; known: {sorted(COLOURS)}")
        for name in self.shapes:
            if name not in SHAPES:
                raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
        if len(self.colours) < 2 or len(self.shapes) < 2:
            raise ValueError("a world needs at least 2 colours and 2 shapes")
        if len(self.colours) * len(self.shapes) < self.max_objects + 1:
            raise ValueError("too few colour x shape combinations for max_objects")
        for op in self.math_ops:
            if op not in ("+", "-", "*"):
                raise ValueError(f"unknown math op {op!r}; use '+', '-' or '*'")
        if not self.math_ops:
            raise ValueError("math_ops must not be empty")
        if not 1 <= self.max_operand <= 99:
            raise ValueError(f"max_operand must be in 1..99, got {self.max_operand}")
        if not 1 <= self.ocr_max_chars <= 12:
            raise ValueError(f"ocr_max_chars must be in 1..12, got {self.ocr_max_chars}")
        if not 2 <= self.chart_items <= 8:
            raise ValueError(f"chart_items must be in 2..8, got {self.chart_items}")
        if not 6 <= self.chart_font <= 20:
            raise ValueError(f"chart_font must be in 6..20, got {self.chart_font}")
        if self.chart_letters is not None:
            cl = self.chart_letters
            if len(set(cl)) != len(cl) or not all("A" <= ch <= "Z" for ch in cl) or len(cl) < self.chart_items:
                raise ValueError(f"chart_letters must be distinct capitals A-Z, at least chart_items "
                                 f"({self.chart_items}) of them, got {cl!r}")
        if self.spatial_max_objects is not None and not 2 <= self.spatial_max_objects <= self.max_objects:
            raise ValueError(f"spatial_max_objects must be in 2..max_objects ({self.max_objects}) or None, "
                             f"got {self.spatial_max_objects}")
        r, c = self.table_shape
        if not (1 <= r <= 6 and 1 <= c <= 6):
            raise ValueError(f"table_shape must be within 1..6 x 1..6, got {self.table_shape}")
        if self.chart_trace not in ("none", "read"):
            raise ValueError(f"chart_trace must be 'none' or 'read', got {self.chart_trace!r}")
        if self.spatial_subject not in ("first", "last"):
            raise ValueError(f"spatial_subject must be 'first' or 'last', got {self.spatial_subject!r}")
        if self.scene_trace not in ("none", "caption"):
            raise ValueError(f"scene_trace must be 'none' or 'caption', got {self.scene_trace!r}")
        if not 2 <= self.video_frames <= 16:
            raise ValueError(f"video_frames must be in 2..16, got {self.video_frames}")
        for name in ("ocr_font", "equation_font"):
            a, b = getattr(self, name)
            if not 6 <= a <= b:
                raise ValueError(f"{name} must be a range (lo, hi) with 6 <= lo <= hi, got {getattr(self, name)}")
        if self.math_trace not in ("steps", "short"):
            raise ValueError(f"math_trace must be 'steps' or 'short', got {self.math_trace!r}")
        if self.image_position not in ("first", "last"):
            raise ValueError(f"image_position must be 'first' or 'last', got {self.image_position!r}")
        if not 0 <= self.text_grid <= 16:
            raise ValueError(f"text_grid must be in 0..16 (0: off), got {self.text_grid}")
        lo, hi = self.small_radius
        lo2, hi2 = self.large_radius
        if not (1 <= lo <= hi < lo2 <= hi2):
            raise ValueError("radii must satisfy 1 <= small_lo <= small_hi < large_lo <= large_hi")

    @property
    def suffix(self) -> str:
        """What follows a short-answer question in this world."""
        return SHORT_ANSWER_SUFFIX if self.answer_suffix else ""

    @property
    def scale(self) -> float:
        return self.image_size / 64.0

    def px(self, v: float) -> int:
        """A 64 px-world length scaled to this image size."""
        return max(1, round(v * self.scale))

    def radius(self, size: str, rng: random.Random) -> int:
        lo, hi = self.small_radius if size == "small" else self.large_radius
        return rng.randint(self.px(lo), self.px(hi))

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_world(world: World | None, image_size: int) -> World:
    """`image_size` is a shortcut for `World(image_size=...)`; a given `world` must not contradict it."""
    if world is None:
        return World(image_size=image_size)
    if not isinstance(world, World):
        raise ValueError(f"world must be a World, got {type(world).__name__}")
    if image_size not in (64, world.image_size):
        raise ValueError(f"image_size={image_size} contradicts world.image_size={world.image_size}")
    return world


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` px, loaded once per size."""
    f = ImageFont.load_default(size=size)
    if not isinstance(f, ImageFont.FreeTypeFont):  # Pillow built without FreeType
        raise RuntimeError("the synthetic world needs Pillow with FreeType (ImageFont.load_default(size=...))")
    return f


@lru_cache(maxsize=4096)
def text_bbox(text: str, size: int) -> tuple[int, int, int, int]:
    """Ink box of `text` at font `size` relative to the drawing origin (cached: the vocabulary is small)."""
    return font(size).getbbox(text)


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
