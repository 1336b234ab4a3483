"""lower-fbgemm, lower-x86, lower-qnnpack: the reference int8 graph onto torch's quantized CPU kernels.

Rewrites each ``dequantize -> op -> quantize`` region insert-qdq produced into one kernel call whose input and
output are quantized tensors (qparams as literals, weights prepacked once for the engine):
    q(conv(dq x)) [+relu]           -> quantized.conv{1,2,3}d[_relu](x, packed, scale, zp)
    q(conv(dq x) + dq r) [+relu]    -> quantized.conv2d_add[_relu](x, r, packed, scale, zp)   (oneDNN packing)
    q(relu6 / clamp (conv(dq x)))   -> relu6 / clamp (quantized.conv2d(...))             (exact on int8)
    q(linear(dq x)) [+relu]         -> quantized.linear[_relu](x, packed, scale, zp)
    q(dq a + dq b) [+relu], mul     -> quantized.add[_relu] / quantized.mul (full-size operand first)
    q(hardswish / (hard)sigmoid / batch_norm2d (dq x)), pooling -> their int8 kernels
    linear(dynamic_quantize(x)), DynamicQuantLSTM / GRU    -> quantized.linear_dynamic, DynamicInt8RNN
Anything else keeps its reference form (dq -> fp32 op -> q), which is correct and listed in the report, and
so do the regions where a torch kernel is wrong or refuses the input (docs/quantization.md lists them).
Why correct: each kernel computes the op on the same int8 inputs and weights and requantizes with the same
output qparams as the reference graph; results differ by rounding inside the kernel (at most one int8 step,
on few elements, measured in the tests). The kernels return channels-last; eager's layout is restored
(backends/eager_layout.py) before ``.view``, before reshapes mutated in place, and at the outputs.
Preconditions: ``quantized``; conv+add fused only in the x86 pipeline (fbgemm and qnnpack have no such kernel).
lower-x86 packs each conv/linear for fbgemm or oneDNN, whichever ran faster on the layer's shape
(``int8_kernel_choice.py``; ``autotune=false``: the x86 engine's packing, as torch.ao does), except depthwise
convs with 8-bit weights, which fbgemm's kernel may saturate (``_fbgemm_depthwise_saturates``): lower-x86 and
lower-fbgemm pack those for oneDNN (the reference form where torch has no oneDNN engine).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import fx, nn

from fxforge.graph.fused import FusedConv, FusedLinear
from fxforge.graph.matching import is_in_place, module_of, replace_submodule
from fxforge.graph.meta import fxmeta, record_rewrite, tensor_shape
from fxforge.graph.ops import hardtanh_bounds, module_op, op_name, out_of_place
from fxforge.passes.dce import remove_dead_code
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import PassResult, graph_pass
from fxforge.progress import bar
from fxforge.quant.deprecation import quantized_tensors_quietly
from fxforge.quant.ops import pool_options, pool_window, weight_axis
from fxforge.quant.plan import ABSORBED, QPARAMS_KEY, stored
from fxforge.quant.qspec import quantized_engine
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM, dynamic_quantize

from .eager_layout import restore_eager_layout
from .int8_kernel_choice import available_engines, example_int8_input, fastest_prepacked
from .int8_packed import PackedWeight
from .int8_rnn import DynamicInt8RNN

_q = torch.ops.quantized
_CONV_OPS = {"conv1d", "conv2d", "conv3d"}  # convs with int8 kernels of the same name (quantized.conv2d, ...)
_BINARY = {"add", "mul"}  # ops with int8 kernels (quantized.add / mul, with or without a fused relu)
_UNARY = {"hardswish": _q.hardswish, "sigmoid": _q.sigmoid}
_INT8_POOLS = {"avgpool"}  # share ops with int8 kernels that keep the input's qparams (windowed average pooling)
_GATE_QPARAMS = (1.0 / 256, 0)  # the output qparams of torch's quint8 sigmoid-like kernels ([0, 1] in 256 steps)
# int8 ops whose output qparams are fixed (quint8): lowered only where the reference quantizes with these
_FIXED_OUTPUT = {"hardsigmoid": (torch.nn.functional.hardsigmoid, _GATE_QPARAMS)}


def _is_dq(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target == "dequantize"


class _Lowering:
    """State of one lowering run: the graph module, its engine, and a counter for prepacked weight names.

    ``kernel_engines`` are the engines whose prepacked weights a conv/linear may use; with more than one, each
    layer takes the one whose kernel measured fastest on the layer's input shape (``int8_kernel_choice.py``).
    """

    def __init__(self, gm: fx.GraphModule, engine: str, kernel_engines: tuple[str, ...] = ()) -> None:
        self.gm, self.engine, self.count = gm, engine, 0
        self.kernel_engines = kernel_engines or (engine,)
        self.lowered: dict[str, int] = {}
        self.chosen: dict[str, int] = {}
        # (kernel, weight shape and geometry, input shape, engines) -> the engine measured fastest for it: layers
        # of the same shapes (resnet50 repeats its bottleneck blocks) are timed once
        self.measured: dict[tuple, str] = {}
        self.private_in_place: list[fx.Node] = []  # replaced in-place ops on a dequantized copy only they read

    def prepack(self, kernel: Callable, prepack: Callable[[str], PackedWeight], q: fx.Node, dequantize: fx.Node,
                engines: tuple[str, ...] | None = None) -> PackedWeight:
        """The weight prepacked for the engine (of ``engines``, default the lowering's) whose ``kernel`` runs
        fastest on the shape ``dequantize`` reads."""
        scale, zero_point = self.qparams(q)
        engines = engines or self.kernel_engines
        x = example_int8_input(self.gm, dequantize) if len(engines) > 1 else None
        shapes = getattr(prepack, "shapes", None)
        key = None if x is None or shapes is None else (kernel, shapes, tuple(x.shape), engines)
        if key in self.measured:
            engine = self.measured[key]
            packed = prepack(engine)
        else:
            engine, packed = fastest_prepacked(kernel, prepack, engines, x, scale, zero_point)
            if key is not None:
                self.measured[key] = engine
        if x is not None:  # a measured choice (conv2d_add has one engine only: not counted)
            self.chosen[engine] = self.chosen.get(engine, 0) + 1
        return packed

    def pack(self, packed: PackedWeight) -> fx.Node:
        name = f"_packed_{self.count}"
        self.count += 1
        self.gm.add_submodule(name, packed)
        return self.gm.graph.create_node("get_attr", f"{name}.packed")  # get_attr() warns on non-tensors

    def qparams(self, q: fx.Node) -> tuple[float, int]:
        scale, zero_point = (getattr(self.gm, str(a.target)) for a in q.args[1:3])
        return float(scale), int(zero_point)

    def emit(self, q: fx.Node, target: Callable, args: tuple, origin: list[fx.Node], kind: str,
             output_qparams: bool = True) -> fx.Node:
        """Replace quantize node ``q`` (and the region before it) by ``target(*args, scale, zp)`` (by
        ``target(*args)`` without ``output_qparams``: a kernel whose output qparams are fixed)."""
        scale, zero_point = self.qparams(q)
        with self.gm.graph.inserting_before(q):
            node = self.gm.graph.call_function(target, (*args, scale, zero_point) if output_qparams else args)
        if output_qparams:  # recalibrate re-reads them from these buffers (fixed ones never change)
            fxmeta(node)[QPARAMS_KEY] = (str(q.args[1].target), str(q.args[2].target))
        record_rewrite(node, f"lower-{self.engine}", *origin)
        q.replace_all_uses_with(node)
        self.lowered[kind] = self.lowered.get(kind, 0) + 1
        return node


def _quantized_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's int8 weight, exactly the grid values insert-qdq put in ``weight`` (scales as buffers)."""
    scale, zero_point = layer.weight_scale, layer.weight_zero_point
    if scale.numel() == 1:
        with quantized_tensors_quietly():
            return torch.quantize_per_tensor(layer.weight.detach(), float(scale), int(zero_point), torch.qint8)
    with quantized_tensors_quietly():
        return torch.quantize_per_channel(layer.weight.detach(), scale, zero_point, weight_axis(layer), torch.qint8)


def _split_activation(value: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(the op computing a quantized value, the absorbed activation after it or None)."""
    if stored(value).get("role") == ABSORBED:
        return value.args[0], value
    return value, None


def _relu_only(act: fx.Node | None) -> bool:
    return act is not None and stored(act).get("kind") == "relu"


def _inner_layer(module: nn.Module | None) -> nn.Module | None:
    """The conv/linear a (fused) module computes with, when at most an add and a relu are fused into it."""
    if isinstance(module, (FusedConv, FusedLinear)):
        if module.activation not in ("", "relu"):
            return None
        return module.conv if isinstance(module, FusedConv) else module.linear
    return module


def _conv_add_kernel(layer: nn.Module, relu: bool) -> tuple[Callable, Callable[[str], PackedWeight], str] | None:
    """quantized.conv2d_add[_relu]: oneDNN-packed Conv2d weights only (the other engines lack the kernel)."""
    if module_op(layer) != "conv2d" or layer.padding_mode != "zeros" or isinstance(layer.padding, str) \
            or "onednn" not in torch.backends.quantized.supported_engines:
        return None
    return (_q.conv2d_add_relu if relu else _q.conv2d_add), _packer(layer, "conv2d"), "conv2d+add"


def _packer(layer: nn.Module, kind: str) -> Callable[[str], PackedWeight]:
    """engine -> the layer's int8 weight packed by that engine. Its ``shapes`` attribute (kind, weight shape,
    bias or not, geometry) is what the kernel's speed depends on besides the input shape."""
    geometry = {} if kind == "linear" else {"stride": list(layer.stride), "padding": list(layer.padding),
                                            "dilation": list(layer.dilation), "groups": layer.groups}

    def pack(engine: str) -> PackedWeight:
        return PackedWeight(kind, engine, _quantized_weight(layer), layer.bias, geometry)

    pack.shapes = (kind, tuple(layer.weight.shape), layer.bias is not None,
                   tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in geometry.items()))
    return pack


