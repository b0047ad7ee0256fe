"""AdaLRS: slope fit, the search on a noisy quadratic, exact rollback, factor decay, exact resume."""

import copy
import io
import json
import math

import numpy as np
import pytest
import torch

from sailvl.train.adalrs import AdaLRS, AdaLRSConfig, fit_slope


# ------------------------------------------------------------------------------------------ helpers
class NoisyQuadratic(torch.nn.Module):
    """Noisy quadratic model: L(w) = 1/2 sum_i lam_i (w_i - w*_i)^2 with lam_i = i^-2 (lam_max = 1), the
    initial error spread so that L decays like a power law of the summed lr (a slowly flattening curve, as in
    pre-training). Plain SGD is stable for lr < 2 (momentum m: lr < 2 (1 + m)); gradients carry Gaussian
    noise of std noise * sqrt(lam_i) (SGD noise, covariance proportional to the curvature)."""

    def __init__(self, dim: int = 64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        i = torch.arange(1, dim + 1, dtype=torch.float64)
        self.register_buffer("lam", i**-2.0)
        self.register_buffer("w_star", torch.randn(dim, generator=g, dtype=torch.float64).sign() * (i**-2.0 / self.lam).sqrt())
        self.w = torch.nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def forward(self):
        return 0.5 * (self.lam * (self.w - self.w_star) ** 2).sum()


class Run:
    """A tiny trainer following the AdaLRS contract: group lr = base lr * lr_scale, step() after the update."""

    def __init__(self, lr, config=None, momentum=0.0, seed=1, noise=0.01):
        self.lr, self.noise = lr, noise
        self.model = NoisyQuadratic()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)
        self.ada = AdaLRS(config, self.model, self.opt) if config is not None else None
        self.gen = torch.Generator().manual_seed(seed)
        self.n = 0  # steps taken
        self.events = []  # (step, event)

    @property
    def scale(self):
        return self.ada.lr_scale if self.ada is not None else 1.0

    def step(self):
        for group in self.opt.param_groups:
            group["lr"] = self.lr * self.scale
        loss = self.model()
        self.opt.zero_grad()
        loss.backward()
        m = self.model
        m.w.grad += self.noise * m.lam.sqrt() * torch.randn(m.w.shape, generator=self.gen, dtype=torch.float64)
        self.opt.step()
        self.n += 1
        event = self.ada.step(loss.item()) if self.ada is not None else None
        if event:
            self.events.append((self.n, event))
        return event

    def loss(self):
        with torch.no_grad():
            return self.model().item()

    def state(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(), "gen": self.gen.get_state(),
                "n": self.n, "ada": self.ada.state_dict()}

    def load(self, state):
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.gen.set_state(state["gen"])
        self.n = state["n"]
        self.ada.load_state_dict(state["ada"])


class Level(torch.nn.Module):
    """A model whose 'loss' is a buffer the test moves by hand, plus a parameter with optimizer state."""

    def __init__(self):
        super().__init__()
        self.register_buffer("level", torch.tensor(100.0, dtype=torch.float64))
        self.p = torch.nn.Parameter(torch.ones(3))
        self.frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)  # in no param group


def oracle_run(config, speed, steps, nan_at=None):
    """Loss oracle: reported loss = level before the update; each step level -= speed(lr_scale). The level
    lives in the model's state, so a rollback rewinds it. Returns (ada, [(step, event, lr_scale)])."""
    model = Level()
    opt = torch.optim.SGD([model.p], lr=0.1, momentum=0.9)
    ada = AdaLRS(config, model, opt)
    out = []
    for t in range(1, steps + 1):
        loss = model.level.item()
        model.p.grad = torch.full((3,), float(t))
        opt.step()
        with torch.no_grad():
            model.level -= speed(ada.lr_scale)
        event = ada.step(float("nan") if t == nan_at else loss)
        if event:
            out.append((t, event, ada.lr_scale))
    return ada, out


# ------------------------------------------------------------------------------------------ slope fit
def test_fit_slope_matches_ols():
    slope, se = fit_slope([5.0, 3.0, 1.0, -1.0])
    assert slope == pytest.approx(-2.0) and se == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    y = 3.0 - 0.1 * np.arange(40) + rng.normal(0, 0.5, 40)
    slope, se = fit_slope(list(y))
    coef, cov = np.polyfit(np.arange(40), y, 1, cov=True)  # numpy scales cov by RSS / (n - 2)
    assert slope == pytest.approx(coef[0], rel=1e-10)
    assert se == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-8)
    with pytest.raises(ValueError, match="at least 3"):
        fit_slope([1.0, 2.0])


