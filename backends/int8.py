"""The CPU int8 targets ``x86`` (oneDNN), ``fbgemm`` and ``qnnpack``: their quantization pipelines.

Each target applies its backend's qparam rules (``fxforge.quant.qspec.backend_quant``), builds the reference
int8 graph (``insert-qdq``: fp32 ops between quantize/dequantize nodes, which fixes the numerics and the
report's SQNR), then lowers it onto the engine's kernels (``lower-<engine>``, backends/int8_lowering.py).

Modes: ``static`` (default; needs calibration data), ``dynamic`` (Linear/Conv1D/LSTM/GRU weights int8,
activations quantized per call) and ``weight-only`` (Linear/Conv1D weights int8 or int4 on torch's weight-only
kernels, Embedding rows int8, fp32 activations).
"""

from __future__ import annotations

import torch

from fxforge.pipeline.fragments import compose, register_fragment
from fxforge.pipeline.targets import Target, register_target
from fxforge.pipeline.text import PassSpec

# static int8: record value ranges, calibrate them, then the reference int8 graph (quantize/dequantize around ops)
register_fragment("static-int8", "insert-observers,calibrate,insert-qdq")
# weight-only int8/int4: round the weights, then pack them for torch's weight-only kernels (any engine)
register_fragment("weight-only-int", "quantize-weight-only,lower-weight-only")


def _fuse(engine: str) -> tuple[PassSpec, PassSpec]:
    """Fuse only what the engine's int8 kernels fuse: conv+relu and linear+relu everywhere, conv+add(+relu) where
    oneDNN runs it (x86); elsewhere adds stay separate int8 ops (quantized.add_relu), other activations too."""
    conv_post_ops = "add+relu" if engine == "x86" else "relu"
    return PassSpec("fuse-conv", (("post_ops", conv_post_ops),)), PassSpec("fuse-linear", (("post_ops", "relu"),))


def static_recipe(engine: str, fusion: tuple[PassSpec, ...] | None = None) -> str:
    """The static int8 passes of ``engine`` up to its reference int8 graph (its qparam rules come with the target's
    ``quant_backend``): what its own lowering starts from, and another executor's (openvino-int8), which may fuse
    what its kernels fuse instead (``fusion``: the fuse-conv / fuse-linear specs)."""
    return compose("canonicalize", "fold-bn", *(_fuse(engine) if fusion is None else fusion), "static-int8")


def runtime_engine(engine: str) -> str | None:
    """The process-wide quantized engine ``engine``'s target runs its kernels (and its reference graph) under."""
    # conv2d_add runs only under the onednn engine; the x86 target's other kernels run the same under it
    return "onednn" if engine == "x86" and _has_engine("onednn") else None


def _pipeline(engine: str) -> str:
    return compose(static_recipe(engine), f"lower-{engine}")


def _modes(engine: str) -> dict[str, str]:
    """Pipelines of the other quantization modes."""
    return {"dynamic": compose("canonicalize", "fold-bn", "quantize-dynamic", f"lower-{engine}"),
            "weight-only": compose("canonicalize", "fold-bn", "weight-only-int")}

_DESCRIPTIONS = {
    "x86": "int8 on x86 CPUs through the 'x86' quantized engine (oneDNN/fbgemm kernels)",
    "fbgemm": "int8 on x86 CPUs through fbgemm kernels",
    "qnnpack": "int8 for ARM/mobile-class CPUs through qnnpack kernels",
}


def _has_engine(engine: str) -> bool:
    return engine in torch.backends.quantized.supported_engines


def _engine_check(engine: str):
    def unavailable() -> str | None:
        if engine not in torch.backends.quantized.supported_engines:
            return (f"this torch build has no '{engine}' quantized engine "
                    f"(available: {', '.join(torch.backends.quantized.supported_engines)})")
        return None

    return unavailable


for _name, _description in _DESCRIPTIONS.items():
    register_target(Target(
        name=_name,
        description=_description,
        pipeline=_pipeline(_name),
        availability=_engine_check(_name),
        quant_backend=_name,
        quantized_engine=runtime_engine(_name),
        mode_pipelines=_modes(_name),
    ))
