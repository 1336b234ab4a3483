"""``CompiledModule.to_torchscript()``: the lowered graph as a TorchScript module for serving stacks.

torch.jit is deprecated upstream but still what libtorch (C++), TorchServe and Triton's PyTorch backend
load; ``fxforge.save`` / ``fxforge.load`` is the format that round-trips every target. The graph is traced
with ``torch.jit.trace`` (it is straight-line code), after swapping the modules the tracer cannot record:
- the cpu target's oneDNN modules -> scripted twins on dense weights (``fxforge.backends.cpu_script``);
- dynamic int8 LSTM/GRU -> scripted twins holding the same packed cells (``fxforge.backends.int8_rnn_script``);
- user submodules the tracer kept whole -> ``torch.jit.script`` of them (tracing would freeze their
  control flow to the example's path).
torch.export would be the maintained route, but it rejects the int8 kernels' prepacked weights and the
oneDNN binary post-op (no fake implementations), so it does not cover the targets here.
The traced module is checked against the compiled one on the example inputs (bit-identical outputs).
Engines: a serving process sets ``torch.backends.quantized.engine`` to the engine the graph runs under
(``compiled.quant_options.runtime_engine``: "onednn" for x86, else the target's name) *before*
``torch.jit.load``, since prepacked weights are re-packed for the engine current while loading, and keeps it
while running, since quantized ops without weights (add, pooling) follow it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx, nn

from fxforge.errors import UnsupportedOpError
from fxforge.numerics.metrics import _tensors

from .codec import copy_graph_module, synthetic_inputs, user_module_paths


def _replacements(gm: fx.GraphModule) -> dict[str, nn.Module]:
    from fxforge.backends import cpu_script, int8_rnn_script

    out: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        twin = None if module is None else (cpu_script.scripted_twin(module) or int8_rnn_script.scripted_twin(module))
        if twin is not None:
            out[str(node.target)] = twin
    for path in user_module_paths(gm):
        try:
            out[path] = torch.jit.script(gm.get_submodule(path))
        except Exception as exc:
            raise UnsupportedOpError(f"submodule '{path}' was kept whole by the tracer and does not script "
                                     f"({type(exc).__name__}): use fxforge.save / fxforge.load") from exc
    return out


def to_torchscript(compiled: Any, example_inputs: Any = None) -> torch.jit.ScriptModule:
    """Trace ``compiled``'s graph into TorchScript (see the module docstring); save it with ``torch.jit.save``."""
    from fxforge.quant.qspec import quantized_engine

    gm = compiled.graph_module
    if example_inputs is None:
        inputs = synthetic_inputs(gm)
    else:
        inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    traceable = copy_graph_module(gm, _replacements(gm))
    engine = compiled.quant_options.runtime_engine if compiled.quant_options is not None else None
    with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice: the caller asked for it
        scripted = torch.jit.trace(traceable, inputs, check_trace=False)
        expected, got = compiled.graph_module(*inputs), scripted(*inputs)
    if not all(torch.equal(a, b) for a, b in zip(_tensors(got), _tensors(expected), strict=True)):
        raise UnsupportedOpError("the TorchScript module does not reproduce the compiled model's outputs on the "
                                 "example inputs: use fxforge.save / fxforge.load, and report this with the model")
    return scripted
