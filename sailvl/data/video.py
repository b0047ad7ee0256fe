"""Video frames for SAIL-VL2: decoding, uniform sampling, and Seed1.5-VL-style dynamic sampling.

Features:
  - sources: a video file (PyAV, the optional `data` extra), a folder of frame images, or a list of
    frame references; frames of a folder / list get timestamps from an assumed frame rate;
  - uniform sampling of N frames (segment midpoints, as InternVL samples video);
  - dynamic sampling: choose the frame rate (from `max_fps` down) and the per-frame resolution (from a
    ladder of pixel budgets) so that frames x tokens-per-frame fits a total visual-token budget; the
    prompt then carries each frame's timestamp (`Frame-1 (0.0s): <image>`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .image import ImageError, load_image
from .schema import ImageRef

FRAME_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Frames:
    images: list[Image.Image]
    timestamps: list[float]  # seconds


def uniform_indices(n_total: int, n: int) -> list[int]:
    """Midpoints of n equal segments of [0, n_total) (all frames when n >= n_total)."""
    if n_total <= 0:
        return []
    if n >= n_total:
        return list(range(n_total))
    seg = n_total / n
    return [min(n_total - 1, int(seg / 2 + seg * i)) for i in range(n)]


def _decode_file(path: Path) -> Frames:
    try:
        import av  # type: ignore
    except ImportError:
        raise ImportError("reading video files needs PyAV: pip install 'sailvl[data]'") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            images, times = [], []
            for frame in container.decode(stream):
                images.append(frame.to_image().convert("RGB"))
                t = frame.time if frame.time is not None else len(times) / float(stream.average_rate or 1)
                times.append(float(t))
    except (OSError, ValueError, IndexError, av.FFmpegError) as e:  # type: ignore[attr-defined]
        raise ImageError(f"corrupt video: {path}: {e}") from None
    if not images:
        raise ImageError(f"video has no frames: {path}")
    return Frames(images, times)


def load_frames(video: ImageRef | list[ImageRef], fps: float = 1.0, max_pixels: int | None = None) -> Frames:
    """All frames of a video file, a folder of frames (sorted by name) or a list of frames.
    Frames without their own timestamps are spaced 1/fps apart."""
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    if isinstance(video, (list, tuple)):
        refs = list(video)
    else:
        path = Path(video)  # type: ignore[arg-type]
        if path.is_dir():
            refs = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTS)
        elif path.is_file():
            return _decode_file(path)
        else:
            raise ImageError(f"missing video: {path}")
    if not refs:
        raise ImageError("video has no frames")
    return Frames([load_image(r, **kw) for r in refs], [i / fps for i in range(len(refs))])


def sample_uniform(frames: Frames, n: int) -> Frames:
    idx = uniform_indices(len(frames.images), n)
    return Frames([frames.images[i] for i in idx], [frames.timestamps[i] for i in idx])


@dataclass
class DynamicPlan:
    fps: float
    indices: list[int]
    pixels_per_frame: int


def plan_dynamic(timestamps: list[float], token_budget: int, tokens_for_pixels, pixel_ladder: list[int],
                 max_fps: float = 2.0, min_fps: float = 0.25, max_frames: int = 256) -> DynamicPlan:
    """Seed1.5-VL-style: prefer a high frame rate, then lower per-frame resolution, then a lower rate,
    until frames x tokens fits the budget. `tokens_for_pixels(p)` gives the visual tokens of a frame
    resized to about p pixels; `pixel_ladder` lists per-frame pixel budgets from large to small."""
    if not timestamps:
        raise ValueError("no frames to plan")
    duration = timestamps[-1] - timestamps[0]
    fps = max_fps
    while True:
        n = max(1, min(max_frames, int(duration * fps) + 1, len(timestamps)))
        for pixels in pixel_ladder:
            if n * tokens_for_pixels(pixels) <= token_budget:
                return DynamicPlan(fps, _at_rate(timestamps, n), pixels)
        if fps / 2 < min_fps:
            break
        fps /= 2
    # even the lowest rate and resolution overflow: keep as many evenly spread frames as fit
    pixels = pixel_ladder[-1]
    n = max(1, token_budget // max(tokens_for_pixels(pixels), 1))
    return DynamicPlan(fps, _at_rate(timestamps, min(n, len(timestamps))), pixels)


def _at_rate(timestamps: list[float], n: int) -> list[int]:
    """n frames evenly spread in time: the frame nearest to each target time."""
    t = np.asarray(timestamps)
    targets = np.linspace(t[0], t[-1], n) if n > 1 else np.array([t[0]])
    idx = np.abs(t[None, :] - targets[:, None]).argmin(1)
    return sorted(dict.fromkeys(int(i) for i in idx))
