"""The OpenVINO targets: fxforge optimizes (fp32) or quantizes (int8) the graph, OpenVINO's CPU runtime runs it.

Targets: ``openvino`` (fp32), ``openvino-int8`` (static int8 with the ``x86`` target's qparam rules and the
``static-int8`` fragment, after the fusion OpenVINO's int8 kernels take: ``INT8_FUSION``), ``openvino-bf16``
(CPUs with native bf16). fxforge stays the quantizer
(observer search, accuracy budget, report); OpenVINO is the executor, as ``torch.compile(backend="openvino")``.

lower-openvino rewrites the whole graph into one call:
    x -> (the graph) -> y    =>    x -> openvino(x) -> getitem 0..n-1 -> y   (the model's output structure kept)
``openvino`` is an ``OpenVinoModule``: the graph as ONNX, as ``export_onnx`` writes it (fp32: the graph itself;
int8: the QDQ graph of ``onnx_qdq`` with this compile's qparams and int8 weights, which OpenVINO fuses into
int8 kernels), and OpenVINO's compiled model of it.
Why correct: the ONNX graph computes the graph's function (fp32: the same ops and weights; int8: the reference
int8 graph's quantize / dequantize points and int8 weights); OpenVINO's kernels differ by summation order and,
for int8, by where they requantize. The build compares the output with eager (fp32) or reports its SQNR (int8,
bf16) as for the other targets.
Compile settings: PERFORMANCE_HINT LATENCY; INFERENCE_NUM_THREADS = ``torch.get_num_threads()`` when the OpenVINO
model is compiled (at ``fxforge.compile``, and again where a copied, pickled or loaded module is rebuilt from its
ONNX bytes); INFERENCE_PRECISION_HINT f32 (OpenVINO's CPU plugin runs bf16 on bf16-capable CPUs otherwise), bf16
for ``openvino-bf16``. Dynamic dims are those of the compiled call's signature, all others static; calls at the
compiled example's shapes run a copy of the model with every dim fixed (OpenVINO infers shapes on every call of
a dynamic model: 2-18% of a batch-1 call, ``benchmarks/openvino_profile.py``), other shapes the dynamic one,
compiled on the first such call.
Report: the convs / matmuls OpenVINO executes, per runtime precision (``get_runtime_model()``); fewer int8 ones
than the compile quantized is degradation, warned about.
Preconditions: the ``openvino`` package (``pip install 'fxforge[openvino]'``); int8: the reference graph of a
static int8 compile without correct-bias (``onnx_qdq``).
"""

from __future__ import annotations

import logging
import operator
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fxforge.capture.signature import CallSignature
from fxforge.driver.health import warn
from fxforge.errors import BackendUnavailableError, ConfigError, ExportError, UnsupportedOpError
from fxforge.graph.matching import module_of
from fxforge.graph.meta import fxmeta, record_rewrite
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.fragments import compose
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.targets import Target, register_target
from fxforge.pipeline.text import PassSpec
from fxforge.quant.config import QuantOptions
from fxforge.quant.ops import weighted_layer
from fxforge.quant.plan import COMPUTE, stored
from fxforge.serialization.codec import synthetic_inputs
from fxforge.serialization.deploy import register_deploy_writer
from fxforge.serialization.onnx import export_onnx
from fxforge.serialization.torchscript import register_scripted_twin

from .int8 import runtime_engine, static_recipe

log = logging.getLogger(__name__)

INSTALL = "pip install 'fxforge[openvino]'"
MODULE_NAME = "openvino"  # the lowered graph's one submodule
# openvino-int8's fusion: OpenVINO fuses relu6 and silu (efficientnet's swish) into an int8 conv when no quantize /
# dequantize pair sits between them, so they are fused before quantization (the x86 recipe quantizes the conv's
# output first: efficientnet_b0 ran ~15% slower on OpenVINO and 1 dB less accurate). hardswish stays an op of its
# own: fused, mobilenet_v3_large's SQNR fell by 1.8 dB (benchmarks/RESULTS.md).
INT8_FUSION = (PassSpec("fuse-conv", (("post_ops", "add+relu+relu6+silu"),)),
               PassSpec("fuse-linear", (("post_ops", "relu+relu6+silu"),)))
