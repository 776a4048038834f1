"""When to prune and to what sparsity: schedules as data (YAML can express every one; no lambdas).

A schedule is a list of *events* ``(step, sparsity)``: at optimiser step ``step`` the masks are recomputed so that
``sparsity`` of the targets is pruned (monotone: what an earlier event pruned stays pruned). An event may carry the
loss its scores are computed with (``alpha``, ``temperature``: SDMPrune's two stages are two events).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal


@dataclass
class Event:
    """One pruning event: at optimiser step ``step``, prune to ``sparsity``.

    ``alpha``/``temperature`` (optional): the distillation loss of the scoring steps that lead to this event
    (``(1−α)·CE + α·KL(softmax(z_t/τ) ‖ softmax(z_s))``); ``None`` leaves the module's own loss unchanged.
    """

    step: int
    sparsity: float
    alpha: float | None = None
    temperature: float | None = None


# the fields each kind reads, and the defaults of those left None
USES = {
    "one_shot": ("step", "sparsity", "alpha", "temperature"),
    "steps": ("events",),
    "cubic": ("sparsity", "initial_sparsity", "start_step", "end_step", "every", "alpha", "temperature"),
}
DEFAULTS = {"step": 0, "sparsity": 0.5, "initial_sparsity": 0.0, "start_step": 0, "every": 1}
# every field's value in a schedule printed whole by earlier versions: unused fields at these values are not refused
WRITTEN_WHOLE = {**DEFAULTS, "events": [], "end_step": 0, "alpha": None, "temperature": None}


@dataclass
class Schedule:
    """Pruning schedule. ``kind``:

    - ``one_shot``: prune to ``sparsity`` at ``step``;
    - ``steps``: the explicit list ``events`` (each ``{step, sparsity[, alpha, temperature]}``);
    - ``cubic`` (Zhu & Gupta 2017, "To prune, or not to prune"): from ``initial_sparsity`` at ``start_step`` to
      ``sparsity`` at ``end_step``, an event every ``every`` steps, ``s_t = s_f + (s_0 − s_f)(1 − (t − t_0)/(t_1 −
      t_0))³`` (fast early, gentle at the end).

    A field left ``None`` takes its kind's default (``step`` 0, ``sparsity`` 0.5, ``initial_sparsity`` 0.0,
    ``start_step`` 0, ``every`` 1); a field its kind does not use is refused when set (``--print_config=skip_null``
    shows only the fields a schedule sets); an unused field at the value earlier versions printed for it (a
    schedule written whole: ``step: 0``, ``sparsity: 0.5``, ``events: []``, ...) is read as unset.
    """

    kind: Literal["one_shot", "steps", "cubic"] = "one_shot"
    step: int | None = None
    sparsity: float | None = None
    events: list[Event] | None = None
    initial_sparsity: float | None = None
    start_step: int | None = None
    end_step: int | None = None
    every: int | None = None
    alpha: float | None = None
    temperature: float | None = None

    @classmethod
    def of(cls, value: Schedule | dict | None) -> Schedule:
        """``value`` as a schedule: itself, its fields as a dict (unknown keys named), or the default (None)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"schedule={value!r} must be a Schedule or a dict of its fields")
        unknown = sorted(set(value) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(
                f"schedule has unknown key(s) {unknown}; known: {[f.name for f in fields(cls)]}. HINT: fix the "
                "schedule's keys"
            )
        return cls(**value)

    def __post_init__(self) -> None:
        if self.kind not in USES:
            raise ValueError(f"schedule.kind={self.kind!r} must be 'one_shot', 'steps' or 'cubic'")
        self._settle_keys()
        self.events = [e if isinstance(e, Event) else Event(**e) for e in self.events or []]
        if self.kind == "steps" and not self.events:
            raise ValueError("schedule.kind='steps' needs schedule.events: [{step: 10, sparsity: 0.3}, ...]")
        if self.kind == "cubic":
            if self.end_step is None or self.end_step <= self.start_step:
                raise ValueError(f"schedule.end_step={self.end_step} must be > schedule.start_step={self.start_step}")
            if self.every < 1:
                raise ValueError(f"schedule.every={self.every} must be >= 1")
        plan = self.plan()
        for e in plan:
            if not 0 <= e.sparsity < 1:
                raise ValueError(f"schedule: sparsity={e.sparsity} at step {e.step} must be in [0, 1)")
            if e.step < 0:
                raise ValueError(f"schedule: step={e.step} must be >= 0")
            if e.alpha is not None and not 0 <= e.alpha <= 1:
                raise ValueError(f"schedule: alpha={e.alpha} at step {e.step} must be in [0, 1]")
            if e.temperature is not None and not e.temperature > 0:
                raise ValueError(f"schedule: temperature={e.temperature} at step {e.step} must be > 0")
        steps = [e.step for e in plan]
        if steps != sorted(set(steps)):
            raise ValueError(f"schedule: event steps {steps} must be strictly increasing")

    def _settle_keys(self) -> None:
        """Refuse a field the kind does not use (read as unset at the value earlier versions printed for it); give
        the unset fields the kind uses their defaults."""
        unused = [f.name for f in fields(self) if f.name != "kind" and f.name not in USES[self.kind]]
        for name in unused:  # a schedule written whole (every field at its old default) reads as before
            if getattr(self, name) == WRITTEN_WHOLE[name]:
                setattr(self, name, None)
        stray = [n for n in unused if getattr(self, n) is not None]
        if stray:
            own = " (each event carries its own step, sparsity, alpha and temperature)" if self.kind == "steps" else ""
            raise ValueError(
                f"schedule.kind={self.kind!r} does not use {', '.join('schedule.' + n for n in stray)} (it uses "
                f"{', '.join(USES[self.kind])}). HINT: remove {stray[0]}{own}"
            )
        for name, value in DEFAULTS.items():
            if name in USES[self.kind] and getattr(self, name) is None:
                setattr(self, name, value)

    @staticmethod
    def cubic_sparsity(t: int, s0: float, sf: float, t0: int, t1: int) -> float:
        """Zhu & Gupta's cubic sparsity at step ``t`` (clamped to ``[t0, t1]``)."""
        frac = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
        return sf + (s0 - sf) * (1.0 - frac) ** 3

    def plan(self) -> list[Event]:
        """Every event, in step order."""
        if self.kind == "one_shot":
            return [Event(self.step, self.sparsity, self.alpha, self.temperature)]
        if self.kind == "steps":
            return sorted(self.events, key=lambda e: e.step)
        n = math.ceil((self.end_step - self.start_step) / self.every)
        steps = [min(self.start_step + k * self.every, self.end_step) for k in range(n + 1)]
        return [
            Event(
                t,
                self.cubic_sparsity(t, self.initial_sparsity, self.sparsity, self.start_step, self.end_step),
                self.alpha,
                self.temperature,
            )
            for t in steps
        ]

    def check_reachable(self, total_steps: float) -> None:
        """Refuse events a run of ``total_steps`` optimiser steps never reaches (an event at the last step fires
        after it, with no recovery after it)."""
        late = [e for e in self.plan() if e.step > total_steps]
        if late:
            what = "schedule.end_step" if self.kind == "cubic" else "the event"
            raise ValueError(
                f"schedule: {what} at step {late[0].step} (sparsity {late[0].sparsity:g}) comes after the run's last "
                f"optimiser step {int(total_steps)} (trainer.max_steps, or the steps max_epochs gives), so the run "
                "would end with less pruning than scheduled. HINT: raise trainer.max_steps or schedule the events "
                "earlier"
            )

    def final_sparsity(self) -> float:
        return self.plan()[-1].sparsity
