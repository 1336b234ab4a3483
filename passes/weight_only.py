"""quantize-weight-only: Linear (and transformers' Conv1D) weights onto an int8 or group-wise int4 grid,
activations untouched; Embedding rows onto int8.

Rewrites (reference numerics; lower-weight-only packs them for torch's weight-only CPU kernels):
    linear(x, W)   -> WeightOnlyLinear: W rounded per output channel (per tensor where quant_config says
                      per_channel=False) to int8 (symmetric), or, with
                      ``weight_bits=4``, per group of ``group_size`` input channels to uint4 with a scale
                      and a zero point (torch's ``_weight_int4pack_mm_for_cpu`` layout)
    Conv1D(x)      -> the same, on the Linear it equals (Conv1D keeps its weight as [in, out])
    embedding(W)   -> W's rows on the int8 grid (fp32 lookup)
``weight_bits`` and ``group_size`` come from quant_config, globally or per layer; a layer whose width the
int4 groups do not divide keeps int8. Where int4 everywhere leaves the model output below ``min_output_sqnr_db``
on the example inputs, the int4 layers that cost it most per byte saved go int8, by measured sensitivity
(``weight_only_bits``). Why correct: the modules compute the same product with each weight
replaced by its rounded value; the report gives each layer's output SQNR against fp32.
Preconditions: quantization options in the context (an int8 target with quantization="weight-only").
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from fxforge.graph.fused import FusedLinear
from fxforge.graph.matching import call_count, module_of, replace_submodule
from fxforge.pipeline.context import PassContext, clone_inputs
from fxforge.pipeline.pass_api import Pass, PassResult, register_pass
from fxforge.pipeline.report import QuantLayerRecord, QuantSummary
from fxforge.quant.config import LayerQuant, QuantOptions, layer_name
from fxforge.quant.qspec import QSpec
from fxforge.quant.reference import quantize_weight
from fxforge.quant.sqnr import capture, outputs_sqnr_db, sample_inputs

from .insert_observers import quant_options
from .weight_only_bits import Candidate, hold_floor

log = logging.getLogger(__name__)

_CONV1D = "transformers.pytorch_utils.Conv1D"
_INT8_ROWS = QSpec(torch.qint8, -127, 127, symmetric=True, axis=0)  # what _weight_int8pack_mm takes


def as_linear(module: nn.Module) -> nn.Linear | None:
    """``module`` if it is a Linear; the equivalent Linear of a transformers Conv1D (weight transposed, a
    copy); else None."""
    if isinstance(module, nn.Linear):
        return module
    kind = type(module)
    if f"{kind.__module__}.{kind.__qualname__}" != _CONV1D:
        return None
    in_features, out_features = module.weight.shape
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(module.weight.detach().t())
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach())
    return linear.to(module.weight.device)


def int4_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(uint4 values in int32 [out, in], scales [out, in/g], zeros [out, in/g]) with
    ``w ~ (q - 8) * scale + zero`` per group of ``group_size`` input channels (min/max, asymmetric)."""
    out_features = weight.shape[0]
    groups = weight.detach().float().reshape(out_features, -1, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    return q.to(torch.int32).reshape(out_features, -1), scale, low + 8 * scale


class WeightOnlyLinear(nn.Module):
    """A Linear whose weight sits on an int8 (per row) or int4 (per group) grid; runs in fp32 (reference)."""

    def __init__(self, linear: nn.Linear, bits: int, group_size: int, per_channel: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else 0
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        if bits == 8:
            spec = _INT8_ROWS if per_channel else _INT8_ROWS.with_axis(None)
            weight, scale, _ = quantize_weight(linear.weight, spec)
            scale = scale.float().expand(self.out_features).clone() if scale.dim() == 0 else scale.float()
            self.register_buffer("qweight", (weight / scale[:, None]).round().to(torch.int8))
            self.register_buffer("scales", scale)
            self.register_buffer("zeros", None)
        else:
            q, scale, zero = int4_groups(linear.weight, group_size)
            self.register_buffer("qweight", q)
            self.register_buffer("scales", scale)
            self.register_buffer("zeros", zero)
        self.register_buffer("weight", self.dequantized())

    def dequantized(self) -> Tensor:
        if self.bits == 8:
            return self.qweight.float() * self.scales[:, None]
        q = self.qweight.float().reshape(self.out_features, -1, self.group_size)
        return ((q - 8) * self.scales[..., None] + self.zeros[..., None]).reshape(self.out_features, -1)

    def packed_bytes(self) -> int:
        """The weight's size once packed: 8 or 4 bits a value, plus fp32 scales (and zeros, int4)."""
        values = self.out_features * self.in_features
        if self.bits == 8:
            return values + 4 * self.out_features
        return values // 2 + 8 * values // self.group_size

    def describe(self) -> str:
        if self.bits == 4:
            return f"int4 groups of {self.group_size}"
        return "int8 per output channel" if bool((self.scales != self.scales[0]).any()) else "int8 per tensor"

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.describe()}"


def _bits_for(settings: LayerQuant, linear: nn.Linear) -> tuple[int, int, str]:
    """(bits, group size, why) for one layer: int4 only where its groups divide the input width."""
    if settings.weight_bits == 4 and linear.in_features % settings.int4_group == 0:
        return 4, settings.int4_group, ""
    if settings.weight_bits == 4:
        return 8, 0, f" (int4 groups of {settings.int4_group} do not divide {linear.in_features} inputs)"
    return 8, 0, ""


def _quantize_embedding(embedding: nn.Embedding) -> str:
    weight, scale, zero_point = quantize_weight(embedding.weight.detach(), _INT8_ROWS)
    embedding.weight.data.copy_(weight)
    embedding.register_buffer("weight_scale", scale)
    embedding.register_buffer("weight_zero_point", zero_point)
    return "int8 per row (fp32 lookup)"


def _untie_weight(gm: fx.GraphModule, path: str, linear: nn.Linear) -> None:
    """Graph reads of the layer's weight outside the layer (a tied weight: GPT-2's token embedding reads its LM
    head's, as torch.export captures it) get their own fp32 copy, as the layer's weight is about to go."""
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == f"{path}.weight"]
    if readers:
        name = f"{path}_weight_untied".replace(".", "_")
        gm.register_buffer(name, linear.weight.detach().clone())
        for reader in readers:
            reader.target = name


