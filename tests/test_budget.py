"""The wall-clock budget: the speed probe, the scale it sets, re-planning from real stage times, resume, and the
trainer running the budgeted step counts."""

import json
import math
import time
from dataclasses import replace

import pytest

from sailvl.config import tiny_config
from sailvl.train.budget import Budget, Reference, speed_probe
from sailvl.train.stages import DataSpec, Stage
from sailvl.train.trainer import Trainer
from tests.test_train import losses, make_run, world  # noqa: F401  (the fixture)


def stages(**steps: int) -> list[Stage]:
    return [Stage(name, n, [DataSpec("unused.jsonl")]) for name, n in steps.items()]


REF = Reference(step_s={"a": 1.0, "b": 2.0}, probe_s=1.0, other_s=10.0, margin=1.0)


def budget_at(tmp_path, seconds: float, elapsed: float, probe_s: float, ref: Reference = REF) -> Budget:
    return Budget(seconds, ref, tmp_path / "budget.json", start=time.perf_counter() - elapsed, probe_s=probe_s)


def test_speed_probe_times_training_steps():
    cfg = tiny_config(vocab_size=300)
    before = cfg.to_dict()
    t = speed_probe(cfg, steps=1, repeats=1, rows=1, row_len=128, images=2)
    assert math.isfinite(t) and t > 0
    assert cfg.to_dict() == before  # the run's config is not touched (it once set the image token id)


def test_the_probe_sets_the_first_scale(tmp_path):
    s = stages(a=100, b=50)  # 100 * 1 + 50 * 2 = 200 s at the reference's speed
    b = budget_at(tmp_path, 310, elapsed=100, probe_s=2.0)  # twice as slow: 400 s predicted, 200 s left
    assert b.speed == pytest.approx(2.0)
    assert b.predicted_s(s) == pytest.approx(400)
    assert b.scale_for(s, 0) == pytest.approx(0.5, abs=1e-3)
    first = b.stage(s, 0)
    assert first.steps == 50 and first.name == "a" and s[0].steps == 100  # a copy; the recipe is untouched
    assert json.loads((tmp_path / "budget.json").read_text())["stages"]["a"] == {"steps": 50, "of": 100, "scale": 0.5}


def test_no_stage_grows_by_default_and_none_runs_below_one_step(tmp_path):
    s = stages(a=100, b=50)
    assert budget_at(tmp_path, 10_000, elapsed=0, probe_s=1.0).stage(s, 0).steps == 100
    assert budget_at(tmp_path / "x", 20, elapsed=30, probe_s=1.0).stage(s, 0).steps == 1  # already over: 1 step
    with pytest.raises(ValueError, match="> 0 seconds"):
        Budget(0, REF, tmp_path / "y.json", start=0.0)


def test_later_stages_are_replanned_from_the_real_stage_times(tmp_path):
    s = stages(a=100, b=50)
    b = budget_at(tmp_path, 310, elapsed=100, probe_s=2.0)
    b.stage(s, 0)  # 50 steps of a, predicted 100 s at the probe's speed ...
    b._running = ("a", 50, time.perf_counter() - 25.0)  # ... but they took 25 s: the machine runs at half the reference
    b.start = time.perf_counter() - 125.0
    assert b.stage(s, 1).steps == 50  # 175 s left, b predicted at 50 s: the whole recipe
    assert b.speed == pytest.approx(0.5, rel=1e-3)
    b2 = budget_at(tmp_path / "slow", 310, elapsed=100, probe_s=2.0)
    b2.stage(s, 0)
    b2._running = ("a", 50, time.perf_counter() - 150.0)  # 3x the reference: b (100 s at the reference) gets 50 s left
    b2.start = time.perf_counter() - 250.0
    assert b2.stage(s, 1).steps == round(50 * 50 / 300)


def test_resume_reuses_the_recorded_steps(tmp_path):
    s = stages(a=100, b=50)
    b = budget_at(tmp_path, 310, elapsed=100, probe_s=2.0)
    assert b.stage(s, 0).steps == 50
    again = budget_at(tmp_path, 310, elapsed=0, probe_s=0.1)  # a fresh process, faster: a keeps its 50 steps
    assert again.state["probe_s"] == 2.0 and again.stage(s, 0).steps == 50
    assert again.stage(s, 1).steps == 50  # b was never planned: planned now, from this process's clock
    assert again.speed == pytest.approx(2.0)  # a resumed stage's time is no measure of speed: the recorded probe's


def test_plan_all_uses_one_factor(tmp_path):
    planned = budget_at(tmp_path, 310, elapsed=100, probe_s=2.0).plan_all(stages(a=100, b=50))
    assert [p.steps for p in planned] == [50, 25]


