"""Answer metrics, pure functions.

  - `normalize_short`: lower-case, trim, drop a trailing period and surrounding quotes (short answers);
  - `exact_match`: normalised equality;
  - `parse_box` / `box_iou` / `grounding_hit`: 0-1000 boxes "[x1, y1, x2, y2]", hit when IoU >= 0.5;
  - `token_f1`: SQuAD-style bag-of-words F1 (captions).
"""

from __future__ import annotations

import re
from collections import Counter

_BOX = re.compile(r"\[\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\]")


def normalize_short(text: str) -> str:
    t = text.strip().lower()
    t = t.strip("\"'` ")
    return t[:-1].strip() if t.endswith(".") else t


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize_short(prediction) == normalize_short(answer))


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    m = _BOX.search(text)
    return tuple(float(g) for g in m.groups()) if m else None


def box_iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def grounding_hit(prediction: str, answer: str, threshold: float = 0.5) -> float:
    p, a = parse_box(prediction), parse_box(answer)
    return float(p is not None and a is not None and box_iou(p, a) >= threshold)


def token_f1(prediction: str, answer: str) -> float:
    p, a = normalize_short(prediction).split(), normalize_short(answer).split()
    common = sum((Counter(p) & Counter(a)).values())
    if not p or not a or not common:
        return float(p == a)
    precision, recall = common / len(p), common / len(a)
    return 2 * precision * recall / (precision + recall)
