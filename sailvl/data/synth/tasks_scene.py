"""Task generators over shape scenes: captions, VQA, grounding, multi-image change, video.

Every generator has the signature `gen(rng: random.Random, world: World) -> (record, images)` and keeps
the scene it drew in `record["meta"]` (objects as dicts: shape, colour, size, x, y, r) so that answers
can be recomputed from the spec. Questions that cannot be asked unambiguously about a drawn scene (no
unique referring phrase, no clear spatial relation, ...) redraw the scene.
"""

from __future__ import annotations

import random

from .record import make_record
from .scene import (
    Obj,
    caption,
    format_box,
    grounding_box,
    place,
    plural,
    random_scene,
    refer,
    relation,
    render,
    unused_kind,
)
from .world import World

CAPTION_PROMPTS = ("Describe the image in detail.", "Describe every object in the image.",
                   "What objects are in the image? Describe each one.")
REL_PHRASE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def spatial_question(world: World, ri: str, rj: str) -> str:
    """Where the object called ri is relative to the one called rj, asked with ri named first (World.spatial_subject
    "first") or last ("last", next to the answer)."""
    if world.spatial_subject == "last":
        return f"Relative to the {rj}, is the {ri} left, right, above or below?"
    return f"Is the {ri} left of, right of, above or below the {rj}?"


def _attempts(task: str, n: int = 2000):
    """range(n) for redraw loops, then a ValueError: a world whose settings make the question impossible
    (e.g. size classes too close for vqa_compare) fails loudly instead of looping forever."""
    yield from range(n)
    raise ValueError(f"{task}: no valid sample in {n} draws; this world's settings make the question impossible")


def _scene(rng: random.Random, world: World, lo: int = 1, hi: int | None = None) -> list[Obj]:
    hi = world.max_objects if hi is None else hi
    return random_scene(rng, world, rng.randint(min(lo, hi), hi))


def _meta(scene: list[Obj], **kw) -> dict:
    return {"scene": [o.to_dict() for o in scene], **kw}


def caption_task(rng: random.Random, world: World):
    scene = _scene(rng, world)
    cap = caption(scene, world.image_size)
    return make_record("caption", rng.choice(CAPTION_PROMPTS), cap, _meta(scene), n_images=1), \
        [render(scene, world)]


def vqa_color(rng: random.Random, world: World):
    for _ in _attempts("vqa_color"):
        scene = _scene(rng, world)
        i = rng.randrange(len(scene))
        ref = refer(scene, i, avoid=("colour",))
        if ref:
            break
    q = f"What colour is the {ref}?" + world.suffix
    return make_record("vqa_color", q, scene[i].colour, _meta(scene, target=i), n_images=1), [render(scene, world)]


def vqa_shape(rng: random.Random, world: World):
    for _ in _attempts("vqa_shape"):
        scene = _scene(rng, world)
        i = rng.randrange(len(scene))
        ref = refer(scene, i, avoid=("shape",))
        if ref:
            break
    q = f"What shape is the {ref}?" + world.suffix
    return make_record("vqa_shape", q, scene[i].shape, _meta(scene, target=i), n_images=1), [render(scene, world)]


def vqa_count(rng: random.Random, world: World):
    """How many objects / <shape>s / <colour> objects. The answer is drawn first (uniform over 1..max
    for all objects, 0..max for a filter) and the scene built to match; `meta.count_filter` names the
    filter."""
    m = world.max_objects
    kind = rng.choice(("all", "shape", "colour"))
    if kind == "all":
        flt: dict = {}
        scene = random_scene(rng, world, rng.randint(1, m))
        q = "How many objects are there?"
    else:
        if kind == "shape":
            value = rng.choice(world.shapes)
            k = rng.randint(0, min(m, len(world.colours)))
            match = [(c, value) for c in rng.sample(world.colours, k)]
            pool = [(c, s) for c in world.colours for s in world.shapes if s != value]
            q = f"How many {plural(value)} are there?"
        else:
            value = rng.choice(world.colours)
            k = rng.randint(0, min(m, len(world.shapes)))
            match = [(value, s) for s in rng.sample(world.shapes, k)]
            pool = [(c, s) for c in world.colours for s in world.shapes if c != value]
            q = f"How many {value} objects are there?"
        n = rng.randint(max(k, 1), min(m, k + len(pool)))
        kinds = match + rng.sample(pool, n - k)
        rng.shuffle(kinds)
        scene = random_scene(rng, world, n, kinds)
        flt = {kind: value}
    count = sum(all(getattr(o, a) == v for a, v in flt.items()) for o in scene)
    return make_record("vqa_count", q + world.suffix, str(count), _meta(scene, count_filter=flt),
                       n_images=1), [render(scene, world)]