def _kernel(layer: nn.Module, relu: bool) -> tuple[Callable, Callable[[str], PackedWeight], str] | None:
    """(int8 op, engine -> the weight packed for it, kind) for a conv/linear layer, else None."""
    if isinstance(layer, nn.Linear):
        return (_q.linear_relu if relu else _q.linear), _packer(layer, "linear"), "linear"
    name = module_op(layer)
    if name not in _CONV_OPS or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None
    if relu and name != "conv2d":  # only conv2d has a fused relu kernel
        return None
    return getattr(_q, name + ("_relu" if relu else "")), _packer(layer, name), name


def _fbgemm_depthwise_saturates(layer: nn.Module) -> bool:
    """Whether fbgemm's depthwise kernel may saturate on this layer: it sums pairs of u8 x s8 products into int16
    with saturation even on VNNI CPUs, so weights beyond 7 bits (|w| > 64: 255 * (|a| + |b|) > 32767) can clip
    a sum, off by up to ~30 output steps on a few elements (measured: square 3x3 to 7x7 conv2d and 3x3x3 conv3d
    kernels, depthwise with or without a channel multiplier, dilation 1; other shapes take exact paths).
    oneDNN's kernel accumulates in int32 and agrees with the reference."""
    if not isinstance(layer, (nn.Conv2d, nn.Conv3d)) or layer.groups == 1 or layer.groups != layer.in_channels:
        return False
    kernel = tuple(layer.kernel_size)
    if len(set(kernel)) != 1 or kernel[0] == 1 or any(d != 1 for d in layer.dilation):
        return False
    return 2 * 255 * int(_quantized_weight(layer).int_repr().abs().max()) > torch.iinfo(torch.int16).max


