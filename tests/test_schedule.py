"""Schedules as data: the events each kind produces, Zhu & Gupta's cubic by hand, bad input named."""

from __future__ import annotations

from pathlib import Path

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


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "steps", "events": [{"step": 5, "sparsity": 0.1}], "sparsity": 0.3}, r"does not use schedule.spar"),
        ({"kind": "one_shot", "end_step": 9}, r"kind='one_shot' does not use schedule.end_step"),
        ({"kind": "cubic", "end_step": 9, "step": 3}, r"kind='cubic' does not use schedule.step "),
        ({"kind": "one_shot", "events": [{"step": 5, "sparsity": 0.1}]}, r"does not use schedule.events"),
    ],
)
def test_fields_a_kind_does_not_use_are_refused(kwargs, match):
    """A key the kind ignores (``sparsity`` next to a ``steps`` list) was dropped silently; now it is named."""
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_fields_left_unset_take_their_kinds_defaults():
    assert Schedule().plan() == [Event(0, 0.5)]
    cubic = Schedule(kind="cubic", end_step=4)
    assert (cubic.sparsity, cubic.initial_sparsity, cubic.start_step, cubic.every) == (0.5, 0.0, 0, 1)
    assert Schedule(kind="steps", events=[{"step": 3, "sparsity": 0.2}]).plan() == [Event(3, 0.2)]


def test_print_config_shows_only_the_fields_a_steps_schedule_uses(capsys):
    """``pruning fit --print_config=skip_null`` of the demo's ``kind: steps`` schedule: its events, nothing else."""
    import yaml

    from pruning.commands import run

    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as done:
        run(["fit", "--config", str(root / "configs/demo.yaml"), "--print_config=skip_null"])
    assert done.value.code == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    (schedule,) = [c["init_args"]["schedule"] for c in cfg["trainer"]["callbacks"] if "schedule" in c["init_args"]]
    assert schedule == {
        "kind": "steps",
        "events": [{"step": 4, "sparsity": 0.025}, {"step": 8, "sparsity": 0.3, "alpha": 0.42, "temperature": 0.5}],
    }


def test_a_schedule_written_whole_by_earlier_versions_still_reads():
    """Earlier ``--print_config`` output lists every field at its default; those unused values are read as unset."""
    whole = dict(step=0, sparsity=0.5, events=[], initial_sparsity=0.0, start_step=0, end_step=0, every=1)
    assert Schedule(**{**whole, "kind": "steps", "events": [{"step": 3, "sparsity": 0.2}]}).plan() == [Event(3, 0.2)]
    assert Schedule(**{**whole, "kind": "one_shot", "step": 4, "sparsity": 0.3}).plan() == [Event(4, 0.3)]
    with pytest.raises(ValueError, match="does not use schedule.sparsity"):
        Schedule(**{**whole, "kind": "steps", "sparsity": 0.3, "events": [{"step": 3, "sparsity": 0.2}]})
