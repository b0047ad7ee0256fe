"""The `tiny` recipe: the whole SAIL-VL2 stage list at CPU scale on the built-in synthetic world.

Model: a 64 px / patch 8 SAIL-ViT (16 image tokens per tile after pixel shuffle) and a small Qwen3, sized
from shared/CALIBRATION.md (what a 2-core CPU can teach to see in minutes). Data: `prepare_tiny` writes the
synthetic world once (train / val / test) plus per-ability JSONL views of the train split, and trains a
byte-level BPE on its text. Stages follow the paper: SAIL-ViT warm-up (adapter only, dense captions) ->
fine-grained (ViT + adapter) -> world knowledge (all) -> basic pretraining with AdaLRS -> multi-task
pretraining -> SFT -> LongCoT SFT -> Think-Fusion SFT (90% direct, 10% thinking).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import LLMConfig, SailVLConfig, VisionConfig
from ..data.synth.world import World
from ..train.budget import Reference
from ..train.stages import DataSpec, RunConfig, Stage

GROUPS = {
    "captions": ["caption", "caption_pretrain"],
    "scene": ["vqa_color", "vqa_shape", "vqa_count", "vqa_spatial", "vqa_compare", "vqa_yesno", "grounding",
              "multi_change", "video_motion", "video_count"],
    "scene_multi": ["scene_qa"],
    "text_in_image": ["ocr", "chart", "table"],
    "math_direct": ["math_direct"],
    "math_cot": ["math_cot"],
    "text": ["text_instruct"],
    # video_motion again, on its own: learnt alone from ~4,400 samples (0.91, benchmarks/task_alone.py) but the
    # scene group gave it ~470 in the whole demo (0.24, below chance); this group lifts that to ~1,600 (0.64)
    "motion": ["video_motion"],
}
VOCAB = 1024
# bump when prepare_tiny's output changes, so old data is redone (2: the tokenizer splits capitals; 3: no
# answer-format suffix, drills; 4: typeset text; 5: short math_cot traces; 6: the motion group; 7: text_lists; 8: test
# leaves out text_lists' questions; 9: the induction split; 10: its lookups laid out as the chart trace reads; 11:
# splits drawn in chunks of their own RNG, by a process per CPU; the induction split since dropped, which leaves every
# other file as it was; 12: charts labelled A, B, C, spatial-relation questions about 2-object scenes)
DATA_VERSION = 12


def tiny_model(vocab_size: int = VOCAB) -> SailVLConfig:
    # init std 0.1 for the from-scratch ViT: with HF's 0.02 (made for pretrained-size models) the dense labels
    # learn much slower (measured, 300 steps x 64 images: per-patch character accuracy 0.36 vs 0.54)
    vision = VisionConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                          image_size=64, patch_size=8, initializer_range=0.1)
    # LLM (and adapter) init std 0.06, about 1 / sqrt(width), instead of HF's 0.02: the LLM starts from random weights
    # here. Finding an object named in the question and saying where it is (1-3 objects, 800 steps, the demo's
    # tower): 0.59 -> 0.67 (benchmarks/llm_init.py); the whole demo 0.36 -> 0.46.
    # Same-time shapes measured from one tower (demo log, session 20): 6 layers of width 192 0.626 / 0.586 / 0.545 over
    # three seeds against this one's 0.587 / 0.587 / 0.597 (vqa_compare up, everything else noisier); 8 of 192 0.559
    llm = LLMConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=10000.0,
                    max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.06)
    # A visual position code at 0.3 of the token's RMS (SailVLConfig.visual_position_code; sailvl's own option, 0 in
    # SAIL-VL2): the from-scratch tower does not tell the LLM where a token sits, and the code does. It speeds up
    # finding a named object (benchmarks/visual_position.py: 0.81 -> 0.87, 3 objects 0.68 -> 0.80). On the session-16
    # recipe (before vit_read kept scene labels, text_lists and math_cot) the whole recipe from one tower gave 0.556
    # against 0.568 without (one data order); on this one, from one tower over three data orders
    # (benchmarks/recipe_seeds.py), 0.664 / 0.656 / 0.658 against 0.659 / 0.629 / 0.634: grounding 0.30 / 0.38 /
    # 0.52 against 0.26 / - / 0.14, video_motion 0.84 / 0.94 / 0.90 against 0.80 / - / 0.72 (demo log, session 22)
    return SailVLConfig(vision_config=vision, llm_config=llm, select_layer=-1, max_dynamic_patch=1,
                        visual_position_code=0.3)


# The demo's world: World()'s defaults (CALIBRATION.md's learnable big-object world) with text a 64 px
# patch-8 ViT can read in minutes: OCR of 1-2 characters, single-digit table cells.
# Questions end at "?" (no SAIL-VL2 answer-format suffix): 11 of a short question's ~45 tokens, which buy the
# tiny model nothing since every synthetic question has a one-word answer.
# Text is typeset at fixed sizes on a 4 px grid (World.text_grid): a patch-8 ViT learnt from scratch names single
# characters 0.98 after 300 steps that way, 0.37 with text at any size and pixel position
# (benchmarks/typeset_glyphs.py).
TYPESET = dict(text_grid=4, ocr_font=(26, 26), equation_font=(18, 18))
# math_cot's think trace is two lines ("The image shows a + b." / "So a + b = c."): the count-up trace was copied
# wrongly (math_cot 0.22 held-out) while the short one reaches 0.76 in the same demo (demo log, session 11).
# Charts have the fixed categories A, B, C left to right (World.chart_letters): with labels drawn from all 26 letters
# the tiny LLM did not find a named label's bar, and chart stayed at or near chance in sessions 20-30 (0.12-0.30
# against 0.12-0.16; 0.16-0.18 in session 30). Spatial-relation questions are asked about 2-object scenes only
# (World.spatial_max_objects): among three objects vqa_spatial stayed near chance (mostly 0.30-0.42, at most 0.54,
# against 0.28-0.32). From one tower (seed 0): 0.739
# against 0.706 / 0.708 before, chart 0.62 (chance 0.22), vqa_spatial 0.46 (chance 0.30; 0.52 / 0.40 on another
# draw with only vqa_spatial's own scenes bounded): the relation's axis is named right 50 of 50 times, its side
# still at random (demo log, session 31)
TINY_WORLD = World(ocr_max_chars=2, table_max_value=9, answer_suffix=False, math_trace="short",
                   chart_letters="ABC", spatial_max_objects=2, **TYPESET)
# The curriculum's "basics": one object or one character per image. Measured on this CPU (300 steps from
# scratch): shape questions about single objects reach 0.94, and transfer to 3-object scenes (0.80), while
# 300 steps of dense scene captions leave the shape of objects in scenes near chance (0.46; the caption's
# shape word is one token in twenty, and which object it belongs to must be found first).
BASICS_WORLD = World(max_objects=1, ocr_max_chars=1, table_max_value=9, answer_suffix=False, **TYPESET)
BASICS_TASKS = ["vqa_shape", "vqa_color", "caption", "ocr", "grounding"]
# Training splits next to train (name: (fraction of n_train, tasks, world)); each is also a mixture group.
# Drills ask 4-6 of the single-image tasks' questions about one image in one conversation.
# text_lists: more of text_instruct's open-ended kinds (list operations, sequences, comparisons; the ones its test
# split holds), short text-only samples in every stage that has `text`: from one tower (seeds 0 / 1 / 2) text_instruct
# 0.30 -> 0.50 / 0.68 / 0.68, overall 0.574 / 0.585 (seeds 0 / 1) -> 0.587 / 0.587 / 0.597 (demo log, session 20)
EXTRA = {"basics": (0.25, BASICS_TASKS, BASICS_WORLD),
         "scene_drills": (0.2, ["scene_drill"], TINY_WORLD),
         "text_drills": (0.2, ["text_drill"], TINY_WORLD),
         "text_lists": (0.2, ["text_lists"], TINY_WORLD)}


def group_path(data_dir: str, group: str) -> str:
    """The JSONL of a data group (GROUPS: a view of train; EXTRA: a split of its own) that prepare_tiny writes."""
    return f"{data_dir}/{group if group in EXTRA else 'train_' + group}.jsonl"


def tiny(data_dir: str = "runs/tiny/data", out_dir: str = "runs", name: str = "tiny", scale: float = 1.0,
         vit_lr_ratio: float = 0.1) -> RunConfig:
    """`scale` multiplies every stage's step count (the demo and tests use it to trade time for accuracy).
    At scale 1: two SAIL-ViT pretraining stages (600 steps of 64 dense-labelled images, 400 steps of 64 of the
    world's text images with their transcripts), then 3,053 VLM steps of 1,024 tokens (Muon throughout), the ViT at
    `vit_lr_ratio` of the lr in vit_finegrained and vit_world and frozen after them.

    Curriculum (CALIBRATION.md and the measurements at BASICS_WORLD): the SAIL-ViT stages see "basics" first
    (one object or one character per image: shape / colour questions, captions, OCR, boxes) with captions,
    then whole scenes, text images and drills (4-6 questions about one image), then the multi-task mixture, SFT
    and the thinking stages. Every stage trains the LLM except the two adapter-only ones (the paper's SAIL-ViT
    warm-up and basic pretraining): the LLM here starts from random weights and must learn language too.
    Small steps (2 rows of 512 tokens, ~17 samples) give more updates per minute, which is what a tiny
    model trained from scratch needs most. Measured (overall held-out accuracy; single runs differ by a few
    points): 1,800 steps of 4 rows 0.34, 3,600 steps of 2 rows 0.41 (1.23x the time, over the demo's budget),
    1,800 of 2 rows 0.31 and 2,252 of 2 rows 0.35 (10.7 and 13.5 minutes of training with vit_read). Questions
    without the answer-format suffix, drills and sqrt weighting (the default): the same accuracy (0.312 vs 0.315
    from the same SAIL-ViT) with 18% less VLM time; spending that on 19% more steps gave 0.29 (noise)."""

    def d(**weights: float) -> list[DataSpec]:
        return [DataSpec(group_path(data_dir, g), w, g) for g, w in weights.items()]

    def steps(n: int) -> int:
        return max(1, int(round(n * scale)))

    # Muon (sailvl.train.muon) in every stage: each step costs ~90 ms more (Newton-Schulz on the hidden matrices, about
    # 0.6x a VLM step), so the VLM stages take 0.75x the steps they had with AdamW and vit_dense 600 instead of
    # 1,000 (its character accuracy at 600 with Muon = AdamW's at 1,000: benchmarks/muon.py --dense). Whole demo,
    # same seed and day: 0.45 -> 0.52 held out in 13.6 -> about 13 min (slow machine; seed 1: 0.51); Muon in vit_dense
    # alone: 0.41
    common = dict(max_len=512, rows_per_step=2, grad_accum=1, warmup_steps=10, loss_weighting="token",
                  optimizer="muon")
    # question answering: a sample weighs sqrt(its answer tokens), so one-word answers are not drowned by
    # captions while a drill's several answers count more than one answer
    qa = dict(common, loss_weighting="sqrt")
    # after vit_dense the ViT trains with a fraction of the stage's lr (0: frozen). Measured: at the full lr the
    # first VLM stage wipes out what the dense stage taught (per-patch character accuracy of the dense heads
    # 0.64 -> 0.06 after vit_finegrained), and reading stays at chance.
    lr = lambda v: {"vit": v * vit_lr_ratio, "adapter": v, "llm": v}  # noqa: E731
    all_ = ["vit", "adapter", "llm"] if vit_lr_ratio > 0 else ["adapter", "llm"]
    # after the SAIL-ViT stages the tower is frozen: the LLM stages skip its backward (15% of a step) and take 25%
    # more steps in the same time. Measured from one tower: 0.34 -> 0.40 overall (ViT at 0.1x lr, 1x steps).
    # The VLM stages then took 1.3x their steps (2,250 -> 2,926; +100 s): 0.40 -> 0.43 from one tower
    late = ["adapter", "llm"]
    stages = [
        # stands in for SAIL-ViT's pretrained AIMv2 start: the ViT alone on dense per-patch labels (in memory)
        Stage("vit_dense", steps(600), [], kind="vision", trainable=["vit"], lr={"vit": 1e-3}, rows_per_step=64,
              warmup_steps=10, schedule="cosine", vision={"world": TINY_WORLD.to_dict()}, optimizer="muon"),
        # ... then reading: the world's own OCR / equation / chart / table images, each with its transcript
        # predicted from the mean of all patches (measured: OCR 0.02 -> 0.15 in the demo, 0.02 -> 0.19 in a probe),
        # with dense scene labels kept in the mix (2 of 7 images) so the tower does not forget which object each cell
        # belongs to: the VLM stages from such a tower 0.533 -> 0.574 (count, shape, motion up; demo log, session 18),
        # and a whole default demo with it 0.63 (session 19; the best default run before it 0.61)
        Stage("vit_read", steps(400), [], kind="vision", trainable=["vit"], lr={"vit": 1e-3}, rows_per_step=64,
              warmup_steps=10, schedule="cosine", optimizer="muon", vision={"world": TINY_WORLD.to_dict(), "kinds": {
                  "read_ocr": 2, "read_equation": 1, "read_chart": 1, "read_table": 1, "scene": 2}}),
        # No LLM warm-up on plain text before the VLM stages (sessions 27-29 had one, `llm_warmup`: 1,200 steps on
        # text_induction, which then stayed in every later mixture): at equal reference time its 245 s are worth more
        # as VLM steps. The VLM stages at 1.39x the steps they had beside it, from one tower (seed 0): 0.702 against
        # 0.646 on one data draw, 0.692 against 0.692 on another (grounding 0.32 / 0.34 -> 0.50 / 0.56, chart
        # 0.12 / 0.20 -> 0.26 / 0.30), and in a demo the warm-up's 148-326 s came off the top (demo log, sessions 29-30)
        Stage("vit_warmup", steps(76), d(captions=1, basics=1), trainable=["adapter"], lr={"adapter": 3e-3},
              **common),
        Stage("vit_finegrained", steps(534), d(basics=3, captions=1, scene_drills=1), lr=lr(1e-3),
              trainable=all_, schedule="constant", **qa),
        Stage("vit_world", steps(509), d(captions=2, scene=1, scene_multi=0.5, scene_drills=2, text_drills=1.5,
                                         text_in_image=0.5, basics=1, math_direct=0.3, text=0.5, text_lists=1,
                                         motion=0.3),
              lr=lr(1e-3), trainable=all_, schedule="constant", **qa),
        Stage("pretrain_basic", steps(76), d(captions=2, text_in_image=1), trainable=["adapter"],
              lr={"adapter": 1e-3}, adalrs={"window": 10}, schedule="constant", **common),
        # math_direct at 0.5 (1.00 held out at 1 or 0.5), its share to video_motion (motion): 0.55 -> 0.57 from one
        # tower.
        # math_cot here and in sft (0.2 / 0.3), so the thinking format is not new at longcot_sft: without them that
        # stage's loss started at ~8.6 (above a uniform guess's 6.9) and was still ~2 after its 86 steps; with them it
        # starts at ~0.15. From one tower (seeds 0 / 1): math_cot 0.66 / 0.48 -> 1.00 / 1.00, overall 0.639 / 0.559 ->
        # 0.659 / 0.629 (demo log, session 21)
        Stage("pretrain_multitask", steps(890), d(captions=1, scene=1.5, scene_multi=0.5, scene_drills=2,
                                                  text_drills=2, text_in_image=1, basics=0.5, math_direct=0.5, text=0.7,
                                                  text_lists=1, motion=0.6, math_cot=0.2),
              lr=lr(1e-3), trainable=late, schedule="constant", **qa),
        Stage("sft", steps(610), d(captions=0.5, scene=2, scene_multi=0.5, scene_drills=1.5, text_drills=1.5,
                                   text_in_image=1, math_direct=0.5, text=0.7, text_lists=1, motion=0.6, math_cot=0.3),
              lr=lr(7e-4), trainable=late, schedule="wsd", decay_fraction=0.5, **qa),
        Stage("longcot_sft", steps(120), d(math_cot=1, math_direct=0.3, scene=0.5), lr=lr(3e-4), trainable=late,
              **common),
        # Think-Fusion: mostly single questions, the evaluation's format
        Stage("think_fusion_sft", steps(238), d(scene=3, scene_multi=0.5, scene_drills=0.5, text_drills=0.5,
                                                 text_in_image=2, math_direct=1, math_cot=0.7, text=0.5, text_lists=1,
                                                 captions=0.3, motion=0.3),
              lr=lr(2e-4), trainable=late, **qa),
    ]
    return RunConfig(name=name, model=tiny_model(), tokenizer=f"{data_dir}/tokenizer", out_dir=out_dir,
                     stages=stages, checkpoint_every=200, log_every=20, precision="bf16")


# The time budget's reference (`sailvl demo --minutes`, sailvl.train.budget): seconds per step of each stage of the
# recipe at scale 1, export included, at the speed probe's reference time. Each stage's value is the mean of its
# seconds per step over the probe's factor in the two default demos of session 27 (probe 0.58x / 0.73x). The values
# before (first measured 2026-12-03, rescaled in sessions 23 and 25) had the VLM stages 1.2-1.7x too slow (sft 0.403
# against 0.274 / 0.257 measured): both demos cut vit_dense, vit_read or llm_warmup for time the later stages then
# did not need, grew the thinking stages to 2-3x their steps instead, and left ~80 s of the 15 minutes unused.
TINY_REFERENCE = Reference(
    step_s={"vit_dense": 0.269, "vit_read": 0.273, "vit_warmup": 0.197, "vit_finegrained": 0.316, "vit_world": 0.325,
            "pretrain_basic": 0.207, "pretrain_multitask": 0.269, "sft": 0.266, "longcot_sft": 0.259,
            "think_fusion_sft": 0.280},
    # the thinking stages (~100 s: 98 s at the reference, 95 s in session 30's first demo) whole: squeezed to 0.65 of
    # their steps in a budgeted run, math_cot fell 0.82 -> 0.08, and 0.2 of their time (~20 s) held back from the
    # stages before them: in session 23's demo sft ran ~29 s over its prediction (mostly the old reference's error,
    # corrected above; the reserve covers what is left of such swings)
    # what follows training (loading the model, evaluation, the two chats) took 8 / 8 / 11 s in session 29's demos (the
    # last in a 2x slow hour): 15 s leaves room for that, where 25 s left ~15 s of each demo unused
    probe_s=0.22, other_s=15.0, keep=("longcot_sft", "think_fusion_sft"), keep_reserve=0.2,
    # vit_read whole too: the default demos' math_direct followed its steps (219 / 400: 0.30, 238: 0.22, 307: 0.58,
    # 369: 0.96, 400: 1.00; ocr 0.42, 0.32, 0.40, 0.62, 0.60), the tower reading the equations it teaches; in slow
    # hours the VLM stages take the cut (demo log, session 28). vit_dense whole as well: with 400 of its 600 steps
    # (as a slow hour's budget cut it) the VLM stages at full steps scored 0.676 / 0.654 against 0.706 / 0.708 (two
    # data orders; math_cot 0.98 / 1.00 -> 0.80 / 0.68), more than its ~50 s buy as VLM steps (demo log, session 30)
    fixed=("vit_dense", "vit_read"),
    # in a fast hour the VLM stages share the time to spare, up to twice their steps: at twice their steps held-out
    # accuracy rose 0.54 -> 0.65 while twice the SAIL-ViT stages gave 0.55 (same data and seed, demo log, session 17)
    grow=("vit_finegrained", "vit_world", "pretrain_basic", "pretrain_multitask", "sft", "longcot_sft",
          "think_fusion_sft"), max_grow=2.0,
    # the last stage (think_fusion_sft, the recipe's general mixture at a low lr) may take up to 4x: the machine sped up
    # 2x during session 23's second demo, the stages before had been cut, and 108 s went unused at the 2x cap
    last_max_grow=4.0)


def prepare_tiny(run: RunConfig, n_train: int = 48_000, n_eval: int = 950, seed: int = 0) -> None:
    """Write the synthetic world, its per-group views and the tokenizer under the run's data dir, once."""
    from ..data.synth import generate_splits
    from ..data.tokenizer import corpus_texts, train_bpe

    data = Path(run.tokenizer).parent
    spec = {"n_train": n_train, "n_eval": n_eval, "seed": seed, "version": DATA_VERSION}
    ready = data / "READY"
    if ready.exists():
        try:
            if json.loads(ready.read_text()) == spec:
                return
        except ValueError:
            pass
        print(f"[data] {data} was prepared differently ({ready.read_text().strip()}); regenerating it for {spec}")
        ready.unlink()
    data.mkdir(parents=True, exist_ok=True)
    generate_splits(data, n_train, n_eval, n_eval, seed=seed, world=TINY_WORLD,
                    extra_train={k: (int(n_train * f), tasks, w) for k, (f, tasks, w) in EXTRA.items()}, progress=True)
    lines = (data / "train.jsonl").read_text().splitlines()
    task_of = [json.loads(line)["task"] for line in lines]
    for group, tasks in GROUPS.items():
        keep = [line for line, task in zip(lines, task_of) if task in tasks]
        (data / f"train_{group}.jsonl").write_text("\n".join(keep) + "\n")
    # capitals split: otherwise half of the two-letter OCR answers become single tokens of their own (measured)
    train_bpe(corpus_texts([data / "train.jsonl"]), VOCAB, data / "tokenizer", split_capitals=True)
    ready.write_text(json.dumps(spec))
