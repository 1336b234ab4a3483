"""The compile report as one self-contained HTML page (``CompileReport.to_html``).

Everything is inline (CSS, SVG drawn by Graphviz); the page loads nothing from the network. Sections: the
summary (target, torch, times, output error), the pipeline text, a timeline of the passes (time, nodes
before/after, what changed), for int8 targets the per-layer table (scale, zero point, observer, SQNR) and the
fp32 islands with their reasons, then the graph after each pass that changed it, drawn as a diff against the
graph before it (the plain graph below it, folded). Without Graphviz's ``dot`` the page carries the DOT text.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from fxforge.graph.snapshot import GraphStage
from fxforge.pipeline.report import CompileReport, PassRecord, QuantLayerRecord, QuantSummary

from .diff import compare, diff_view
from .dot import digraph, view_of
from .render import dot_available, svg_text

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1200px;
       color: #252525; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #d9d9d9; }
h3 { font-size: 15px; margin: 20px 0 6px; }
code, pre { font: 12px/1.4 Menlo, Consolas, monospace; background: #f5f5f5; }
pre { padding: 8px 10px; white-space: pre-wrap; word-break: break-all; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d9d9d9; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary td:first-child { color: #636363; }
.bar { display: flex; height: 22px; border: 1px solid #bdbdbd; margin: 8px 0 2px; }
.bar div { overflow: hidden; white-space: nowrap; font-size: 11px; line-height: 22px; padding-left: 3px;
           border-right: 1px solid #fff; }
.timebar { background: #6baed6; height: 10px; display: inline-block; vertical-align: middle; margin-right: 6px; }
.changed { color: #238b45; font-weight: 600; } .unchanged { color: #969696; }
.good { background: #e5f5e0; } .fair { background: #fff7bc; } .poor { background: #fcbba1; }
.graph { overflow: auto; max-height: 85vh; border: 1px solid #d9d9d9; padding: 4px; background: #fff; }
.note { color: #636363; } details summary { cursor: pointer; color: #2171b5; margin: 6px 0; }
"""
_SEGMENT_COLORS = ("#c6dbef", "#9ecae1", "#c7e9c0", "#fdd0a2", "#dadaeb", "#fcbba1")


def _e(value: object) -> str:
    return html.escape(str(value))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _summary(r: CompileReport) -> str:
    rows = [("target", r.target), ("torch", r.torch_version),
            ("time", f"trace {_ms(r.trace_seconds)} ms, total compile {_ms(r.compile_seconds)} ms")]
    rows += [("warning", w) for w in r.warnings]
    if r.max_rel_error is not None:
        rows.append(("output vs eager", f"max abs error {r.max_abs_error:.3g}, relative {r.max_rel_error:.3g} "
                                        f"(example inputs)"))
    q = r.quantization
    if q is not None and q.model_sqnr_db is not None:
        rows.append(("int8 output SQNR", f"{q.model_sqnr_db:.1f} dB against {q.reference}"))
    if r.output_sqnr_db is not None:  # reduced-precision float targets (cpu-bf16, ...)
        rows.append(("output SQNR", f"{r.output_sqnr_db:.1f} dB against fp32 (example inputs)"))
    rows += [("kept as a leaf", f"{path or '<root>'}: {why}") for path, why in r.leaf_modules.items()]
    rows += [("argument fixed while tracing", f"{k}={v}") for k, v in r.bound_arguments.items()]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _stage_of(r: CompileReport, index: int) -> GraphStage | None:
    return next((s for s in r.stages if s.index == index), None)


def _changes(r: CompileReport, index: int) -> str:
    """The diff counts of pass ``index`` against the stage before it, when it changed the graph."""
    i = next((k for k, s in enumerate(r.stages) if s.index == index), None)
    if i is None or i == 0:
        return ""
    return compare(r.stages[i - 1].graph, r.stages[i].graph).summary()