INT8_RECIPE = static_recipe("x86", INT8_FUSION)
COMPUTE_LAYERS = frozenset({"Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul", "Gemm"})
INT8_PRECISIONS = frozenset({"i8", "u8"})


def _openvino() -> Any:
    try:  # optional dependency ([openvino] extra): only these targets need it
        import openvino
    except ImportError as exc:
        raise BackendUnavailableError(f"the OpenVINO targets need the openvino package: {INSTALL}") from exc
    return openvino


def unavailable_reason() -> str | None:
    """None when OpenVINO imports here, else why the targets cannot run."""
    try:
        _openvino()
    except BackendUnavailableError as exc:
        return str(exc)
    return None


def bf16_unavailable_reason() -> str | None:
    """``openvino-bf16``: OpenVINO's CPU plugin must report native bf16 (AVX512-BF16 or AMX)."""
    reason = unavailable_reason()
    if reason is None and "BF16" not in _openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "OpenVINO reports no native bf16 on this CPU (OPTIMIZATION_CAPABILITIES): use 'openvino' (fp32)"
    return reason


def compile_config(precision: str) -> dict[str, Any]:
    """OpenVINO's CPU settings (module docstring); the thread count is read now."""
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "INFERENCE_PRECISION_HINT": precision}


class OpenVinoModule(nn.Module):
    """A whole graph run by OpenVINO: the ONNX model (``onnx``, bytes) and OpenVINO's compiled model of it.

    ``shapes``: the compiled example's input shapes; calls at those shapes run ``compiled_model``, the model with
    every dim fixed to them; other shapes run the ONNX model's own (dynamic) dims, compiled on the first such call.
    Copies and pickles (``fxforge.save``) carry the bytes and compile them again (``__setstate__``): the compiled
    models are not state. Tensors in and out: inputs are handed to OpenVINO without a copy (contiguous CPU tensors),
    outputs are OpenVINO's copies of its result buffers, which the next call reuses. Calls are serialized (one
    inference request per compiled model).
    """

    def __init__(self, onnx: bytes, precision: str = "f32", shapes: tuple[tuple[int, ...], ...] | None = None) -> None:
        super().__init__()
        self.onnx, self.precision, self.shapes = onnx, precision, shapes
        self._compile()

    def _compiled(self, shapes: tuple[tuple[int, ...], ...] | None) -> Any:
        core = _openvino().Core()
        model = core.read_model(self.onnx)
        if shapes is not None:
            model.reshape({i: list(shape) for i, shape in enumerate(shapes)})
        return core.compile_model(model, "CPU", compile_config(self.precision))

    def _compile(self) -> None:
        compiled = self._compiled(self.shapes)
        self.__dict__.update(compiled_model=compiled, request=compiled.create_infer_request(), dynamic_request=None,
                             lock=threading.Lock())

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for derived in ("compiled_model", "request", "dynamic_request", "lock"):
            state.pop(derived, None)
        return state

    def __setstate__(self, state: dict) -> None:
        state.setdefault("shapes", None)
        super().__setstate__(state)
        self._compile()

    def _request(self, arrays: list[Any]) -> Any:
        """The inference request for these inputs' shapes (called under the lock)."""
        if self.shapes is None or tuple(a.shape for a in arrays) == self.shapes:
            return self.request
        if self.dynamic_request is None:
            self.__dict__["dynamic_request"] = self._compiled(None).create_infer_request()
        return self.dynamic_request

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if torch.compiler.is_exporting():  # a program cannot call OpenVINO (compiled.export refuses before this)
            raise ExportError("OpenVINO's compiled model cannot be traced into a torch.export program: export the "
                              "ONNX model it runs, or compile for 'cpu' / 'x86'", op=MODULE_NAME)
        arrays = [x.detach().contiguous().numpy() for x in inputs]
        with self.lock:
            results = self._request(arrays).infer(arrays, share_inputs=True, share_outputs=False)
        return tuple(torch.from_numpy(array) for array in results.to_tuple())

    def executed_layers(self) -> Counter[tuple[str, str]]:
        """(layer type, runtime precision) -> count of the convs / matmuls OpenVINO executes."""
        counts: Counter[tuple[str, str]] = Counter()
        for op in self.compiled_model.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            kind = info["layerType"].astype(str)
            if kind in COMPUTE_LAYERS:
                counts[kind, info["runtimePrecision"].astype(str).lower()] += 1
        return counts

    def extra_repr(self) -> str:
        return f"onnx={len(self.onnx)} bytes, precision={self.precision}"


