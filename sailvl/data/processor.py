"""`sailvl.Processor`: tokenizer + image / video preprocessing + the SAIL-VL2 chat template.

Saved with a model directory as `preprocessor_config.json` plus the HF tokenizer files; loaded from one
(settings the file lacks come from the model's config.json). One call turns a `Sample` (or messages and
images) into model inputs: `input_ids`, `labels` (assistant spans only, Think-Fusion rule),
`pixel_values` ([tiles, 3, S, S] in tiles mode; a list of [3, H, W] in native mode).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import SailVLConfig
from .focus import focus_marks
from .image import DEFAULT_MAX_PIXELS, ImageError, load_image, max_tiles_for, native_resize, tiles_tensor, to_tensor
from .schema import Sample, SkipSample
from .template import IMG_CONTEXT, IM_END, JINJA_TEMPLATE, Visuals, parse_thinking, render
from .tokenizer import TOKENIZER_FILES, load_tokenizer, token_id
from .video import load_frames, plan_dynamic, sample_uniform

IGNORE_INDEX = -100
CONFIG_NAME = "preprocessor_config.json"


@dataclass
class ProcessorConfig:
    mode: str = "tiles"  # "tiles" (InternVL dynamic tiling) or "native" (2D-RoPE ViT)
    image_size: int = 448
    patch_size: int = 14
    downsample_ratio: float = 0.5
    dynamic_image_size: bool = True
    use_thumbnail: bool = True
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 10
    use_msac: bool = False
    min_pixels: int = 56 * 56
    max_pixels: int = 1792 * 1792
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_images: int = 64
    video_frames: int = 16
    video_sampling: str = "uniform"  # or "dynamic"
    video_token_budget: int = 4096
    video_max_fps: float = 2.0
    frames_fps: float = 1.0  # frame rate assumed for folders / lists of frames
    max_length: int | None = None
    system_prompt: str | None = None

    def __post_init__(self):
        if self.mode not in ("tiles", "native"):
            raise ValueError(f"processor mode must be 'tiles' or 'native', got {self.mode!r}")
        if self.video_sampling not in ("uniform", "dynamic"):
            raise ValueError(f"video_sampling must be 'uniform' or 'dynamic', got {self.video_sampling!r}")

    @property
    def tokens_per_tile(self) -> int:
        return int((self.image_size // self.patch_size) ** 2 * self.downsample_ratio**2)

    @property
    def factor(self) -> int:
        return int(self.patch_size / self.downsample_ratio)

    @classmethod
    def from_model_config(cls, cfg: SailVLConfig, **overrides) -> ProcessorConfig:
        v = cfg.vision_config
        return cls(mode="native" if v.position_embedding == "rope2d" else "tiles", image_size=cfg.force_image_size,
                   patch_size=v.patch_size, downsample_ratio=cfg.downsample_ratio,
                   dynamic_image_size=cfg.dynamic_image_size, use_thumbnail=cfg.use_thumbnail,
                   min_dynamic_patch=cfg.min_dynamic_patch, max_dynamic_patch=cfg.max_dynamic_patch, **overrides)


class Processor:
    def __init__(self, tokenizer, config: ProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or ProcessorConfig()
        self.img_context_id = token_id(tokenizer, IMG_CONTEXT)
        self.im_end_id = token_id(tokenizer, IM_END)

    # ------------------------------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides) -> Processor:
        path = Path(path)
        file = path / CONFIG_NAME
        if file.exists():
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{file} is not valid JSON: {e}") from None
            names = {f.name for f in dataclasses.fields(ProcessorConfig)}
            cfg = ProcessorConfig(**{**{k: v for k, v in data.items() if k in names}, **overrides})
        elif (path / "config.json").exists():
            cfg = ProcessorConfig.from_model_config(SailVLConfig.load(path / "config.json"), **overrides)
        else:
            cfg = ProcessorConfig(**overrides)
        return cls(load_tokenizer(path), cfg)

    def save_pretrained(self, path: str | Path, source_dir: str | Path | None = None) -> None:
        """Write preprocessor_config.json and the tokenizer files (copied from source_dir when given,
        so files like tokenizer_config.json survive; else tokenizer.json is serialised)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")
        copied = False
        if source_dir is not None and Path(source_dir).resolve() != path.resolve():
            for name in TOKENIZER_FILES:
                if (Path(source_dir) / name).exists():
                    shutil.copy2(Path(source_dir) / name, path / name)
                    copied = True
        if not copied and not (path / "tokenizer.json").exists():
            self.tokenizer.save(str(path / "tokenizer.json"))
        tcfg_file = path / "tokenizer_config.json"
        tcfg = json.loads(tcfg_file.read_text()) if tcfg_file.exists() else {}
        tcfg["chat_template"] = JINJA_TEMPLATE
        tcfg_file.write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")

    # ----------------------------------------------------------------------------------------- vision
    def image_inputs(self, images: list, n_images: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Decode and preprocess images -> (tensors per image: [tiles, 3, S, S] or [3, H, W]; tokens per image)."""
        c = self.config
        n = n_images if n_images is not None else len(images)
        if n > c.max_images:
            raise ImageError(f"too many images: {n} > {c.max_images}")
        tensors, tokens = [], []
        for ref in images:
            im = load_image(ref, c.max_image_pixels)
            if c.mode == "native":
                im = native_resize(im, c.factor, c.min_pixels, c.max_pixels)
                tensors.append(to_tensor(im))
                tokens.append((im.width // c.factor) * (im.height // c.factor))
            else:
                if c.dynamic_image_size:
                    tiles = tiles_tensor(im, c.image_size, c.min_dynamic_patch, max_tiles_for(n, c.max_dynamic_patch),
                                         c.use_thumbnail, msac=c.use_msac and n == 1)
                else:
                    tiles = to_tensor(im.resize((c.image_size, c.image_size), resample=3))[None]
                tensors.append(tiles)
                tokens.append(tiles.shape[0] * c.tokens_per_tile)
        return tensors, tokens

    def video_inputs(self, video) -> tuple[list[torch.Tensor], list[int], list[float] | None]:
        """Frames -> (one tensor per frame, tokens per frame, timestamps when dynamically sampled)."""
        c = self.config
        frames = load_frames(video, fps=c.frames_fps, max_pixels=c.max_image_pixels)
        if c.video_sampling == "uniform":
            frames = sample_uniform(frames, c.video_frames)
            tensors, tokens = self._frames_to_tensors(frames.images, None)
            return tensors, tokens, None
        if c.mode == "native":
            ladder = [p for p in (448 * 448, 336 * 336, 224 * 224, 112 * 112) if p >= c.factor**2] or [c.factor**2]
            cost = lambda p: max(1, p // (c.factor**2))  # noqa: E731
        else:  # a tile per frame: resolution is fixed, only the frame rate can move
            ladder, cost = [c.image_size**2], lambda p: c.tokens_per_tile  # noqa: E731
        plan = plan_dynamic(frames.timestamps, c.video_token_budget, cost, ladder, max_fps=c.video_max_fps)
        images = [frames.images[i] for i in plan.indices]
        tensors, tokens = self._frames_to_tensors(images, plan.pixels_per_frame)
        return tensors, tokens, [frames.timestamps[i] for i in plan.indices]

    def _frames_to_tensors(self, images, pixels):
        c = self.config
        tensors, tokens = [], []
        for im in images:
            if c.mode == "native":
                im = native_resize(im, c.factor, c.min_pixels, pixels or c.max_pixels)
                tensors.append(to_tensor(im))
                tokens.append((im.width // c.factor) * (im.height // c.factor))
            else:
                tensors.append(to_tensor(im.resize((c.image_size, c.image_size), resample=3))[None])
                tokens.append(c.tokens_per_tile)
        return tensors, tokens

    # ------------------------------------------------------------------------------------------- text
    def __call__(self, messages: list[dict], images: list | None = None, video=None, *, thinking: bool | None = None,
                 add_generation_prompt: bool = False, system: str | None = None) -> dict:
        """Messages (+ images / video) -> {"input_ids": [L] long, "labels": [L] long, "pixel_values": ...,
        "num_image_tokens": int, "text": str}. Raises ImageError / SkipSample naming bad input."""
        images = list(images or [])
        tensors, img_tokens = self.image_inputs(images) if images else ([], [])
        frame_tokens, frame_times = [], None
        if video is not None:
            vt, frame_tokens, frame_times = self.video_inputs(video)
            tensors = tensors + vt
        visuals = Visuals(img_tokens, frame_tokens, frame_times)
        text, spans = render(messages, visuals, system=system if system is not None else self.config.system_prompt,
                             thinking=thinking, add_generation_prompt=add_generation_prompt)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = torch.tensor(enc.ids, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        if spans:
            starts = torch.tensor([o[0] for o in enc.offsets])
            keep = torch.zeros_like(ids, dtype=torch.bool)
            for s, e in spans:
                keep |= (starts >= s) & (starts < e)
            labels[keep] = ids[keep]
        n_visual = sum(img_tokens) + sum(frame_tokens)
        if int((ids == self.img_context_id).sum()) != n_visual:
            raise SkipSample("image placeholder text was tokenized unexpectedly (the tokenizer splits <IMG_CONTEXT>)")
        if self.config.max_length is not None and len(ids) > self.config.max_length:
            raise SkipSample(f"too long: {len(ids)} tokens > max_length {self.config.max_length}")
        pixel_values = None
        if tensors:
            pixel_values = list(tensors) if self.config.mode == "native" else torch.cat(tensors)
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "num_image_tokens": n_visual,
                "text": text, "tokens_per_image": img_tokens}

    def encode_text(self, text: str, prompt: str | None = None) -> dict:
        """Plain text (no chat template) -> model inputs: every token of `text` a label, as LLM pretraining text is
        trained (a sample's first token is never predicted: the packer's loss weights skip it); an untrained
        `prompt` before it (tokenized on its own, so the two meet at a token boundary)."""
        head = self.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
        body = self.tokenizer.encode(text, add_special_tokens=False).ids
        ids = torch.tensor(head + body, dtype=torch.long)
        if (ids == self.img_context_id).any():
            raise SkipSample("a text sample holds image-context tokens")
        if self.config.max_length is not None and len(ids) > self.config.max_length:
            raise SkipSample(f"too long: {len(ids)} tokens > max_length {self.config.max_length}")
        labels = ids.clone()
        labels[:len(head)] = IGNORE_INDEX
        if int((labels[1:] != IGNORE_INDEX).sum()) == 0:
            raise SkipSample("no trainable tokens")
        return {"input_ids": ids, "labels": labels, "pixel_values": None, "num_image_tokens": 0,
                "text": (prompt or "") + text, "tokens_per_image": []}

    def encode_sample(self, sample: Sample) -> dict:
        """A training sample -> model inputs (raises SkipSample for anything unusable)."""
        sample.validate()
        if sample.text is not None:
            return self.encode_text(sample.text, sample.prompt)
        out = self(sample.messages, sample.images, sample.video)
        if not (out["labels"] != IGNORE_INDEX).any():
            raise SkipSample("no trainable tokens")
        if sample.meta.get("focus") and out["tokens_per_image"] and self.config.mode != "native":
            marks = focus_marks(out["input_ids"], out["labels"], self.img_context_id, out["tokens_per_image"][0],
                                self.config.tokens_per_tile, sample.meta["focus"])
            if marks is not None:
                out["focus"] = marks
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    parse_thinking = staticmethod(parse_thinking)
