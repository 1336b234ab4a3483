"""Which ops run quantized, and how: the op table behind the quantization passes.

Every node gets a *role*:
- ``compute``: runs in fp32 on dequantized inputs; its output is quantized with its own observed qparams
  (conv, linear, add, mul, matmul, bmm, hardswish, hardsigmoid, sigmoid, tanh, silu, gelu, leaky_relu,
  standalone batchnorm, bilinear interpolate): ``dequantize -> op -> quantize``, one kernel once lowered.
- ``share``: the same, but the output reuses the input's qparams (average pooling, which stays inside its
  inputs' range; ops that only pick values but have no int8 kernel in torch, e.g. adaptive max-pool).
- ``direct``: runs on the quantized tensor itself and keeps its qparams, exactly (flatten, reshape, view,
  permute, max-pool, relu/relu6/hardtanh/clamp, nearest interpolate, dropout/identity, slicing; ``cat`` once
  all its inputs share one set of qparams).
- ``meta``: reads only a quantized tensor's shape (``x.size()``, ``x.dim()``).
- ``float``: everything else: an fp32 island between a dequantize and a quantize (listed in the report).
Exceptions: max pooling over one-element windows is ``share`` (qnnpack's kernel rejects it), average pooling
with a ``divisor_override`` is ``compute`` (a scaled sum leaves its inputs' range).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import fx, nn

from fxforge.graph.fused import FusedConv, FusedLinear
from fxforge.graph.matching import module_of
from fxforge.graph.meta import tensor_shape
from fxforge.graph.ops import module_op, op_name, out_of_place

from .qat_modules import QATConvBn, QATWeighted

COMPUTE, SHARE, DIRECT, CAT, META, FLOAT = "compute", "share", "direct", "cat", "meta", "float"


@dataclass(frozen=True)
class OpInfo:
    role: str
    kind: str  # a short op name for reports and per-type rules: "conv", "linear", "add", "maxpool", ...
    op_type: type | None = None  # the module class for module calls (FusedConv: the wrapped conv's class)


# op -> kind: runs in fp32 between dequantize and quantize, its output with qparams of its own
_COMPUTE = {"add": "add", "mul": "mul", "matmul": "matmul", "bmm": "bmm", "hardswish": "hardswish",
            "sigmoid": "sigmoid", "silu": "silu", "hardsigmoid": "hardsigmoid", "tanh": "tanh", "gelu": "gelu",
            "leaky_relu": "leaky_relu", "mean": "mean"}  # mean: as adaptive average pooling (_avg_pool_role)
# op -> kind: compute ops as module calls only (the module holds the weight or statistics insert-qdq reads)
_LAYERS = {"conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "conv_transpose1d": "conv-transpose",
           "conv_transpose2d": "conv-transpose", "conv_transpose3d": "conv-transpose", "linear": "linear",
           "batch_norm": "batchnorm"}
# op -> kind: the output keeps (or is requantized with) its input's qparams
_SHARE = {"adaptive_max_pool2d": "maxpool"}
# op -> kind: runs on the int8 tensor itself and keeps its qparams, exactly
_DIRECT = {"flatten": "flatten", "unflatten": "unflatten", "reshape": "reshape", "view": "view",
           "permute": "permute", "transpose": "transpose", "contiguous": "contiguous", "squeeze": "squeeze",
           "unsqueeze": "unsqueeze", "relu": "relu", "relu6": "relu6", "hardtanh": "hardtanh", "clamp": "clamp",
           "identity": "identity", "dropout": "dropout", "getitem": "slice"}
# reads only the tensor's shape
_META = {"size", "dim"}
# average pooling: a share op (a compute op with a divisor_override)
_AVG_POOLS = {"avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
              "adaptive_avg_pool3d"}
# max pooling over a window: a direct op (a share op over one-element windows)
_MAX_POOLS = {"max_pool1d", "max_pool2d", "max_pool3d"}
_WINDOW_POOLS = _MAX_POOLS | {"avg_pool1d", "avg_pool2d", "avg_pool3d"}  # pooling with kernel_size, stride, ...


def _nearest_role(node: fx.Node) -> str:
    """Nearest upsampling runs quantized where torch has the kernel (2-d and 3-d images), else as a share op."""
    shape = tensor_shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return DIRECT if shape is not None and len(shape) in (4, 5) else SHARE


# positional parameters after the input (max pooling's 4th is dilation; avg_pool1d has no divisor_override)
_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def pool_options(node: fx.Node, mod: nn.Module | None = None) -> dict[str, Any] | None:
    """kernel_size, padding, count_include_pad, ... of a (non-adaptive) max/avg pooling call, else None."""
    if mod is not None:
        if module_op(mod) not in _WINDOW_POOLS:
            return None
        return {name: getattr(mod, name) for name in (*_POOL_PARAMETERS, "dilation") if hasattr(mod, name)}
    op = op_name(node) if node.op == "call_function" else None
    if op not in _WINDOW_POOLS:
        return None
    names = _MAX_POOL_PARAMETERS if op in _MAX_POOLS else _POOL_PARAMETERS
    return {**dict(zip(names, node.args[1:], strict=False)), **node.kwargs}


def pool_window(node: fx.Node, mod: nn.Module | None = None) -> int | None:
    """Elements in the window of a (non-adaptive) max/avg pooling call, None for other ops or when unknown."""
    kernel = (pool_options(node, mod) or {}).get("kernel_size")
    if isinstance(kernel, int):
        kernel = (kernel,)
    return math.prod(kernel) if isinstance(kernel, (tuple, list)) and all(isinstance(k, int) for k in kernel) else None


def _pool_role(node: fx.Node, mod: nn.Module | None = None) -> str:
    """Max pooling runs on int8 tensors, except over one-element windows (a strided subsampling), which
    qnnpack's int8 kernel rejects ("1x1 pooling is meaningless"): those dequantize -> pool -> quantize with
    the input's qparams (exact, as every share op)."""
    return SHARE if pool_window(node, mod) == 1 else DIRECT


