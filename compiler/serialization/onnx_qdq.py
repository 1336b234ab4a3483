"""The QDQ graph of a static int8 model: fp32 ops between quantize-dequantize pairs, for ONNX export.

Built from the fp32 graph with observers that a static int8 compile keeps (``compiled.observed_graph``), on a
copy; the compiled model is not changed:
    observer_k(v)                  -> fake_quantize(v, scale_k, zero_point_k)          (uint8)
    direct op on an int8 value     -> op, then fake_quantize with its input's qparams (exact: the op keeps them)
    share op requantized (avgpool) -> op, then fake_quantize with its input's qparams
    conv / linear of a compute op  -> its weight read as dequantize(int8 values, scales, zero points), per
                                      channel or per tensor: the scheme insert-qdq chose for the layer
``fake_quantize`` and ``dequantize`` are ops of this module (``fxforge::``), which ``onnx.py`` writes as
QuantizeLinear -> DequantizeLinear and as DequantizeLinear of an int8 initializer. The activation qparams are
read from the compiled graph's buffers (those ``fxforge.recalibrate`` refreshes), so they are what the compile
chose after observer search and the accuracy budget; layers the compile left in fp32 have no observer around
them and stay fp32.
Why it equals the compiled model: insert-qdq rewrote the same observed graph into quantize / dequantize nodes
with these qparams and the same int8 weights (``quantize_weight``, the same spec), and fake-quantize is a
quantize followed by a dequantize; the lowered kernels reproduce that reference within one int8 step on few
elements.
Preconditions: a static int8 compile (``observed_graph`` kept) without ``correct-bias``, whose corrected
biases live only in the lowered kernels (``ExportError`` says so).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from fxforge.errors import ExportError
from fxforge.graph.matching import module_of
from fxforge.graph.meta import fxmeta
from fxforge.quant.config import QuantOptions
from fxforge.quant.ops import weight_axis, weighted_layer
from fxforge.quant.plan import CAT, COMPUTE, DIRECT, OBSERVER_KEY, SHARE, group_buffers, stored
from fxforge.quant.qspec import backend_quant
from fxforge.quant.reference import quantize_weight
from fxforge.quant.search import WEIGHT_SCHEME_KEY, configured_per_channel

_INT8 = (-128, 127)  # weights are exported as int8: any narrower grid (reduce_range, qnnpack's) lies inside it

__all__ = ["DEQUANTIZE", "FAKE_QUANTIZE", "dequantize", "fake_quantize", "qdq_graph"]


@torch.library.custom_op("fxforge::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """Quantize then dequantize ``x`` per tensor (0-d ``scale`` and ``zero_point``), onto uint8 or int8 by
    ``zero_point``'s dtype. One op, so that export writes QuantizeLinear -> DequantizeLinear for it rather than
    torch's decomposition of fake-quantize."""
    qmin, qmax = (0, 255) if zero_point.dtype == torch.uint8 else _INT8
    return torch.fake_quantize_per_tensor_affine(x, scale.float(), zero_point.int(), qmin, qmax)