def _need_two(world: World, task: str) -> None:
    if world.max_objects < 2:
        raise ValueError(f"{task} needs a world with max_objects >= 2")


def _pair_with_relation(rng: random.Random, world: World):
    """A scene with 2..World.spatial_max_objects objects and a pair (i, j) whose relation is clear, with unique
    phrases."""
    _need_two(world, "vqa_spatial")
    for _ in _attempts("vqa_spatial"):
        scene = _scene(rng, world, lo=2, hi=world.spatial_max_objects)
        i, j = rng.sample(range(len(scene)), 2)
        rel = relation(scene[i], scene[j], world.image_size)
        ri, rj = refer(scene, i), refer(scene, j)
        if rel and ri and rj:
            return scene, i, j, rel, ri, rj


def vqa_spatial(rng: random.Random, world: World):
    """Where one named object is relative to another, in a scene of 2..World.spatial_max_objects objects."""
    scene, i, j, rel, ri, rj = _pair_with_relation(rng, world)
    q = spatial_question(world, ri, rj) + world.suffix
    return make_record("vqa_spatial", q, rel, _meta(scene, a=i, b=j), n_images=1), [render(scene, world)]


def _compare(rng: random.Random, scene: list[Obj]):
    """A bigger / smaller question about two objects of different size classes, or None: the larger one must
    also have clearly more painted area (>= 1.3x), so the answer never depends on shape."""
    i, j = rng.sample(range(len(scene)), 2)
    a, b = scene[i], scene[j]
    if a.size == b.size:
        return None
    big, small = (a, b) if a.size == "large" else (b, a)
    if big.area() < 1.3 * small.area():
        return None
    ri, rj = refer(scene, i, avoid=("size",)), refer(scene, j, avoid=("size",))
    if not (ri and rj):
        return None
    word = rng.choice(("bigger", "smaller"))
    winner = i if (scene[i].size == "large") == (word == "bigger") else j
    return i, j, word, winner, f"Which is {word}, the {ri} or the {rj}?", ri if winner == i else rj


def vqa_compare(rng: random.Random, world: World):
    """Which of two objects of different size classes is bigger / smaller (see `_compare`)."""
    _need_two(world, "vqa_compare")
    for _ in _attempts("vqa_compare"):
        scene = _scene(rng, world, lo=2)
        asked = _compare(rng, scene)
        if asked:
            break
    i, j, word, winner, q, answer = asked
    return make_record("vqa_compare", q + world.suffix, answer, _meta(scene, a=i, b=j, word=word, winner=winner),
                       n_images=1), [render(scene, world)]


