"""Modules for quantization-aware training (QAT): fake quantization with a straight-through estimator.

Built on ``torch.fake_quantize_per_tensor_affine`` / ``torch.fake_quantize_per_channel_affine`` (no
``torch.ao.quantization``): the forward pass rounds to the int8 grid and back; the backward pass lets the
gradient through inside the representable range and zeroes it where values were clipped.
- ``FakeQuantize``: an activation observer plus fake quantization. It observes in training mode and uses its
  frozen ``scale`` / ``zero_point`` (what the int8 model uses) in eval mode or with ``observe`` False; it
  saturates where the int8 graph does, so the compiled model reproduces the trained one.
- ``SharedFakeQuantize``: rounds onto another FakeQuantize's grid (values requantized with their input's qparams).
- ``fake_quantize_weight``: rounds a weight as the int8 kernels will, with qparams from its current min/max.
- ``QATWeighted``: a conv (1d/2d/3d, transposed too) or linear layer computing with its fake-quantized weight.
- ``QATConvBn``: conv + BatchNorm trained as one conv with the fake-quantized BN-folded weight
  ``w * gamma / sqrt(running_var + eps)``, its output divided by the fold factor again before the real BN
  (docs/quantization.md says why).
Contract the compiler relies on: ``to_float()`` returns the plain layer (``QATConvBn``: the conv with BN
folded from its running statistics, ``w' = w * gamma / std``, ``b' = (b - mean) * gamma / std + beta``); in
eval mode a QAT module equals that layer run with ``fake_quantize_weight`` of its weight (or the plain
weight when ``fake_quant_weights`` is False), up to float rounding.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .observers import Observer
from .qspec import QSpec

__all__ = ["FakeQuantize", "QATConvBn", "QATWeighted", "SharedFakeQuantize", "fake_quantize_weight"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BATCHNORM_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
_TRANSPOSE_FN = {nn.ConvTranspose1d: F.conv_transpose1d, nn.ConvTranspose2d: F.conv_transpose2d,
                 nn.ConvTranspose3d: F.conv_transpose3d}


_DTYPE_LIMITS = {torch.quint8: (0, 255), torch.qint8: (-128, 127)}


def _saturation_range(spec: QSpec) -> tuple[int, int]:
    """Where the int8 graph clamps an activation quantized with ``spec``: ``quantize_per_tensor`` saturates at
    the dtype's limits, whatever narrower range chose the scale (reduce_range: 7-bit scale, values reach 255)."""
    return _DTYPE_LIMITS.get(spec.dtype, (spec.quant_min, spec.quant_max))


class FakeQuantize(nn.Module):
    """Observe activations (training mode) and round them to the int8 grid with a straight-through gradient.

    ``observe`` False freezes the qparams even in training mode; ``enabled`` False makes forward the identity.
    """

    def __init__(self, observer: Observer, spec: QSpec) -> None:
        super().__init__()
        if spec.axis is not None:
            raise ValueError(f"FakeQuantize is per-tensor (activations); got a per-channel spec: {spec.describe()}")
        self.observer = observer
        self.spec = spec
        self.observe = True
        self.enabled = True
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int64))
        # whether scale / zero_point hold real qparams (a buffer so state_dict and deepcopy carry it)
        self.register_buffer("qparams_ready", torch.tensor(False))
        self._ready: bool | None = False  # python mirror of qparams_ready (None: re-read it), saves device syncs

    @property
    def batches_seen(self) -> int:
        return int(self.observer.batches_seen)

    def _refresh(self) -> None:
        scale, zero_point = self.observer.qparams(self.spec)
        with torch.no_grad():
            self.scale.copy_(scale.reshape(()))
            self.zero_point.copy_(zero_point.reshape(()))
            self.qparams_ready.fill_(True)
        self._ready = True

    def _ensure_qparams(self) -> None:
        if self._ready is None:
            self._ready = bool(self.qparams_ready)
        if self._ready:
            return
        if self.batches_seen > 0:  # an observer that was fed before it was wrapped
            self._refresh()
            return
        raise RuntimeError(f"{self.describe()} saw no data: run it in training mode (observe=True) on some "
                           "batches before evaluating it or reading its qparams")

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled and self.training and self.observe:
            self.observer(x.detach())
            self._refresh()
        return self.round(x)

    def round(self, x: Tensor) -> Tensor:
        """``x`` on this fake-quant's current grid, without observing it (the identity when disabled)."""
        if not self.enabled:
            return x
        self._ensure_qparams()
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point.to(torch.int32),
                                                     *_saturation_range(self.spec))

    def qparams(self, spec: QSpec | None = None) -> tuple[Tensor, Tensor]:
        """The frozen (scale float32, zero_point int64) this fake-quant uses (``spec`` is accepted and ignored)."""
        del spec  # observer-compatible signature: a trained fake-quant's qparams are its own
        self._ensure_qparams()
        return self.scale.detach().clone(), self.zero_point.detach().clone()

    def reset(self) -> None:
        """Forget the observed statistics and the qparams (the next training batch starts afresh)."""
        self.observer.reset()
        with torch.no_grad():
            self.scale.fill_(1.0)
            self.zero_point.zero_()
            self.qparams_ready.fill_(False)
        self._ready = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = None

    def describe(self) -> str:
        return f"fake-quant({self.observer.describe()})"

    def extra_repr(self) -> str:
        qparams = (f"scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}" if bool(self.qparams_ready)
                   else "scale=?, zero_point=? (no data yet)")
        return f"{self.spec.describe()}, {qparams}, observe={self.observe}, enabled={self.enabled}"


