"""fxforge.quant.qspec.quantized_engine: pinning torch's process-wide quantized engine, safely across threads."""

from __future__ import annotations

import threading

import torch

from fxforge.quant.qspec import quantized_engine

WAIT_S = 10.0  # generous: only reached when the behaviour under test is broken (or the machine is stalled)


def _engine() -> str:
    return torch.backends.quantized.engine


def test_pins_nest_in_one_thread_and_restore_the_callers_engine():
    before = _engine()
    with quantized_engine("fbgemm"):
        assert _engine() == "fbgemm"
        with quantized_engine("qnnpack"):  # a module for another engine called inside
            assert _engine() == "qnnpack"
        assert _engine() == "fbgemm"
        with quantized_engine(None):
            assert _engine() == "fbgemm"
    assert _engine() == before


def test_threads_pinning_the_same_engine_run_together():
    first_in, second_in = threading.Event(), threading.Event()
    overlapped = []

    def first() -> None:
        with quantized_engine("qnnpack"):
            first_in.set()
            overlapped.append(second_in.wait(WAIT_S))  # the second thread gets in while we hold the pin

    def second() -> None:
        first_in.wait(WAIT_S)
        with quantized_engine("qnnpack"):
            second_in.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert overlapped == [True]


def test_a_thread_pinning_another_engine_waits_for_the_others():
    holding, other_in = threading.Event(), threading.Event()
    seen = {}

    def holder() -> None:
        with quantized_engine("qnnpack"):
            holding.set()
            seen["other entered while we held qnnpack"] = other_in.wait(1.0)
            seen["engine while held"] = _engine()

    def other() -> None:
        holding.wait(WAIT_S)
        with quantized_engine("fbgemm"):
            other_in.set()
            seen["engine for the other"] = _engine()

    before = _engine()
    threads = [threading.Thread(target=holder), threading.Thread(target=other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert seen == {"other entered while we held qnnpack": False, "engine while held": "qnnpack",
                    "engine for the other": "fbgemm"}
    assert _engine() == before