def _lower_weighted(low: _Lowering, q: fx.Node, op: fx.Node, act: fx.Node | None) -> fx.Node | None:
    module = module_of(low.gm, op)
    layer = _inner_layer(module)
    add = getattr(module, "add", False)
    if layer is None or not hasattr(layer, "weight_scale") or len(op.args) != 1 + add \
            or not all(_is_dq(a) for a in op.args):
        return None
    relu = getattr(module, "activation", "") == "relu" or _relu_only(act)
    origin = [op] + ([act] if act is not None else [])  # the kernel computes act's value, absorbed or not
    if act is not None and not relu:
        if _saturation_is_the_activation(low, q, act):
            relu, act = True, None
        elif low.engine == "qnnpack":  # torch's qnnpack clamp misreads channels-last int8 tensors (measured)
            return None
    kernel = _conv_add_kernel(layer, relu) if add else _kernel(layer, relu)
    if kernel is None:
        return None
    target, prepack, kind = kernel
    # conv2d_add reads two int8 tensors: not timed, and only oneDNN packs for it
    engines = ("onednn",) if add else None
    if low.engine in ("fbgemm", "x86") and _fbgemm_depthwise_saturates(layer):
        if "onednn" not in torch.backends.quantized.supported_engines:
            return None  # the reference form
        engines = ("onednn",)
    packed = low.prepack(target, prepack, q, op.args[0], engines=engines)
    with low.gm.graph.inserting_before(q):
        packed = low.pack(packed)
    inputs = tuple(a.args[0] for a in op.args)  # x (and the residual when add): the int8 tensors dequantized
    if add:
        inputs = (inputs[0], _writable_accumulator(low, op, inputs[1], before=q))
    node = low.emit(q, target, (*inputs, packed), origin, kind + ("+relu" if relu else ""))
    return _reapply_activation(low, node, act) if act is not None and not _relu_only(act) else node


