"""AdaLRS: loss-guided adaptive learning-rate search (SAIL-VL2 basic multimodal pre-training).

SAIL-VL2 (shared/SAILVL2.md section 5) searches the learning rate online during basic multimodal
pre-training: every k steps it fits the loss slope by least squares, tries a larger lr, keeps it when the
loss falls measurably faster, and otherwise rolls the weights and the optimizer state back and shrinks the
lr; the growth and shrink factors decay toward 1 so the search settles. Reported: lr 2e-4 -> ~6.75e-4
(= 2e-4 x 1.5^3) with a better final loss.

Contract with the trainer
-------------------------
The trainer owns the optimizer and the LR schedule. AdaLRS owns one number, `lr_scale` (starts at 1.0),
which the trainer multiplies into every param group's lr on EVERY step, before `optimizer.step()`::

    adalrs = AdaLRS(AdaLRSConfig(window=50, start_step=warmup_steps), model, optimizer)
    for step in ...:
        for group, base_lr in zip(optimizer.param_groups, schedule(step)):   # schedule: pure fn of step
            group["lr"] = base_lr * adalrs.lr_scale
        loss = forward(...); loss.backward(); optimizer.step(); optimizer.zero_grad()
        event = adalrs.step(global_mean_loss)   # AFTER optimizer.step(); "trial" / "keep" / ... / None

* The schedule must be a pure function of the step (e.g. warmup + cosine computed from the step), never a
  chained update that reads back ``group["lr"]``: that value already contains ``lr_scale`` and a rollback
  overwrites it (``optimizer.load_state_dict`` restores the groups' hyperparameters as they were at the
  snapshot). The trainer re-sets every group's lr each step, so both are harmless under this contract.
* Under data parallelism pass the loss averaged over all ranks: every rank then takes the same decisions
  (the arithmetic is plain Python floats, deterministic) and rolls its own replica back. Each rank keeps its
  own snapshot of its `model.state_dict()` / `optimizer.state_dict()` (sharded states work as long as those
  calls are rank-local and `load_state_dict` accepts what they returned).
* A rollback rewinds only the weights and the optimizer state. The global step, the schedule position and
  the data stream keep going: the trial's samples are not replayed.
* Set `start_step` to at least the schedule's warm-up length: slopes measured while the base lr ramps are
  not comparable. During `start_step` calls AdaLRS only counts.

Algorithm (exactly as implemented)
----------------------------------
Phases: ``baseline`` -> ``trial`` -> decide -> ... -> ``settled``. A window is `window` consecutive
`step()` calls (the loss passed to call t was computed before that step's update, so a window's losses
trail its lr by one step; the lag is the same for every window).

1. baseline: collect `window` losses at the current `lr_scale`; fit slope `b` and its standard error
   `se_b` (see `fit_slope`). Then start a trial.
2. start a trial: if `stop_step` is reached, or ``alpha' - 1 < settle_eps``, or `lr_scale` is already at
   `max_lr_scale`, the search is settled (no more trials; event "settled"). Otherwise snapshot the model
   and optimizer (CPU deep copies of both `state_dict()`s, taken after the update of the window's last
   step; the model part holds the parameters the optimizer manages plus all buffers, since frozen
   parameters cannot change during a trial), remember the pre-trial scale ``s0`` and set
   ``lr_scale = min(s0 * alpha', max_lr_scale)`` (event "trial").
3. trial: collect `window` losses at the trial lr; fit ``(t, se_t)``. With ``m = se_b + se_t``:
   * keep      if ``t < b - keep_z * m``     (the loss falls faster by more than the estimation error):
                 the trial lr stays, the snapshot is dropped, and the trial window becomes the baseline
                 of the next trial, which starts at once (step 2);
   * rollback  if ``t > b + rollback_z * m`` (measurably worse), or at once when a trial loss is not
                 finite: the model and optimizer states are loaded back from the snapshot and
                 ``lr_scale = max(s0 / beta', min_lr_scale)``; a fresh baseline follows;
   * reject    otherwise (no measurable difference): the weights are kept, ``lr_scale = s0``, and a fresh
                 baseline follows.
   After every decision both factors decay toward 1: ``alpha' = 1 + (alpha' - 1) * decay`` and
   ``beta' = 1 + (beta' - 1) * decay`` (the decision itself used the values before the decay).
Non-finite losses during a baseline window are skipped (not counted), so a baseline always holds `window`
finite losses. Loss slopes are negative while training improves; "better" means more negative.

`state_dict()` / `load_state_dict()` carry every field above (JSON-able) plus, while a trial is live, the
snapshot (tensors), so a resumed run takes exactly the decisions the uninterrupted run would have.

Caveats
-------
* Short-horizon bias: a later window of the same run is naturally flatter (the loss curve bends), and a
  larger lr first raises the SGD noise floor; both favour the baseline, so the search is conservative (it
  undershoots the best lr rather than overshooting). Windows short against the elapsed training (large
  `start_step`, `window` << steps so far) and low-noise losses (large batches) make its decisions sharper.
* Memory: while a trial is live, a CPU copy of the trainable parameters, the buffers and the optimizer
  state exists (about 3x the trainable parameters' size for Adam), and it is part of `state_dict()`.
* A trainer that skips non-finite steps should still call ``step(float("nan"))`` for them: during a trial
  that rolls back at once; during a baseline it is ignored.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["AdaLRS", "AdaLRSConfig", "fit_slope"]

STATE_VERSION = 1


@dataclass
class AdaLRSConfig:
    window: int = 50  # steps per slope estimate; a baseline and a trial each last `window` steps
    alpha: float = 1.5  # initial lr growth factor of a trial (alpha')
    beta: float = 1.5  # initial lr shrink factor of a rollback (beta')
    decay: float = 0.9  # after each decision: f' = 1 + (f' - 1) * decay, for alpha' and beta'
    keep_z: float = 1.0  # keep iff trial_slope < base_slope - keep_z * (se_base + se_trial)
    rollback_z: float = 1.0  # rollback iff trial_slope > base_slope + rollback_z * (se_base + se_trial)
    min_lr_scale: float = 0.1
    max_lr_scale: float = 10.0
    start_step: int = 0  # step() calls ignored before the search starts (>= the schedule's warm-up)
    stop_step: int | None = None  # no trial starts at or after this many step() calls (a live one finishes)
    settle_eps: float = 0.01  # settled once alpha' - 1 < settle_eps
    enabled: bool = True  # False: step() does nothing and lr_scale stays 1.0

    def __post_init__(self):
        if int(self.window) != self.window or self.window < 3:
            raise ValueError(f"AdaLRS window must be an integer >= 3 (a slope's error needs 3 points), got {self.window}")
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 1.0):
                raise ValueError(f"AdaLRS {name} must be a finite number >= 1, got {v}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"AdaLRS decay must be in [0, 1], got {self.decay}")
        for name in ("keep_z", "rollback_z", "settle_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0.0):
                raise ValueError(f"AdaLRS {name} must be a finite number >= 0, got {v}")
        if not (0.0 < self.min_lr_scale <= 1.0 <= self.max_lr_scale and math.isfinite(self.max_lr_scale)):
            raise ValueError(
                f"AdaLRS needs 0 < min_lr_scale <= 1 <= max_lr_scale < inf, got {self.min_lr_scale}, {self.max_lr_scale}"
            )
        if self.start_step < 0 or (self.stop_step is not None and self.stop_step < 0):
            raise ValueError("AdaLRS start_step / stop_step must be >= 0")


def fit_slope(losses: list[float]) -> tuple[float, float]:
    """Ordinary least squares of loss on step index 0..n-1 -> (slope, standard error of the slope).

    slope = Sxy / Sxx, with Sxx = sum (x - mean x)^2 and Sxy = sum (x - mean x)(y - mean y);
    se = sqrt(RSS / (n - 2) / Sxx), RSS the residual sum of squares of the fitted line.
    """
    n = len(losses)
    if n < 3:
        raise ValueError(f"a slope with an error needs at least 3 losses, got {n}")
    xm = (n - 1) / 2
    ym = math.fsum(losses) / n
    sxx = math.fsum((i - xm) ** 2 for i in range(n))
    sxy = math.fsum((i - xm) * (y - ym) for i, y in enumerate(losses))
    slope = sxy / sxx
    intercept = ym - slope * xm
    rss = math.fsum((y - intercept - slope * i) ** 2 for i, y in enumerate(losses))
    return slope, math.sqrt(rss / (n - 2) / sxx)


def _cpu_clone(obj: Any) -> Any:
    """Deep copy of a (nested) state dict with every tensor copied to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, _cpu_clone(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return copy.deepcopy(obj)


class AdaLRS:
    """Adaptive lr search around a trainer-owned schedule; see the module docstring for the contract.

    Public state: `lr_scale` (multiply into every group's lr), `phase` ("baseline" | "trial" | "settled"),
    `alpha_cur` / `beta_cur` (the decayed factors), `num_steps` (step() calls so far), `history` (one dict
    per event: step, event, lr_scale, slopes).
    """

    def __init__(self, config: AdaLRSConfig | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.config = config or AdaLRSConfig()
        self.model = model
        self.optimizer = optimizer
        self.lr_scale = 1.0
        self.alpha_cur = float(self.config.alpha)
        self.beta_cur = float(self.config.beta)
        self.phase = "baseline"
        self.num_steps = 0
        self.history: list[dict[str, Any]] = []
        self._losses: list[float] = []
        self._base: tuple[float, float] | None = None  # (slope, se) of the window before the live trial
        self._pre_trial_scale: float | None = None
        self._snapshot: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------ steps
    @property
    def settled(self) -> bool:
        return self.phase == "settled"

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """{"model": state_dict, "optimizer": state_dict} on CPU while a trial is live, else None."""
        return self._snapshot

    def step(self, loss: float | torch.Tensor) -> str | None:
        """Record the loss of one optimizer step (call AFTER optimizer.step()). Returns the event that
        happened at this step: "trial", "keep", "reject", "rollback", "settled", or None."""
        cfg = self.config
        if not cfg.enabled:
            return None
        loss = float(loss.detach().float().item() if isinstance(loss, torch.Tensor) else loss)
        self.num_steps += 1
        if self.num_steps <= cfg.start_step or self.phase == "settled":
            return None
        if self.phase == "baseline":
            if not math.isfinite(loss):
                return None
            self._losses.append(loss)
            if len(self._losses) < cfg.window:
                return None
            self._base = fit_slope(self._losses)
            self._losses = []
            return self._start_trial()
        # trial
        if not math.isfinite(loss):
            return self._decide("rollback", None)
        self._losses.append(loss)
        if len(self._losses) < cfg.window:
            return None
        trial = fit_slope(self._losses)
        self._losses = []
        (b, se_b), (t, se_t) = self._base, trial
        margin = se_b + se_t
        if t < b - cfg.keep_z * margin:
            return self._decide("keep", trial)
        if t > b + cfg.rollback_z * margin:
            return self._decide("rollback", trial)
        return self._decide("reject", trial)

    def _start_trial(self) -> str:
        cfg = self.config
        target = min(self.lr_scale * self.alpha_cur, cfg.max_lr_scale)
        reason = None
        if cfg.stop_step is not None and self.num_steps >= cfg.stop_step:
            reason = "stop_step"
        elif self.alpha_cur - 1.0 < cfg.settle_eps:
            reason = "alpha settled"
        elif target <= self.lr_scale:
            reason = "max_lr_scale"
        if reason is not None:
            self.phase = "settled"
            self._base = None
            self._log("settled", reason=reason)
            return "settled"
        self._snapshot = {"model": self._model_snapshot(), "optimizer": _cpu_clone(self.optimizer.state_dict())}
        self._pre_trial_scale = self.lr_scale
        self.lr_scale = target
        self.phase = "trial"
        self._log("trial", base_slope=self._base[0], base_se=self._base[1])
        return "trial"

    def _model_snapshot(self) -> dict[str, torch.Tensor]:
        """CPU copies of the model's state-dict entries a trial can change: the parameters the optimizer
        manages and every buffer. Frozen parameters (not in any param group) are left out."""
        managed = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        params = dict(self.model.named_parameters(remove_duplicate=False))
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()
                if k not in params or id(params[k]) in managed}

    def _decide(self, event: str, trial: tuple[float, float] | None) -> str:
        base, s0 = self._base, self._pre_trial_scale
        info = {"base_slope": base[0], "base_se": base[1],
                "trial_slope": None if trial is None else trial[0], "trial_se": None if trial is None else trial[1]}
        if trial is None:
            info["reason"] = "non-finite loss"
        if event == "rollback":
            snap = self._snapshot
            # Note: optimizer.load_state_dict may adopt the snapshot's CPU tensors without copying; the
            # snapshot is dropped right after, so nothing else sees the optimizer's later in-place updates.
            result = self.model.load_state_dict(snap["model"], strict=False)  # frozen params are not in it
            if result.unexpected_keys:
                raise RuntimeError(f"AdaLRS snapshot does not match the model: {result.unexpected_keys[:10]}")
            self.optimizer.load_state_dict(snap["optimizer"])
            self.lr_scale = max(s0 / self.beta_cur, self.config.min_lr_scale)
        elif event == "reject":
            self.lr_scale = s0
        self._snapshot = None
        self._pre_trial_scale = None
        self._losses = []
        self._base = None
        self.phase = "baseline"
        d = self.config.decay
        self.alpha_cur = 1.0 + (self.alpha_cur - 1.0) * d
        self.beta_cur = 1.0 + (self.beta_cur - 1.0) * d
        self._log(event, **info)
        if event == "keep":  # the trial window is the next trial's baseline
            self._base = trial
            self._start_trial()
        return event

    def _log(self, event: str, **info) -> None:
        self.history.append({"step": self.num_steps, "event": event, "lr_scale": self.lr_scale, **info})

    # ------------------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly. All fields are JSON-able except "snapshot", which is None
        or {"model": ..., "optimizer": ...} (CPU tensors, shared with this object: serialise it before the
        next step())."""
        return {
            "version": STATE_VERSION,
            "config": dataclasses.asdict(self.config),
            "lr_scale": self.lr_scale,
            "alpha_cur": self.alpha_cur,
            "beta_cur": self.beta_cur,
            "phase": self.phase,
            "num_steps": self.num_steps,
            "losses": list(self._losses),
            "base": None if self._base is None else list(self._base),
            "pre_trial_scale": self._pre_trial_scale,
            "history": copy.deepcopy(self.history),
            "snapshot": self._snapshot,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()`. The current `config` is kept (the saved one is informational)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported AdaLRS state version {state.get('version')!r} (expected {STATE_VERSION})")
        phase = state["phase"]
        if phase not in ("baseline", "trial", "settled"):
            raise ValueError(f"AdaLRS state has an unknown phase {phase!r}")
        if phase == "trial" and (state.get("snapshot") is None or state.get("base") is None
                                 or state.get("pre_trial_scale") is None):
            raise ValueError("AdaLRS state is mid-trial but lacks the snapshot / baseline needed to roll back")
        self.lr_scale = float(state["lr_scale"])
        self.alpha_cur = float(state["alpha_cur"])
        self.beta_cur = float(state["beta_cur"])
        self.phase = phase
        self.num_steps = int(state["num_steps"])
        self._losses = [float(x) for x in state["losses"]]
        self._base = None if state["base"] is None else (float(state["base"][0]), float(state["base"][1]))
        self._pre_trial_scale = None if state["pre_trial_scale"] is None else float(state["pre_trial_scale"])
        self.history = copy.deepcopy(list(state.get("history", [])))
        self._snapshot = state["snapshot"] if phase == "trial" else None
