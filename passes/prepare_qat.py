"""prepare-qat: swap layers for their quantization-aware-training versions.

Rewrites: ``conv -> bn`` (the pairs fold-bn would fold) into ``QATConvBn`` (BatchNorm keeps training on
the output of the conv with fake-quantized folded weights), and every other Conv1d/2d/3d and Linear into
``QATWeighted`` (fake-quantized weights, per channel or per tensor as the layer's ``quant_config`` says, the
same scheme insert-qdq will use). Layers named in ``skip`` are left alone.
Why: training then sees the int8 weight rounding it will face after conversion, and BatchNorm statistics
are gathered on what the int8 conv will compute, so folding them at conversion changes nothing.
Preconditions: quantization options in the context (``fxforge.prepare_qat`` sets them); run before
insert-observers{fake_quant=true}.

Before: ``y = bn(conv(x)); z = fc(y)``
After:  ``y = conv(x); z = fc(y)``   (conv: a QATConvBn holding bn; fc: a QATWeighted)
"""

from __future__ import annotations

from torch import fx, nn

from fxforge.graph.matching import call_count, calls_module, module_of, replace_submodule
from fxforge.pipeline.context import PassContext
from fxforge.pipeline.pass_api import graph_pass
from fxforge.quant.config import QuantOptions
from fxforge.quant.ops import weight_axis
from fxforge.quant.qat_modules import QATConvBn, QATWeighted
from fxforge.quant.qspec import QSpec, backend_quant

from .fold_bn import why_not_foldable
from .insert_observers import quant_options


def _weight_spec(opts: QuantOptions, weight: QSpec, layer: nn.Module, path: str) -> QSpec:
    """The layer's weight spec: per output channel unless its quant_config says per_channel=False (as insert-qdq)."""
    kind = "linear" if isinstance(layer, nn.Linear) else "conv"
    per_channel = opts.config.resolve(path, type(layer), kind).per_channel
    return weight.with_axis(weight_axis(layer) if per_channel else None)


def _conv_bn_pairs(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    return [(n.args[0], n) for n in gm.graph.nodes
            if calls_module(gm, n, nn.modules.batchnorm._BatchNorm) and why_not_foldable(gm, n) is None
            and calls_module(gm, n.args[0], nn.modules.conv._ConvNd)
            and not isinstance(module_of(gm, n.args[0]), nn.modules.conv._ConvTransposeNd)]


@graph_pass("prepare-qat", provides=("bn-folded",))
def prepare_qat_modules(gm: fx.GraphModule, ctx: PassContext) -> bool:
    """conv -> bn => QATConvBn; other conv/linear => QATWeighted."""
    opts = quant_options(ctx, "prepare-qat")
    weight = backend_quant(opts.backend, opts.reduce_range).weight
    ctx.shapes(gm)
    swapped = 0
    for conv, bn in _conv_bn_pairs(gm):
        if opts.skipped(str(conv.target)):
            continue
        layer = module_of(gm, conv)
        spec = _weight_spec(opts, weight, layer, str(conv.target))
        replace_submodule(gm, str(conv.target), QATConvBn.from_float(layer, module_of(gm, bn), spec))
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        swapped += 1
    for node in list(gm.graph.nodes):
        layer = module_of(gm, node)
        if type(layer) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) and not opts.skipped(str(node.target)) \
                and call_count(gm, str(node.target)) == 1:
            spec = _weight_spec(opts, weight, layer, str(node.target))
            replace_submodule(gm, str(node.target), QATWeighted.from_float(layer, spec))
            swapped += 1
    gm.delete_all_unused_submodules()
    ctx.note(f"{swapped} layers prepared for quantization-aware training")
    return swapped > 0
