"""Observers: identity modules that watch the values at a quantization point and choose its int8 range.

``forward`` returns its input untouched and records statistics; ``calculate_range(spec)`` turns them into the
float range to quantize over and ``qparams(spec)`` into a scale and zero point (``QSpec.qparams``). The spec
comes in when the range is chosen because the best range depends on the grid. Kinds (``OBSERVERS``, the
names ``QuantConfig`` takes; docs/quantization.md says when each fits):
- ``minmax``: running min / max (per channel along ``axis``); ``moving-average``: the same smoothed over batches;
- ``histogram`` (the default for activations): the range with the least expected quantization MSE on the
  grid, searched exactly over all bin edges, clipping at most ``max_clipped`` (1e-5) of the values on either
  side; ``percentile``: the histogram's (100 - p)th and p-th percentiles;
- ``entropy``: the threshold with the least KL divergence between clipped and original histograms;
- ``FixedRangeObserver``: outputs of sigmoid / hardsigmoid, fixed qparams (1/256, 0) as their int8 kernels give.
Histogram ranges contain zero and skip non-finite values. Min/max observers report raw statistics
(``QSpec.qparams`` widens them to zero) and, like torch.ao's, let NaN / inf through: checking every batch
would cost a host sync; ``saw_nonfinite()`` tells afterwards whether NaN / inf reached an observer (compile
warns). ``torch.ao.quantization`` is not used; the tests use it as an oracle.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .qspec import QSpec

__all__ = ["FIXED_RANGES", "OBSERVERS", "EntropyObserver", "FixedRangeObserver", "HistogramBasedObserver",
           "HistogramObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "Observer", "PercentileObserver",
           "make_observer", "observers_paused"]

# None: observers record. Inside observers_paused: the ids of the observers that still record (per thread / task:
# a check in one thread never pauses another's calibration)
_PAUSED: ContextVar[frozenset[int] | None] = ContextVar("fxforge_observers_paused", default=None)


@contextmanager
def observers_paused(recording: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Observers pass values through without recording statistics inside this block, but for ``recording``.

    For every run of an observed graph on data that is not calibration data: shape propagation and
    ``verify="numeric"`` run it on the example inputs, which must not widen the calibrated ranges."""
    token = _PAUSED.set(frozenset(map(id, recording)))
    try:
        yield
    finally:
        _PAUSED.reset(token)


