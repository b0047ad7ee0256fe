"""A wall-clock budget for a run: how many of its recipe's steps fit in the minutes left on this machine today.

This 2-core CPU runs the same steps up to ~1.9x slower in some hours than in others (the tiny demo's SAIL-ViT stage
took 103 s one morning and 197 s another afternoon). A fixed recipe is then either over a time budget in slow hours
or smaller than it needs to be in fast ones. `Budget` instead scales the stages' steps to fit:

  - before training, `speed_probe` times a few training steps of a fresh model of the run's shape on synthetic
    packed rows (~4 s); its ratio to the probe time measured alongside the reference stage times (`reference`)
    predicts each stage's seconds here, today, and sets the scale that fits the budget;
  - when the whole recipe fits with time to spare, the stages named in `Reference.grow` share the spare time, less a
    reserve against the machine slowing down later (`Reference.grow_reserve`), up to `Reference.max_grow` times their
    steps (on the tiny demo, the VLM stages: twice their steps took held-out accuracy 0.54 -> 0.65, twice the
    SAIL-ViT stages' 0.54 -> 0.55, demo log, session 17), the last stage up to `Reference.last_max_grow` (planned when
    the others have run, it takes what a late speed-up leaves); the others run whole;
  - as each stage starts, the one factor for the stages left is recomputed from the seconds the finished ones really
    took (the probe is a guess; the stages are the truth), so an error in the first guess is corrected on the way;
  - every decision is written to `budget.json` in the run directory, so `--resume` re-runs the same steps.

Stage step counts (and so the schedules) are fixed when a stage starts and never change inside one. Stages named in
`Reference.keep` are planned whole while the others can absorb the cut (on the tiny demo, the short thinking stages:
squeezed, math_cot fell 0.82 -> 0.08), with a reserve of their time (`Reference.keep_reserve`) against the stages
before them running slower than predicted; among the others one factor did better than sparing either the SAIL-ViT
or the VLM stages (demo log, session 15).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..config import SailVLConfig
from .stages import Stage


def speed_probe(model_cfg: SailVLConfig, steps: int = 4, repeats: int = 3, rows: int = 2, row_len: int = 512,
                images: int = 18, seed: int = 0) -> float:
    """Seconds per training step (forward, backward, AdamW; bf16 autocast on CPU) of a fresh model of this
    shape on random packed rows with `images` tiles: the fastest of `repeats` blocks of `steps` steps after two
    warm-up steps (this VM's speed wanders within seconds; the fastest block is the steadiest measure). A
    measure of this machine's speed now, comparable across runs of the same model shape."""
    from ..model.vlm import SailVL

    model_cfg = copy.deepcopy(model_cfg)  # the caller's config stays as it is (the probe sets an image token id)
    gen = torch.Generator().manual_seed(seed)
    model = SailVL(model_cfg)
    model.train()
    v, llm = model_cfg.vision_config, model_cfg.llm_config
    per_tile = (v.image_size // v.patch_size // 2) ** 2  # after the 2x2 pixel shuffle
    ids = torch.randint(16, llm.vocab_size, (rows, row_len), generator=gen)
    # samples of 64 tokens; the first `images` of them start with one tile each
    img_id = model_cfg.img_context_token_id if model_cfg.img_context_token_id is not None else 1
    seg = 64
    for i in range(min(images, rows * (row_len // seg))):
        r, k = divmod(i, row_len // seg)
        ids[r, k * seg + 2: k * seg + 2 + per_tile] = img_id
    model_cfg.img_context_token_id = img_id
    n_tiles = int((ids == img_id).sum()) // per_tile
    pixels = torch.rand(n_tiles, 3, v.image_size, v.image_size, generator=gen)
    pos = torch.arange(seg).repeat(rows * row_len // seg).view(rows, row_len)
    cu = torch.arange(0, rows * row_len + 1, seg, dtype=torch.int32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)

    def step() -> None:
        with autocast:
            out = model(ids, pixel_values=pixels, position_ids=pos, cu_seqlens=cu, max_seqlen=seg,
                        compute_logits=False)
            ce, _ = model.labelled_token_losses(out.hidden, ids, cu)
        ce.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


@dataclass
class Reference:
    """What one run of the recipe took on this machine: seconds per step of each stage (by name, export and
    loader start-up included), `speed_probe` seconds measured in the same run, and the seconds after training
    that a budget must leave room for (loading the model, evaluation, chat)."""

    step_s: dict[str, float]
    probe_s: float
    other_s: float = 25.0
    margin: float = 0.97  # aim at this fraction of the budget: the prediction is a few percent off at times
    # stages planned whole while the others can absorb the cut (short ones worth more per second than the rest)
    keep: tuple[str, ...] = ()
    # stages that share time to spare, up to max_grow times their steps (1: the recipe is the most a run trains)
    grow: tuple[str, ...] = ()
    max_grow: float = 1.0
    # the cap for the run's last stage when it grows (None: max_grow). It is planned when every other stage has run,
    # from their measured speed, and no stage after it can lose time to it: a machine that sped up late otherwise
    # leaves time unused (a default demo: the thinking stages at their 2x cap, 108 s of the budget left, demo log
    # session 23)
    last_max_grow: float | None = None
    # growing stages leave this fraction of the time the stages left need at full size unspent: the machine may slow
    # down later, and a cut then falls on the last stages, the kept ones too (a demo in a fast hour that slowed: the
    # thinking stages cut to 0.8 of their steps, math_cot 0.80 -> 0.18)
    grow_reserve: float = 0.15
    # when the others absorb a cut, the kept stages' time is counted this fraction larger: the stage before them may
    # run slower than predicted, and what it overruns then comes off the kept stages (a default demo in a slow hour:
    # sft ran 25% over its prediction, longcot_sft and think_fusion_sft got 0.58 / 0.54 of their steps, math_cot
    # 0.98 -> 0.64)
    keep_reserve: float = 0.0
    # stages that always run their recipe's steps, neither cut nor grown, the others planned around them: a stage
    # whose worth comes all at once at its end, or that later stages follow closely (the tiny recipe's vit_read: the
    # demos' math and OCR followed its steps)
    fixed: tuple[str, ...] = ()


class Budget:
    """Scales the stages of a run to end within `seconds` of wall time counted from `start` (a
    `time.perf_counter()` value); see the module doc. `path` keeps the decisions (budget.json)."""

    def __init__(self, seconds: float, reference: Reference, path: Path, start: float, probe_s: float | None = None):
        if seconds <= 0:
            raise ValueError(f"a budget must be > 0 seconds, got {seconds}")
        self.seconds, self.ref, self.path, self.start = seconds, reference, Path(path), start
        self.state = json.loads(self.path.read_text()) if self.path.exists() else {}
        if "probe_s" not in self.state:
            self.state["probe_s"] = probe_s if probe_s is not None else reference.probe_s
        self.state.setdefault("seconds", seconds)
        self.state.setdefault("stages", {})
        self._done: list[tuple[str, float, int]] = []  # (stage, seconds it took here, steps it ran) this process
        self._running: tuple[str, int, float] | None = None  # (stage, steps, perf_counter at its start)

    @property
    def speed(self) -> float:
        """How much slower than the reference this machine is now (> 1: slower): from the stages finished in this
        process when there are any, else from the probe."""
        done = [(s, t, n) for s, t, n in self._done if self.ref.step_s.get(s)]
        if done:
            ref = sum(self.ref.step_s[s] * n for s, _, n in done)
            return sum(t for _, t, _ in done) / max(ref, 1e-9)
        return self.state["probe_s"] / self.ref.probe_s

    def predicted_s(self, stages: list[Stage]) -> float:
        """Seconds these stages would take here now at their full step counts."""
        return sum(s.steps * self.ref.step_s.get(s.name, 0.0) for s in stages) * self.speed

    def scale_for(self, stages: list[Stage], si: int) -> float:
        """The factor for stage si as things stand: with the time left (less the room for what follows training)
        short of what stages si.. need at full size, the factor that fits, at most 1, where stages in
        `reference.keep` count at full size plus `keep_reserve` of it and the others share what is left (a kept
        stage itself gets the factor of all stages left); with time to spare (beyond that reserve), stages in
        `reference.grow` share it, less `grow_reserve` (at most `max_grow`; the last stage at most `last_max_grow`),
        and the others get 1; a stage in `reference.fixed` gets 1 always, its time counted first for the others."""
        return 1.0 if stages[si].name in self.ref.fixed else self._scale(stages, si)

    def _scale(self, stages: list[Stage], si: int) -> float:
        """`scale_for` without the fixed stages' 1: the factor the stages from si that are not fixed share."""
        left, rest = self._left(), stages[si:]
        kept, held = self._kept(rest)
        spare = left - held - self.predicted_s(rest)
        if spare >= 0:
            if stages[si].name not in self.ref.grow:
                return 1.0
            return self._grow_factor(rest, spare, self.ref.last_max_grow if si == len(stages) - 1 else None)
        if kept:  # the kept (and fixed) stages' time first, the others share what is left
            left -= held + self.predicted_s(kept)
            rest = [s for s in rest if s.name not in {k.name for k in kept}]
        need = self.predicted_s(rest)
        return max(0.0, min(1.0, left / need)) if need > 0 else 1.0

    def _kept(self, rest: list[Stage]) -> tuple[list[Stage], float]:
        """The stages whose time comes first when rest[0] plans: every fixed one, and the kept ones unless rest[0] is
        one of them; and the seconds held back for them."""
        keep = rest[0].name not in self.ref.keep
        kept = [s for s in rest if s.name in self.ref.fixed or (keep and s.name in self.ref.keep)]
        return kept, self.ref.keep_reserve * self.predicted_s(kept)

    def _left(self) -> float:
        return self.seconds * self.ref.margin - (time.perf_counter() - self.start) - self.ref.other_s

    def _grow_factor(self, rest: list[Stage], spare: float, cap: float | None = None) -> float:
        """The growing stages' factor for `spare` seconds beyond what `rest` needs at full size, less the reserve,
        at most `cap` (default max_grow)."""
        growing = self.predicted_s([s for s in rest if s.name in self.ref.grow])
        spare -= self.ref.grow_reserve * self.predicted_s(rest)
        cap = self.ref.max_grow if cap is None else cap
        return min(cap, 1.0 + max(0.0, spare) / growing) if growing > 0 else 1.0

    def stage(self, stages: list[Stage], si: int) -> Stage:
        """Stage si as it runs under the budget (its steps scaled; at least 1), recorded for --resume."""
        if self._running is not None:
            name, steps, t0 = self._running
            self._done.append((name, time.perf_counter() - t0, steps))
            self._running = None
        stage = stages[si]
        if stage.name in self.state["stages"]:  # planned by an earlier process: may resume part-way, so its time
            return replace(stage, steps=int(self.state["stages"][stage.name]["steps"]))  # is no measure of speed
        scale = self.scale_for(stages, si)
        steps = max(1, round(stage.steps * scale))
        self.state["stages"][stage.name] = {"steps": steps, "of": stage.steps, "scale": round(scale, 4)}
        self._save()
        self._running = (stage.name, steps, time.perf_counter())
        return replace(stage, steps=steps)

    def factors(self, stages: list[Stage]) -> list[float]:
        """Each stage's factor if all of them were planned now: when cut, the kept stages whole and the others by
        one factor (`scale_for`, the keep reserve held back); with time to spare beyond that reserve, the growing
        stages by one factor (at most max_grow, the last stage's `last_max_grow` aside: it is for a run planned stage
        by stage) and the others whole."""
        spare = self._left() - self._kept(stages)[1] - self.predicted_s(stages)
        if spare >= 0:
            grow = self._grow_factor(stages, spare)
            return [grow if s.name in self.ref.grow else 1.0 for s in stages]
        scale = self._scale(stages, 0)
        return [1.0 if (s.name in self.ref.keep and scale > 0) or s.name in self.ref.fixed else scale for s in stages]

    def plan_all(self, stages: list[Stage]) -> list[Stage]:
        """Every stage planned now by `factors` (for runs this process cannot follow stage by stage, e.g. under
        torchrun); recorded like `stage` records them."""
        for s, f in zip(stages, self.factors(stages)):
            self.state["stages"].setdefault(s.name, {"steps": max(1, round(s.steps * f)), "of": s.steps,
                                                     "scale": round(f, 4)})
        self._save()
        return [replace(s, steps=int(self.state["stages"][s.name]["steps"])) for s in stages]

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.path)