def test_trainer_runs_the_budgeted_steps(world, tmp_path):  # noqa: F811
    run = make_run(world, tmp_path)  # stages warm (3 steps) and all (5 steps)
    ref = Reference(step_s={"warm": 10.0, "all": 10.0}, probe_s=1.0, other_s=0.0, margin=1.0)
    budget = Budget(50.0, ref, tmp_path / "t" / "budget.json", start=time.perf_counter(), probe_s=1.0)
    Trainer(run, quiet=True, budget=budget).fit()  # 8 steps predicted at 10 s each, 50 s of budget
    steps = {}
    for stage, i, _ in losses(tmp_path / "t"):
        steps[stage] = i
    planned = json.loads((tmp_path / "t" / "budget.json").read_text())["stages"]
    assert steps == {"warm": planned["warm"]["steps"], "all": planned["all"]["steps"]}
    assert planned["warm"]["steps"] == 2 and planned["warm"]["of"] == 3 and 0.55 < planned["warm"]["scale"] <= 0.625
    # the warm stage took about a second, not 20 s: re-planned from that, "all" runs whole
    assert planned["all"]["steps"] == 5


def test_kept_stages_are_planned_whole_while_the_others_absorb_the_cut(tmp_path):
    ref = Reference(step_s={"a": 1.0, "b": 2.0}, probe_s=1.0, other_s=10.0, margin=1.0, keep=("b",))
    s = stages(a=100, b=50)  # at speed 2: a 200 s, b 200 s; 300 s left
    b = budget_at(tmp_path, 310, elapsed=0, probe_s=2.0, ref=ref)
    assert b.scale_for(s, 0) == pytest.approx(0.5, abs=1e-3)  # a takes the whole cut (uniform would be 0.75)
    assert b.stage(s, 0).steps == 50
    assert budget_at(tmp_path / "all", 310, elapsed=0, probe_s=2.0, ref=ref).plan_all(s)[1].steps == 50


def test_the_keep_reserve_holds_back_part_of_the_kept_stages_time_from_the_others(tmp_path):
    ref = Reference(step_s={"a": 1.0, "b": 2.0}, probe_s=1.0, other_s=10.0, margin=1.0, keep=("b",),
                    keep_reserve=0.25)
    s = stages(a=100, b=50)  # at speed 2: a 200 s, b 200 s (+ 50 s held back); 300 s left
    b = budget_at(tmp_path, 310, elapsed=0, probe_s=2.0, ref=ref)
    assert b.scale_for(s, 0) == pytest.approx(0.25, abs=1e-3)  # a: (300 - 200 - 50) / 200
    assert b.scale_for(s, 1) == pytest.approx(1.0)  # b itself: no reserve against itself, it fits whole
    assert budget_at(tmp_path / "all", 310, elapsed=0, probe_s=2.0, ref=ref).factors(s) == pytest.approx([0.25, 1.0],
                                                                                                        abs=1e-3)
    # the whole recipe fits but not with the reserve: a is cut to leave it
    tight = budget_at(tmp_path / "tight", 430, elapsed=0, probe_s=2.0, ref=ref)  # 420 s left of 400 + 50
    assert tight.scale_for(s, 0) == pytest.approx(0.85, abs=1e-3)  # (420 - 250) / 200
    # with time to spare beyond the reserve, nothing changes
    assert budget_at(tmp_path / "easy", 500, elapsed=0, probe_s=2.0, ref=ref).factors(s) == [1.0, 1.0]


def test_fixed_stages_run_their_steps_neither_cut_nor_grown(tmp_path):
    ref = Reference(step_s={"a": 1.0, "f": 2.0, "c": 1.0}, probe_s=1.0, other_s=10.0, margin=1.0, fixed=("f",),
                    grow=("a", "c"), max_grow=2.0, grow_reserve=0.0)
    s = stages(a=100, f=50, c=100)  # at speed 2: a 200 s, f 200 s, c 200 s; 400 s left
    short = budget_at(tmp_path, 410, elapsed=0, probe_s=2.0, ref=ref)
    assert short.scale_for(s, 0) == pytest.approx(0.5, abs=1e-3)  # a and c share what f leaves: 200 / 400
    assert short.scale_for(s, 1) == 1.0  # f itself whole, though what is left cannot hold it and c
    assert budget_at(tmp_path / "all", 410, elapsed=0, probe_s=2.0, ref=ref).factors(s) == pytest.approx(
        [0.5, 1.0, 0.5], abs=1e-3)
    late = budget_at(tmp_path / "late", 410, elapsed=390, probe_s=2.0, ref=ref)  # 10 s left: f still whole
    assert late.stage(s, 1).steps == 50
    easy = budget_at(tmp_path / "easy", 1010, elapsed=0, probe_s=2.0, ref=ref)  # 400 s to spare: a and c grow
    assert easy.factors(s) == pytest.approx([2.0, 1.0, 2.0], abs=1e-3)
    # a fixed first stage planned with the others at once (plan_all): its time still comes first
    first = stages(f=50, a=100, c=100)
    assert budget_at(tmp_path / "first", 410, elapsed=0, probe_s=2.0, ref=ref).factors(first) == pytest.approx(
        [1.0, 0.5, 0.5], abs=1e-3)