def _avg_pool_role(node: fx.Node, mod: nn.Module | None = None) -> str:
    """Average pooling over a window keeps its input's qparams (an average stays inside its inputs' range),
    except with a divisor_override, which divides the window's sum by another count: sum / 2 over a 3x3
    window reaches 4.5x the inputs' range, so it gets qparams of its own. Adaptive pooling (and ``mean``)
    averages whole feature maps: the means spread over a small part of the inputs' range (measured on
    mobilenet_v3's squeeze-excitation pools: a tenth), so on the inputs' grid they keep three or four bits
    (local SQNR ~20 dB, the worst op of that net); they get qparams of their own (the op runs in fp32
    between dequantize and quantize), as onnxruntime's GlobalAveragePool does."""
    options = pool_options(node, mod)  # None: adaptive pooling
    return COMPUTE if options is None or options.get("divisor_override") is not None else SHARE


def _wrapped_info(mod: nn.Module, node: fx.Node) -> OpInfo | None:
    """fxforge's fused and QAT modules: compute ops of the conv / linear they wrap."""
    if isinstance(mod, FusedConv):
        kind = _LAYERS.get(module_op(mod.conv) or "", "conv")
        return OpInfo(COMPUTE, kind, type(mod.conv.conv) if isinstance(mod.conv, QATConvBn) else type(mod.conv))
    if isinstance(mod, FusedLinear):
        return OpInfo(COMPUTE, "linear", nn.Linear)
    if isinstance(mod, QATConvBn):
        return OpInfo(COMPUTE, "conv", type(mod.conv))
    if isinstance(mod, QATWeighted):
        return _module_info(mod.module, node)
    return None


def _interpolate_role(node: fx.Node, mod: nn.Module | None) -> str:
    """Nearest upsampling picks input values (see _nearest_role); other modes compute new ones."""
    if mod is not None:
        nearest = mod.mode == "nearest"
    else:
        nearest = node.kwargs.get("mode", "nearest") == "nearest" and len(node.args) < 4
    return _nearest_role(node) if nearest else COMPUTE


def _role(op: str, node: fx.Node, mod: nn.Module | None) -> OpInfo | None:
    """The role and kind of op ``op`` (in-place forms as their op), None for ops without an int8 form."""
    op_type = type(mod) if mod is not None else None
    if op in _LAYERS:
        return OpInfo(COMPUTE, _LAYERS[op], op_type) if mod is not None else None
    if op in _AVG_POOLS:
        return OpInfo(_avg_pool_role(node, mod), "avgpool", op_type)
    if op in _MAX_POOLS:
        return OpInfo(_pool_role(node, mod), "maxpool", op_type)
    if op == "interpolate":
        return OpInfo(_interpolate_role(node, mod), "interpolate", op_type)
    if op == "cat":
        return OpInfo(CAT, "cat", op_type)
    if op in _META:
        return OpInfo(META, op, op_type)
    for table, role in ((_COMPUTE, COMPUTE), (_SHARE, SHARE), (_DIRECT, DIRECT)):
        if op in table:
            return OpInfo(role, table[op], op_type)
    return None


def _module_info(mod: nn.Module, node: fx.Node) -> OpInfo:
    op = module_op(mod)
    info = _wrapped_info(mod, node) or (_role(out_of_place(op), node, mod) if op else None)
    return info or OpInfo(FLOAT, type(mod).__name__, type(mod))


def _call_name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))


def op_info(gm: fx.GraphModule, node: fx.Node) -> OpInfo:
    """The role and kind of ``node`` (placeholders, get_attr and output nodes are ``float``)."""
    if node.op == "call_module":
        return _module_info(module_of(gm, node), node)
    if node.op not in ("call_function", "call_method"):
        return OpInfo(FLOAT, node.op)
    op = op_name(node)
    return (_role(out_of_place(op), node, None) if op else None) or OpInfo(FLOAT, _call_name(node))


def weight_axis(module: nn.Module) -> int:
    """Per-channel axis of a weight: output channels, which conv-transpose keeps on dim 1."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def weighted_layer(module: nn.Module) -> nn.Module | None:
    """The conv/linear whose weight a module computes with (inside fused and QAT wrappers), else None."""
    while isinstance(module, (FusedConv, FusedLinear, QATWeighted)):
        module = getattr(module, "conv", None) or getattr(module, "linear", None) or module.module
    return module if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) else None
