"""Typeset text in the synthetic world (World.text_grid): glyphs on the pixel grid, identical wherever they land,
and the renderer, the dense stream and charts agreeing."""

import random

import pytest
from PIL import Image

from sailvl.data.synth import World, sample


def _ink_box(img: Image.Image) -> tuple[int, int, int, int]:
    import numpy as np
    ys, xs = np.nonzero((np.asarray(img.convert("L")) < 250))
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_typeset_text_sits_on_the_grid_and_looks_the_same_everywhere():
    """With text_grid, a glyph is drawn identically (pixel for pixel) wherever it lands: cells start on the grid,
    so the same text at two places differs only by a shift of whole grid steps."""
    import numpy as np
    world = World(ocr_max_chars=2, text_grid=4, ocr_font=(26, 26), equation_font=(18, 18))
    crops: dict[tuple, np.ndarray] = {}
    rng = random.Random(0)
    n_same = 0
    for _ in range(400):
        record, (img,) = sample("ocr", rng, world=world)
        spec = record["meta"]
        x0, y0, x1, y1 = spec["box"]
        assert x0 % 4 == 0 and y0 % 4 == 0 and 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        ix0, iy0, ix1, iy1 = _ink_box(img)  # every pixel of ink is inside the typeset box
        assert x0 <= ix0 and y0 <= iy0 and ix1 <= x1 and iy1 <= y1
        crop = np.asarray(img)[y0:y1, x0:x1]
        key = (spec["text"], spec["colour"])
        if key in crops:
            n_same += 1
            assert np.array_equal(crops[key], crop), key
        crops[key] = crop
    assert n_same > 20
    # the proportional default still places text at any pixel
    offsets = {sample("ocr", rng)[0]["meta"]["box"][0] % 4 for _ in range(60)}
    assert offsets == {0, 1, 2, 3}


def test_typeset_equations_tables_and_dense_text_agree_with_the_renderer():
    import numpy as np
    from PIL import ImageDraw

    from sailvl.data.synth.dense import DenseStream, _Canvas, _write
    from sailvl.data.synth.render import pitch, text_size, typeset
    world = World(text_grid=4, ocr_font=(26, 26), equation_font=(18, 18), table_max_value=9)
    rng = random.Random(1)
    for _ in range(30):
        record, (img,) = sample("math_direct", rng, world=world)
        ix0, _, ix1, _ = _ink_box(img)
        assert ix1 - ix0 <= 60  # five glyphs of the numeric pitch fit the 64 px image
    assert pitch(18, 4, "1+2=?") == 12 and pitch(26, 4, "AB") == 28 and text_size("AB", 26, 4)[0] == 56
    # dense labels paint glyph by glyph; the picture is exactly the renderer's
    a, b = (Image.new("RGB", (64, 64), (255, 255, 255)) for _ in range(2))
    typeset(ImageDraw.Draw(a), (8, 20), "7x3=?", 18, (0, 0, 0), 4)
    canvas = _Canvas(b)
    _write(canvas, "7x3=?", (8, 20), 18, "black", 4)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and len(canvas.elements) == 5
    # the dense "text" kind draws typeset text in the world's sizes, labelled per character
    stream = DenseStream(world, kinds={"text": 1})
    for i in range(5):
        _, labels = stream.sample(random.Random(i))
        assert (labels["char"] > 0).sum() > 0
    # typeset charts: labels (Q's tail too) sit on one grid row below an intact axis, in the renderer and the
    # dense stream's chart kind alike
    from sailvl.data.synth.render import chart_axis, make_chart
    world = World(text_grid=4, table_max_value=9, chart_typeset=True)
    axis_y, label_y = chart_axis(world, world.px(11))
    assert label_y % 4 == 0 and axis_y < label_y
    seen_q = False
    for i in range(80):
        spec, img = make_chart(random.Random(i), world)
        dense_img, _ = DenseStream(world, kinds={"chart": 1}).sample(random.Random(i))
        seen_q |= "Q" in spec["labels"]
        for im in (img, dense_img):
            a = np.asarray(im.convert("L"))
            assert (a[axis_y] == a[axis_y, 0]).all() and a[axis_y, 0] < 250  # the axis: one unbroken line
            assert (a[axis_y + 1:label_y] >= 250).all() and (a[label_y:] < 250).any()  # labels start at label_y
    assert seen_q
    with pytest.raises(ValueError, match="text_grid"):
        World(text_grid=-1)
    with pytest.raises(ValueError, match="equation_font"):
        World(equation_font=(20, 10))
