"""How one tensor is quantized (``QSpec``) and each int8 backend's rules for activations and weights.

Qparams follow the usual affine / symmetric formulas (the same as torch.ao's, so its observers can serve as
a test oracle): ``scale = (hi - lo) / (quant_max - quant_min)`` with the range widened to include zero, and
``zero_point = quant_min - round(lo / scale)``; symmetric specs use ``scale = max(|lo|, |hi|) / ((quant_max -
quant_min) / 2)`` with zero point 0 (qint8). ``eps`` is the smallest scale a backend accepts.

Backend rules:
- fbgemm and x86: activations quint8 [0, 255]; weights per-channel symmetric qint8 in [-128, 127]. Without
  VNNI (``reduce_range``) the int8 kernels sum pairs of u8 x s8 products into int16 with saturation (AVX2
  ``vpmaddubsw``): static int8 then uses 7-bit weights, [-64, 63], so that ``2 * 255 * 64 = 32640`` fits
  int16 whatever the activation codes (ONNX Runtime's ``reduce_range`` does the same). torch.ao narrows the
  activations to [0, 127] instead, but ``quantize_per_tensor`` and the kernels' requantization clamp to the
  dtype (255), not 127: values above a clipped calibrated range still get codes 128-255, on which the kernels
  saturate and depart from the reference graph (tests/quant/test_qspec.py). Dynamic int8 keeps 8-bit
  weights and 7-bit activations (``dynamic_weight``): their range is each tensor's own min/max, so the codes
  never pass 127.
- qnnpack: activations quint8 over the full range, weights per-channel symmetric qint8 restricted to
  [-127, 127], and scales no smaller than 2**-12 (its requantization needs bounded scale ratios).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class QSpec:
    """The quantized dtype, integer range and scheme of one tensor (``axis`` set: per channel)."""

    dtype: torch.dtype = torch.quint8
    quant_min: int = 0
    quant_max: int = 255
    symmetric: bool = False
    axis: int | None = None
    eps: float = FLOAT32_EPS

    @property
    def levels(self) -> int:
        return self.quant_max - self.quant_min + 1

    def with_axis(self, axis: int | None) -> QSpec:
        return replace(self, axis=axis)

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int64) for the observed range [lo, hi] (tensors, per channel or 0-d)."""
        lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
        hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
        if self.symmetric:
            scale = torch.maximum(-lo, hi) / ((self.quant_max - self.quant_min) / 2)
            scale = torch.clamp(scale, min=self.eps)
            zero = 0 if self.dtype == torch.qint8 else (self.quant_min + self.quant_max + 1) // 2
            return scale, torch.full_like(scale, zero, dtype=torch.int64)
        scale = torch.clamp((hi - lo) / (self.quant_max - self.quant_min), min=self.eps)
        zero_point = self.quant_min - torch.round(lo / scale).to(torch.int64)
        return scale, torch.clamp(zero_point, self.quant_min, self.quant_max)

    def describe(self) -> str:
        scheme = "symmetric" if self.symmetric else "affine"
        where = f"per-channel(axis={self.axis})" if self.axis is not None else "per-tensor"
        return f"{str(self.dtype).removeprefix('torch.')}[{self.quant_min},{self.quant_max}] {where} {scheme}"


@dataclass(frozen=True)
class BackendQuant:
    """A backend's activation and weight specs (weights: per-channel along axis 0 unless the op says 1)."""

    name: str
    activation: QSpec
    weight: QSpec  # static int8 (7 bits with reduce_range)
    reduce_range: bool = False  # no VNNI: int16 pair sums saturate (fbgemm, x86)
    dynamic_weight: QSpec | None = None  # dynamic int8's weights where they differ from ``weight``

    @property
    def dynamic(self) -> QSpec:
        """Dynamic int8's weight spec: activations are quantized per call over their own min/max (7 bits with
        ``reduce_range``), so full 8-bit weights cannot saturate the kernels."""
        return self.dynamic_weight or self.weight