def vqa_yesno(rng: random.Random, world: World):
    """Yes/no (balanced): does a <colour> <shape> exist, is the <ref> <colour>, is A <relation> B."""
    want = rng.random() < 0.5
    kind = rng.choice(("exists", "colour", "relation") if world.max_objects >= 2 else ("exists", "colour"))
    if kind == "relation":
        scene, i, j, rel, ri, rj = _pair_with_relation(rng, world)
        asked = rel if want else rng.choice([r for r in REL_PHRASE if r != rel])
        q = f"Is the {ri} {REL_PHRASE[asked]} the {rj}?"
        meta = _meta(scene, kind=kind, a=i, b=j, relation=asked)
    elif kind == "colour":
        for _ in _attempts("vqa_yesno"):
            scene = _scene(rng, world)
            i = rng.randrange(len(scene))
            ref = refer(scene, i, avoid=("colour",))
            if ref:
                break
        asked = scene[i].colour if want else rng.choice([c for c in world.colours if c != scene[i].colour])
        q = f"Is the {ref} {asked}?"
        meta = _meta(scene, kind=kind, target=i, colour=asked)
    else:
        scene = _scene(rng, world)
        if want:
            o = rng.choice(scene)
            colour, shape = o.colour, o.shape
        else:  # a hard negative shares the colour or the shape of something present, when possible
            o = rng.choice(scene)
            present = {(p.colour, p.shape) for p in scene}
            options = [(o.colour, s) for s in world.shapes] + [(c, o.shape) for c in world.colours]
            options = [k for k in options if k not in present]
            colour, shape = rng.choice(options) if options else unused_kind(rng, world, scene)
        q = f"Is there a {colour} {shape}?"
        meta = _meta(scene, kind=kind, colour=colour, shape=shape)
    answer = "yes" if want else "no"
    return make_record("vqa_yesno", q + world.suffix, answer, meta, n_images=1), [render(scene, world)]


def grounding(rng: random.Random, world: World):
    for _ in _attempts("grounding"):
        scene = _scene(rng, world)
        i = rng.randrange(len(scene))
        ref = refer(scene, i)
        if ref:
            break
    box = grounding_box(scene[i], world.image_size)
    q = f"Where is the {ref}? Answer with its bounding box [x1, y1, x2, y2] in 0-1000 coordinates."
    return make_record("grounding", q, format_box(box), _meta(scene, target=i), n_images=1), \
        [render(scene, world)]


def multi_change(rng: random.Random, world: World):
    """Two scenes differing by one object added, removed or recoloured."""
    kinds = ["removed", "recoloured"] + (["added"] if world.max_objects >= 2 else [])
    kind = rng.choice(kinds)
    for _ in _attempts("multi_change"):
        if kind == "added":
            before = random_scene(rng, world, rng.randint(1, world.max_objects - 1))
            colour, shape = unused_kind(rng, world, before)
            new = place(rng, world, shape, colour, rng.choice(("small", "large")), before)
            if new is None:
                continue
            after, obj = before + [new], new
            answer = f"a {new.colour} {new.shape} was added"
        else:
            before = _scene(rng, world)
            k = rng.randrange(len(before))
            obj = before[k]
            if kind == "removed":
                after = before[:k] + before[k + 1:]
                answer = f"the {obj.colour} {obj.shape} was removed"
            else:
                used = {(o.colour, o.shape) for o in before}
                options = [c for c in world.colours if (c, obj.shape) not in used]
                if not options:
                    continue
                to = rng.choice(options)
                after = before[:k] + [Obj(obj.shape, to, obj.size, obj.x, obj.y, obj.r)] + before[k + 1:]
                answer = f"the {obj.colour} {obj.shape} turned {to}"
        break
    meta = {"before": [o.to_dict() for o in before], "after": [o.to_dict() for o in after],
            "change": kind, "object": obj.to_dict()}
    q = "What changed between the two scenes?" + world.suffix
    return make_record("multi_change", q, answer, meta, n_images=2), [render(before, world), render(after, world)]


DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def _start(rng: random.Random, d: int, lo: int, hi: int, travel: int) -> int:
    """A start coordinate in [lo, hi] from which moving `travel` px in direction d stays in [lo, hi]."""
    if d > 0:
        return rng.randint(lo, hi - travel)
    if d < 0:
        return rng.randint(lo + travel, hi)
    return rng.randint(lo, hi)