@fake_quantize.register_fake
def _fake_quantize_meta(x: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    return torch.empty_like(x)


FAKE_QUANTIZE = torch.ops.fxforge.fake_quantize.default  # the op as graph nodes and export tables name it


@torch.library.custom_op("fxforge::dequantize", mutates_args=())
def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """``(q - zero_point) * scale`` of an int8 tensor, per tensor (0-d ``scale``) or per channel along ``axis``:
    DequantizeLinear of an int8 initializer in ONNX (``onnx.py``)."""
    shape = [1] * q.dim()
    if scale.dim() == 1:
        shape[axis] = -1
    return (q.float() - zero_point.float().view(shape)) * scale.float().view(shape)


@dequantize.register_fake
def _dequantize_meta(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    return torch.empty_like(q, dtype=torch.float32)


DEQUANTIZE = torch.ops.fxforge.dequantize.default


class _Int8Weight(nn.Module):
    """A parametrization replacing a layer's weight by ``dequantize`` of its int8 values, so that the export
    writes an int8 initializer and a (per-channel) DequantizeLinear. The fp32 original is dropped."""

    def __init__(self, q: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> None:
        super().__init__()
        self.axis = 0 if axis is None else axis
        self.register_buffer("q", q)
        self.register_buffer("scale", scale.float().reshape(-1 if axis is not None else ()))
        self.register_buffer("zero_point", zero_point.to(torch.int8).reshape(-1 if axis is not None else ()))

    def forward(self, original: Tensor) -> Tensor:
        return dequantize(self.q, self.scale, self.zero_point, self.axis)


def _fake_quantize(gm: fx.GraphModule, compiled_gm: fx.GraphModule, value: fx.Node, gid: int,
                   before: fx.Node) -> fx.Node:
    """A uint8 fake-quantize of ``value`` with group ``gid``'s qparams, as the compiled graph holds them."""
    scale_name, zp_name = group_buffers(gid)
    names = (f"export_{scale_name}", f"export_{zp_name}")
    if not hasattr(gm, names[0]):
        gm.register_buffer(names[0], getattr(compiled_gm, scale_name).detach().float().reshape(()).clone())
        gm.register_buffer(names[1], getattr(compiled_gm, zp_name).detach().to(torch.uint8).reshape(()).clone())
    with gm.graph.inserting_before(before):
        scale, zero_point = gm.graph.get_attr(names[0]), gm.graph.get_attr(names[1])
        return gm.graph.call_function(FAKE_QUANTIZE, (value, scale, zero_point))


def _is_float_tensor(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "dtype") and meta.dtype.is_floating_point


def _requantized(node: fx.Node) -> bool:
    """An op whose int8 output keeps its input's qparams: a direct op on an int8 value, a requantized share op."""
    plan = stored(node)
    if plan.get("role") in (DIRECT, CAT):
        return plan.get("state") == "derived" and _is_float_tensor(node)
    return plan.get("role") == SHARE and plan.get("state") == "requant"


def _activations(gm: fx.GraphModule, compiled_gm: fx.GraphModule) -> None:
    """Observers -> fake-quantize nodes; int8 values of direct and share ops -> fake-quantized again."""
    for node in list(gm.graph.nodes):
        if OBSERVER_KEY in fxmeta(node):
            fq = _fake_quantize(gm, compiled_gm, node.args[0], fxmeta(node)[OBSERVER_KEY], before=node)
            node.replace_all_uses_with(fq)
            gm.graph.erase_node(node)
        elif _requantized(node):
            fq = _fake_quantize(gm, compiled_gm, node, stored(node)["group"], before=node.next)
            node.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)


def _int8_values(on_grid: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> Tensor:
    """The int8 values of a weight that lies on its grid (exact: it was rounded there)."""
    shape = [1] * on_grid.dim()
    if axis is not None:
        shape[axis] = -1
    q = torch.round(on_grid / scale.float().view(shape)) + zero_point.float().view(shape)
    return q.clamp(*_INT8).to(torch.int8)


def _weights(gm: fx.GraphModule, opts: QuantOptions) -> None:
    """Each compute layer's weight onto its int8 grid, read as ``dequantize`` of its int8 values."""
    weight_spec = backend_quant(opts.backend, opts.reduce_range).weight
    done: set[int] = set()
    for node in gm.graph.nodes:
        layer = weighted_layer(module_of(gm, node)) if stored(node).get("role") == COMPUTE else None
        if layer is None or id(layer) in done:
            continue
        done.add(id(layer))
        per_channel = fxmeta(node).get(WEIGHT_SCHEME_KEY, configured_per_channel(opts, node))
        axis = weight_axis(layer) if per_channel else None
        on_grid, scale, zero_point = quantize_weight(layer.weight.detach(), weight_spec.with_axis(axis))
        grid = _int8_values(on_grid, scale, zero_point, axis)
        parametrize.register_parametrization(layer, "weight", _Int8Weight(grid, scale, zero_point, axis), unsafe=True)
        layer.parametrizations.weight.original = nn.Parameter(torch.empty(0), requires_grad=False)


def qdq_graph(compiled: Any) -> fx.GraphModule:
    """The QDQ graph of static int8 ``compiled`` (see the module docstring): a new GraphModule."""
    observed, opts = getattr(compiled, "observed_graph", None), getattr(compiled, "quant_options", None)
    if observed is None or opts is None or opts.mode != "static":
        raise ExportError("the QDQ export needs a static int8 compile, which keeps its observed fp32 graph "
                          "(a model from fxforge.load keeps it only when saved with recalibratable=True)")
    if "correct-bias" in str(getattr(compiled, "pipeline", "")):
        raise ExportError("correct-bias changed the int8 layers' biases inside the lowered kernels, which the QDQ "
                          "export does not read: compile without correct-bias to export to ONNX", op="correct-bias")
    gm = copy.deepcopy(observed)
    if backend_quant(opts.backend, opts.reduce_range).activation.dtype != torch.quint8:
        raise ExportError(f"the QDQ export writes uint8 activations; backend {opts.backend!r} uses another type",
                          op=opts.backend)
    _weights(gm, opts)
    _activations(gm, compiled.graph_module)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()