_FRESH_INT8 = {"max_pool2d"}  # ops that return a new int8 tensor (besides quantize and the quantized:: kernels)
_CLAMP_MODULES = {"relu", "relu6", "hardtanh"}  # on int8, these modules return their input or a new tensor


def _storage_chain(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node] | None:
    """The nodes whose value may share ``node``'s memory: ``node``, and through int8 clamps (in place or
    not) the kernel output they clamp. None when ``node`` may be a view of another value (or unknown)."""
    op = op_name(node, partial(module_of, gm))
    if node.op == "call_module" and out_of_place(op or "") in _CLAMP_MODULES and isinstance(node.args[0], fx.Node):
        inner = _storage_chain(gm, node.args[0])
        return None if inner is None else [node, *inner]
    if op in _FRESH_INT8 or (node.op == "call_function" and (node.target is torch.quantize_per_tensor or str(
            getattr(node.target, "_qualified_op_name", "")).startswith("quantized::"))):
        return [node]
    return None


def _writable_accumulator(low: _Lowering, op: fx.Node, accum: fx.Node, before: fx.Node) -> fx.Node:
    """conv2d_add writes its result into the accumulator's memory when layouts match (measured: a residual
    read again afterwards came back overwritten). Pass ``accum`` itself only when it is not ``op``'s other
    input, not a view of another value, and nothing reads its memory after ``op``; otherwise a clone."""
    chain = _storage_chain(low.gm, accum)
    if chain is not None and accum is not op.args[0].args[0]:
        order = {n: i for i, n in enumerate(low.gm.graph.nodes)}
        readers = [r for n in chain for u in n.users for r in (u.users if _is_dq(u) else [u])
                   if r is not op and r not in chain]
        if all(order[r] < order[op] for r in readers):
            return accum
    with low.gm.graph.inserting_before(before):
        return low.gm.graph.call_method("clone", (accum,))