def _time_bar(r: CompileReport) -> str:
    total = max(r.compile_seconds, r.trace_seconds + sum(p.seconds for p in r.passes), 1e-9)
    parts = [("trace", r.trace_seconds)] + [(p.spec, p.seconds) for p in r.passes]
    parts.append(("checks, shape propagation, final run", max(total - sum(s for _, s in parts), 0.0)))
    cells = []
    for k, (name, seconds) in enumerate(parts):
        width = 100 * seconds / total
        if width >= 0.2:
            color = _SEGMENT_COLORS[k % len(_SEGMENT_COLORS)]
            cells.append(f'<div style="width:{width:.2f}%;background:{color}" title="{_e(name)}: {_ms(seconds)} ms">'
                         f'{_e(name) if width > 6 else ""}</div>')
    return f'<div class="bar">{"".join(cells)}</div><div class="note">compile time, {_ms(total)} ms in all</div>'


def _timeline(r: CompileReport) -> str:
    slowest = max((p.seconds for p in r.passes), default=0.0) or 1e-9
    rows = []
    for i, p in enumerate(r.passes, start=1):
        rows.append(_timeline_row(r, i, p, slowest))
    head = ("<tr><th>#</th><th>pass</th><th>time (ms)</th><th>nodes before &rarr; after</th><th>changed</th>"
            "<th>what changed</th></tr>")
    return _time_bar(r) + f"<table>{head}{''.join(rows)}</table>"


def _timeline_row(r: CompileReport, i: int, p: PassRecord, slowest: float) -> str:
    bar = f'<span class="timebar" style="width:{max(80 * p.seconds / slowest, 1):.0f}px"></span>'
    changed = '<span class="changed">yes</span>' if p.modified else '<span class="unchanged">no</span>'
    what = [_e(n) for n in p.notes]
    diff = _changes(r, i)
    if diff:
        what.append(f'<a href="#stage-{i}">graph: {_e(diff)}</a>')
    return (f"<tr><td class='num'>{i}</td><td><code>{_e(p.spec)}</code></td><td class='num'>{bar}{_ms(p.seconds)}"
            f"</td><td class='num'>{p.nodes_before} &rarr; {p.nodes_after}</td><td>{changed}</td>"
            f"<td>{'<br>'.join(what)}</td></tr>")


def _db_class(db: float | None) -> str:
    if db is None:
        return ""
    return "good" if db >= 30 else "fair" if db >= 20 else "poor"


def _db(db: float | None) -> str:
    return f"<td class='num {_db_class(db)}'>{'-' if db is None else f'{db:.1f}'}</td>"


def _search_cell(x: QuantLayerRecord) -> str:
    if x.search_gain_db is None:
        return "<td>-</td>"
    return f"<td>{_e(x.search)} <b>{x.search_gain_db:+.1f}</b></td>"


def _quantization(q: QuantSummary) -> str:
    facts = [f"{q.mode} int8 for <b>{_e(q.backend)}</b>"]
    if q.reduce_range:
        facts.append("reduce_range: 7-bit static weights / dynamic activations (this CPU has no VNNI)")
    if q.calibration_batches:
        facts.append(f"calibrated on {q.calibration_batches} batches")
    if q.model_sqnr_db is not None:
        facts.append(f"model output SQNR {q.model_sqnr_db:.1f} dB against {_e(q.reference)}")
    if q.search:
        facts.append(_e(q.search))
    searched = bool(q.search)  # search-observers ran: a column with each point's choice and gain
    head = ("<tr><th>layer</th><th>op</th><th>scale</th><th>zero point</th><th>observer</th><th>weight</th>"
            "<th>own SQNR (dB)</th><th>cumulative SQNR (dB)</th>"
            + ("<th>observer search (gain in own dB)</th>" if searched else "") + "</tr>")
    rows = "".join(
        f"<tr><td><code>{_e(x.layer)}</code></td><td>{_e(x.op)}</td><td class='num'>{x.scale:.4g}</td>"
        f"<td class='num'>{x.zero_point}</td><td>{_e(x.observer)}</td><td>{_e(x.weight) or '-'}</td>"
        f"{_db(x.local_sqnr_db)}{_db(x.sqnr_db)}{_search_cell(x) if searched else ''}</tr>" for x in q.layers)
    table = (f'<h3>Per-layer quantization ({len(q.layers)} quantization points)</h3><table class="layers">{head}{rows}'
             f"</table><p class='note'>SQNR: signal-to-quantization-noise ratio of the layer's output. Own: the "
             f"error this layer adds, run on the same (quantized) inputs; cumulative: the error so far, against "
             f"the fp32 model. Green "
             f"&ge; 30 dB, yellow &ge; 20 dB, red below.</p>")
    islands = "".join(f"<li>{_e(i)}</li>" for i in q.islands) or "<li>none: every op runs in int8</li>"
    skipped = "".join(f"<li><code>{_e(s)}</code></li>" for s in q.skipped)
    extra = f"<h3>Kept in fp32 on request (skip)</h3><ul>{skipped}</ul>" if skipped else ""
    return (f"<p>{'; '.join(facts)}.</p>{table}<h3>fp32 islands ({len(q.islands)})</h3>"
            f"<p class='note'>Ops with no int8 version run in fp32 between a dequantize and a quantize; the "
            f"reason follows each.</p><ul class='islands'>{islands}</ul>{extra}")


