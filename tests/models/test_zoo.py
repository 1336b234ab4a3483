"""Model sweep: random-init torchvision classifiers through the "cpu" target.

Each model gets BatchNorm statistics re-estimated on random batches first (random-init outputs otherwise
vanish, see docs/design.md, *Tests, in layers*), is compiled once per module (a 2x3x64x64 example), and is
then checked: outputs match eager within 1e-4 relative on fresh inputs at the example batch size and
others, the user's model is untouched, and the graph was really rewritten (BN folded where a conv feeds
it, every conv on oneDNN).

Input size: every model here accepts 32x32, but that leaves 1x1 feature maps at the end, whose NCHW and
NHWC strides coincide and would hide layout bugs; 64x64 keeps 2x2 and the whole sweep well under a minute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn

import fxforge
from fxforge.backends.cpu import GemmConv1x1, OneDnnConv2d
from fxforge.graph.fused import FusedConv
from helpers import assert_unchanged, module_types, one_intra_op_thread, reestimate_bn, rel_error, state_snapshot

tv_models = pytest.importorskip("torchvision.models")

pytestmark = pytest.mark.slow

RTOL = 1e-4
SIZE = 64
EXAMPLE_BATCH = 2
_BN = nn.modules.batchnorm._BatchNorm
_ANY_CONV = (nn.modules.conv._ConvNd, FusedConv, OneDnnConv2d, GemmConv1x1)  # as traced, fused, lowered

ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: tv_models.resnet18(),
    "resnet50": lambda: tv_models.resnet50(),
    "mobilenet_v2": lambda: tv_models.mobilenet_v2(),
    "mobilenet_v3_large": lambda: tv_models.mobilenet_v3_large(),
    "efficientnet_b0": lambda: tv_models.efficientnet_b0(),
    "shufflenet_v2_x1_0": lambda: tv_models.shufflenet_v2_x1_0(),
    "regnet_x_400mf": lambda: tv_models.regnet_x_400mf(),
    "densenet121": lambda: tv_models.densenet121(),
    "googlenet": lambda: tv_models.googlenet(aux_logits=False, init_weights=True),
    "convnext_tiny": lambda: tv_models.convnext_tiny(),
}
# BatchNorms that no conv feeds directly (densenet normalizes the concatenated features): nothing to fold.
UNFOLDABLE_BN = {"densenet121"}


one_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    snapshot: dict
    example: torch.Tensor
    compiled: fxforge.CompiledModule


def _inputs(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(ZOO))
def case(request: pytest.FixtureRequest) -> ZooCase:
    torch.manual_seed(0)  # weight init
    model = reestimate_bn(ZOO[request.param](), [_inputs(4, 1), _inputs(4, 2)])
    snapshot = state_snapshot(model)
    example = _inputs(EXAMPLE_BATCH, 3)
    compiled = fxforge.compile(model, "cpu", example_inputs=example)
    return ZooCase(request.param, model, snapshot, example, compiled)


def _check_matches_eager(case: ZooCase, x: torch.Tensor) -> None:
    assert not (x.shape == case.example.shape and torch.equal(x, case.example)), "use a fresh input"
    with torch.no_grad():
        expected = case.model(x)
    assert expected.std() > 1e-2, "reference output vanishes: the comparison would be meaningless"
    actual = case.compiled(x)
    assert actual.shape == expected.shape
    err = rel_error(actual, expected)
    assert err <= RTOL, f"{case.name}: relative error {err:.3g} at batch {x.shape[0]}"


def test_matches_eager_on_fresh_input(case: ZooCase) -> None:
    _check_matches_eager(case, _inputs(EXAMPLE_BATCH, 4))
    assert case.compiled.report.max_rel_error is not None and case.compiled.report.max_rel_error <= RTOL


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_eager_at_other_batch_sizes(case: ZooCase, batch: int) -> None:
    _check_matches_eager(case, _inputs(batch, 10 + batch))


def test_user_model_unchanged(case: ZooCase) -> None:
    case.compiled(_inputs(EXAMPLE_BATCH, 5))
    assert_unchanged(case.model, case.snapshot)
    assert all(not m.training for m in case.model.modules())


def _calls(gm: fx.GraphModule, node: object, types: type | tuple[type, ...]) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(str(node.target)), types))


def test_batchnorm_folded(case: ZooCase) -> None:
    gm = case.compiled.graph_module
    bn_before = sum(isinstance(m, _BN) for m in case.model.modules())
    bn_after = [n for n in gm.graph.nodes if _calls(gm, n, _BN)]
    after_conv = [str(n.target) for n in bn_after if _calls(gm, n.args[0], _ANY_CONV)]
    assert not after_conv, f"{case.name}: BN left right after a conv: {after_conv[:5]}"
    if case.name in UNFOLDABLE_BN:
        assert 0 < len(bn_after) < bn_before, "the BNs after convs are folded, the ones after concats kept"
    else:
        assert not bn_after, f"{case.name}: {len(bn_after)} of {bn_before} BatchNorms left"
    if bn_before:
        assert any(r.name == "fold-bn" and r.modified for r in case.compiled.report.passes)


def test_every_conv_lowered_to_onednn(case: ZooCase) -> None:
    convs = sum(isinstance(m, nn.Conv2d) for m in case.model.modules())
    types = module_types(case.compiled.graph_module)
    lowered = types.count("OneDnnConv2d") + types.count("GemmConv1x1")  # GEMMs: pointwise convs on 1x1 maps
    assert lowered == convs, f"{case.name}: {lowered} of {convs} convs lowered"
    assert not [t for t in types if t in ("Conv2d", "FusedConv")], "conv left on the eager path"