# ------------------------------------------------------------------------------- search on the NQM
@pytest.mark.parametrize("seed", [1, 2])
def test_raises_a_too_small_lr_and_beats_it(seed):
    lr = 0.1  # the model's good range is ~0.8-1.9 (stable < 2): 8x too small
    fixed = Run(lr, seed=seed)
    ada = Run(lr, AdaLRSConfig(window=20, start_step=200), seed=seed)
    for _ in range(600):
        fixed.step(), ada.step()
    kinds = [e for _, e in ada.events]
    assert "keep" in kinds
    assert ada.scale >= 3.0, ada.ada.history
    assert lr * ada.scale < 2.0  # never settled on a diverging lr
    assert ada.loss() < 0.7 * fixed.loss()


def test_too_large_lr_trial_rolls_back_weights_and_optimizer_exactly():
    # SGD + momentum 0.5 is stable for lr < 3: lr 2.5 trains (oscillating); the x1.5 trial (3.75) diverges.
    run = Run(2.5, AdaLRSConfig(window=20, start_step=50), momentum=0.5, seed=3)
    event = None
    while event != "trial":
        event = run.step()
    assert run.scale == 1.5
    model_snap = copy.deepcopy(run.model.state_dict())
    opt_snap = copy.deepcopy(run.opt.state_dict())
    loss_at_trial = run.loss()
    event = None
    while event is None:
        before = run.loss()
        event = run.step()
    assert event == "rollback"
    assert before > loss_at_trial  # the trial made things worse before the decision
    ada = run.ada
    assert ada.lr_scale == pytest.approx(1 / 1.5) and ada.snapshot is None and ada.phase == "baseline"
    assert ada.alpha_cur == pytest.approx(1.45) and ada.beta_cur == pytest.approx(1.45)
    state = run.model.state_dict()
    assert all(torch.equal(state[k], model_snap[k]) for k in model_snap)
    opt_state = run.opt.state_dict()
    assert opt_state["state"].keys() == opt_snap["state"].keys()
    for pid, s in opt_snap["state"].items():
        assert torch.equal(opt_state["state"][pid]["momentum_buffer"], s["momentum_buffer"])
    assert run.loss() == loss_at_trial


# ----------------------------------------------------------------------------- exact state machine
def _speed(limit):
    return lambda s: s if s <= limit else -s  # loss falls at rate s up to `limit`, rises beyond it


def test_state_machine_decisions_and_decay():
    cfg = AdaLRSConfig(window=4, alpha=1.5, beta=1.5, decay=0.5, settle_eps=0.01)
    ada, events = oracle_run(cfg, _speed(2.0), 60)
    got = [(t, e, round(s, 6)) for t, e, s in events]
    assert got == [
        (4, "trial", 1.5),           # baseline slope -1 -> try x1.5
        (8, "keep", 1.5 * 1.25),     # -1.5 < -1: keep; next trial x1.25 (alpha' decayed: 1 + 0.5 * 0.5)
        (12, "keep", round(1.875 * 1.125, 6)),
        (16, "rollback", round(1.875 / 1.125, 6)),  # 2.109 > limit: loss rises -> back to 1.875 / beta'
        (20, "trial", round(1.875 / 1.125 * 1.0625, 6)),
        (24, "keep", round(1.875 / 1.125 * 1.0625 * 1.03125, 6)),
        (28, "keep", round(1.875 / 1.125 * 1.0625 * 1.03125 * 1.015625, 6)),
        (32, "keep", round(1.875 / 1.125 * 1.0625 * 1.03125 * 1.015625, 6)),  # alpha' - 1 < eps: settled
    ]
    assert ada.settled and ada.history[-1]["event"] == "settled"
    assert ada.alpha_cur == pytest.approx(1.0078125) and ada.beta_cur == pytest.approx(1.0078125)
    # factors decay toward 1 after every decision, never below
    decisions = [h for h in ada.history if h["event"] in ("keep", "reject", "rollback")]
    assert len(decisions) == 6


def test_rollback_rewinds_the_trial_and_reject_keeps_weights():
    cfg = AdaLRSConfig(window=4, alpha=1.5, beta=1.5, decay=0.5)
    model = Level()
    opt = torch.optim.SGD([model.p], lr=0.1, momentum=0.9)
    ada = AdaLRS(cfg, model, opt)
    # baseline: slope -1; trial: slope +1 -> rollback; the level returns to its value at the trial start
    for t in range(4):
        model.p.grad = torch.ones(3)
        opt.step()
        ada.step(100.0 - t)
    level0, p0, buf0 = model.level.clone(), model.p.detach().clone(), opt.state[model.p]["momentum_buffer"].clone()
    assert set(ada.snapshot["model"]) == {"level", "p"}  # frozen parameters are not copied
    for t in range(4):
        model.p.grad = torch.ones(3)
        opt.step()
        with torch.no_grad():
            model.level += 1
        event = ada.step(96.0 + t)
    assert event == "rollback"
    assert torch.equal(model.level, level0) and torch.equal(model.p, p0) and torch.equal(model.frozen, torch.zeros(2))
    assert torch.equal(opt.state[model.p]["momentum_buffer"], buf0)
    # a trial whose slope equals the baseline's within the error: reject, weights kept, lr back
    cfg = AdaLRSConfig(window=4)
    model = Level()
    opt = torch.optim.SGD([model.p], lr=0.1)
    ada = AdaLRS(cfg, model, opt)
    losses = [10.0, 9.0, 9.0, 8.0, 8.0, 7.0, 7.0, 6.0]  # same noisy slope twice
    events = []
    for loss in losses:
        with torch.no_grad():
            model.p += 1
        events.append(ada.step(loss))
    assert events[3] == "trial" and events[7] == "reject"
    assert ada.lr_scale == 1.0 and torch.equal(model.p, torch.full((3,), 9.0))