def _activation_bounds(gm: fx.GraphModule, act: fx.Node) -> tuple[float, float] | None:
    """(min, max) of a clamping activation (relu6, hardtanh) when known, else None."""
    return hardtanh_bounds(act, partial(module_of, gm))


def _saturation_is_the_activation(low: _Lowering, q: fx.Node, act: fx.Node) -> bool:
    """relu6 (a clamp to [0, hi]) equals a fused relu when the int8 output already saturates at or below hi:
    q(clamp(y, 0, hi)) == q(relu(y)) iff round(hi / scale) + zero_point >= 255 (kernels clamp at quint8's max)."""
    bounds = _activation_bounds(low.gm, act)
    if bounds is None or bounds[0] != 0.0:
        return False
    scale, zero_point = low.qparams(q)
    return round(bounds[1] / scale) + zero_point >= 255


def _reapply_activation(low: _Lowering, node: fx.Node, act: fx.Node) -> fx.Node:
    """relu6 / hardtanh / clamp after the int8 op: the same node, now reading the int8 output (exact)."""
    users = [u for u in node.users]
    with low.gm.graph.inserting_after(node):
        clamp = low.gm.graph.node_copy(act, lambda a: node if a is act.args[0] else a)
    for user in users:
        user.replace_input_with(node, clamp)
    return clamp


def _lower_binary(low: _Lowering, q: fx.Node, op: fx.Node, act: fx.Node | None) -> fx.Node | None:
    kind = op_name(op)
    if kind not in _BINARY or op.kwargs or len(op.args) != 2 or not all(_is_dq(a) for a in op.args):
        return None
    if act is not None and not _relu_only(act):
        return None
    kind += "_relu" if act is not None else ""
    operands = (op.args[0].args[0], op.args[1].args[0])
    if _broadcasts_onto(op.args[0], op.args[1], op):
        operands = operands[::-1]
    return low.emit(q, getattr(_q, kind), operands, [op] + ([act] if act else []), kind)


def _broadcasts_onto(a: fx.Node, b: fx.Node, out: fx.Node) -> bool:
    """Whether ``a`` is broadcast onto ``b`` (``a`` smaller than the result, ``b`` the result's shape).

    torch's int8 add/mul kernels lay their output out like their *first* operand. With the small operand first
    (a squeeze-excitation ``scale [N,C,1,1] * x [N,C,H,W]``) the result is NCHW while ``x`` is channels-last:
    the kernel walks ``x`` across its strides and the next conv copies its input back to channels-last
    (measured on x86: 3-6x slower mul, e.g. 1.0 ms against 0.46 ms at [1,96,56,56], plus the copy). Both ops
    are commutative, the kernels' integer arithmetic symmetric in the operands (outputs identical, measured
    and tested), so the lowering passes the full-size operand first."""
    shapes = [tensor_shape(n) for n in (a, b, out)]
    return None not in shapes and shapes[0] != shapes[2] and shapes[1] == shapes[2]


def _lower_unary(low: _Lowering, q: fx.Node, op: fx.Node, act: fx.Node | None) -> fx.Node | None:
    kind = stored(op).get("kind")
    if act is not None or (kind not in _UNARY and kind not in _FIXED_OUTPUT) or not _is_dq(op.args[0]) \
            or len(op.all_input_nodes) != 1:
        return None
    if low.engine == "qnnpack" and kind == "sigmoid" and low.qparams(q) != _GATE_QPARAMS:
        return None  # qnnpack's int8 sigmoid only produces these (others: an internal assert at run time)
    if kind in _FIXED_OUTPUT:
        target, qparams = _FIXED_OUTPUT[kind]
        if low.qparams(q) != qparams or len(op.args) != 1 or op.kwargs:  # e.g. a hardsigmoid in a cat group
            return None
        node = low.emit(q, target, (op.args[0].args[0],), [op], kind, output_qparams=False)
    else:
        node = low.emit(q, _UNARY[kind], (op.args[0].args[0],), [op], kind)
    if is_in_place(low.gm, op) and len(op.args[0].users) == 1:
        low.private_in_place.append(op)
    return node