@functools.cache
def cpu_has_vnni() -> bool:
    """True when this CPU has AVX-512 VNNI or AVX-VNNI (u8 x s8 dot products without int16 saturation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume the conservative answer
        return False
    return any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def backend_quant(backend: str, reduce_range: bool | None = None) -> BackendQuant:
    """The quantization rules of ``backend`` ("fbgemm", "x86" or "qnnpack").

    ``reduce_range`` (7-bit static weights, 7-bit dynamic activations: see the module docstring) defaults to
    "this CPU lacks VNNI" for fbgemm/x86 and is always False for qnnpack.
    """
    if backend == "qnnpack":
        eps = 2.0**-12
        return BackendQuant(backend, QSpec(torch.quint8, 0, 255, eps=eps),
                            QSpec(torch.qint8, -127, 127, symmetric=True, axis=0, eps=eps))
    if backend not in ("fbgemm", "x86"):
        raise ValueError(f"no int8 rules for backend {backend!r}; use fbgemm, x86 or qnnpack")
    reduce = (not cpu_has_vnni()) if reduce_range is None else reduce_range
    weight = QSpec(torch.qint8, -128, 127, symmetric=True, axis=0)
    if not reduce:
        return BackendQuant(backend, QSpec(torch.quint8, 0, 255), weight)
    return BackendQuant(backend, QSpec(torch.quint8, 0, 255), replace(weight, quant_min=-64, quant_max=63),
                        reduce_range=True, dynamic_weight=weight)


class _EngineGate:
    """``torch.backends.quantized.engine`` is one process-wide setting, which int8 kernels without prepacked
    weights (add, pooling, hardswish, clamp, ...) dispatch on. Pins of the same engine run together (threads
    serving one model in parallel); a pin of another engine waits until they are done. The engine found
    before the first pin is restored after the last. A thread that already holds a pin and pins another
    engine (a compiled module calling one compiled for another engine) switches at once rather than wait
    for itself, and new pins wait until it switches back; other threads already running keep running, so
    only that nesting, from several threads at once, can still mix engines."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._holders: dict[int, int] = {}  # thread id -> pins it holds
        self._engine: str | None = None  # the pinned engine while any pin is held
        self._base = ""  # the engine to restore after the last pin
        self._nested = 0  # nested switches in effect

    @contextlib.contextmanager
    def pin(self, engine: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._cond:
            self._cond.wait_for(lambda: self._may_enter(me, engine))
            switched_from = self._enter(me, engine)
        try:
            yield
        finally:
            with self._cond:
                self._leave(me, switched_from)
                self._cond.notify_all()

    def _may_enter(self, me: int, engine: str) -> bool:
        if not self._holders or me in self._holders:
            return True
        return self._engine == engine and not self._nested

    def _enter(self, me: int, engine: str) -> str | None:
        """Take a pin; returns the engine that a nested switch replaced, else None."""
        switched_from = None
        if not self._holders:
            self._base = torch.backends.quantized.engine
        elif self._engine != engine:
            switched_from, self._nested = self._engine, self._nested + 1
        self._set(engine)
        self._holders[me] = self._holders.get(me, 0) + 1
        return switched_from

    def _leave(self, me: int, switched_from: str | None) -> None:
        self._holders[me] -= 1
        if not self._holders[me]:
            del self._holders[me]
        if switched_from is not None:
            self._nested -= 1
            self._set(switched_from)
        if not self._holders:
            self._set(self._base)
            self._engine = None

    def _set(self, engine: str) -> None:
        self._engine = engine
        if torch.backends.quantized.engine != engine:
            torch.backends.quantized.engine = engine


_ENGINE_GATE = _EngineGate()


def quantized_engine(engine: str | None) -> contextlib.AbstractContextManager[None]:
    """Run with ``torch.backends.quantized.engine = engine`` (None: leave it), restoring it afterwards; safe
    across threads (see ``_EngineGate``)."""
    return contextlib.nullcontext() if engine is None else _ENGINE_GATE.pin(engine)