@dataclass(frozen=True)
class _Compile:
    """What ``export_onnx`` reads of a compiled model, taken from the compile in progress."""

    graph_module: fx.GraphModule
    target: str
    pipeline: str
    quant_options: QuantOptions | None
    observed_graph: fx.GraphModule | None
    signature: CallSignature | None


def onnx_bytes(gm: fx.GraphModule, ctx: PassContext) -> bytes:
    """The graph as ``compiled.export("x.onnx")`` would write it (``export_onnx``, QDQ for static int8)."""
    source = _Compile(gm, ctx.target, ctx.report.pipeline, ctx.quant, ctx.artifacts.get("observed_graph"),
                      ctx.signature)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(source, Path(folder) / "model.onnx")
        if len(list(Path(folder).iterdir())) > 1:
            raise ExportError("the ONNX model keeps its weights in external data files (over 2 GB), which the "
                              "OpenVINO targets do not hold: compile for 'cpu' or 'x86'", op=MODULE_NAME)
        return path.read_bytes()


def single_call(gm: fx.GraphModule, module: OpenVinoModule, pass_name: str) -> fx.GraphModule:
    """``gm``'s placeholders -> one call of ``module`` on the unbound ones -> its outputs in ``gm``'s structure."""
    graph, env = fx.Graph(), {}
    for node in gm.graph.find_nodes(op="placeholder"):
        env[node] = graph.node_copy(node, lambda n: env[n])
    inputs = [env[n] for n in gm.graph.find_nodes(op="placeholder") if not fxmeta(n).get("bound")]
    call = graph.call_module(MODULE_NAME, tuple(inputs))
    leaves, spec = tree_flatten(gm.graph.output_node().args[0])
    values = [leaf for leaf in leaves if isinstance(leaf, fx.Node)]
    held = module.compiled_model
    if (len(held.inputs), len(held.outputs)) != (len(inputs), len(values)):
        raise ExportError(f"the ONNX model takes {len(held.inputs)} inputs and gives {len(held.outputs)} outputs "
                          f"for the graph's {len(inputs)} and {len(values)}: compile for 'cpu' or 'x86'",
                          op=MODULE_NAME)
    outputs = iter(range(len(values)))
    new_leaves = []
    for leaf in leaves:
        if isinstance(leaf, fx.Node):
            item = graph.call_function(operator.getitem, (call, next(outputs)))
            record_rewrite(item, pass_name, leaf)
            leaf = item
        new_leaves.append(leaf)
    graph.output(tree_unflatten(new_leaves, spec))
    return fx.GraphModule({MODULE_NAME: module}, graph, type(gm).__name__).eval()


def quantized_layers(observed: fx.GraphModule | None) -> int:
    """The conv / linear layers a static int8 compile quantized (their weights are int8 in the QDQ graph)."""
    if observed is None:
        return 0
    layers = {id(layer) for node in observed.graph.nodes if stored(node).get("role") == COMPUTE
              and (layer := weighted_layer(module_of(observed, node))) is not None}
    return len(layers)


def describe_execution(module: OpenVinoModule, ctx: PassContext) -> str:
    """The report's line on what OpenVINO executes; a warning when quantized layers run in a float precision."""
    counts = module.executed_layers()
    shown = ", ".join(f"{n} {kind} {precision}" for (kind, precision), n in sorted(counts.items())) or "none"
    line = (f"OpenVINO {_openvino().get_version().split('-')[0]} runs the graph (ONNX, {len(module.onnx)} bytes; "
            f"{module.precision} precision hint, {module.compiled_model.get_property('INFERENCE_NUM_THREADS')} "
            f"threads, latency hint); executed convs / matmuls: {shown}")
    log.info("%s", line)
    expected = quantized_layers(ctx.artifacts.get("observed_graph")) if ctx.quant is not None else 0
    int8 = sum(n for (_, precision), n in counts.items() if precision in INT8_PRECISIONS)
    if int8 < expected:
        warn(ctx.report, f"OpenVINO runs {expected - int8} of the {expected} quantized conv / linear layers in a "
                         f"float precision (executed: {shown}): the int8 speed-up is lost there while the report's "
                         "SQNR is of int8 numerics; compare with target 'x86'")
    return line


