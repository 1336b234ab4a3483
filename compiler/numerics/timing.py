"""Timing callables against each other: the one harness behind every measured choice.

The per-layer kernel choices (int8 weight packing, fp32 GEMM or oneDNN, fused cuDNN or not), the profitability
check and the benchmarks all ask the same question, "which of these runs faster here?", and answer it the same way:
- warm-up: ``Schedule.warmup`` untimed calls of each candidate first (oneDNN builds its primitive and cuDNN its plan
  on the first call for a shape);
- interleaved: one sample of every candidate per round, in an order that reverses from round to round, so that a
  burst of load from another process, or a cache warmed by the candidate before, falls on all of them alike;
- a robust statistic over the ``Schedule.rounds`` samples: the minimum (best case: a kernel's speed) or the median
  (typical case: a whole model);
- a margin: a candidate replaces the incumbent only when ``clearly_faster``, so that noise rarely flips a choice;
- a clock: ``wall_clock`` (``time.perf_counter``) for CPU work, ``cuda_events`` for GPU work (CUDA events around
  the sample, synchronized before the time is read). ``Schedule.calls`` back-to-back calls per sample hide the
  launch latency of short GPU kernels, as they run back to back in the compiled model.
Every function takes the clock as a ``Timer`` (one call of a callable -> seconds), so tests drive the harness with
fake clocks and never assert on real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Timer = Callable[[Callable[[], object]], float]  # seconds that one call of the given function took


def wall_clock(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` by ``time.perf_counter`` (CPU work)."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cuda_events(fn: Callable[[], object]) -> float:
    """GPU seconds of one call of ``fn`` on the current stream, between two CUDA events; waits for the end event,
    so the time includes everything ``fn`` queued (work queued before it is not counted)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def clock_for(cuda: bool) -> Timer:
    """The clock for callables that run on a GPU (``cuda``) or on the CPU."""
    return cuda_events if cuda else wall_clock


@dataclass(frozen=True)
class Schedule:
    """How a candidate is timed: ``warmup`` untimed calls, then ``rounds`` samples of ``calls`` back-to-back calls
    each (a sample is their time / ``calls``), summarised by ``statistic`` (``min`` or ``statistics.median``)."""

    warmup: int = 2
    rounds: int = 5
    calls: int = 1
    statistic: Callable[[list[float]], float] = min

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.rounds < 1 or self.calls < 1:
            raise ValueError(f"{self}: need warmup >= 0, rounds >= 1 and calls >= 1")


DEFAULT = Schedule()  # kernel choices: 2 warm-up calls, the best of 5 interleaved samples


def _repeated(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    if calls == 1:
        return fn

    def block() -> None:
        for _ in range(calls):
            fn()

    return block


def samples(candidates: Mapping[str, Callable[[], object]], schedule: Schedule = DEFAULT,
            timer: Timer = wall_clock) -> dict[str, list[float]]:
    """{name: per-call seconds of each of ``schedule.rounds`` samples}, the candidates warmed up, then sampled
    interleaved: one sample each per round, the order reversed every other round."""
    for fn in candidates.values():
        for _ in range(schedule.warmup):
            fn()
    names = list(candidates)
    blocks = {name: _repeated(fn, schedule.calls) for name, fn in candidates.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(schedule.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timer(blocks[name]) / schedule.calls)
    return times


def measure(candidates: Mapping[str, Callable[[], object]], schedule: Schedule = DEFAULT,
            timer: Timer = wall_clock) -> dict[str, float]:
    """{name: seconds per call}: ``schedule.statistic`` of each candidate's interleaved ``samples``."""
    return {name: schedule.statistic(s) for name, s in samples(candidates, schedule, timer).items()}


def seconds_per_call(fn: Callable[[], object], schedule: Schedule = DEFAULT, timer: Timer = wall_clock) -> float:
    """Seconds per call of one callable, timed as ``measure`` times a candidate."""
    return measure({"": fn}, schedule, timer)[""]


def clearly_faster(seconds: float, than: float, margin: float) -> bool:
    """True when ``than`` takes more than ``1 + margin`` times ``seconds``: a lead that load noise rarely fakes."""
    return than > seconds * (1 + margin)


def fastest(candidates: Mapping[str, Callable[[], object]], schedule: Schedule = DEFAULT,
            timer: Timer = wall_clock, margin: float = 0.0) -> tuple[str, dict[str, float]]:
    """(name, {name: seconds per call}) of the candidate to keep. The first candidate is the incumbent: the
    fastest of the others replaces it only when ``clearly_faster`` by ``margin`` (ties keep the earlier one)."""
    seconds = measure(candidates, schedule, timer)
    incumbent = next(iter(seconds))
    best = min(seconds, key=seconds.__getitem__)
    return (best if clearly_faster(seconds[best], seconds[incumbent], margin) else incumbent), seconds
