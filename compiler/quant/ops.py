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
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxforge.graph.fused import FusedConv, FusedLinear
from fxforge.graph.matching import module_of
from fxforge.graph.meta import tensor_shape

from .qat_modules import QATConvBn, QATWeighted

COMPUTE, SHARE, DIRECT, CAT, META, FLOAT = "compute", "share", "direct", "cat", "meta", "float"


@dataclass(frozen=True)
class OpInfo:
    role: str
    kind: str  # a short op name for reports and per-type rules: "conv", "linear", "add", "maxpool", ...
    op_type: type | None = None  # the module class for module calls (FusedConv: the wrapped conv's class)


_COMPUTE_MODULES: dict[type, str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv", nn.ConvTranspose1d: "conv-transpose",
    nn.ConvTranspose2d: "conv-transpose", nn.ConvTranspose3d: "conv-transpose", nn.Linear: "linear",
    nn.BatchNorm1d: "batchnorm", nn.BatchNorm2d: "batchnorm", nn.BatchNorm3d: "batchnorm",
    nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.Hardsigmoid: "hardsigmoid",
    nn.Tanh: "tanh", nn.GELU: "gelu", nn.LeakyReLU: "leaky_relu",
}
_SHARE_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                  nn.AdaptiveAvgPool3d)
_DIRECT_MODULES: dict[type, str] = {
    nn.MaxPool1d: "maxpool", nn.MaxPool2d: "maxpool", nn.MaxPool3d: "maxpool",
    nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Flatten: "flatten", nn.Identity: "identity",
    nn.Dropout: "dropout", nn.Unflatten: "unflatten",
}
_COMPUTE_FUNCTIONS = {
    operator.add: "add", torch.add: "add", operator.mul: "mul", torch.mul: "mul", torch.matmul: "matmul",
    operator.matmul: "matmul", torch.bmm: "bmm", F.hardswish: "hardswish", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.silu: "silu", F.hardsigmoid: "hardsigmoid", torch.tanh: "tanh", F.gelu: "gelu",
    F.leaky_relu: "leaky_relu",
}
_SHARE_FUNCTIONS = {F.avg_pool1d: "avgpool", F.avg_pool2d: "avgpool", F.avg_pool3d: "avgpool",
                    F.adaptive_avg_pool1d: "avgpool", F.adaptive_avg_pool2d: "avgpool",
                    F.adaptive_avg_pool3d: "avgpool", torch.mean: "mean"}
_DIRECT_FUNCTIONS = {
    torch.flatten: "flatten", torch.reshape: "reshape", torch.permute: "permute", torch.transpose: "transpose",
    torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze", F.max_pool1d: "maxpool", F.max_pool2d: "maxpool",
    F.max_pool3d: "maxpool", torch.relu: "relu", F.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh",
    torch.clamp: "clamp", F.dropout: "dropout", operator.getitem: "slice",
}
_COMPUTE_METHODS = {"add": "add", "mul": "mul", "matmul": "matmul", "bmm": "bmm", "sigmoid": "sigmoid",
                    "tanh": "tanh"}
_SHARE_METHODS = {"mean": "mean"}
_DIRECT_METHODS = {
    "view": "view", "reshape": "reshape", "flatten": "flatten", "permute": "permute", "transpose": "transpose",
    "contiguous": "contiguous", "squeeze": "squeeze", "unsqueeze": "unsqueeze", "relu": "relu", "clamp": "clamp",
}
_META_METHODS = {"size", "dim"}


