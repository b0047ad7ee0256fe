"""The task registry and `sample`, which draws one record in memory.

TASKS maps each task name to its generator `gen(rng: random.Random, world: World) -> (record, images)`;
TRAIN_ONLY holds the generators that are not tasks of their own (several tasks' questions about one image, or
one task's open-ended kinds), used by name for training splits; GENERATORS is both.
`sample` accepts a `random.Random`, a `numpy.random.Generator` or an int seed: all randomness flows
from that one object, so equal states give equal samples.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
from PIL import Image

from . import tasks_scene as S
from . import tasks_text as T
from .record import add_focus, add_scene_trace, is_text_record, place_media
from .world import World, resolve_world

Generator = Callable[[random.Random, World], "tuple[dict, list[Image.Image]]"]

TASKS: dict[str, Generator] = {
    # captions: dense supervision that teaches the ViT to see (CALIBRATION.md)
    "caption": S.caption_task,
    "caption_pretrain": T.caption_pretrain,
    # VQA over shape scenes
    "vqa_color": S.vqa_color,
    "vqa_shape": S.vqa_shape,
    "vqa_count": S.vqa_count,
    "vqa_spatial": S.vqa_spatial,
    "vqa_compare": S.vqa_compare,
    "vqa_yesno": S.vqa_yesno,
    "scene_qa": S.scene_qa,  # several of those questions about one scene, as one conversation
    # rendered text
    "ocr": T.ocr,
    "chart": T.chart,
    "table": T.table,
    # grounding (box in 0-1000 coordinates)
    "grounding": S.grounding,
    # arithmetic rendered as an image: thinking trace + \boxed{}, and direct answer
    "math_cot": T.math_cot,
    "math_direct": T.math_direct,
    # several images, video
    "multi_change": S.multi_change,
    "video_motion": S.video_motion,
    "video_count": S.video_count,
    # language only
    "text_instruct": T.text_instruct,
}
# Training-only generators (not evaluated: several single-task questions about one image, or text-only drills)
TRAIN_ONLY: dict[str, Generator] = {
    "scene_drill": S.scene_drill,
    "text_drill": T.text_drill,
    "text_lists": T.text_lists,
    "text_recall": T.text_recall,
    "text_induction": T.text_induction,
}
GENERATORS: dict[str, Generator] = {**TASKS, **TRAIN_ONLY}


def as_rng(rng: random.Random | np.random.Generator | int) -> random.Random:
    """A random.Random from a Random (returned as is), a numpy Generator (seeded from it) or an int."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return random.Random(int(rng))
    raise ValueError(f"rng must be a random.Random, a numpy Generator or an int, got {type(rng).__name__}")


def check_tasks(tasks: list[str] | tuple[str, ...] | None) -> list[str]:
    """The task list (default: all evaluated tasks, in registry order; training-only ones when named);
    ValueError naming unknown ones."""
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks must not be empty")
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {sorted(GENERATORS)}")
    return tasks


def sample(task: str, rng: random.Random | np.random.Generator | int, image_size: int = 64,
           world: World | None = None) -> tuple[dict, list[Image.Image]]:
    """One `task` sample in memory: (record, images). The record is the JSONL object without id and
    paths (see record.py); images are PIL RGB images (video frames for video tasks, [] for text)."""
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; known: {sorted(GENERATORS)}")
    return draw(task, as_rng(rng), resolve_world(world, image_size))


def draw(task: str, rng: random.Random, world: World) -> tuple[dict, list[Image.Image]]:
    """GENERATORS[task] with the world's placement of the image / video placeholders applied."""
    record, images = GENERATORS[task](rng, world)
    if is_text_record(record):  # no turns, no media
        return record, images
    if world.scene_trace == "caption":
        record = add_scene_trace(record, world.image_size)
    if world.focus:
        record = add_focus(record, world.image_size)
    return place_media(record, world.image_position), images
