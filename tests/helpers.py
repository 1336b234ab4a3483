"""Test helpers: models with non-trivial BatchNorm, relative errors, node queries."""

from __future__ import annotations

import torch
from torch import fx, nn

from fxforge.numerics import max_errors
from fxforge.testing import randomize_bn, reestimate_bn  # noqa: F401  (re-exported for the tests)


def one_intra_op_thread():
    """Fixture body: one intra-op thread for a test module. Small graphs gain nothing from a second thread,
    and on a 2-core machine shared with another process each oneDNN call waited ~16 ms for the busy core
    (measured: sweeps ran ~20x slower), so one thread keeps run times steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_error(actual, expected) -> float:
    return max_errors(actual, expected)[1]


def output_steps(gm: fx.GraphModule, eager: tuple[torch.Tensor, ...]) -> tuple[float, ...]:
    """The quantization step of each output of an int8 graph: the scale of the quantize node it comes from
    (through dequantize and layout ops), else (an output computed in fp32) an 8-bit step of eager's range of it."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    steps = []
    for node, e in zip(output if isinstance(output, (tuple, list)) else (output,), eager, strict=True):
        while isinstance(node, fx.Node) and node.target in ("dequantize", "contiguous", "to"):
            node = node.args[0]
        if isinstance(node, fx.Node) and node.target is torch.quantize_per_tensor:
            steps.append(float(getattr(gm, str(node.args[1].target))))
        else:
            steps.append(max((e.max() - e.min()).item() if e.numel() else 0.0, 1e-6) / 255)
    return tuple(steps)


def state_snapshot(model: nn.Module) -> dict:
    """Everything compile must not touch: tensors, training flags and the submodule tree."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "modules": [(n, type(m)) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    after = state_snapshot(model)
    assert after["training"] == snapshot["training"]
    assert after["modules"] == snapshot["modules"]
    assert after["tensors"].keys() == snapshot["tensors"].keys()
    for k, v in snapshot["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} was modified"


def module_types(gm: fx.GraphModule) -> list[str]:
    """Class names of the modules called by the graph, in graph order."""
    return [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.nodes if n.op == "call_module"]


def function_targets(gm: fx.GraphModule) -> list[object]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def run_pipeline(model: nn.Module, text: str, *inputs: torch.Tensor):
    """Compile ``model`` with exactly the pipeline ``text``; returns (compiled, eager output, compiled output)."""
    import fxforge

    compiled = fxforge.compile(model, "cpu", example_inputs=inputs, pipeline=text)
    with torch.inference_mode():
        return compiled, model(*inputs), compiled(*inputs)


def close_to_eager(actual, expected, rtol: float = 1e-4, atol: float = 1e-6) -> bool:
    """Outputs within ``rtol`` of max |expected| (per output), or all within ``atol``: near-zero outputs admit no
    relative bound (a BN over a constant map gives eager ~1e-7 where the folded conv gives 0, float cancellation).
    False on NaN."""
    abs_error, rel_error_ = max_errors(actual, expected)
    return rel_error_ <= rtol or abs_error <= atol
