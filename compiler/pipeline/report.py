"""CompileReport: what was done to the model, how long it took, and what it cost in accuracy."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fxforge.errors import ConfigError, suggest
from fxforge.graph.snapshot import GraphStage
from fxforge.version import __version__

from .renderers import html_report_writer

SCHEMA_VERSION = 1  # of CompileReport.to_dict (report.json)


@dataclass
class PassRecord:
    name: str
    spec: str
    seconds: float
    nodes_before: int
    nodes_after: int
    modified: bool
    notes: list[str] = field(default_factory=list)
    matches: dict[str, int] = field(default_factory=dict)  # rewrite rule -> times it fired (fxforge.patterns)


@dataclass
class QuantLayerRecord:
    """One quantization point: the layer whose output it is, its qparams and what it costs (dB)."""

    layer: str
    op: str
    node: str
    observer: str
    scale: float
    zero_point: int
    activation: str
    weight: str = ""
    local_sqnr_db: float | None = None  # this layer's own error, on the same (quantized) inputs
    sqnr_db: float | None = None  # accumulated error at this point, against the fp32 model
    # search-observers: what it compared here ("configured -> chosen", "" when not searched) and the local
    # SQNR gain of the kept choice over the configured one, on the search data
    search: str = ""
    search_gain_db: float | None = None


@dataclass
class QuantSummary:
    mode: str
    backend: str
    reduce_range: bool = False
    layers: list[QuantLayerRecord] = field(default_factory=list)
    islands: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    calibration_batches: int = 0
    model_sqnr_db: float | None = None
    reference: str = "fp32"  # what SQNRs are measured against (a QAT model: itself, with fake quantization)
    search: str = ""  # search-observers: one line on what it searched, on which data, at what cost

    def lines(self) -> list[str]:
        out = [f"quantization: {self.mode} int8 for {self.backend}"
               + (" (reduce_range, no VNNI: 7-bit static weights, 7-bit dynamic activations)"
                  if self.reduce_range else "")]
        if self.model_sqnr_db is not None:
            out.append(f"model output SQNR vs {self.reference} on the example inputs: {self.model_sqnr_db:.1f} dB")
        if self.search:
            out.append(f"{self.search}; per layer: [search: gain in local dB over the configured choice]")
        out.append(f"  {'layer':<28}{'op':<16}{'scale':>11}{'zp':>5}{'local dB':>10}{'cum dB':>8}  observer / weight")
        for r in self.layers:
            local = "-" if r.local_sqnr_db is None else f"{r.local_sqnr_db:.1f}"
            cum = "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}"
            weight = f" / {r.weight}" if r.weight else ""
            searched = "" if r.search_gain_db is None else f"  [search: {r.search_gain_db:+.1f} dB]"
            out.append(f"  {r.layer[:27]:<28}{r.op[:15]:<16}{r.scale:>11.4g}{r.zero_point:>5}{local:>10}{cum:>8}"
                       f"  {r.observer}{weight}{searched}")
        out.extend(f"  fp32 island: {i}" for i in self.islands)
        out.extend(f"  kept in fp32 (skip): {s}" for s in self.skipped)
        return out


def _db(value: float | None) -> str:
    return "-" if value is None else ("exact" if value >= 999 else f"{value:.1f}")


@dataclass
class LayerError:
    """One value of the compiled graph against the fp32 model (``fxforge.debug.compare``)."""

    layer: str  # module path of the fp32 node ("" for the root module's own code)
    node: str  # the fp32 graph's node (the traced value)
    op: str
    compiled_node: str  # the compiled graph's node computing that value
    sqnr_db: float | None  # accumulated: the compiled value against the fp32 model's (999: equal)
    local_sqnr_db: float | None  # added here: the compiled value against the fp32 op run on its compiled inputs
    max_abs_error: float


@dataclass
class LayerComparison:
    """Per-layer errors of a compiled model, most damaging (lowest local SQNR) first."""

    inputs: str
    output_sqnr_db: float | None
    rows: list[LayerError] = field(default_factory=list)
    shown: int = 15  # rows printed by ``lines`` (all are kept)

    def lines(self) -> list[str]:
        out = [f"per-layer error vs fp32 on {self.inputs}: output SQNR {_db(self.output_sqnr_db)} dB, "
               f"{len(self.rows)} values compared, most damaging first"]
        out.append(f"  {'layer':<28}{'op':<26}{'local dB':>9}{'cum dB':>8}{'max abs err':>13}  compiled node")
        for r in self.rows[:self.shown]:
            out.append(f"  {(r.layer or '<root>')[:27]:<28}{r.op[:25]:<26}{_db(r.local_sqnr_db):>9}"
                       f"{_db(r.sqnr_db):>8}{r.max_abs_error:>13.3g}  {r.compiled_node}")
        if len(self.rows) > self.shown:
            out.append(f"  ... {len(self.rows) - self.shown} more (report.comparison.rows)")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class LayerSensitivity:
    """How much one layer costs when it alone is quantized (the rest of the model in fp32)."""

    layer: str
    score: float  # the budget's measure: output SQNR (dB) or the user's metric


@dataclass
class AccuracyRecord:
    """What ``compile(..., accuracy=...)`` did to meet its budget (``fxforge.AccuracyBudget``)."""

    requirement: str
    measure: str
    before: float  # every layer int8
    after: float
    met: bool
    fp32_layers: list[str] = field(default_factory=list)  # moved back to fp32, in the order they were chosen
    sensitivity: list[LayerSensitivity] = field(default_factory=list)  # most damaging first
    latency_ms_int8: float | None = None  # quick timing on the example inputs (median of a few runs)
    latency_ms_final: float | None = None
    compiles: int = 0

    def lines(self) -> list[str]:
        out = [f"accuracy budget: {self.requirement}: {'met' if self.met else 'NOT met'} "
               f"({self.measure}: all-int8 {self.before:.4g} -> {self.after:.4g}, {self.compiles} compiles)"]
        if self.fp32_layers:
            out.append(f"  kept in fp32 to meet it: {', '.join(self.fp32_layers)}")
        else:
            out.append("  every quantized layer kept in int8")
        if self.latency_ms_int8 is not None and self.latency_ms_final is not None:
            out.append(f"  speed cost: {self.latency_ms_int8:.3g} ms all-int8 -> {self.latency_ms_final:.3g} ms "
                       f"({self.latency_ms_final / max(self.latency_ms_int8, 1e-9):.2f}x), example inputs")
        if self.sensitivity:
            out.append("  sensitivity (only this layer int8), most damaging first: " + ", ".join(
                f"{s.layer} {s.score:.4g}" for s in self.sensitivity[:8]) + (" ..." if len(self.sensitivity) > 8
                                                                            else ""))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class LayerTiming:
    """One int8 conv/linear: its kernel against the same layer run in fp32 between int8 neighbours."""

    layer: str
    kernel: str
    int8_ms: float
    fp32_ms: float  # dequantize + fp32 layer + quantize


@dataclass
class ProfitabilityRecord:
    """What ``compile(..., profitability=True)`` measured and moved to fp32 because int8 was slower there."""

    timings: list[LayerTiming] = field(default_factory=list)
    fp32_layers: list[str] = field(default_factory=list)
    model_ms_before: float | None = None
    model_ms_after: float | None = None  # with the slower-in-int8 layers in fp32 (None: none were slower)
    margin: float = 0.1  # int8 counts as slower when int8_ms > fp32_ms * (1 + margin)

    def lines(self) -> list[str]:
        slower = [t.layer for t in self.timings if t.int8_ms > t.fp32_ms * (1 + self.margin)]
        out = [f"profitability: {len(self.timings)} int8 kernels timed, {len(slower)} slower than fp32 "
               f"(by > {self.margin:.0%}); "
               + (f"kept in fp32: {', '.join(self.fp32_layers)}" if self.fp32_layers else "all kept in int8")]
        if self.model_ms_after is not None:
            out.append(f"  whole model: {self.model_ms_before:.3g} ms all-int8, {self.model_ms_after:.3g} ms with "
                       f"those layers in fp32 ({'kept' if self.fp32_layers else 'not faster: discarded'})")
        out.extend(f"  {t.layer:<28}{t.kernel:<14}int8 {t.int8_ms:8.3f} ms  fp32 {t.fp32_ms:8.3f} ms"
                   for t in self.timings[:15])
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


@dataclass
class AutoCandidate:
    """One target ``target="auto"`` tried: its median time on the example inputs, output SQNR vs eager, verdict."""

    target: str
    ms: float | None
    output_sqnr_db: float | None
    accepted: bool
    why: str


@dataclass
class AutoChoice:
    """What ``target="auto"`` chose and why, with every candidate it measured."""

    chosen: str
    reason: str
    min_sqnr_db: float
    candidates: list[AutoCandidate] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"target auto: chose {self.chosen}, {self.reason}"]
        for c in self.candidates:
            ms = "" if c.ms is None else f"{c.ms:.3f} ms"
            out.append(f"    {'*' if c.target == self.chosen else ' '} {c.target:<10}{ms:>12}  "
                       f"SQNR {_db(c.output_sqnr_db):>6} dB  {'taken' if c.accepted else 'rejected'}: {c.why}")
        return out


@dataclass
class CompileReport:
    target: str
    pipeline: str
    torch_version: str
    passes: list[PassRecord] = field(default_factory=list)
    leaf_modules: dict[str, str] = field(default_factory=dict)
    bound_arguments: dict[str, str] = field(default_factory=dict)
    trace_seconds: float = 0.0
    front_end: str = "symbolic"  # what captured the graph: "symbolic" (torch.fx) or "export" (torch.export)
    front_end_reason: str = ""
    input_shapes: list[str] = field(default_factory=list)  # the shape contract: static sizes, dynamic symbols
    compile_seconds: float = 0.0
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    # reduced-precision float targets (cpu-bf16, cuda fp16/bf16): the output's SQNR against the fp32 model
    output_sqnr_db: float | None = None
    quantization: QuantSummary | None = None
    # the traced graph, then the graph after each pass that changed it (see fxforge.graph.snapshot); not in to_dict
    stages: list[GraphStage] = field(default_factory=list, repr=False)
    comparison: LayerComparison | None = None  # fxforge.debug.compare
    accuracy: AccuracyRecord | None = None  # compile(..., accuracy=fxforge.AccuracyBudget(...))
    profitability: ProfitabilityRecord | None = None  # compile(..., profitability=True)
    # what may make the compiled model worse than it looks (one line per kind, also logged by fxforge.driver.health)
    warnings: list[str] = field(default_factory=list)
    auto: AutoChoice | None = None  # compile(model, "auto", ...): the candidates and the choice

    def to_dict(self) -> dict:
        """Plain data for report.json: ``schema_version`` first (raised when a key changes meaning or goes away),
        the fxforge and torch versions that made it, then the fields."""
        out = asdict(dataclasses.replace(self, stages=[]))  # graphs are for viz and to_html, not the JSON
        del out["stages"]
        return {"schema_version": SCHEMA_VERSION, "fxforge_version": __version__, **out}

    def stage(self, after: str) -> GraphStage:
        """The graph as it was after pass ``after`` (its name or spec; "trace": the traced graph).

        A pass that changed nothing leaves the graph of the last pass before it that did."""
        return self.stages[self._stage_index(after)]

    def stage_before(self, after: str) -> GraphStage:
        """The graph that pass ``after`` started from (for ``fxforge.viz.diff``)."""
        i = self._stage_index(after)
        changed = self.stages[i].index == self._pass_index(after) and i > 0
        return self.stages[i - 1] if changed else self.stages[i]

    def _pass_index(self, after: str) -> int:
        if after == "trace":
            return 0
        for i, r in enumerate(self.passes, start=1):
            if after in (r.name, r.spec):
                return i
        names = [r.spec for r in self.passes]
        raise ConfigError(f"no pass '{after}' ran in this compile.{suggest(after, names)} Passes: "
                          f"{', '.join(names) or 'none'} (or 'trace' for the traced graph)")

    def _stage_index(self, after: str) -> int:
        index = self._pass_index(after)
        if not self.stages:
            raise ConfigError("this report has no graph stages: it was not made by fxforge.compile")
        return max(i for i, s in enumerate(self.stages) if s.index <= index)

    def __str__(self) -> str:
        lines = [
            f"fxforge compile report: target={self.target}  torch={self.torch_version}",
            f"pipeline: {self.pipeline}",
            f"trace {self.trace_seconds * 1e3:.1f} ms, total compile {self.compile_seconds * 1e3:.1f} ms",
            f"captured by {self.front_end}" + (f" ({self.front_end_reason})" if self.front_end_reason else ""),
        ]
        if self.input_shapes:
            lines.append("inputs (sizes fixed, or symbol[min..max] where dynamic): " + "; ".join(self.input_shapes))
        lines.extend(f"WARNING: {w}" for w in self.warnings)
        if self.max_rel_error is not None:
            lines.append(f"output vs eager on example inputs: max abs err {self.max_abs_error:.3g}, "
                         f"relative {self.max_rel_error:.3g}")
        if self.auto is not None:
            lines.extend(self.auto.lines())
        if self.output_sqnr_db is not None:
            lines.append(f"reduced precision: output SQNR vs fp32 on the example inputs: {_db(self.output_sqnr_db)} dB")
        if self.quantization is not None:
            lines.extend(self.quantization.lines())
        if self.accuracy is not None:
            lines.extend(self.accuracy.lines())
        if self.profitability is not None:
            lines.extend(self.profitability.lines())
        if self.comparison is not None:
            lines.extend(self.comparison.lines())
        for path, why in self.leaf_modules.items():
            lines.append(f"kept as a leaf (not traced into): {path or '<root>'}: {why}")
        for name, value in self.bound_arguments.items():
            lines.append(f"forward argument fixed while tracing (default or concrete_args): {name}={value}")
        lines.append(f"{'pass':<28}{'ms':>9}{'nodes':>15}  changed")
        for r in self.passes:
            nodes = f"{r.nodes_before}->{r.nodes_after}"
            lines.append(f"{r.spec:<28}{r.seconds * 1e3:>9.2f}{nodes:>15}  {'yes' if r.modified else 'no'}")
            lines.extend(f"    - {n}" for n in r.notes)
            lines.extend(f"    - rule {rule}: {count} match(es)" for rule, count in r.matches.items())
        return "\n".join(lines)

    def save(self, directory: str | Path) -> Path:
        """Write report.txt and report.json into ``directory``; returns the directory."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.txt").write_text(str(self) + "\n")
        (out / "report.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return out

    def to_html(self, path: str | Path, graphs: bool = True) -> Path:
        """Write one self-contained HTML page (inline SVG, no network access): target, pipeline, pass timeline,
        the graph after each changing pass with its diff (``graphs=False`` leaves them out), the int8 tables."""
        return html_report_writer()(self, Path(path), graphs)