def test_nonfinite_trial_loss_rolls_back_at_once():
    cfg = AdaLRSConfig(window=4, alpha=1.5, beta=2.0, decay=0.5)
    ada, events = oracle_run(cfg, _speed(10.0), 6, nan_at=6)
    assert events == [(4, "trial", 1.5), (6, "rollback", 0.5)]
    assert ada.history[-1]["reason"] == "non-finite loss"
    # a non-finite loss in a baseline window is skipped, not counted
    ada, events = oracle_run(cfg, _speed(10.0), 5, nan_at=2)
    assert events == [(5, "trial", 1.5)]


def test_scale_bounds():
    ada, events = oracle_run(AdaLRSConfig(window=4, decay=0.5, max_lr_scale=1.7), _speed(5.0), 40)
    assert [e for _, e, _ in events] == ["trial", "keep", "keep"]
    assert ada.lr_scale == 1.7 and ada.settled and ada.history[-1]["reason"] == "max_lr_scale"
    ada, events = oracle_run(AdaLRSConfig(window=4, min_lr_scale=0.8), _speed(0.5), 8)
    assert events[-1][1:] == ("rollback", 0.8)


def test_disabled_start_step_stop_step():
    ada, events = oracle_run(AdaLRSConfig(window=4, enabled=False), _speed(5.0), 30)
    assert events == [] and ada.lr_scale == 1.0 and ada.num_steps == 0
    ada, events = oracle_run(AdaLRSConfig(window=4, start_step=10), _speed(5.0), 14)
    assert events == [(14, "trial", 1.5)]
    ada, events = oracle_run(AdaLRSConfig(window=4, stop_step=8), _speed(5.0), 30)
    assert [(t, e) for t, e, _ in events] == [(4, "trial"), (8, "keep")] and ada.settled
    assert ada.history[-1]["reason"] == "stop_step"


def test_config_validation():
    for bad in ({"window": 2}, {"alpha": 0.9}, {"beta": float("nan")}, {"decay": 1.5}, {"min_lr_scale": 0},
                {"max_lr_scale": 0.5}, {"keep_z": -1}, {"start_step": -1}):
        with pytest.raises(ValueError):
            AdaLRSConfig(**bad)


# ------------------------------------------------------------------------------------ exact resume
def test_state_dict_round_trip_resumes_exactly():
    cfg = AdaLRSConfig(window=20, start_step=50)
    full = Run(2.5, cfg, momentum=0.5, seed=3)
    for _ in range(300):
        full.step()
    history = full.ada.history
    assert {"trial", "rollback", "keep"} <= {h["event"] for h in history}
    first_trial = next(h["step"] for h in history if h["event"] == "trial")
    cut = first_trial + 10  # mid-trial: the snapshot must travel with the state

    part = Run(2.5, cfg, momentum=0.5, seed=3)
    for _ in range(cut):
        part.step()
    assert part.ada.phase == "trial"
    state = part.state()
    json.dumps({k: v for k, v in state["ada"].items() if k != "snapshot"})  # everything but tensors is JSON
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    resumed = Run(2.5, cfg, momentum=0.5, seed=99)  # fresh objects, different RNG: all comes from the state
    resumed.load(loaded)
    for _ in range(300 - cut):
        resumed.step()
    assert resumed.ada.history == history
    assert resumed.ada.lr_scale == full.ada.lr_scale
    assert torch.equal(resumed.model.w, full.model.w)
    a, b = resumed.opt.state_dict()["state"], full.opt.state_dict()["state"]
    assert all(torch.equal(a[k]["momentum_buffer"], b[k]["momentum_buffer"]) for k in b)


def test_load_state_dict_refuses_a_trial_without_snapshot():
    ada, _ = oracle_run(AdaLRSConfig(window=4), _speed(5.0), 6)
    state = ada.state_dict()
    assert state["phase"] == "trial" and state["snapshot"] is not None
    state["snapshot"] = None
    model = Level()
    fresh = AdaLRS(AdaLRSConfig(window=4), model, torch.optim.SGD([model.p], lr=0.1))
    with pytest.raises(ValueError, match="snapshot"):
        fresh.load_state_dict(state)
    with pytest.raises(ValueError, match="version"):
        fresh.load_state_dict({**state, "version": 99})
