"""Value-by-value errors between two graphs of one trace: ``local_errors`` at a value's first node (what an
op adds to its fp32 result) and, with ``rounded=True``, at its final rounded form (what an int8 kernel must
reproduce exactly)."""

from __future__ import annotations

import pytest
import torch
from quant_helpers import batches, compile_reference
from torch import fx, nn

import fxforge
from fxforge.numerics.provenance import capture, local_errors, value_keys
from fxforge.quant.qspec import quantized_engine
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)
INT8 = next((t for t in ("x86", "fbgemm", "qnnpack") if t in fxforge.targets()), None)
pytestmark = pytest.mark.skipif(INT8 is None, reason="no int8 engine in this torch build")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _conv_step(gm: fx.GraphModule) -> tuple[str, float]:
    """(key, quantization step) of the last conv's quantized output in a reference int8 graph."""
    keys = value_keys(gm)
    q = [n for n in gm.graph.nodes if n.target is torch.quantize_per_tensor][-1]
    return keys[q.name], float(getattr(gm, str(q.args[1].target)))


def test_rounded_errors_compare_int8_values_after_the_references_rounding():
    x = batches(1, seed=3)[0]
    reference = compile_reference(_model(), x, INT8)
    lowered = fxforge.compile(_model(), INT8, example_inputs=x, calibration=batches(4, tuple(x.shape)))
    key, step = _conv_step(reference.graph_module)
    with quantized_engine(lowered.quant_options.runtime_engine), torch.no_grad():
        values, _ = capture(lowered.graph_module, (x,))
        rounded = local_errors(reference.graph_module, (x,), values, rounded=True)
        unrounded = local_errors(reference.graph_module, (x,), values)
        assert rounded[key].max_abs_error <= step * (1 + 1e-4) and rounded[key].differing < 0.05
        assert 0 < unrounded[key].max_abs_error < step  # against the fp32 conv: the rounding itself
        broken = dict(values)
        broken[key] = values[key].contiguous().clone()
        broken[key].view(-1)[5] += 3 * step  # one value three steps off
        off = local_errors(reference.graph_module, (x,), broken, rounded=True)[key]
    assert off.max_abs_error == pytest.approx(3 * step, rel=1e-3)
    assert off.differing >= 1 / values[key].numel()
