"""Compiled int8 modules for different engines (x86, fbgemm, qnnpack) in one process: used alternately, and
from several threads at once, each gives exactly what it gives alone, single-threaded.

torch's quantized engine is a process-wide setting that int8 kernels without prepacked weights (add,
pooling, hardswish, clamp, ...) dispatch on, and each compiled module pins its own engine per call: these
tests check that pinning neither leaks between modules nor races between threads (nor leaves the user's
engine changed).
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxforge
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import randomize_bn

ENGINES = ("x86", "fbgemm", "qnnpack")
ROUNDS = 20


class Block(nn.Module):
    """Kernels with prepacked weights (conv, linear) and engine-dispatched ones without (add, avg pooling with
    padding excluded, hardswish, relu6 on a channels-last tensor, cat, max pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        z = F.hardswish(self.conv2(y) + y)
        z = F.relu6(self.pool(z))
        z = F.max_pool2d(torch.cat([y, z], 1), 2)
        return self.fc(torch.flatten(z, 1))


@pytest.fixture(scope="module")
def compiled() -> dict[str, fxforge.CompiledModule]:
    torch.manual_seed(0)
    model = randomize_bn(Block()).eval()
    calibration = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    x = torch.randn(2, 3, 8, 8)
    return {engine: fxforge.compile(model, engine, example_inputs=x, calibration=calibration) for engine in ENGINES}


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(b, 3, 8, 8, generator=g).clamp(-3, 3) for b in (1, 2, 3, 5)]


def _alone(compiled: dict[str, fxforge.CompiledModule]) -> dict[str, list[torch.Tensor]]:
    return {engine: [module(x) for x in _inputs()] for engine, module in compiled.items()}


def test_the_engines_really_differ(compiled):
    """Otherwise the tests below could not tell one engine's results from another's."""
    alone = _alone(compiled)
    assert not torch.equal(alone["x86"][0], alone["qnnpack"][0])
    assert all(outputs_sqnr_db(compiled["x86"](x), alone["qnnpack"][i]) > 15 for i, x in enumerate(_inputs()))


def test_alternating_engines_in_one_thread(compiled):
    expected = _alone(compiled)
    before = torch.backends.quantized.engine
    for _ in range(3):
        for engine in (*ENGINES, *reversed(ENGINES)):
            for x, want in zip(_inputs(), expected[engine], strict=True):
                assert torch.equal(compiled[engine](x), want), engine
    assert torch.backends.quantized.engine == before  # the caller's engine is left as it was


def test_engines_used_from_several_threads_at_once(compiled):
    """Two threads per engine run their module ROUNDS times each, all at the same time; every output equals
    that module's own single-threaded output."""
    expected = _alone(compiled)
    before = torch.backends.quantized.engine
    start = threading.Barrier(2 * len(ENGINES))
    failures: list[str] = []

    def work(engine: str) -> None:
        try:
            start.wait()
            for r in range(ROUNDS):
                for x, want in zip(_inputs(), expected[engine], strict=True):
                    if not torch.equal(compiled[engine](x), want):
                        failures.append(f"{engine}: round {r}, batch {len(x)}")
        except Exception as exc:  # noqa: BLE001 - reported below, with the engine
            failures.append(f"{engine}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(engine,)) for engine in ENGINES for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not failures, f"{len(failures)} wrong results, first: {failures[:3]}"
    assert torch.backends.quantized.engine == before
