"""``CompiledModule.to_torchscript()``: the lowered graph as a TorchScript module for serving stacks.

torch.jit is deprecated upstream but still what libtorch (C++), TorchServe and Triton's PyTorch backend
load; ``fxforge.save`` / ``fxforge.load`` is the format that round-trips every target. The graph is traced
with ``torch.jit.trace`` (it is straight-line code), after swapping the modules the tracer cannot record:
- the cpu target's oneDNN modules -> scripted twins on dense weights (``fxforge.backends.cpu_script``);
- dynamic int8 LSTM/GRU -> scripted twins holding the same packed cells (``fxforge.backends.int8_rnn_script``);
  backends register these converters on import (``register_scripted_twin``): this module never imports them;
- user submodules the tracer kept whole -> ``torch.jit.script`` of them (tracing would freeze their
  control flow to the example's path).
torch.export would be the maintained route, but it rejects the int8 kernels' prepacked weights and the
oneDNN binary post-op (no fake implementations), so it does not cover the targets here.
The traced module is checked against the compiled one on the example inputs (bit-identical outputs). It takes
the graph's flat tensor inputs and returns its flat outputs: example inputs given as keyword arguments are
flattened by the compiled model's call signature, and the model's output structure is not kept.
Engines: a serving process sets ``torch.backends.quantized.engine`` to the engine the graph runs under
(``compiled.quant_options.runtime_engine``: "onednn" for x86, else the target's name) *before*
``torch.jit.load``, since prepacked weights are re-packed for the engine current while loading, and keeps it
while running, since quantized ops without weights (add, pooling) follow it. ``save_torchscript`` records that
engine and the CPU facts the kernels assume (``isa``) in the archive (``extra/fxforge.json``, read by
``torchscript_metadata``); ``load_torchscript`` checks them and loads under the engine.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from fxforge.capture.signature import graph_inputs
from fxforge.errors import ArtifactError, UnsupportedOpError
from fxforge.numerics.metrics import flat_tensors
from fxforge.quant.qspec import quantized_engine

from .codec import copy_graph_module, synthetic_inputs, user_module_paths
from .isa import check_isa, isa_facts

ScriptedTwin = Callable[[nn.Module], torch.jit.ScriptModule | None]  # a runtime module's twin; None: not its kind
_TWINS: list[ScriptedTwin] = []  # filled by the backends on import


def register_scripted_twin(twin: ScriptedTwin) -> ScriptedTwin:
    """Let ``to_torchscript`` swap the runtime modules ``twin`` recognizes for scripted twins (a decorator)."""
    if twin not in _TWINS:
        _TWINS.append(twin)
    return twin


def _twin(module: nn.Module) -> torch.jit.ScriptModule | None:
    for convert in _TWINS:
        twin = convert(module)
        if twin is not None:
            return twin
    return None


def _replacements(gm: fx.GraphModule) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        twin = _twin(gm.get_submodule(str(node.target))) if node.op == "call_module" else None
        if twin is not None:
            out[str(node.target)] = twin
    for path in user_module_paths(gm):
        try:
            out[path] = torch.jit.script(gm.get_submodule(path))
        except Exception as exc:
            raise UnsupportedOpError(f"submodule '{path}' was kept whole by the tracer and does not script "
                                     f"({type(exc).__name__}): use fxforge.save / fxforge.load") from exc
    return out


def _trace(traceable: fx.GraphModule, inputs: tuple) -> torch.jit.ScriptModule:
    try:
        return torch.jit.trace(traceable, inputs, check_trace=False)
    except Exception as exc:  # typically a runtime module no registered twin converted
        foreign = sorted({type(m).__name__ for m in traceable.modules()
                          if not type(m).__module__.startswith("torch.") and m is not traceable})
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnsupportedOpError(
            f"torch.jit.trace failed on the compiled graph ({type(exc).__name__}: {first}). Modules it holds that "
            f"are not torch's: {', '.join(foreign) or 'none'}; backends register TorchScript twins of their runtime "
            f"modules on import (import fxforge.backends). Or use fxforge.save / fxforge.load") from exc


def to_torchscript(compiled: Any, example_inputs: Any = None) -> torch.jit.ScriptModule:
    """Trace ``compiled``'s graph into TorchScript (see the module docstring); save it with ``torch.jit.save``."""
    gm = compiled.graph_module
    inputs = synthetic_inputs(gm) if example_inputs is None else graph_inputs(compiled.signature, example_inputs)
    traceable = copy_graph_module(gm, _replacements(gm))
    engine = compiled.quant_options.runtime_engine if compiled.quant_options is not None else None
    with quantized_engine(engine), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice: the caller asked for it
        scripted = _trace(traceable, inputs)
        expected, got = compiled.graph_module(*inputs), scripted(*inputs)
    if not all(torch.equal(a, b) for a, b in zip(flat_tensors(got), flat_tensors(expected), strict=True)):
        raise UnsupportedOpError("the TorchScript module does not reproduce the compiled model's outputs on the "
                                 "example inputs: use fxforge.save / fxforge.load, and report this with the model")
    return scripted


METADATA = "fxforge.json"  # the extra file save_torchscript adds to the TorchScript archive


def save_torchscript(compiled: Any, path: str | Path, example_inputs: Any = None) -> Path:
    """``to_torchscript`` written to ``path`` with the engine and CPU facts a serving process needs."""
    scripted = to_torchscript(compiled, example_inputs)
    isa = isa_facts(compiled)
    meta = {"target": compiled.target, "engine": isa["engine"], "torch_version": torch.__version__, "isa": isa}
    torch.jit.save(scripted, str(path), _extra_files={METADATA: json.dumps(meta, indent=2)})
    return Path(path)


def torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """What ``save_torchscript`` recorded (read from the archive: nothing is loaded)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next((n for n in archive.namelist() if n.endswith(f"/extra/{METADATA}")), None)
            if name is None:
                raise ArtifactError(f"{path} holds no {METADATA}: it was not written by save_torchscript")
            return json.loads(archive.read(name))
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not a TorchScript archive from save_torchscript ({exc})") from None


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """A module from ``save_torchscript``, loaded under its engine once this CPU is known to run it correctly
    (``BackendUnavailableError`` otherwise). TorchScript archives hold code: load only files you trust. Run the
    module under the same engine (``torchscript_metadata(path)["engine"]``)."""
    meta = torchscript_metadata(path)
    check_isa(meta["isa"])
    with quantized_engine(meta["engine"]):
        return torch.jit.load(str(path))
