"""``fxforge.prepare_qat``: a trainable copy of a model that simulates the target's int8 rounding.

The returned GraphModule holds QATConvBn / QATWeighted layers (fake-quantized weights, BatchNorm kept
training) and a FakeQuantize (observer + straight-through rounding) at every point the int8 model will
quantize: the same points ``compile`` chooses, so the trained qparams carry over one to one. Train it as
usual, call ``.eval()``, then ``fxforge.compile(trained, target, example_inputs=...)``: the QAT layers are
folded back to plain layers (BN with its running statistics) and the fake-quants' qparams are used; no
calibration data is needed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from fxforge.capture.signature import example_args
from fxforge.capture.tracing import trace
from fxforge.errors import ConfigError
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.manager import PassManager
from fxforge.pipeline.report import CompileReport
from fxforge.pipeline.targets import resolve_target
from fxforge.quant.config import QuantConfig, QuantOptions, check_skip_names
from fxforge.quant.qat_modules import QATConvBn, QATWeighted

QAT_PIPELINE = "normalize-inplace,normalize-relu,prepare-qat,insert-observers{fake_quant=true}"


def prepare_qat(model: nn.Module, target: str, example_inputs: Any, *, quant_config: QuantConfig | dict | None = None,
                skip: str | Sequence[str] = ()) -> fx.GraphModule:
    """A training-mode copy of ``model`` with fake quantization for ``target`` (x86, fbgemm or qnnpack).

    Activation observers default to moving-average min/max (cheap per step, robust to early outliers).
    The user's model is not modified.
    """
    tgt = resolve_target(target)
    if tgt.quant_backend is None:
        raise ConfigError(f"prepare_qat needs an int8 target (x86, fbgemm, qnnpack), not '{tgt.name}'")
    inputs, keywords = example_args(example_inputs)
    if keywords:
        raise ConfigError(f"prepare_qat traces positional inputs; got keyword example inputs {sorted(keywords)}: "
                          "pass them as a tuple in forward's order")
    config = QuantConfig.from_value(quant_config if quant_config is not None else QuantConfig("moving-average"))
    skip = check_skip_names(model, skip)
    work = copy.deepcopy(model).eval()  # eval while preparing: shape propagation must not move BN statistics
    gm = trace(work, inputs).gm
    ctx = PassContext(inputs, CompileReport(tgt.name, QAT_PIPELINE, torch.__version__), target=tgt.name,
                      quant=QuantOptions(mode="qat", backend=tgt.quant_backend, config=config, skip=skip))
    ctx.propagate(gm)
    gm = PassManager.from_text(QAT_PIPELINE).run(gm, ctx)
    return gm.train()


def convert_qat_layers(model: nn.Module) -> int:
    """Replace QAT layers by plain ones in place (BN folded with its running statistics); returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, (QATConvBn, QATWeighted)):
            setattr(model, name, child.to_float().train(child.training))
            count += 1
        else:
            count += convert_qat_layers(child)
    return count