def video_motion(rng: random.Random, world: World):
    """One object moves steadily left / right / up / down over the frames; others stand still."""
    f = world.video_frames
    s = world.image_size
    for _ in _attempts("video_motion"):
        direction = rng.choice(tuple(DIRECTIONS))
        dx, dy = DIRECTIONS[direction]
        size = rng.choice(("small", "large"))
        r = world.radius(size, rng)
        span = s - 3 - 2 * r                       # length of the free centre range
        max_step = span // (f - 1)
        if max_step < 1:
            continue
        step = rng.randint(min(world.px(4), max_step), min(world.px(8), max_step))
        travel = step * (f - 1)
        colour, shape = rng.choice(world.colours), rng.choice(world.shapes)
        lo, hi = r + 1, s - 2 - r                  # the centre range that keeps the object inside
        x0, y0 = (_start(rng, d, lo, hi, travel) for d in (dx, dy))
        path = [Obj(shape, colour, size, x0 + dx * step * t, y0 + dy * step * t, r) for t in range(f)]
        statics: list[Obj] = []
        for _ in range(rng.randint(0, world.max_objects - 1)):
            c2, s2 = unused_kind(rng, world, statics + [path[0]])
            o = place(rng, world, s2, c2, rng.choice(("small", "large")), statics + path)
            if o is not None:
                statics.append(o)
        break
    frames = [statics + [p] for p in path]
    ref = refer(frames[0], len(statics))
    q = f"Which direction is the {ref} moving?" + world.suffix
    meta = {"frames": [[o.to_dict() for o in fr] for fr in frames], "moving": path[0].name, "step": step}
    return make_record("video_motion", q, direction, meta, video=True), [render(fr, world) for fr in frames]


def video_count(rng: random.Random, world: World):
    """K objects at fixed places, each visible in a random non-empty set of frames; how many different
    objects appear over the whole video."""
    f = world.video_frames
    scene = _scene(rng, world)
    visible = []
    for _ in scene:
        mask = [rng.random() < 0.5 for _ in range(f)]
        if not any(mask):
            mask[rng.randrange(f)] = True
        visible.append(mask)
    frames = [[o for o, m in zip(scene, visible) if m[t]] for t in range(f)]
    q = "How many different objects appear in the video?" + world.suffix
    meta = {"frames": [[o.to_dict() for o in fr] for fr in frames], "objects": [o.to_dict() for o in scene]}
    return make_record("video_count", q, str(len(scene)), meta, video=True), [render(fr, world) for fr in frames]


# ---------------------------------------------------------------- several questions about one scene

def _ask_colour(rng, world, scene):
    i = rng.randrange(len(scene))
    ref = refer(scene, i, avoid=("colour",))
    return (f"What colour is the {ref}?", scene[i].colour) if ref else None


def _ask_shape(rng, world, scene):
    i = rng.randrange(len(scene))
    ref = refer(scene, i, avoid=("shape",))
    return (f"What shape is the {ref}?", scene[i].shape) if ref else None


def _ask_count(rng, world, scene):
    kind = rng.choice(("all", "shape", "colour"))
    if kind == "all":
        return "How many objects are there?", str(len(scene))
    if kind == "shape":
        shape = rng.choice(world.shapes)
        return f"How many {plural(shape)} are there?", str(sum(o.shape == shape for o in scene))
    colour = rng.choice(sorted({o.colour for o in scene}) + list(world.colours))  # present ones twice as likely
    return f"How many {colour} objects are there?", str(sum(o.colour == colour for o in scene))


def _pair(rng, world, scene):
    """Two objects with a clear relation and unique phrases: (relation, phrase of one, of the other), or None (also
    for a scene of more than World.spatial_max_objects objects)."""
    if not 2 <= len(scene) <= (world.spatial_max_objects or world.max_objects):
        return None
    i, j = rng.sample(range(len(scene)), 2)
    rel = relation(scene[i], scene[j], world.image_size)
    ri, rj = refer(scene, i), refer(scene, j)
    return (rel, ri, rj) if rel and ri and rj else None


def _ask_spatial(rng, world, scene):
    pair = _pair(rng, world, scene)
    return (spatial_question(world, pair[1], pair[2]), pair[0]) if pair else None


def _ask_exists(rng, world, scene):
    present = {(o.colour, o.shape) for o in scene}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        o = rng.choice(scene)
        near = [(o.colour, s) for s in world.shapes] + [(c, o.shape) for c in world.colours]
        near = [k for k in near if k not in present]
        colour, shape = rng.choice(near) if near else unused_kind(rng, world, scene)
    return f"Is there a {colour} {shape}?", "yes" if (colour, shape) in present else "no"


ASKERS = (_ask_colour, _ask_shape, _ask_count, _ask_spatial, _ask_exists)