class SharedFakeQuantize(nn.Module):
    """Rounds onto another FakeQuantize's grid without observing: where the int8 model requantizes a value
    with its input's qparams (average pooling), so that training sees this rounding too."""

    def __init__(self, source: FakeQuantize) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: Tensor) -> Tensor:
        return self.source.round(x)


def _channel_minmax(weight: Tensor, axis: int) -> tuple[Tensor, Tensor]:
    flat = weight.detach().transpose(0, axis).reshape(weight.shape[axis], -1)
    return flat.amin(dim=1), flat.amax(dim=1)


def weight_qparams(weight: Tensor, spec: QSpec) -> tuple[Tensor, Tensor]:
    """(scale, zero_point) of ``weight`` from its current min/max (per channel along ``spec.axis``)."""
    if spec.axis is None:
        w = weight.detach()
        return spec.qparams(w.amin(), w.amax())
    return spec.qparams(*_channel_minmax(weight, spec.axis % weight.dim()))


def fake_quantize_weight(weight: Tensor, spec: QSpec) -> Tensor:
    """``weight`` rounded to the int8 grid of ``spec`` (qparams from its current range), straight-through grad."""
    scale, zero_point = weight_qparams(weight, spec)
    zero_point = zero_point.to(torch.int32)
    if spec.axis is None:
        return torch.fake_quantize_per_tensor_affine(weight, scale, zero_point, spec.quant_min, spec.quant_max)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, spec.axis % weight.dim(),
                                                  spec.quant_min, spec.quant_max)


def _weight_spec_for(module: nn.Module, spec: QSpec) -> QSpec:
    """Per-channel specs use the layer's output-channel axis (1 for conv-transpose weights, else 0)."""
    if spec.axis is None:
        return spec
    return spec.with_axis(1 if isinstance(module, _CONV_TRANSPOSES) else 0)