def test_time_to_spare_goes_to_the_growing_stages_up_to_max_grow(tmp_path):
    ref = Reference(step_s={"a": 1.0, "b": 2.0}, probe_s=1.0, other_s=10.0, margin=1.0, grow=("b",), max_grow=2.0,
                    grow_reserve=0.0)
    s = stages(a=100, b=50)  # 200 s at the reference's speed
    b = budget_at(tmp_path, 310, elapsed=0, probe_s=1.0, ref=ref)  # 300 s left: 100 s to spare, all of it for b
    assert b.scale_for(s, 0) == 1.0  # a does not grow
    assert b.scale_for(s, 1) == pytest.approx(2.0, abs=1e-3)  # b: 100 s at full size + 100 s spare
    assert b.stage(s, 0).steps == 100
    b._running = ("a", 100, time.perf_counter() - 50.0)  # a took half its predicted time: the machine is 2x faster
    b.start = time.perf_counter() - 50.0
    assert b.stage(s, 1).steps == 100  # 250 s left, b 50 s at full size: capped at max_grow
    planned = budget_at(tmp_path / "all", 260, elapsed=0, probe_s=1.0, ref=ref).plan_all(s)
    assert [p.steps for p in planned] == [100, 75]  # 50 s to spare: b 1.5x
    # short of time, growing stages are cut like the others
    assert budget_at(tmp_path / "cut", 310, elapsed=100, probe_s=2.0, ref=ref).stage(s, 0).steps == 50
    # max_grow 1 (the default): the recipe is the most a run trains
    assert budget_at(tmp_path / "one", 10_000, elapsed=0, probe_s=1.0,
                     ref=Reference(step_s=ref.step_s, probe_s=1.0, grow=("b",))).scale_for(s, 1) == 1.0


def test_the_last_stage_may_grow_past_max_grow_up_to_last_max_grow(tmp_path):
    """Planned last, from the speed the other stages measured, it takes the time a late speed-up leaves over."""
    ref = Reference(step_s={"a": 1.0, "b": 2.0}, probe_s=1.0, other_s=10.0, margin=1.0, grow=("a", "b"),
                    max_grow=2.0, last_max_grow=4.0, grow_reserve=0.0)
    s = stages(a=100, b=50)  # 200 s at the reference's speed
    b = budget_at(tmp_path, 710, elapsed=0, probe_s=1.0, ref=ref)  # 700 s left: 500 s to spare
    assert b.stage(s, 0).steps == 200  # a: capped at max_grow
    b._running = ("a", 200, time.perf_counter() - 200.0)  # a ran at the reference's speed
    b.start = time.perf_counter() - 200.0
    assert b.stage(s, 1).steps == 200  # 500 s left for b's 100 s at full size: 5x, capped at 4x, not 2x
    assert budget_at(tmp_path / "all", 710, elapsed=0, probe_s=1.0, ref=ref).factors(s) == [2.0, 2.0]
    # by default the last stage's cap is max_grow
    plain = budget_at(tmp_path / "plain", 310, elapsed=0, probe_s=1.0, ref=replace(ref, last_max_grow=None))
    assert plain.scale_for(s, 1) == pytest.approx(2.0)


def test_growth_leaves_a_reserve_of_the_time_the_stages_left_need(tmp_path):
    ref = Reference(step_s={"a": 1.0, "b": 2.0}, probe_s=1.0, other_s=10.0, margin=1.0, grow=("b",), max_grow=3.0,
                    grow_reserve=0.25)
    s = stages(a=100, b=50)  # 200 s at full size, 300 s left: 100 s to spare, less 0.25 * 200 s kept back
    assert budget_at(tmp_path, 310, elapsed=0, probe_s=1.0, ref=ref).factors(s) == pytest.approx([1.0, 1.5], abs=1e-3)
    # 20 s to spare, less than the reserve: nothing grows
    assert budget_at(tmp_path / "tight", 230, elapsed=0, probe_s=1.0, ref=ref).factors(s) == [1.0, 1.0]