def _inline_svg(graph) -> str:
    svg, why_not = svg_text(graph)
    if svg is None:
        fix = (" Install the OS package <code>graphviz</code> (e.g. <code>apt-get install graphviz</code>) and write "
               "the report again, or render" if not dot_available() else " Render")
        return (f"<p class='note'>{_e(why_not)}, so this graph is not drawn.{fix} the DOT text below with "
                f"<code>dot -Tsvg graph.dot -o graph.svg</code>.</p><details><summary>DOT text</summary>"
                f"<pre>{_e(graph.source)}</pre></details>")
    svg = re.sub(r"^.*?(?=<svg)", "", svg, flags=re.DOTALL)  # drop the XML prolog and DOCTYPE
    return f'<div class="graph">{svg}</div>'


def _graphs(r: CompileReport) -> str:
    parts = []
    for k, stage in enumerate(r.stages):
        anchor = f'<section id="stage-{stage.index}">'
        if k == 0:
            parts.append(f"{anchor}<h3>Traced graph ({len(stage.graph)} nodes)</h3>"
                         f"{_inline_svg(digraph(view_of(stage.graph)))}</section>")
            continue
        before = r.stages[k - 1]
        view = diff_view(before.graph, stage.graph)
        plain = _inline_svg(digraph(view_of(stage.graph)))
        parts.append(f"{anchor}<h3>After <code>{_e(stage.after)}</code> (pass {stage.index}, "
                     f"{len(before.graph)} &rarr; {len(stage.graph)} nodes)</h3>"
                     f"<p class='note'>Changes against the graph after <code>{_e(before.after)}</code>: "
                     f"{_e(compare(before.graph, stage.graph).summary())}. Added nodes have a green border, "
                     f"rewritten ones purple, removed ones are dashed red.</p>{_inline_svg(digraph(view))}"
                     f"<details><summary>the graph after {_e(stage.after)} alone</summary>{plain}</details></section>")
    return "".join(parts)


def render_html(r: CompileReport, graphs: bool = True) -> str:
    """The report page as a string (see the module docstring)."""
    sections = [f"<h1>fxforge compile report</h1>{_summary(r)}",
                f"<h2>Pipeline</h2><pre class='pipeline'>{_e(r.pipeline)}</pre>"
                f"<p class='note'>The same text, given as <code>pipeline=</code> to <code>fxforge.compile</code> or "
                f"to the CLI, runs exactly these passes.</p>",
                f"<h2>Passes</h2>{_timeline(r)}"]
    if r.quantization is not None:
        sections.append(f"<h2>Quantization</h2>{_quantization(r.quantization)}")
    if graphs and r.stages:
        sections.append(f"<h2>Graphs</h2>{_graphs(r)}")
    title = f"fxforge report: {r.target}"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(sections)}</body></html>\n")


def write_report(r: CompileReport, path: str | Path, graphs: bool = True) -> Path:
    """Write ``render_html(r)`` to ``path`` (directories created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(r, graphs), encoding="utf-8")
    return path
