"""Schedules as data: the events each kind produces, Zhu & Gupta's cubic by hand, bad input named."""

from __future__ import annotations

import pytest

from pruning.schedule import Event, Schedule


def test_one_shot():
    assert Schedule(kind="one_shot", step=7, sparsity=0.3).plan() == [Event(7, 0.3)]


def test_steps_from_dicts_sorted_with_loss():
    s = Schedule(
        kind="steps",
        events=[{"step": 20, "sparsity": 0.3, "alpha": 0.42, "temperature": 0.5}, {"step": 10, "sparsity": 0.025}],
    )
    assert s.plan() == [Event(10, 0.025), Event(20, 0.3, 0.42, 0.5)]
    assert s.final_sparsity() == 0.3


def test_cubic_by_hand():
    # s_t = s_f + (s_0 - s_f)(1 - (t - t0)/(t1 - t0))^3 with s0 = 0, sf = 0.8, t0 = 0, t1 = 100, every 25
    s = Schedule(kind="cubic", initial_sparsity=0.0, sparsity=0.8, start_step=0, end_step=100, every=25)
    got = [(e.step, round(e.sparsity, 6)) for e in s.plan()]
    want = [
        (0, 0.0),
        (25, round(0.8 - 0.8 * 0.75**3, 6)),
        (50, round(0.8 - 0.8 * 0.5**3, 6)),
        (75, round(0.8 - 0.8 * 0.25**3, 6)),
        (100, 0.8),
    ]
    assert got == want
    # the last event lands on end_step even when `every` does not divide the span
    s = Schedule(kind="cubic", sparsity=0.5, start_step=10, end_step=45, every=10)
    assert [e.step for e in s.plan()] == [10, 20, 30, 40, 45]
    assert s.plan()[-1].sparsity == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "linear"}, "schedule.kind='linear'"),
        ({"kind": "steps"}, "needs schedule.events"),
        ({"kind": "cubic", "start_step": 5, "end_step": 5}, "schedule.end_step=5"),
        ({"kind": "one_shot", "sparsity": 1.0}, r"sparsity=1.0 at step 0 must be in \[0, 1\)"),
        (
            {"kind": "steps", "events": [{"step": 5, "sparsity": 0.1}, {"step": 5, "sparsity": 0.2}]},
            "strictly increasing",
        ),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)