def _drop_private_in_place(gm: fx.GraphModule, ops: list[fx.Node]) -> None:
    """In-place activations the kernels replaced (``nn.Hardswish(inplace=True)`` on ``dequantize(x)``, as in
    torchvision's mobilenet_v3): they mutate the fresh fp32 copy that only they read, so once unused nothing
    observes them; dce keeps in-place ops (it cannot know a ``dequantize`` is fresh), so they go here."""
    for op in ops:
        if not op.users:
            gm.graph.erase_node(op)


def _lower_batchnorm(low: _Lowering, q: fx.Node, op: fx.Node, act: fx.Node | None) -> fx.Node | None:
    bn = module_of(low.gm, op)
    if act is not None or not isinstance(bn, nn.BatchNorm2d) or not _is_dq(op.args[0]) or bn.running_mean is None:
        return None
    if bn.weight is None or bn.bias is None:
        return None
    with low.gm.graph.inserting_before(q):
        tensors = [low.gm.graph.get_attr(f"{op.target}.{name}")
                   for name in ("weight", "bias", "running_mean", "running_var")]
    return low.emit(q, _q.batch_norm2d, (op.args[0].args[0], *tensors, bn.eps), [op], "batchnorm")


def _lower_share(low: _Lowering, q: fx.Node, op: fx.Node) -> fx.Node | None:
    """Average pooling requantized with its input's qparams -> the pooling itself on the int8 tensor."""
    if stored(op).get("role") != "share" or stored(op).get("kind") not in _INT8_POOLS or not _is_dq(op.args[0]) \
            or len(op.all_input_nodes) != 1:
        return None
    if low.engine == "qnnpack" and _qnnpack_pool_differs(op, module_of(low.gm, op)):
        return None
    op.replace_input_with(op.args[0], op.args[0].args[0])
    q.replace_all_uses_with(op)
    low.lowered["avgpool"] = low.lowered.get("avgpool", 0) + 1
    return op


def _qnnpack_pool_differs(op: fx.Node, module: nn.Module | None) -> bool:
    """Average pooling that qnnpack's int8 kernel rejects (one-element windows: "1x1 pooling is
    meaningless") or gets wrong (measured: it ignores count_include_pad=False with padding): it keeps its
    reference form (dequantize -> pool -> quantize). (divisor_override, which it ignores too, never gets
    here: such pooling has qparams of its own, a compute op.)"""
    options = pool_options(op, module)
    if options is None:
        return False
    padding = options.get("padding", 0)
    padded = any(p != 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))
    return pool_window(op, module) == 1 or (padded and not options.get("count_include_pad", True))


_MODULE_RULES = (_lower_weighted, _lower_batchnorm, _lower_unary)  # regions around a module call
_FUNCTION_RULES = (_lower_binary, _lower_unary)  # around a function or method call


def _lower_quantize(low: _Lowering, q: fx.Node) -> bool:
    value = q.args[0]
    if not isinstance(value, fx.Node) or len(value.users) != 1:
        return False
    if _lower_share(low, q, value) is not None:
        return True
    op, act = _split_activation(value)
    if op.op == "placeholder" or (act is not None and len(op.users) != 1):
        return False
    rules = _MODULE_RULES if op.op == "call_module" else _FUNCTION_RULES
    return any(rule(low, q, op, act) is not None for rule in rules)


def _lower_dynamic_linear(low: _Lowering, node: fx.Node) -> bool:
    """linear(dynamic_quantize(x)) -> quantized.linear_dynamic(x, packed, reduce_range)."""
    linear = module_of(low.gm, node)
    source = node.args[0] if node.args else None
    if not isinstance(linear, nn.Linear) or not hasattr(linear, "weight_scale") or not isinstance(source, fx.Node) \
            or source.target is not dynamic_quantize or len(source.users) != 1:
        return False
    with low.gm.graph.inserting_before(node):
        packed = low.pack(_packer(linear, "linear")(low.engine))
        new = low.gm.graph.call_function(_q.linear_dynamic, (source.args[0], packed, source.args[1]))
    record_rewrite(new, f"lower-{low.engine}", source, node)
    node.replace_all_uses_with(new)
    low.lowered["linear_dynamic"] = low.lowered.get("linear_dynamic", 0) + 1
    return True