def lower(gm: fx.GraphModule, ctx: PassContext, precision: str, pass_name: str) -> PassResult:
    """The graph -> one OpenVinoModule call (module docstring)."""
    if ctx.quant is not None and "quantized" not in ctx.properties:
        raise ConfigError(f"{pass_name} on an int8 target runs the reference int8 graph: put it after insert-qdq")
    shapes = tuple(tuple(x.shape) for x in synthetic_inputs(gm))
    module = OpenVinoModule(onnx_bytes(gm, ctx), precision, shapes).eval()
    lowered = single_call(gm, module, pass_name)
    ctx.shapes(lowered, refresh=True)
    return PassResult(lowered, True, [describe_execution(module, ctx)])


@register_pass
@dataclass(frozen=True)
class LowerOpenVino(Pass):
    """The whole graph (fp32, or the reference int8 graph) onto OpenVINO's CPU runtime in fp32 precision."""

    name = "lower-openvino"
    provides = frozenset({"lowered"})
    precision = "f32"

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        return lower(gm, ctx, self.precision, self.name)


@register_pass
@dataclass(frozen=True)
class LowerOpenVinoBf16(LowerOpenVino):
    """lower-openvino with OpenVINO's bf16 inference precision (fp32 in and out)."""

    name = "lower-openvino-bf16"
    provides = frozenset({"lowered", "reduced-precision"})
    precision = "bf16"


@register_deploy_writer
def write_held_onnx(compiled: Any, format: str, path: Path, options: dict[str, Any]) -> Path | None:
    """An OpenVINO compile deploys as the ONNX model it runs; the torch formats cannot hold OpenVINO's model."""
    gm = getattr(compiled, "graph_module", None)
    module = dict(gm.named_children()).get(MODULE_NAME) if isinstance(gm, fx.GraphModule) else None
    if not isinstance(module, OpenVinoModule):
        return None
    fallback = "x86" if compiled.quant_options is not None else "cpu"
    if format != "onnx":
        raise ExportError(f"target {compiled.target!r} runs in OpenVINO, which a {format} file cannot hold: export "
                          f"the ONNX model it runs (.onnx), or compile for {fallback!r} and export that",
                          op=MODULE_NAME)
    if options.get("opset") is not None or options.get("dynamic", True) is False:
        raise ConfigError(f"target {compiled.target!r} holds the ONNX model it runs (the compiled dynamic dims, "
                          f"torch.onnx's opset): opset= and dynamic=False need a new export; compile for "
                          f"{fallback!r} and export that")
    path.write_bytes(module.onnx)
    return path


@register_scripted_twin
def no_scripted_twin(module: nn.Module) -> None:
    """TorchScript cannot call OpenVINO (tracing would record its outputs as constants): refused."""
    if isinstance(module, OpenVinoModule):
        raise UnsupportedOpError("a model running in OpenVINO has no TorchScript form: deploy the ONNX model it runs "
                                 "(compiled.export('model.onnx')), or compile for 'cpu' / 'x86'")


_FLOAT_TARGETS = {  # name: (lowering, availability, description)
    "openvino": ("lower-openvino", unavailable_reason,
                 "fp32 on OpenVINO's CPU runtime: BN folded by fxforge, the graph as ONNX compiled by OpenVINO"),
    "openvino-bf16": ("lower-openvino-bf16", bf16_unavailable_reason,
                      "bf16 on OpenVINO's CPU runtime (CPUs with AVX512-BF16 / AMX); fp32 in and out, output SQNR "
                      "vs fp32 in the report"),
}
for _name, (_lowering, _availability, _description) in _FLOAT_TARGETS.items():
    register_target(Target(name=_name, description=f"{_description} (needs {INSTALL})",
                           pipeline=compose("canonicalize", "fold-bn", _lowering), availability=_availability))
register_target(Target(
    name="openvino-int8",
    description="static int8 quantized by fxforge (the x86 target's qparam rules), run by OpenVINO's CPU runtime "
                f"from the QDQ ONNX graph (needs {INSTALL})",
    pipeline=compose(INT8_RECIPE, "lower-openvino"),
    availability=unavailable_reason,
    quant_backend="x86",
    quantized_engine=runtime_engine("x86"),
))
