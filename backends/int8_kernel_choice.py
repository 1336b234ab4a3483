"""Choose, per layer, the engine whose int8 kernel is fastest: measured at compile time, not guessed.

torch's quantized conv/linear ops dispatch on the packed weight: a weight prepacked under the ``fbgemm`` engine
runs fbgemm's kernel, one prepacked under ``onednn`` runs oneDNN's, whatever the process-wide engine. Both
compute the same integer convolution and requantize to the same output qparams (results agree to one int8
step), but which is faster depends on the layer's shape (benchmarks/RESULTS.md, int8 notes;
``benchmarks/int8_kernels.py`` measures them). So the lowering prepacks each layer's weight for every
candidate engine, times the kernels on a random int8 input of the layer's input shape
(``fxforge.numerics.timing``: warm-up, then the best of a few calls, the engines interleaved) and keeps the
fastest packing. Layers of the same shapes share one measurement.
The choice costs a few kernel calls per layer at compile time and depends on the machine and its load;
``lower-x86{autotune=false}`` turns it off.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from fxforge.graph.meta import fxmeta, tensor_shape
from fxforge.numerics import timing
from fxforge.quant.plan import QPARAMS_KEY
from fxforge.quant.qspec import quantized_engine

SCHEDULE = timing.Schedule(warmup=2, rounds=3)  # oneDNN builds its primitive for a shape on the first call
FALLBACK_QPARAMS = (1.0 / 32, 128)  # activation qparams when the producer's cannot be found (timing only)


def available_engines(engines: Sequence[str]) -> tuple[str, ...]:
    """The candidate engines this torch build has."""
    return tuple(e for e in engines if e in torch.backends.quantized.supported_engines)


def _producer_qparams(gm: fx.GraphModule, node: Any) -> tuple[float, int]:
    """Qparams of the int8 value ``node``: its quantize node's buffers, or the kernel that wrote it, followed
    through int8 pass-through ops (pooling, flatten, clamps) that keep their input's qparams."""
    for _ in range(16):
        if not isinstance(node, fx.Node):
            break
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            names = (str(node.args[1].target), str(node.args[2].target))
        else:
            names = fxmeta(node).get(QPARAMS_KEY)
        if names is not None:
            scale, zero_point = (getattr(gm, name) for name in names)
            return float(scale), int(zero_point)
        node = node.args[0] if node.args else None
    return FALLBACK_QPARAMS


def example_int8_input(gm: fx.GraphModule, dequantize: fx.Node) -> torch.Tensor | None:
    """A random quint8 tensor shaped and quantized like the value ``dequantize`` reads (None: shape unknown)."""
    shape = tensor_shape(dequantize)
    if shape is None:
        return None
    scale, zero_point = _producer_qparams(gm, dequantize.args[0])
    generator = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, tuple(shape), generator=generator, dtype=torch.uint8)
    x = torch._make_per_tensor_quantized_tensor(values, scale, zero_point)
    # int8 kernels write channels-last outputs; the next layer reads them in that layout
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _under_engine(engine: str, kernel: Callable, *args: Any) -> Any:
    with quantized_engine(engine):
        return kernel(*args)


def fastest_prepacked(kernel: Callable, prepack: Callable[[str], Any], engines: Sequence[str],
                      x: torch.Tensor | None, scale: float, zero_point: int,
                      timer: timing.Timer = timing.wall_clock) -> tuple[str, Any]:
    """(engine, prepack(engine)) for the engine whose ``kernel(x, prepack(engine).packed, scale, zero_point)``
    is fastest (ties: the earlier engine). With one engine, or no example input, the first engine's packing is
    returned untimed.
    """
    if len(engines) == 1 or x is None:
        return engines[0], prepack(engines[0])
    # prepacked outside inference mode: the packed weight lives on in the compiled module
    packed = {engine: prepack(engine) for engine in engines}
    calls = {engine: functools.partial(_under_engine, engine, kernel, x, p.packed, scale, zero_point)
             for engine, p in packed.items()}
    with torch.inference_mode():
        engine, _ = timing.fastest(calls, SCHEDULE, timer)
    return engine, packed[engine]
