"""Image decoding and preprocessing: InternVL tiling parity, MSAC order, native sizes, colour modes, bad files."""

import io
import random

import numpy as np
import pytest
from PIL import Image

import torch

from sailvl.data.image import (ImageError, candidate_grids, closest_grid, cut_tiles, dynamic_tiles, load_image,
                               max_tiles_for, native_size, tiles_tensor, to_tensor)


# --- InternVL's reference, transcribed from its published preprocessing code (grid choice only) ---
def internvl_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def internvl_grid(width, height, min_num, max_num, image_size):
    target_ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                        if i * j <= max_num and i * j >= min_num)
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    return internvl_find_closest_aspect_ratio(width / height, target_ratios, width, height, image_size)


@pytest.mark.parametrize("size,expected", [
    ((448, 448), (1, 1)),      # exact 1:1, small: no tie-break upward
    ((896, 896), (2, 2)),      # ties (1,1),(2,2),(3,3): area > half of 2x2 but not of 3x3
    ((1000, 500), (2, 1)),     # (4,2) ties but the image is too small for it
    ((448, 1344), (1, 3)),
    ((4000, 100), (10, 1)),    # extreme aspect: widest grid allowed
    ((560, 448), (1, 1)),      # aspect 1.25 ties 1:1 and 3:2; small image keeps (1,1)
    ((1400, 1120), (3, 3)),    # same aspect, large image: the last tied grid, (3,3), wins
])
def test_grid_choice_table(size, expected):
    grids = candidate_grids(1, 10)
    assert closest_grid(*size, grids, 448) == expected == internvl_grid(*size, 1, 10, 448)


def test_grid_choice_matches_internvl_on_random_sizes():
    rng = random.Random(0)
    for _ in range(2000):
        w, h = rng.randint(16, 5000), rng.randint(16, 5000)
        lo = rng.randint(1, 4)
        hi = rng.randint(lo, 24)
        assert closest_grid(w, h, candidate_grids(lo, hi), 448) == internvl_grid(w, h, lo, hi, 448)


def _gradient(w, h):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 77, np.float32)], -1).astype(np.uint8))


def test_tiles_thumbnail_and_msac_order():
    im = _gradient(128, 64)
    tiles = dynamic_tiles(im, 64, 1, 10, thumbnail=True)
    assert len(tiles) == 3 and all(t.size == (64, 64) for t in tiles)  # (2,1) + thumbnail
    assert np.array_equal(np.asarray(tiles[-1]), np.asarray(im.resize((64, 64), Image.BICUBIC)))
    assert len(dynamic_tiles(_gradient(64, 64), 64, 1, 10, thumbnail=True)) == 1  # one tile: no thumbnail
    assert len(dynamic_tiles(im, 64, 1, 10, thumbnail=False)) == 2
    msac = dynamic_tiles(im, 64, 1, 10, thumbnail=True, msac=True)
    # pass 1: (2,1); pass 2: grids dividing neither side -> (4,2) matches 2:1 exactly; then the thumbnail
    first, second = cut_tiles(im, (2, 1), 64), cut_tiles(im, (4, 2), 64)
    assert len(msac) == 2 + 8 + 1
    for got, want in zip(msac, first + second + [im.resize((64, 64), Image.BICUBIC)]):
        assert np.array_equal(np.asarray(got), np.asarray(want))


def test_multi_image_rule():
    assert max_tiles_for(1, 10) == 10 and max_tiles_for(8, 10) == 8 and max_tiles_for(20, 10) == 3
    assert max_tiles_for(100, 10) == 1


@pytest.mark.parametrize("w,h", [(640, 480), (4000, 3000), (30, 30), (5000, 20), (1, 1), (1792, 1792)])
def test_native_sizes_are_multiples_within_budget(w, h):
    f, lo, hi = 28, 56 * 56, 1024 * 1024
    nw, nh = native_size(w, h, f, lo, hi)
    assert nw % f == 0 and nh % f == 0 and nw >= f and nh >= f
    assert nw * nh <= hi
    assert nw * nh >= lo or (nw == f or nh == f)
    if 0.2 < w / h < 5 and w * h >= lo:
        assert abs(nw / nh - w / h) / (w / h) < 0.25


def _png(im, **kw):
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def test_colour_modes_become_rgb():
    pal = Image.new("P", (4, 4))
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 0
    assert load_image(_png(pal)).getpixel((0, 0)) == (255, 255, 255)  # transparent index -> white
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert load_image(_png(rgba)).getpixel((0, 0)) == (127, 127, 127)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    assert load_image(_png(cmyk, format="JPEG")).getpixel((0, 0))[0] > 200
    g16 = Image.fromarray(np.array([[0, 65535], [32768, 1000]], dtype=np.uint16))
    px = load_image(_png(g16))
    assert px.mode == "RGB" and px.getpixel((1, 0)) == (255, 255, 255) and px.getpixel((0, 1))[0] in (127, 128)
    assert load_image(_png(Image.new("L", (3, 3), 9))).getpixel((0, 0)) == (9, 9, 9)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert load_image(_png(im, format="JPEG", exif=exif)).size == (20, 40)


def test_bad_images_are_named_errors(tmp_path):
    with pytest.raises(ImageError, match="missing image"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="corrupt image"):
        load_image(b"this is not an image")
    data = _png(Image.new("RGB", (64, 64)))
    with pytest.raises(ImageError, match="corrupt image"):
        load_image(data[: len(data) // 2])
    with pytest.raises(ImageError, match="decompression bomb: 64x64"):
        load_image(data, max_pixels=1000)
    assert isinstance(ImageError("x"), ValueError)


def test_to_tensor_normalises():
    t = to_tensor(Image.new("RGB", (2, 3), (255, 0, 128)))
    assert t.shape == (3, 3, 2)
    assert abs(t[0, 0, 0].item() - (1 - 0.485) / 0.229) < 1e-5 and abs(t[1, 0, 0].item() + 0.456 / 0.224) < 1e-5


@pytest.mark.parametrize("size,msac", [((128, 64), False), ((128, 64), True), ((64, 64), False), ((50, 300), True)])
def test_tiles_tensor_equals_per_tile_conversion(size, msac):
    im = _gradient(*size)
    ref = torch.stack([to_tensor(t) for t in dynamic_tiles(im, 64, 1, 6, thumbnail=True, msac=msac)])
    assert torch.equal(tiles_tensor(im, 64, 1, 6, thumbnail=True, msac=msac), ref)