class QATWeighted(nn.Module):
    """A conv / conv-transpose / linear layer that computes with its fake-quantized weight.

    Wraps (does not copy) ``module``: its weight, bias and conv settings are the ones trained. Per-channel
    weight specs are applied along the output channels (axis 1 for conv-transpose, 0 otherwise).
    """

    def __init__(self, module: nn.Module, weight_spec: QSpec) -> None:
        super().__init__()
        if not isinstance(module, (*_CONVS, *_CONV_TRANSPOSES, nn.Linear)):
            raise TypeError(f"QATWeighted wraps Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear, "
                            f"not {type(module).__name__}")
        if isinstance(module, _CONV_TRANSPOSES) and module.padding_mode != "zeros":
            raise ValueError(f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported")
        self.module = module
        self.weight_spec = _weight_spec_for(module, weight_spec)
        self.fake_quant_weights = True

    @classmethod
    def from_float(cls, module: nn.Module, weight_spec: QSpec) -> QATWeighted:
        return cls(module, weight_spec)

    def quantized_weight(self) -> Tensor:
        w = self.module.weight
        return fake_quantize_weight(w, self.weight_spec) if self.fake_quant_weights else w

    def forward(self, x: Tensor) -> Tensor:
        m, w = self.module, self.quantized_weight()
        if isinstance(m, nn.Linear):
            return F.linear(x, w, m.bias)
        if isinstance(m, _CONV_TRANSPOSES):
            return _TRANSPOSE_FN[type(m)](x, w, m.bias, m.stride, m.padding, m.output_padding, m.groups, m.dilation)
        return m._conv_forward(x, w, m.bias)

    def to_float(self) -> nn.Module:
        """A deep copy of the plain layer with the trained (unrounded) weights."""
        return copy.deepcopy(self.module)

    def extra_repr(self) -> str:
        return f"weight={self.weight_spec.describe()}, fake_quant_weights={self.fake_quant_weights}"


class QATConvBn(nn.Module):
    """Conv + BatchNorm trained as the BN-folded conv the int8 model runs (see the module docstring).

    The BN layer keeps training (batch statistics, running-statistics updates) in training mode and uses its
    running statistics in eval mode; ``to_float()`` folds it into a plain conv. ``fake_quant_weights`` False
    turns the weight rounding off (plain conv-bn numerics).
    """

    def __init__(self, conv: nn.Module, bn: nn.Module, weight_spec: QSpec) -> None:
        super().__init__()
        if type(conv) not in _BATCHNORM_FOR:
            raise TypeError(f"QATConvBn folds BatchNorm into Conv1d/2d/3d, not {type(conv).__name__}")
        if not isinstance(bn, _BATCHNORM_FOR[type(conv)]):
            raise TypeError(f"{type(conv).__name__} needs a {_BATCHNORM_FOR[type(conv)].__name__}, "
                            f"got {type(bn).__name__}")
        if bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm has {bn.num_features} features but the conv {conv.out_channels} outputs")
        if not bn.track_running_stats or bn.running_var is None:
            raise ValueError("QATConvBn needs a BatchNorm that tracks running statistics (they are folded)")
        self.conv = conv
        self.bn = bn
        self.weight_spec = _weight_spec_for(conv, weight_spec)
        self.fake_quant_weights = True

    @classmethod
    def from_float(cls, conv: nn.Module, bn: nn.Module, weight_spec: QSpec) -> QATConvBn:
        return cls(conv, bn, weight_spec)

    def _scale_factor(self) -> Tensor:
        """gamma / sqrt(running_var + eps), per output channel."""
        running_std = torch.sqrt(self.bn.running_var + self.bn.eps)
        gamma = self.bn.weight if self.bn.weight is not None else torch.ones_like(running_std)
        return gamma / running_std

    def _folded_weight(self, scale_factor: Tensor) -> Tensor:
        w = self.conv.weight
        return w * scale_factor.reshape([-1] + [1] * (w.dim() - 1))

    def forward(self, x: Tensor) -> Tensor:
        scale_factor = self._scale_factor()
        w = self._folded_weight(scale_factor)
        if self.fake_quant_weights:
            w = fake_quantize_weight(w, self.weight_spec)
        y = self.conv._conv_forward(x, w, None)
        channel_shape = [1, -1] + [1] * (y.dim() - 2)
        y = y / scale_factor.reshape(channel_shape)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(channel_shape)
        return self.bn(y)

    def to_float(self) -> nn.Module:
        """A plain conv (deep copy, same class) with BN folded in from its running statistics."""
        conv = copy.deepcopy(self.conv)
        with torch.no_grad():
            scale_factor = self._scale_factor()
            weight = self._folded_weight(scale_factor)
            bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(self.bn.running_mean)
            beta = self.bn.bias if self.bn.bias is not None else torch.zeros_like(self.bn.running_mean)
            bias = (bias - self.bn.running_mean) * scale_factor + beta
        requires_grad = self.conv.weight.requires_grad
        conv.weight = nn.Parameter(weight.detach().clone(), requires_grad=requires_grad)
        conv.bias = nn.Parameter(bias.detach().clone().to(weight.dtype), requires_grad=requires_grad)
        return conv

    def extra_repr(self) -> str:
        return f"weight={self.weight_spec.describe()}, fake_quant_weights={self.fake_quant_weights}"