def _placer(gm: fx.GraphModule, path: str, mod: nn.Module) -> Callable[[nn.Module], None]:
    """Puts a quantized version of the layer at ``path`` into the graph (inside its FusedLinear if it has one)."""
    if isinstance(mod, FusedLinear):
        return lambda quantized: setattr(mod, "linear", quantized)
    return lambda quantized: replace_submodule(gm, path, quantized)


def _rewrite(gm: fx.GraphModule, node: fx.Node, opts: QuantOptions, int4: list[Candidate]) -> str | None:
    """Quantize one node's layer; returns what its weight got, or None when it has no weight to quantize.
    An int4 layer joins ``int4`` with its int8 twin (``hold_floor`` may choose that)."""
    path = str(node.target)
    mod = module_of(gm, node)
    if mod is None or opts.skipped(path) or call_count(gm, path) != 1:
        return None
    if isinstance(mod, nn.Embedding):
        return _quantize_embedding(mod)
    linear = as_linear(mod.linear if isinstance(mod, FusedLinear) else mod)
    if linear is None:
        return None
    settings = opts.config.resolve(path, type(mod), type(mod).__name__.lower())
    bits, group, why = _bits_for(settings, linear)
    quantized = WeightOnlyLinear(linear, bits, group, settings.per_channel)
    _untie_weight(gm, path, linear)
    place = _placer(gm, path, mod)
    place(quantized)
    if bits == 4:
        twin = WeightOnlyLinear(linear, 8, 0, settings.per_channel)
        int4.append(Candidate(node.name, quantized, twin, place, twin.packed_bytes() - quantized.packed_bytes()))
    return quantized.describe() + why