def _lower_dynamic_rnn(low: _Lowering, node: fx.Node) -> bool:
    reference = module_of(low.gm, node)
    if not isinstance(reference, (DynamicQuantLSTM, DynamicQuantGRU)):
        return False
    replace_submodule(low.gm, str(node.target), DynamicInt8RNN(reference, low.engine))
    kind = f"{reference.mode.lower()}_dynamic"
    low.lowered[kind] = low.lowered.get(kind, 0) + 1
    return True


def lower_int8(gm: fx.GraphModule, ctx: PassContext, engine: str, kernel_engines: tuple[str, ...] = ()) -> PassResult:
    quantize_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.quantize_per_tensor]
    low = _Lowering(gm, engine, kernel_engines)
    with quantized_engine(engine):  # prepacking picks the engine's weight format
        timed = bar(quantize_nodes, desc=f"lower-{engine}: timing kernels", unit="node",
                    show=len(low.kernel_engines) > 1)  # per-layer kernel timing: the slow part of this pass
        lowered = [q for q in timed if _lower_quantize(low, q)]
        dynamic = [n for n in list(gm.graph.nodes) if _lower_dynamic_linear(low, n) or _lower_dynamic_rnn(low, n)]
    for q in lowered:
        if not q.users:
            gm.graph.erase_node(q)
    _drop_private_in_place(gm, low.private_in_place)
    # int8 kernels (and cat of 1-channel maps) return channels-last tensors: eager's layout where observable
    restored = restore_eager_layout(gm, f"lower-{engine}", ctx.reference_outputs)
    remove_dead_code(gm)  # the reference nodes the kernels replaced (quantize, ops, dequantize, qparams)
    gm.delete_all_unused_submodules()
    summary = ", ".join(f"{n} {kind}" for kind, n in sorted(low.lowered.items()))
    notes = [f"int8 kernels ({engine}): {summary or 'none'}"]
    if len(low.kernel_engines) > 1 and low.chosen:
        notes.append("weights packed for the fastest engine measured per layer: "
                     + ", ".join(f"{n} {e}" for e, n in sorted(low.chosen.items())))
    return PassResult(gm, bool(lowered or dynamic or restored), notes)


def _lowering_pass(engine: str, tunable: tuple[str, ...] = ()) -> type:
    """lower-<engine>; with ``tunable`` engines, an ``autotune`` option (on by default) picks among them per layer."""
    if tunable:
        def lower(gm: fx.GraphModule, ctx: PassContext, autotune: bool = True) -> PassResult:
            return lower_int8(gm, ctx, engine, available_engines(tunable) if autotune else ())
    else:
        def lower(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            return lower_int8(gm, ctx, engine)

    lower.__name__ = lower.__qualname__ = f"lower_{engine}"
    lower.__doc__ = f"Reference int8 regions -> torch.ops.quantized kernels prepacked for the {engine} engine."
    if tunable:
        lower.__doc__ += (f" autotune: each conv/linear takes the weights packing ({', '.join(tunable)}) whose "
                          "kernel measured fastest on its input shape at compile time.")
    return graph_pass(f"lower-{engine}", requires=("quantized",), provides=("lowered",))(lower)


LOWER_FBGEMM = _lowering_pass("fbgemm")
# The x86 engine's ops accept weights packed by fbgemm or oneDNN: which is faster depends on the layer
# (oneDNN on large depthwise feature maps, fbgemm on small ones, measured), so x86 chooses per layer.
LOWER_X86 = _lowering_pass("x86", tunable=("fbgemm", "onednn"))
LOWER_QNNPACK = _lowering_pass("qnnpack")
