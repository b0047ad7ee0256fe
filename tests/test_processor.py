"""sailvl.Processor: samples -> input_ids / labels / pixel_values, video, persistence, bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from sailvl import Processor
from sailvl.data.image import ImageError
from sailvl.data.processor import IGNORE_INDEX, ProcessorConfig
from sailvl.data.schema import Sample, SkipSample
from sailvl.data.tokenizer import load_tokenizer


@pytest.fixture
def proc(bpe_dir):
    return Processor(load_tokenizer(bpe_dir), ProcessorConfig(image_size=64, patch_size=8, max_dynamic_patch=4))


def _img(w, h, colour="red"):
    return Image.new("RGB", (w, h), colour)


def test_tiles_sample_ids_labels_pixels(proc):
    s = Sample([{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                {"role": "assistant", "content": "red"}], images=[_img(128, 64)])
    out = proc.encode_sample(s)
    ids, labels = out["input_ids"], out["labels"]
    assert out["pixel_values"].shape == (3, 3, 64, 64)  # (2,1) grid + thumbnail
    assert out["num_image_tokens"] == 3 * 16 == int((ids == proc.img_context_id).sum())
    assert proc.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=False) == "red<|im_end|>"
    assert proc.decode(ids, skip_special_tokens=False) == out["text"]
    assert out["text"].startswith("<|im_start|>user\n<img><IMG_CONTEXT>")


def test_multi_image_and_native_mode(proc, bpe_dir):
    msgs = [{"role": "user", "content": "<image>\n<image>\nSame?"}, {"role": "assistant", "content": "no"}]
    out = proc(msgs, [_img(64, 64), _img(300, 64)])
    assert "Image-1: <img>" in out["text"] and "Image-2: <img>" in out["text"]
    native = Processor(load_tokenizer(bpe_dir), ProcessorConfig(mode="native", patch_size=8, min_pixels=16 * 16,
                                                                max_pixels=64 * 64))
    out = native(msgs, [_img(64, 64), _img(300, 64)])
    shapes = [tuple(p.shape) for p in out["pixel_values"]]
    assert shapes == [(3, 64, 64), (3, 16, 128)]  # 300x64 floored into the 64*64 budget, multiples of 16
    assert out["num_image_tokens"] == 16 + 8


def test_video_from_frames_uniform_and_dynamic(proc, bpe_dir, tmp_path):
    frames = [_img(64, 64, (i * 20, 0, 0)) for i in range(10)]
    for i, f in enumerate(frames):
        f.save(tmp_path / f"{i:03d}.png")
    msgs = [{"role": "user", "content": "<video>\nWhere?"}, {"role": "assistant", "content": "left"}]
    proc.config.video_frames = 4
    out = proc(msgs, video=str(tmp_path))
    assert out["pixel_values"].shape == (4, 3, 64, 64) and out["text"].count("Frame-") == 4
    # uniform sampling takes segment midpoints: frames 1, 3, 6, 8 of 10
    first = out["pixel_values"][0, 0, 0, 0].item()
    assert abs(first - ((20 / 255) - 0.485) / 0.229) < 1e-4
    dyn = Processor(load_tokenizer(bpe_dir), ProcessorConfig(image_size=64, patch_size=8, video_sampling="dynamic",
                                                             video_token_budget=16 * 6, video_max_fps=2.0))
    out = dyn(msgs, video=frames)  # 10 frames at 1 fps = 9 s; 2 fps needs 19 frames > budget of 6 tiles
    n = out["text"].count("Frame-")
    assert n <= 6 and out["num_image_tokens"] <= 16 * 6
    assert "Frame-1 (0.0s): <img>" in out["text"]


def test_video_file_with_pyav(proc, tmp_path):
    av = pytest.importorskip("av")
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        stream = c.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(8):
            arr = np.zeros((64, 64, 3), np.uint8)
            arr[:, i * 8:(i + 1) * 8] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    proc.config.video_frames = 4
    out = proc([{"role": "user", "content": "<video>\nWhere?"}], video=str(path), add_generation_prompt=True)
    assert out["pixel_values"].shape == (4, 3, 64, 64)
    with pytest.raises(ImageError, match="corrupt video|missing video"):
        (tmp_path / "bad.mp4").write_bytes(b"not a video")
        proc([{"role": "user", "content": "<video>"}], video=str(tmp_path / "bad.mp4"))


def test_bad_inputs_are_skips(proc):
    long = Sample([{"role": "user", "content": "red " * 50}, {"role": "assistant", "content": "ok"}])
    proc.config.max_length = 20
    with pytest.raises(SkipSample, match="too long"):
        proc.encode_sample(long)
    proc.config.max_length = None
    with pytest.raises(SkipSample, match="no assistant turn"):
        proc.encode_sample(Sample([{"role": "user", "content": "hi"}]))
    with pytest.raises(SkipSample, match="corrupt image"):
        proc.encode_sample(Sample([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                                  images=[b"junk"]))
    proc.config.max_images = 1
    with pytest.raises(ImageError, match="too many images"):
        proc([{"role": "user", "content": "<image><image>"}], [_img(8, 8), _img(8, 8)])


def test_save_and_load_round_trip(proc, tmp_path, bpe_dir):
    proc.config.use_msac = True
    proc.save_pretrained(tmp_path, source_dir=bpe_dir)
    again = Processor.from_pretrained(tmp_path)
    assert again.config == proc.config
    assert (tmp_path / "tokenizer_config.json").exists()
    msgs = [{"role": "user", "content": "<image>\nWhat?"}, {"role": "assistant", "content": "blue"}]
    a, b = proc(msgs, [_img(100, 60)]), again(msgs, [_img(100, 60)])
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_think_tokens_survive_decoding(proc):
    ids = proc.tokenizer.encode("<think>\nhm\n</think>\n\n\\boxed{4}", add_special_tokens=False).ids
    text = proc.decode(ids, skip_special_tokens=True)
    assert proc.parse_thinking(text) == ("hm", "4")


def test_plain_text_samples(proc):
    """A document trains on every token (the packer's weights skip the first); a prompt-completion pair on the
    completion only; neither goes through the chat template."""
    doc = proc.encode_sample(Sample([], text="red circle, blue square"))
    assert torch.equal(doc["labels"], doc["input_ids"]) and doc["pixel_values"] is None
    assert proc.decode(doc["input_ids"], skip_special_tokens=False) == doc["text"] == "red circle, blue square"
    pair = proc.encode_sample(Sample([], text="2", prompt="Q:1+1="))
    trained = pair["labels"] != IGNORE_INDEX
    assert proc.decode(pair["input_ids"], skip_special_tokens=False) == "Q:1+1=2"
    assert proc.decode(pair["labels"][trained]) == "2" and not trained[:-1].any()
    with pytest.raises(SkipSample, match="cannot also carry"):
        proc.encode_sample(Sample([{"role": "user", "content": "hi"}], text="x"))
    with pytest.raises(SkipSample, match="non-empty text"):
        proc.encode_sample(Sample([], text="  ", prompt="a"))
    with pytest.raises(SkipSample, match="no trainable tokens"):
        proc.encode_sample(Sample([], text="r"))  # one token: nothing predicts it
    with pytest.raises(SkipSample, match="image-context"):
        proc.encode_sample(Sample([], text="see <IMG_CONTEXT> here"))
    proc.config.max_length = 5
    with pytest.raises(SkipSample, match="too long"):
        proc.encode_sample(Sample([], text="red " * 20))
