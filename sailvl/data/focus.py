"""Attention-supervision marks: which image tokens a sample's first answer is about.

A record may carry `"focus"`: boxes [x1, y1, x2, y2] in 0-1000 coordinates of its first image (the SAIL-VL2
grounding convention), the objects its first answer depends on. The built-in synthetic world writes them for
the single-question scene tasks (the asked-about object; both objects of a relation; the counted ones). The
processor turns them into per-token marks (`focus_marks`): FOCUS_TARGET on the image tokens whose cell of the
token grid overlaps a box, FOCUS_QUERY on the token that predicts the first answer token. The trainer can then
ask one attention head to look there (`Stage.focus`, sailvl.train.focus).

Only one-tile images have a token grid that maps onto the image directly (row-major, `grid` x `grid` tokens after
pixel shuffle); samples with a tiled or native-resolution first image get no marks.
"""

from __future__ import annotations

import math

import torch

FOCUS_TARGET = 1
FOCUS_QUERY = 2
# a token covers a box when the box takes at least this share of the token's cell (a 2-pixel sliver of an object's
# box at a cell's edge does not count)
MIN_COVER = 0.1


def parse_focus(value) -> list[list[float]]:
    """Validate a record's `focus`: a list of [x1, y1, x2, y2] boxes in 0-1000 coordinates, x1 < x2, y1 < y2."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"focus must be a non-empty list of [x1, y1, x2, y2] boxes, got {value!r}")
    boxes = []
    for b in value:
        if (not isinstance(b, (list, tuple)) or len(b) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)):
            raise ValueError(f"a focus box must be 4 numbers [x1, y1, x2, y2], got {b!r}")
        x1, y1, x2, y2 = (float(v) for v in b)
        if not (0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000):
            raise ValueError(f"focus box {list(b)} is not a box inside 0-1000 coordinates")
        boxes.append([x1, y1, x2, y2])
    return boxes


def grid_cells(boxes: list[list[float]], grid: int) -> list[int]:
    """Row-major indices of the cells of a `grid` x `grid` token grid over the image that the boxes cover."""
    cell = 1000.0 / grid
    out = set()
    for x1, y1, x2, y2 in boxes:
        for r in range(grid):
            for c in range(grid):
                w = min(x2, (c + 1) * cell) - max(x1, c * cell)
                h = min(y2, (r + 1) * cell) - max(y1, r * cell)
                if w > 0 and h > 0 and w * h >= MIN_COVER * cell * cell:
                    out.add(r * grid + c)
    return sorted(out)


def focus_marks(input_ids: torch.Tensor, labels: torch.Tensor, img_context_id: int, first_image_tokens: int,
                tokens_per_tile: int, boxes: list[list[float]], ignore_index: int = -100) -> torch.Tensor | None:
    """[L] int8 marks for one encoded sample (see the module doc), or None when the first image is not one tile
    on a square grid, no box covers a cell, or no trained token comes after the image."""
    grid = math.isqrt(tokens_per_tile)
    if first_image_tokens != tokens_per_tile or grid * grid != tokens_per_tile:
        return None
    image_pos = (input_ids == img_context_id).nonzero().flatten()[:first_image_tokens]
    trained = (labels != ignore_index).nonzero().flatten()
    cells = grid_cells(boxes, grid)
    if len(image_pos) < first_image_tokens or not len(trained) or not cells or int(trained[0]) <= int(image_pos[-1]):
        return None  # (the query must see the image: causal attention)
    marks = torch.zeros(len(input_ids), dtype=torch.int8)
    marks[image_pos[cells]] = FOCUS_TARGET
    marks[int(trained[0]) - 1] = FOCUS_QUERY
    return marks
