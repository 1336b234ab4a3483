"""fxforge.numerics.timing: warm-up, interleaving, statistics, margins and clocks, driven by fake clocks (no
assertion on real time)."""

from __future__ import annotations

import statistics

import pytest
import torch

from fxforge.numerics import timing


class Scripted:
    """Candidates that log their calls, and a fake clock that reports, for each sample, the next time scripted
    for the candidate that ran in it."""

    def __init__(self, script: dict[str, list[float]]) -> None:
        self.script = {name: iter(times) for name, times in script.items()}
        self.calls: list[str] = []

    def candidates(self) -> dict[str, object]:
        return {name: (lambda name=name: self.calls.append(name)) for name in self.script}

    def clock(self, fn) -> float:
        before = len(self.calls)
        fn()
        ran = set(self.calls[before:])
        assert len(ran) == 1, "a sample runs one candidate"
        return next(self.script[ran.pop()])


def test_warm_up_then_interleaved_samples_in_alternating_order():
    fake = Scripted({"a": [1.0] * 4, "b": [2.0] * 4, "c": [3.0] * 4})
    samples = timing.samples(fake.candidates(), timing.Schedule(warmup=2, rounds=4), fake.clock)
    assert fake.calls[:6] == ["a", "a", "b", "b", "c", "c"]  # warm-up: untimed, the scripts untouched
    assert fake.calls[6:] == ["a", "b", "c", "c", "b", "a", "a", "b", "c", "c", "b", "a"]
    assert samples == {"a": [1.0] * 4, "b": [2.0] * 4, "c": [3.0] * 4}


def test_a_sample_of_several_calls_is_their_time_per_call():
    fake = Scripted({"a": [0.3, 0.6]})
    samples = timing.samples(fake.candidates(), timing.Schedule(warmup=0, rounds=2, calls=3), fake.clock)
    assert fake.calls == ["a"] * 6
    assert samples["a"] == pytest.approx([0.1, 0.2])


@pytest.mark.parametrize(("statistic", "expected"), [(min, 1.0), (statistics.median, 3.0)])
def test_measure_summarises_each_candidate_by_the_statistic(statistic, expected):
    fake = Scripted({"a": [5.0, 1.0, 3.0, 9.0, 2.0]})
    schedule = timing.Schedule(warmup=1, rounds=5, statistic=statistic)
    assert timing.measure(fake.candidates(), schedule, fake.clock) == {"a": expected}
    fake = Scripted({"a": [5.0, 1.0, 3.0, 9.0, 2.0]})
    assert timing.seconds_per_call(fake.candidates()["a"], schedule, fake.clock) == expected


@pytest.mark.parametrize(("times", "margin", "winner"), [
    ({"old": 1.0, "new": 0.5}, 0.1, "new"),    # a clear lead replaces the incumbent
    ({"old": 1.0, "new": 0.95}, 0.1, "old"),   # a small one does not
    ({"old": 1.0, "new": 0.95}, 0.0, "new"),   # without a margin, any lead
    ({"old": 1.0, "new": 1.0}, 0.0, "old"),    # a tie keeps the incumbent
    ({"old": 1.0, "new": 2.0}, 0.0, "old"),
])
def test_fastest_keeps_the_incumbent_unless_another_is_clearly_faster(times, margin, winner):
    fake = Scripted({name: [t] * 3 for name, t in times.items()})
    name, seconds = timing.fastest(fake.candidates(), timing.Schedule(warmup=0, rounds=3), fake.clock, margin)
    assert name == winner and seconds == times


def test_fastest_of_several_challengers_is_the_fastest_overall():
    times = {"incumbent": 1.0, "fast": 0.5, "faster": 0.4}
    fake = Scripted({name: [t] * 2 for name, t in times.items()})
    assert timing.fastest(fake.candidates(), timing.Schedule(rounds=2), fake.clock, 0.05)[0] == "faster"


def test_clearly_faster_needs_more_than_the_margin():
    assert timing.clearly_faster(1.0, 1.2, 0.1)
    assert not timing.clearly_faster(1.0, 1.1, 0.1)  # exactly the margin: not clearly
    assert not timing.clearly_faster(1.0, float("nan"), 0.1)  # NaN is never a lead
    assert not timing.clearly_faster(float("nan"), 1.0, 0.1)


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"calls": 0}, {"warmup": -1}])
def test_a_schedule_without_samples_is_refused(bad):
    with pytest.raises(ValueError, match="rounds >= 1"):
        timing.Schedule(**bad)


def test_clocks_time_one_call():
    calls = []
    seconds = timing.wall_clock(lambda: calls.append(1))
    assert calls == [1] and not (seconds < 0)
    assert timing.clock_for(cuda=False) is timing.wall_clock and timing.clock_for(cuda=True) is timing.cuda_events


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_events_wait_for_the_work_they_time():
    x = torch.randn(2048, 2048, device="cuda")
    out = []
    seconds = timing.cuda_events(lambda: out.append(x @ x))
    assert len(out) == 1 and seconds > 0
    assert torch.cuda.current_stream().query()  # synchronized: nothing left queued