def _records(gm: fx.GraphModule, before: fx.GraphModule, layers: dict[str, str], ctx: PassContext
             ) -> list[QuantLayerRecord]:
    fp32, got = capture(before, ctx.fresh_inputs(), set(layers)), capture(gm, ctx.fresh_inputs(), set(layers))
    records = []
    for node in gm.graph.nodes:
        if node.name in layers:
            sqnr = outputs_sqnr_db(fp32[node.name], got[node.name]) if node.name in got else None
            records.append(QuantLayerRecord(
                layer=layer_name(node), op=type(module_of(gm, node)).__name__, node=node.name,
                observer="none (fp32 activations)", scale=0.0, zero_point=0, activation="fp32",
                weight=layers[node.name], sqnr_db=None if sqnr is None else sqnr if math.isfinite(sqnr) else 999.0))
    return records


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _choose_bits(gm: fx.GraphModule, before: fx.GraphModule, int4: list[Candidate], layers: dict[str, str],
                 ctx: PassContext, floor_db: float) -> list[str]:
    """int4 layers the output cannot afford go int8 (``hold_floor``); each layer's weight text says what it got
    and why; returns the report notes."""
    inputs = sample_inputs(ctx.fresh_inputs())  # a large example batch would make each run costly
    start = time.perf_counter()
    with torch.no_grad():
        reference = before(*clone_inputs(inputs))
        runs = [0]

        def measure() -> float:
            runs[0] += 1
            return outputs_sqnr_db(reference, gm(*clone_inputs(inputs)))

        all_int4 = measure()
        if all_int4 >= floor_db:
            return [f"int4 output SQNR {all_int4:.1f} dB on the example inputs holds the {floor_db:.0f} dB floor"]
        final = hold_floor(int4, measure, floor_db, all_int4)
    kept = [c for c in int4 if c.int8_kept]
    for c in int4:
        got = c.int8 if c.int8_kept else c.int4
        why = f"; int8 to hold the {floor_db:.0f} dB output floor" if c.int8_kept else ""
        layers[c.name] = f"{got.describe()}, {_size(got.packed_bytes())} (int4 alone: output {c.alone_db:.1f} dB{why})"
    note = (f"int4 output SQNR {all_int4:.1f} dB is below the {floor_db:.0f} dB floor: {len(kept)} of {len(int4)} "
            f"int4 layers kept int8 (+{_size(sum(c.saved for c in kept))} weights), output {final:.1f} dB "
            f"({runs[0]} runs of the graph, {time.perf_counter() - start:.1f} s)")
    log.info("quantize-weight-only: %s", note)
    return [note]


@register_pass
@dataclass(frozen=True)
class QuantizeWeightOnly(Pass):
    """Linear/Conv1D weights -> int8 per channel or int4 per group (quant_config weight_bits, group_size);
    Embedding rows -> int8; activations stay fp32. int4 layers whose rounding costs the model output most stay
    int8 until the output SQNR on the example inputs reaches ``min_output_sqnr_db`` (-inf: every int4 layer
    stays int4)."""

    name = "quantize-weight-only"
    provides = frozenset({"quantized"})
    min_output_sqnr_db: float = 18.0

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        opts = quant_options(ctx, self.name)
        ctx.shapes(gm)
        before = copy.deepcopy(gm)
        int4: list[Candidate] = []
        layers = {n.name: d for n in list(gm.graph.nodes) if n.op == "call_module"
                  and (d := _rewrite(gm, n, opts, int4)) is not None}
        gm.recompile()
        notes = [f"{len(layers)} layers quantized (weight-only)"]
        if int4:
            notes += _choose_bits(gm, before, int4, layers, ctx, self.min_output_sqnr_db)
        ctx.report.quantization = QuantSummary(mode="weight-only", backend=opts.backend,
                                               layers=_records(gm, before, layers, ctx), skipped=list(opts.skip))
        return PassResult(gm, bool(layers), notes)