class Observer(nn.Module):
    """Records statistics of the tensors it sees; forward returns its input unchanged (same object)."""

    kind: ClassVar[str]
    per_channel_capable: ClassVar[bool] = False

    def __init__(self, axis: int | None = None) -> None:
        super().__init__()
        if axis is not None and not self.per_channel_capable:
            name = getattr(self, "kind", type(self).__name__)
            raise ValueError(f"the {name} observer is per-tensor only: axis must be None, got {axis}")
        self.axis = axis
        # a Python int, not a buffer: FakeQuantize reads it every training step, and a device tensor would
        # cost a host sync each time; state_dict carries it through get_extra_state
        self._batches = 0
        self._nonfinite = False  # a batch held NaN / inf values (checked where the check costs no extra sync)

    @property
    def batches_seen(self) -> int:
        return self._batches

    def saw_nonfinite(self) -> bool:
        """Whether calibration fed this observer NaN / inf values (an overflow inside the model, or masks)."""
        return self._nonfinite

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recording = _PAUSED.get()
        if x.numel() > 0 and (recording is None or id(self) in recording):
            with torch.no_grad():
                if self._observe(x.detach().float()):
                    self._batches += 1
        return x

    def reset(self) -> None:
        self._batches = 0
        self._nonfinite = False
        self._reset_stats()

    def calculate_range(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches == 0:
            raise RuntimeError(f"{self.describe()} observer saw no data: run calibration batches through it first")
        lo, hi = self._range(spec)
        return lo.float(), hi.float()

    def qparams(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        return spec.qparams(*self.calculate_range(spec))

    def describe(self) -> str:
        return self.kind if self.axis is None else f"{self.kind}(axis={self.axis})"

    def extra_repr(self) -> str:
        return f"{self.describe()}, batches_seen={self._batches}"

    # subclass hooks ------------------------------------------------------------------------------------------
    def _observe(self, x: Tensor) -> bool:
        """Record a non-empty float tensor; False when nothing in it could be recorded (not counted)."""
        raise NotImplementedError

    def _reset_stats(self) -> None:
        raise NotImplementedError

    def _range(self, spec: QSpec) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    # serialisation -------------------------------------------------------------------------------------------
    def get_extra_state(self) -> dict[str, int]:
        return {"batches_seen": self._batches, "nonfinite": int(self._nonfinite)}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self._batches = int(state["batches_seen"])
        self._nonfinite = bool(state.get("nonfinite", 0))


class MinMaxObserver(Observer):
    """Running min / max over all batches (per channel along ``axis``, reducing every other dim)."""

    kind = "minmax"
    per_channel_capable = True

    def __init__(self, axis: int | None = None) -> None:
        super().__init__(axis)
        self.register_buffer("min_val", self._empty_stat(math.inf))
        self.register_buffer("max_val", self._empty_stat(-math.inf))

    def _empty_stat(self, fill: float) -> Tensor:
        # per channel the channel count is unknown until the first batch
        return torch.tensor(fill) if self.axis is None else torch.empty(0)

    def _reset_stats(self) -> None:
        self.min_val = self._empty_stat(math.inf).to(self.min_val.device)
        self.max_val = self._empty_stat(-math.inf).to(self.max_val.device)

    def _batch_minmax(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.axis is None:
            return torch.aminmax(x)
        if x.dim() == 0:
            raise ValueError(f"{self.describe()} observer needs a tensor with an axis {self.axis}, got a scalar")
        channels = x.shape[self.axis]
        return torch.aminmax(x.movedim(self.axis, 0).reshape(channels, -1), dim=1)

    def _observe(self, x: Tensor) -> bool:
        lo, hi = self._batch_minmax(x)
        if self._batches == 0:  # a Python check: comparing with the inf sentinels would sync the device
            self.min_val, self.max_val = lo, hi
            return True
        if lo.shape != self.min_val.shape:
            raise ValueError(f"{self.describe()} observer: a batch with {lo.numel()} channels after batches "
                             f"with {self.min_val.numel()}")
        self._merge(lo.to(self.min_val.device), hi.to(self.max_val.device))
        return True

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _range(self, spec: QSpec) -> tuple[Tensor, Tensor]:
        return self.min_val.clone(), self.max_val.clone()

    def saw_nonfinite(self) -> bool:
        # NaN / inf reach the running min / max (checked once here, not per batch: no host sync while observing)
        return self._batches > 0 and not bool(torch.isfinite(torch.cat([self.min_val.flatten(),
                                                                         self.max_val.flatten()])).all())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # per-channel statistics have no size until the first batch (and per-tensor ones are 0-d): take
        # the saved channel count instead of failing the load with a size mismatch
        for name in ("min_val", "max_val"):
            saved, buf = state_dict.get(prefix + name), self._buffers[name]
            if self.axis is not None and isinstance(saved, Tensor) and buf is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


FIXED_RANGES: dict[str, tuple[float, float]] = {"sigmoid": (0.0, 1.0), "hardsigmoid": (0.0, 1.0)}  # op kind -> range


class FixedRangeObserver(Observer):
    """Fixed qparams for an op with a known output range ``[lo, hi]``: ``scale = (hi - lo) / levels`` and
    ``zero_point = quant_min - round(lo / scale)`` (torch.ao's fixed qparams: 1/256 and 0 for [0, 1] on quint8
    [0, 255]). Records nothing but the batches it saw (calibration still runs through it)."""

    kind = "fixed"

    def __init__(self, lo: float = 0.0, hi: float = 1.0) -> None:
        if not lo <= 0.0 <= hi or lo == hi:
            raise ValueError(f"a fixed range must contain zero and be non-empty, got [{lo}, {hi}]")
        super().__init__(None)
        self.lo, self.hi = float(lo), float(hi)

    def _observe(self, x: Tensor) -> bool:
        return True

    def _reset_stats(self) -> None:
        pass

    def _range(self, spec: QSpec) -> tuple[Tensor, Tensor]:
        return torch.tensor(self.lo), torch.tensor(self.hi)

    def qparams(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        self.calculate_range(spec)  # the same "saw no data" check as every observer
        scale = torch.tensor((self.hi - self.lo) / spec.levels, dtype=torch.float32)
        zero_point = spec.quant_min - torch.round(self.lo / scale).to(torch.int64)
        return scale, torch.clamp(zero_point, spec.quant_min, spec.quant_max)

    def describe(self) -> str:
        return f"{self.kind}([{self.lo:g}, {self.hi:g}])"


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Min / max as exponential moving averages of the batch min / max (the first batch sets them)."""

    kind = "moving-average"

    def __init__(self, axis: int | None = None, averaging_constant: float = 0.01) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        super().__init__(axis)
        self.averaging_constant = averaging_constant

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        c = self.averaging_constant
        self.min_val = self.min_val + c * (lo - self.min_val)
        self.max_val = self.max_val + c * (hi - self.max_val)

    def describe(self) -> str:
        where = "" if self.axis is None else f", axis={self.axis}"
        return f"{self.kind}(c={self.averaging_constant:g}{where})"


_HISTC_CHUNK = 1 << 23  # histc counts in float32: chunks keep every partial count exact (< 2**24)


class HistogramBasedObserver(Observer):
    """A histogram of all values seen, over a range that grows with the data (per tensor only).

    The histogram spans exactly [min_val, max_val] of the (finite) data. When a batch widens that range the
    old counts are re-binned by interpolating their cumulative counts at the new bin edges (mass assumed
    uniform inside a bin), so the total count stays the number of finite values seen. Non-finite values
    (e.g. -inf attention masks) are skipped: they would make the range, and every bin, infinite.
    """

    def __init__(self, axis: int | None = None, bins: int = 2048) -> None:
        super().__init__(axis)
        if bins < 1:
            raise ValueError(f"bins must be positive, got {bins}")
        self.bins = bins
        # float64 counts: re-binning makes them fractional, and sums over millions of values stay exact
        self.register_buffer("histogram", torch.zeros(bins, dtype=torch.float64))
        self.register_buffer("min_val", torch.tensor(math.inf))
        self.register_buffer("max_val", torch.tensor(-math.inf))
        # exact zeros (ReLU outputs, padding) sit on every grid and quantize without error: counted apart
        # so the MSE search does not charge them rounding noise
        self.register_buffer("zero_count", torch.tensor(0.0, dtype=torch.float64))

    def _reset_stats(self) -> None:
        self.histogram.zero_()
        self.zero_count.zero_()
        self.min_val.fill_(math.inf)
        self.max_val.fill_(-math.inf)

    def _observe(self, x: Tensor) -> bool:
        x = x.flatten()
        stats = torch.stack([*torch.aminmax(x), self.min_val.to(x.device), self.max_val.to(x.device)])
        lo, hi, old_lo, old_hi = stats.tolist()  # one host sync for the batch's and the histogram's range
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._nonfinite = True
            x = x[torch.isfinite(x)]
            if x.numel() == 0:
                return False
            lo, hi = torch.stack(torch.aminmax(x)).tolist()
        lo, hi = self._grow(lo, hi, old_lo, old_hi)
        self.histogram += self._bin_counts(x, lo, hi).to(self.histogram.device)
        self.zero_count += (x == 0).sum().to(self.zero_count)
        return True

    def _grow(self, lo: float, hi: float, old_lo: float, old_hi: float) -> tuple[float, float]:
        """Widen the histogram range to include [lo, hi] (re-binning the counts); returns the new range."""
        if self._batches > 0:
            if lo < old_lo or hi > old_hi:
                self._regrid(min(lo, old_lo), max(hi, old_hi))
            lo, hi = min(lo, old_lo), max(hi, old_hi)
        self.min_val.fill_(lo)
        self.max_val.fill_(hi)
        return lo, hi

    def _regrid(self, lo: float, hi: float) -> None:
        """Re-bin the counts onto ``bins`` equal bins over the wider range [lo, hi] (before the range is set)."""
        edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64, device=self.histogram.device)
        self.histogram = self._counts_from_cdf(self._cdf(edges))

    def _counts_from_cdf(self, cdf: Tensor) -> Tensor:
        # pin the ends so no mass is lost or created by interpolation (the new range covers the old one)
        cdf[0], cdf[-1] = 0.0, self.histogram.sum()
        return cdf.diff().clamp_min(0.0)

    def _bin_counts(self, x: Tensor, lo: float, hi: float) -> Tensor:
        if lo == hi:  # a single value so far: everything is in the first (zero-width) bin
            counts = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
            counts[0] = x.numel()
            return counts
        parts = [torch.histc(chunk, self.bins, min=lo, max=hi).double() for chunk in x.split(_HISTC_CHUNK)]
        return torch.stack(parts).sum(0)

    # views of the histogram ----------------------------------------------------------------------------------
    def _edges(self) -> Tensor:
        return torch.linspace(self.min_val.item(), self.max_val.item(), self.bins + 1, dtype=torch.float64,
                              device=self.histogram.device)

    def _cdf(self, points: Tensor) -> Tensor:
        """Interpolated count of values below each point (mass spread uniformly inside each bin)."""
        cum = torch.cat([self.histogram.new_zeros(1), self.histogram.cumsum(0)])
        lo, hi = self.min_val.item(), self.max_val.item()
        if hi > lo:
            pos = ((points - lo) * (self.bins / (hi - lo))).clamp(0, self.bins)
        else:  # zero-width histogram: a step at the single value
            pos = (points >= lo).to(torch.float64) * self.bins
        idx = pos.floor().long().clamp(max=self.bins - 1)
        return cum[idx] + (pos - idx) * (cum[idx + 1] - cum[idx])

    def _quantile(self, q: float) -> Tensor:
        """The value below which a fraction ``q`` of the mass lies (linear inside a bin)."""
        cum = _prefix(self.histogram)
        target = q * cum[-1]
        j = torch.searchsorted(cum, target.reshape(1)).clamp(1, self.bins)  # bin j-1 holds the target
        inside = (target - cum[j - 1]) / self.histogram[j - 1].clamp_min(1e-300)
        edges = self._edges()
        return (edges[j - 1] + inside.clamp(0, 1) * (edges[j] - edges[j - 1])).reshape(())

    def _abs_histogram(self) -> tuple[Tensor, float]:
        """The histogram of |x| over [0, max|x|] (same bin count), folded from the stored one."""
        amax = max(-self.min_val.item(), self.max_val.item(), 0.0)
        edges = torch.linspace(0.0, amax, self.bins + 1, dtype=torch.float64, device=self.histogram.device)
        return self._counts_from_cdf(self._cdf(edges) - self._cdf(-edges)), amax

    def _finish(self, lo: Tensor | float, hi: Tensor | float) -> tuple[Tensor, Tensor]:
        """Clip a chosen range to the data seen and widen it to contain zero, as float32 0-d tensors."""
        lo = torch.as_tensor(lo, dtype=torch.float64, device=self.histogram.device)
        hi = torch.as_tensor(hi, dtype=torch.float64, device=self.histogram.device)
        lo = torch.clamp(torch.maximum(lo, self.min_val.double()), max=0.0)
        hi = torch.clamp(torch.minimum(hi, self.max_val.double()), min=0.0)
        return lo.float(), hi.float()

    def describe(self) -> str:
        return f"{self.kind}({self.bins} bins)"


def _prefix(values: Tensor) -> Tensor:
    """Cumulative sums with a leading zero: entry j is the sum over the first j bins."""
    return torch.cat([values.new_zeros(1), values.cumsum(0)])


class HistogramObserver(HistogramBasedObserver):
    """The range that minimises the expected quantization MSE for the spec's grid, over all bin edges.

    Each bin is a point mass at its centre. For a candidate [lo, hi] with step ``(hi - lo) / (quant_max -
    quant_min)`` the error is ``mass inside * step**2 / 12`` (uniform rounding noise) plus ``mass *
    (centre - bound)**2`` for every bin outside (clipping). The clipping terms depend on one bound each, so
    prefix sums of mass, mass*centre and mass*centre**2 evaluate every (lo, hi) pair as one matrix. A
    symmetric spec searches ``t = hi = -lo`` over the edges of the |x| histogram.

    The search clips at most a ``max_clipped`` fraction of the values on each side (the candidates end
    beyond those quantiles). The MSE counts a value's error once, yet errors differ downstream: rounding
    noise is independent from value to value and averages out in the sums of the next layers and in
    pooling, while clipping moves every clipped value the same way, a bias those sums keep (unbounded, the
    search cost mobilenet_v3_large ~3 dB of output SQNR: docs/quantization.md). 1e-5 keeps the MSE's
    choice wherever it clips little."""

    kind = "histogram"
    max_clipped: float | None = None  # observers saved before the bound existed (recalibratable .fxf) search unbounded

    def __init__(self, axis: int | None = None, bins: int = 2048, max_clipped: float | None = 1e-5) -> None:
        if max_clipped is not None and not 0.0 <= max_clipped < 0.5:
            raise ValueError(f"max_clipped must be in [0, 0.5) or None (the MSE alone), got {max_clipped}")
        super().__init__(axis, bins)
        self.max_clipped = max_clipped

    def _range(self, spec: QSpec) -> tuple[Tensor, Tensor]:
        steps = spec.quant_max - spec.quant_min
        lo, hi = self._clip_bounds()
        if spec.symmetric:
            t = self._best_threshold(steps, torch.maximum(-lo, hi))
            return self._finish(-t, t)
        return self._finish(*self._best_affine_range(steps, lo, hi))

    def _clip_bounds(self) -> tuple[Tensor, Tensor]:
        """(the highest lo, the lowest hi) that clip at most ``max_clipped`` of the values (None: no bound)."""
        if self.max_clipped is None:
            unbounded = torch.tensor([math.inf, -math.inf], dtype=torch.float64, device=self.histogram.device)
            return unbounded[0], unbounded[1]
        return self._quantile(self.max_clipped), self._quantile(1.0 - self.max_clipped)

    def _best_affine_range(self, steps: int, lo_at_most: Tensor, hi_at_least: Tensor) -> tuple[Tensor, Tensor]:
        edges, mass = self._edges(), self.histogram
        centres = (edges[:-1] + edges[1:]) / 2
        # the grid always contains zero, so lo <= 0 <= hi: edges beyond zero collapse onto zero
        los, his = edges.clamp(max=0.0).unique(), edges.clamp(min=0.0).unique()
        below = torch.searchsorted(centres, los, side="left")  # bins [0, below) are clipped at lo
        above = torch.searchsorted(centres, his, side="right")  # bins [above, B) are clipped at hi
        p0, p1, p2 = _prefix(mass), _prefix(mass * centres), _prefix(mass * centres**2)
        clip_lo = p2[below] - 2 * los * p1[below] + los**2 * p0[below]
        clip_hi = (p2[-1] - p2[above]) - 2 * his * (p1[-1] - p1[above]) + his**2 * (p0[-1] - p0[above])
        inside = (p0[above][None, :] - p0[below][:, None] - self.zero_count).clamp_min(0)
        step = (his[None, :] - los[:, None]) / steps
        error = inside * step**2 / 12 + clip_lo.clamp_min(0)[:, None] + clip_hi.clamp_min(0)[None, :]
        # no candidate may clip more than max_clipped (the data's own ends always qualify: the quantiles lie inside)
        error[los > lo_at_most, :] = math.inf
        error[:, his < hi_at_least] = math.inf
        best = int(error.argmin())
        return los[best // len(his)], his[best % len(his)]

    def _best_threshold(self, steps: int, at_least: Tensor) -> Tensor:
        mass, amax = self._abs_histogram()
        edges = torch.linspace(0.0, amax, self.bins + 1, dtype=torch.float64, device=mass.device)
        centres = (edges[:-1] + edges[1:]) / 2
        p0, p1, p2 = _prefix(mass), _prefix(mass * centres), _prefix(mass * centres**2)
        # threshold at edge j: bins [0, j) inside, bins [j, B) clipped to t
        clip = (p2[-1] - p2) - 2 * edges * (p1[-1] - p1) + edges**2 * (p0[-1] - p0)
        error = (p0 - self.zero_count).clamp_min(0) * (2 * edges / steps) ** 2 / 12 + clip.clamp_min(0)
        error[edges < torch.clamp(at_least, max=amax)] = math.inf  # clips at most max_clipped on either side
        return edges[int(error.argmin())]

    def describe(self) -> str:
        bound = "" if self.max_clipped is None else f", clipping <= {self.max_clipped:g}"
        return f"{self.kind}(mse, {self.bins} bins{bound})"


class PercentileObserver(HistogramBasedObserver):
    """lo / hi at the (100 - p)th / p-th percentile of the histogram (linear inside a bin)."""

    kind = "percentile"

    def __init__(self, axis: int | None = None, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}")
        super().__init__(axis, bins)
        self.percentile = percentile

    def _range(self, spec: QSpec) -> tuple[Tensor, Tensor]:
        p = self.percentile / 100
        return self._finish(self._quantile(1 - p), self._quantile(p))

    def describe(self) -> str:
        return f"{self.kind}({self.percentile:g})"


class EntropyObserver(HistogramBasedObserver):
    """TensorRT-style KL-divergence calibration on the |x| histogram (x itself when x >= 0).

    For threshold bin i, P is the first i bins with the clipped mass added to the last one, and Q the first
    i bins merged into as many buckets as the grid has levels over [0, t], then spread back evenly over
    P's nonzero bins. The threshold with the least KL(P || Q) wins; at most ~256 thresholds are tried.
    """

    kind = "entropy"
    max_candidates: ClassVar[int] = 256

    def _range(self, spec: QSpec) -> tuple[Tensor, Tensor]:
        mass, amax = self._abs_histogram()
        if amax == 0.0:
            return self._finish(0.0, 0.0)
        # an affine grid over nonnegative data spends all its levels on [0, t]; otherwise (-t, t) halves them
        levels = spec.levels if self.min_val.item() >= 0 and not spec.symmetric else spec.levels // 2
        t = self._best_bin(mass, max(levels, 1)) * amax / self.bins
        return self._finish(-t, t)

    def _candidates(self, levels: int, device: torch.device) -> Tensor:
        first = min(levels, self.bins)
        stride = max(1, math.ceil((self.bins - first) / self.max_candidates))
        ends = torch.arange(first, self.bins + 1, stride, device=device)
        return torch.unique(torch.cat([ends, torch.tensor([self.bins], device=device)]))

    def _best_bin(self, mass: Tensor, levels: int) -> int:
        ends = self._candidates(levels, mass.device)
        return int(ends[_kl_divergences(mass, ends, min(levels, self.bins)).argmin()])

    def describe(self) -> str:
        return f"{self.kind}(kl, {self.bins} bins)"


def _clipped_rows(mass: Tensor, ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For each candidate end i (one row each): which bins are kept (k < i), those bins' counts, and P: the
    same with every clipped count added to bin i - 1."""
    rows = torch.arange(len(ends), device=mass.device)
    kept = torch.arange(len(mass), device=mass.device)[None, :] < ends[:, None]
    raw = mass[None, :] * kept
    p = raw.clone()
    p[rows, ends - 1] += mass.sum() - raw.sum(1)
    return kept, raw, p


def _kl_divergences(mass: Tensor, ends: Tensor, levels: int) -> Tensor:
    """KL(P || Q) for each candidate end bin (all candidates at once, one row each)."""
    kept, raw, p = _clipped_rows(mass, ends)
    rows, bins = p.shape
    # bucket of bin k for end i: floor(k * levels / i); bins past the end go to a spare bucket `levels`
    bucket = torch.where(kept, (torch.arange(bins, device=mass.device)[None, :] * levels) // ends[:, None], levels)
    flat = (bucket + (levels + 1) * torch.arange(rows, device=mass.device)[:, None]).flatten()
    nonzero = (p > 0).to(mass.dtype)
    # Q from the unclipped counts (TensorRT's choice: the clipped mass in P's last bin is what Q lacks, which
    # is what penalises clipping), spread evenly over the bucket's bins where P is nonzero
    q_sum = mass.new_zeros(rows * (levels + 1)).index_add_(0, flat, raw.flatten())
    q_count = mass.new_zeros(rows * (levels + 1)).index_add_(0, flat, nonzero.flatten())
    q = (q_sum / q_count.clamp_min(1))[flat].reshape(rows, bins) * nonzero
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True).clamp_min(1e-300)
    # q can be 0 where p is not (an empty bucket whose last bin took the outliers): a huge, finite penalty
    terms = torch.where(p > 0, p * (p.clamp_min(1e-300) / q.clamp_min(1e-30)).log(), p.new_zeros(()))
    return terms.sum(1)


OBSERVERS: dict[str, type[Observer]] = {cls.kind: cls for cls in (
    MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver, PercentileObserver, EntropyObserver)}


def make_observer(kind: str, axis: int | None = None, **options: Any) -> Observer:
    """A new observer of registry name ``kind`` (``OBSERVERS``), with its constructor's keyword ``options``."""
    cls = OBSERVERS.get(kind)
    if cls is None:
        raise ValueError(f"unknown observer kind {kind!r}; valid kinds: {', '.join(OBSERVERS)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "axis"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"observer {kind!r} has no option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(sorted(accepted)) or 'none'}")
    return cls(axis=axis, **options)
