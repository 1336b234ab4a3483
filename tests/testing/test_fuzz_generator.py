"""The fuzzer's generator itself (fxforge.testing.graphs / FuzzModel): it reaches every op variant and shape
the fuzz tests claim to cover, its graphs paste back as Python, and its models are fair numeric references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import Phase, given, settings
from torch import fx, nn

from fxforge.testing import FuzzModel, OpChoices, graphs
from fxforge.testing.fuzz import FuzzGraph, Op, graph_shapes  # noqa: F401  (eval(repr(graph)) needs Op)
from helpers import state_snapshot

# torch warns that padding="same" with an even kernel copies the input: the fuzzer draws such convs on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


def _features(graph: FuzzGraph) -> set[str]:
    seen = {f"batch-{graph.batch}", f"input-channels-{graph.shape[0]}" if graph.shape[0] == 1 else "input-channels-n"}
    seen |= {"odd-side"} if any(n % 2 for n in graph.shape[1:]) else set()
    seen |= {"1-pixel-side"} if 1 in graph.shape[1:] else set()
    seen |= {"several-outputs"} if len(graph.outputs) > 1 else set()
    for op in graph.ops:
        seen.add(op.kind)
        seen |= _op_features(op)
    return seen


def _op_features(op: Op) -> set[str]:
    p, seen = op.params, set()
    if op.kind in ("conv", "conv_t"):
        seen |= {f"{op.kind}-{k}" for k in ("groups", "stride", "dilation") if _more_than_one(p[k])}
        seen |= {f"{op.kind}-no-bias"} if not p["bias"] else set()
    if op.kind == "conv":
        seen |= {f"conv-padding-{p['padding'] if isinstance(p['padding'], str) else 'int'}",
                 f"conv-{p['padding_mode']}"}
        seen |= {"conv-non-square"} if p["kernel_size"][0] != p["kernel_size"][1] else set()
    if op.kind == "conv_t" and p["output_padding"]:
        seen.add("conv_t-output-padding")
    if op.kind in ("act", "add", "mul", "flatten", "unflatten"):
        seen.add(f"{op.kind}-{p['spelling']}")
    seen |= {f"act-{p['fn']}"} if op.kind == "act" else set()
    if op.kind == "pool":
        args = dict(p.get("args", ()))
        seen |= {f"pool-{p['pool']}"} | {f"pool-{k}" for k in ("ceil_mode", "divisor_override") if args.get(k)}
        seen |= {"pool-exclude-padding"} if args.get("padding") and args.get("count_include_pad") is False else set()
    seen |= {"cat-negative-dim"} if op.kind == "cat" and p["dim"] < 0 else set()
    return seen


def _more_than_one(value: int | tuple[int, ...]) -> bool:
    return max(value if isinstance(value, tuple) else (value,)) > 1


def test_graphs_reach_every_op_variant_and_shape():
    seen: set[str] = set()

    @settings(max_examples=600, deadline=None, derandomize=True, phases=[Phase.generate], database=None)
    @given(graphs())
    def collect(graph: FuzzGraph) -> None:
        seen.update(_features(graph))
        shapes = graph_shapes(graph)
        seen.update("linear-on-images" for op in graph.ops if op.kind == "linear" and len(shapes[op.srcs[0]]) == 3)
        seen.update("bn-1d" for op in graph.ops if op.kind == "bn" and len(shapes[op.srcs[0]]) == 1)
        seen.update(f"{op.kind}-broadcast" for op in graph.ops
                    if op.kind in ("add", "mul") and shapes[op.srcs[0]] != shapes[op.srcs[1]])

    collect()
    expected = {
        "batch-1", "batch-3", "input-channels-1", "odd-side", "1-pixel-side", "several-outputs",
        "conv", "conv-groups", "conv-stride", "conv-dilation", "conv-no-bias", "conv-non-square",
        "conv-padding-int", "conv-padding-same", "conv-padding-valid",
        "conv-zeros", "conv-reflect", "conv-replicate", "conv-circular",
        "conv_t", "conv_t-groups", "conv_t-stride", "conv_t-dilation", "conv_t-output-padding",
        "bn", "bn-1d", "act-relu", "act-relu6", "act-hardswish", "act-silu", "act-sigmoid", "act-tanh", "act-gelu",
        *(f"act-{s}" for s in ("module", "module-inplace", "F", "F-inplace", "torch", "method", "method-inplace")),
        *(f"{k}-{s}" for k in ("add", "mul") for s in ("op", "torch", "method", "inplace")), "mul-broadcast",
        "cat", "cat-negative-dim", "pool-max", "pool-avg", "pool-adaptive_avg", "pool-adaptive_max", "pool-mean",
        "pool-ceil_mode", "pool-divisor_override", "pool-exclude-padding",
        "linear", "linear-on-images", *(f"flatten-{s}" for s in ("module", "torch", "method", "reshape", "view")),
        "unflatten",
    }
    assert expected <= seen, f"never drawn: {sorted(expected - seen)}"


@settings(max_examples=60, deadline=None, database=None)
@given(graphs())
def test_graph_repr_is_python_that_rebuilds_the_same_model(graph: FuzzGraph):
    again = eval(repr(graph))  # noqa: S307  (our own dataclass repr)
    assert again == graph
    first, second = state_snapshot(FuzzModel(graph)), state_snapshot(FuzzModel(again))
    assert first["tensors"].keys() == second["tensors"].keys()
    assert all(torch.equal(first["tensors"][k], second["tensors"][k]) for k in first["tensors"])


def test_models_are_fair_references():
    """Built in eval mode; BatchNorm is not the identity; outputs neither vanish nor explode (checked over
    many graphs: deep random nets would otherwise shrink or blow up their outputs)."""
    scales, bn_shifts = [], []

    @settings(max_examples=150, deadline=None, derandomize=True, phases=[Phase.generate], database=None)
    @given(graphs())
    def collect(graph: FuzzGraph) -> None:
        model = FuzzModel(graph)
        assert not any(m.training for m in model.modules())
        with torch.no_grad():
            outputs = model(graph.example())
        for out in outputs if isinstance(outputs, tuple) else (outputs,):
            scales.append(out.double().pow(2).mean().sqrt().item())
        for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
            bn_shifts.append((bn.running_mean.abs().max() + (bn.running_var - 1).abs().max()).item())

    collect()
    assert bn_shifts and min(bn_shifts) > 1e-3
    logs = sorted(math.log10(max(s, 1e-12)) for s in scales)
    assert logs[len(logs) // 20] >= -2 and logs[-len(logs) // 20] <= 2, "5% tails outside [0.01, 100] rms"


def test_options_narrow_what_is_drawn_and_add_blocks_an_extra_output_and_a_head():
    """OpChoices and input_sizes bound every drawn op and shape; residual_blocks, extra_output and head add their
    structure (bn and add come only from blocks here, flatten and linear only from the head)."""
    choices = OpChoices(kinds=("conv", "act", "pool"), activations=("relu",), act_spellings=("torch-inplace",),
                        binary_spellings=("method-inplace",), pools=("max",), conv_paddings=("int",),
                        padding_modes=("zeros",), conv_channels=4)
    seen: set[str] = set()

    @settings(max_examples=150, deadline=None, derandomize=True, phases=[Phase.generate], database=None)
    @given(graphs(max_ops=4, choices=choices, input_sizes=((2,), (5, 6), (7,)), residual_blocks=True,
                  extra_output=True, head=True))
    def collect(graph: FuzzGraph) -> None:
        assert graph.shape in ((2, 5, 7), (2, 6, 7))
        assert [op.kind for op in graph.ops[-2:]] == ["flatten", "linear"]
        for op in graph.ops[:-2]:
            assert op.kind in ("conv", "act", "pool", "bn", "add"), op  # bn and add: from blocks
            p = op.params
            assert op.kind != "conv" or (isinstance(p["padding"], int) and p["padding_mode"] == "zeros"
                                         and p["out_channels"] <= 4)
            assert op.kind != "act" or (p["fn"], p["spelling"]) == ("relu", "torch-inplace")
            assert op.kind != "add" or p["spelling"] == "method-inplace"
            assert op.kind != "pool" or p["pool"] == "max"
        read = {s for op in graph.ops for s in op.srcs}
        seen.update({"block"} if any(op.kind == "add" for op in graph.ops) else ())
        seen.update({"extra-output"} if len(graph.outputs) > len(set(graph.outputs) - read) else ())
        seen.add("head-pool" if graph.ops[graph.ops[-2].srcs[0] - 1].kind == "pool" else "head")

    collect()
    assert {"block", "extra-output", "head-pool", "head"} <= seen, seen


def test_spellings_drawn_on_request_trace_as_themselves():
    graph = FuzzGraph(shape=(2, 3, 3), batch=1, ops=(
        Op("act", (0,), {"fn": "relu", "spelling": "torch-inplace"}),
        Op("add", (1, 0), {"spelling": "method-inplace"}),
        Op("mul", (2, 0), {"spelling": "method-inplace"})), outputs=(3,))
    nodes = fx.symbolic_trace(FuzzModel(graph)).graph.nodes
    assert [n.target for n in nodes if n.op in ("call_function", "call_method")] == [torch.relu_, "add_", "mul_"]
