"""Per-layer weight bits for quantize-weight-only: int4 layers whose rounding costs the model output most are
kept in int8, until the output holds a floor.

Each int4 candidate has an int8 twin. The output SQNR of the whole graph on the example inputs is measured with
every candidate in int4; if it reaches ``floor_db`` nothing changes. Otherwise each candidate's own cost is
measured: its int4 version alone (every other candidate int8), as noise energy added to the output over the
all-int8 graph. Quantization noise of independent layers adds up roughly, so the candidates go back to int4 in
order of that cost per byte int4 saves over int8, cheapest first, while the predicted noise stays within the
floor's budget (the sum scaled to the all-int4 measurement); then the graph is measured again, and while it is
still below the floor the costliest int4 layer left goes int8; the prediction errs on the safe side, so the
layers left in int8 are then tried in int4 one at a time in the same order, each kept where the measured output
still holds the floor. Cost: up to two runs of the graph per candidate, plus a few; no rewrite of the graph
(modules are swapped in place).
Why correct: each layer ends up with one of two rounded versions of its own weight; only which one changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass
class Candidate:
    """One int4 layer: its int4 and int8 versions, ``place`` puts one in the graph; ``saved`` is what int4 saves
    over int8 (bytes)."""

    name: str
    int4: nn.Module
    int8: nn.Module
    place: Callable[[nn.Module], None]
    saved: int
    alone_db: float = math.inf  # output SQNR with this layer alone in int4 (every other candidate int8)
    int8_kept: bool = False


def _noise(db: float) -> float:
    """Noise energy relative to the signal of an SQNR in dB."""
    return 10 ** (-db / 10) if math.isfinite(db) else (0.0 if db > 0 else math.inf)


def _measure_alone(candidates: list[Candidate], measure: Callable[[], float]) -> float:
    """Each candidate's output SQNR alone in int4; leaves every candidate int8; returns the all-int8 noise."""
    for c in candidates:
        c.place(c.int8)
    base = _noise(measure())
    for c in candidates:
        c.place(c.int4)
        c.alone_db = measure()
        c.place(c.int8)
    return base


def hold_floor(candidates: list[Candidate], measure: Callable[[], float], floor_db: float, all_int4_db: float
               ) -> float:
    """Choose int4 / int8 per candidate (see the module docstring); ``measure`` gives the graph's output SQNR as
    the candidates are currently placed (all int4 on entry, measured ``all_int4_db``, below ``floor_db``). Marks
    ``int8_kept`` and returns the final SQNR."""
    all_int4 = _noise(all_int4_db)
    base = _measure_alone(candidates, measure)
    cost = {c.name: max(_noise(c.alone_db) - base, 0.0) for c in candidates}
    scale = all_int4 / max(base + sum(cost.values()), 1e-30)  # non-additivity, measured
    budget, predicted = _noise(floor_db), base * scale
    chosen: list[Candidate] = []
    for c in sorted(candidates, key=lambda c: cost[c.name] / max(c.saved, 1)):
        if predicted + cost[c.name] * scale > budget:
            continue
        predicted += cost[c.name] * scale
        c.place(c.int4)
        chosen.append(c)
    db = measure()
    while chosen and not db >= floor_db:
        costliest = max(chosen, key=lambda c: cost[c.name])
        costliest.place(costliest.int8)
        chosen.remove(costliest)
        db = measure()
    for c in sorted((c for c in candidates if c not in chosen), key=lambda c: cost[c.name] / max(c.saved, 1)):
        c.place(c.int4)  # the prediction errs on the safe side: what still fits, measured, goes int4
        tried = measure()
        if tried >= floor_db:
            chosen.append(c)
            db = tried
        else:
            c.place(c.int8)
    for c in candidates:
        c.int8_kept = c not in chosen
    return db