def scene_qa(rng: random.Random, world: World):
    """A multi-turn conversation: 2-4 questions (colour, shape, count, spatial relation, existence; the
    single-turn tasks' phrasings) about one scene, as real instruction data asks several questions per
    image. The record's answer is the last reply; the earlier turns are the conversation so far."""
    for _ in _attempts("scene_qa"):
        scene = _scene(rng, world)
        turns = []
        for ask in rng.sample(ASKERS, len(ASKERS)):
            qa = ask(rng, world, scene)
            if qa is not None:
                turns.append(qa)
            if len(turns) == 4:
                break
        if len(turns) >= 2:
            break
    turns = turns[: rng.randint(2, len(turns))]
    record = make_record("scene_qa", "", turns[-1][1], _meta(scene, questions=[q for q, _ in turns]), n_images=1)
    record["conversations"] = conversation([(q, a, True) for q, a in turns], world)
    return record, [render(scene, world)]


# ---------------------------------------------------------------- drills: many questions about one image (training)

def _ask_compare(rng, world, scene):
    asked = _compare(rng, scene) if len(scene) >= 2 else None
    return asked[-2:] if asked else None


def _ask_is_colour(rng, world, scene):
    i = rng.randrange(len(scene))
    ref = refer(scene, i, avoid=("colour",))
    if not ref:
        return None
    asked = scene[i].colour if rng.random() < 0.5 else rng.choice([c for c in world.colours if c != scene[i].colour])
    return f"Is the {ref} {asked}?", "yes" if asked == scene[i].colour else "no"


def _ask_is_relation(rng, world, scene):
    pair = _pair(rng, world, scene)
    if not pair:
        return None
    rel, ri, rj = pair
    asked = rel if rng.random() < 0.5 else rng.choice([r for r in REL_PHRASE if r != rel])
    return f"Is the {ri} {REL_PHRASE[asked]} the {rj}?", "yes" if asked == rel else "no"


def _ask_where(rng, world, scene):
    i = rng.randrange(len(scene))
    ref = refer(scene, i)
    if not ref:
        return None
    return (f"Where is the {ref}? Answer with its bounding box [x1, y1, x2, y2] in 0-1000 coordinates.",
            format_box(grounding_box(scene[i], world.image_size)))


# (asker, weight, gets the short-answer suffix): every single-image scene task's question, in its phrasing
DRILL_ASKERS = ((_ask_colour, 2, True), (_ask_shape, 2, True), (_ask_count, 2, True), (_ask_spatial, 2, True),
                (_ask_compare, 1, True), (_ask_exists, 1, True), (_ask_is_colour, 1, True),
                (_ask_is_relation, 1, True), (_ask_where, 1, False))


def conversation(turns: list[tuple[str, str, bool]], world: World) -> list[dict]:
    """(question, answer, suffixed) turns about one image -> conversations; its placeholder opens the first
    question."""
    conv = []
    for k, (q, a, suffixed) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q + (world.suffix if suffixed else "")},
                 {"from": "gpt", "value": a}]
    return conv


def scene_drill(rng: random.Random, world: World, turns: tuple[int, int] = (4, 6)):
    """Training only: 4-6 questions of every single-image scene task (colour, shape, count, spatial, compare,
    yes/no, grounding) about one scene, as one conversation. One image and one chat template serve several
    answers, so a step teaches several times more answers per token and per image than single questions."""
    scene = _scene(rng, world)
    want = rng.randint(*turns)
    asked: list[tuple[str, str, bool]] = []
    askers, weights = [a for a, _, _ in DRILL_ASKERS], [w for _, w, _ in DRILL_ASKERS]
    for _ in range(8 * want):
        k = rng.choices(range(len(askers)), weights)[0]
        qa = askers[k](rng, world, scene)
        if qa is not None and all(qa[0] != q for q, _, _ in asked):
            asked.append((qa[0], qa[1], DRILL_ASKERS[k][2]))
        if len(asked) == want:
            break
    record = make_record("scene_drill", "", asked[-1][1], _meta(scene, questions=[q for q, _, _ in asked]),
                         n_images=1)
    record["conversations"] = conversation(asked, world)
    return record, [render(scene, world)]