def _nearest_role(node: fx.Node) -> str:
    """Nearest upsampling runs quantized where torch has the kernel (2-d and 3-d images), else as a share op."""
    shape = tensor_shape(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    return DIRECT if shape is not None and len(shape) in (4, 5) else SHARE


_WINDOW_POOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_WINDOW_POOL_FUNCTIONS = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
# positional parameters after the input (max pooling's 4th is dilation; avg_pool1d has no divisor_override)
_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_MAX_POOL_PARAMETERS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def pool_options(node: fx.Node, mod: nn.Module | None = None) -> dict[str, Any] | None:
    """kernel_size, padding, count_include_pad, ... of a (non-adaptive) max/avg pooling call, else None."""
    if isinstance(mod, _WINDOW_POOL_MODULES):
        return {name: getattr(mod, name) for name in (*_POOL_PARAMETERS, "dilation") if hasattr(mod, name)}
    if mod is not None or node.op != "call_function" or node.target not in _WINDOW_POOL_FUNCTIONS:
        return None
    names = _MAX_POOL_PARAMETERS if node.target in _WINDOW_POOL_FUNCTIONS[:3] else _POOL_PARAMETERS
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
    """Average pooling keeps its input's qparams (an average stays inside its inputs' range), except with a
    divisor_override, which divides the window's sum by another count: sum / 2 over a 3x3 window reaches
    4.5x the inputs' range, so it gets qparams of its own."""
    return COMPUTE if (pool_options(node, mod) or {}).get("divisor_override") is not None else SHARE


def _module_info(mod: nn.Module, node: fx.Node) -> OpInfo:
    if isinstance(mod, FusedConv):
        kind = _COMPUTE_MODULES.get(type(mod.conv), "conv")
        return OpInfo(COMPUTE, kind, type(mod.conv.conv) if isinstance(mod.conv, QATConvBn) else type(mod.conv))
    if isinstance(mod, FusedLinear):
        return OpInfo(COMPUTE, "linear", nn.Linear)
    if isinstance(mod, QATConvBn):
        return OpInfo(COMPUTE, "conv", type(mod.conv))
    if isinstance(mod, QATWeighted):
        return _module_info(mod.module, node)
    if type(mod) in _COMPUTE_MODULES:
        return OpInfo(COMPUTE, _COMPUTE_MODULES[type(mod)], type(mod))
    if isinstance(mod, _SHARE_MODULES):
        return OpInfo(_avg_pool_role(node, mod), "avgpool", type(mod))
    if isinstance(mod, nn.AdaptiveMaxPool2d):  # no quantized kernel; the max of grid values is on the grid
        return OpInfo(SHARE, "maxpool", type(mod))
    if isinstance(mod, nn.Upsample):
        return OpInfo(_nearest_role(node) if mod.mode == "nearest" else COMPUTE, "interpolate", type(mod))
    if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
        return OpInfo(_pool_role(node, mod), "maxpool", type(mod))
    if type(mod) in _DIRECT_MODULES:
        return OpInfo(DIRECT, _DIRECT_MODULES[type(mod)], type(mod))
    return OpInfo(FLOAT, type(mod).__name__, type(mod))


def _function_info(node: fx.Node) -> OpInfo:
    fn = node.target
    if fn is torch.cat:
        return OpInfo(CAT, "cat")
    if fn is F.interpolate:
        nearest = node.kwargs.get("mode", "nearest") == "nearest" and len(node.args) < 4
        return OpInfo(_nearest_role(node) if nearest else COMPUTE, "interpolate")
    if fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
        return OpInfo(_pool_role(node), "maxpool")
    if fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
        return OpInfo(_avg_pool_role(node), "avgpool")
    for table, role in ((_COMPUTE_FUNCTIONS, COMPUTE), (_SHARE_FUNCTIONS, SHARE), (_DIRECT_FUNCTIONS, DIRECT)):
        if fn in table:
            return OpInfo(role, table[fn])
    return OpInfo(FLOAT, getattr(fn, "__name__", str(fn)))


def _method_info(node: fx.Node) -> OpInfo:
    name = str(node.target)
    if name in _META_METHODS:
        return OpInfo(META, name)
    for table, role in ((_COMPUTE_METHODS, COMPUTE), (_SHARE_METHODS, SHARE), (_DIRECT_METHODS, DIRECT)):
        if name in table:
            return OpInfo(role, table[name])
    return OpInfo(FLOAT, name)


def op_info(gm: fx.GraphModule, node: fx.Node) -> OpInfo:
    """The role and kind of ``node`` (placeholders, get_attr and output nodes are ``float``)."""
    if node.op == "call_module":
        return _module_info(module_of(gm, node), node)
    if node.op == "call_function":
        return _function_info(node)
    if node.op == "call_method":
        return _method_info(node)
    return OpInfo(FLOAT, node.op)


def weight_axis(module: nn.Module) -> int:
    """Per-channel axis of a weight: output channels, which conv-transpose keeps on dim 1."""
    return 1 if isinstance(module, nn.modules.conv._ConvTransposeNd) else 0


def weighted_layer(module: nn.Module) -> nn.Module | None:
    """The conv/linear whose weight a module computes with (inside fused and QAT wrappers), else None."""
    while isinstance(module, (FusedConv, FusedLinear, QATWeighted)):
        module = getattr(module, "conv", None) or getattr(module, "linear", None) or module.module
    return module if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) else None
