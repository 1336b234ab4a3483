"""CPU int8 inference benchmark: fxforge's int8 targets against int8 peers, side by side in one process.

Peers (``--peers``, default all):
- fp32: ``eager`` (the reference for SQNR), ``ort`` (onnxruntime), ``openvino`` (both bench_cpu's builders) and
  ``fx_cpu`` (``fxforge.compile(model, "cpu", ...)``);
- int8 peers: ``ao_x86`` / ``ao_fbgemm`` (torch.ao.quantization FX mode: prepare_fx with
  ``get_default_qconfig_mapping(engine)``, calibrate, convert_fx; every call runs with
  ``torch.backends.quantized.engine`` set to that engine) and ``ort_int8`` (onnxruntime ``quantize_static`` on
  the exported fp32 ONNX model after ``quant_pre_process``: QDQ, per-channel, activations QUInt8, weights
  QInt8, MinMax calibration; CPUExecutionProvider, ORT_ENABLE_ALL), ``openvino_int8`` (``nncf.quantize``
  with NNCF's defaults on the same calibration images, run by OpenVINO's CPU plugin as bench_cpu's
  ``openvino`` peer: fp32 inference precision for what stays float, torch's thread count);
- ``pt2e_inductor``: torch's own x86 int8 route as torch documents it: ``torch.export``, torchao's PT2E
  ``prepare_pt2e`` with ``X86InductorQuantizer`` (its default config: static, per-channel weights), calibrate,
  ``convert_pt2e``, then ``torch.compile`` with Inductor's ``freezing`` (which lowers the q/dq pattern onto
  oneDNN's int8 ops and fuses the rest into generated C++), calibrated like onnxruntime's (fixed batch size);
  its build time includes Inductor's compile;
- fxforge int8: ``fx_x86``, ``fx_fbgemm``, ``fx_qnnpack`` (``fxforge.compile(model, target, calibration=...)``),
  ``fx_openvino_int8`` (target ``"openvino-int8"``: fxforge's x86 quantization run by OpenVINO; bench_cpu's
  ``fx_openvino`` builder; skipped without openvino).

Models are random-init torchvision classifiers with BatchNorm statistics re-estimated on random batches
(``bench_cpu.make_model``). Every int8 peer calibrates on the same ``--calibration-batches`` batches of 8
random-normal images (fixed seed); onnxruntime's and OpenVINO's graphs have a fixed batch size, so they see the
same images regrouped into batches of that size (min-max ranges do not depend on the grouping). Every peer is built per
(model, batch size) from a fresh deep copy, then all peers are timed on the same input under
``torch.inference_mode``, one peer after another (``bench_cpu.time_blocks`` says why not interleaved):
``--warmup`` untimed calls, then ``--repeats`` timed ones. Run it on an otherwise idle machine.

The tables give, per batch size, the median latency and, for int8 peers, the SQNR of the output against eager
fp32 on the timed input (``fxforge.quant.sqnr.outputs_sqnr_db``), plus a verdict column: the latency of
fxforge's fastest int8 target over the fastest other peer's (fp32 ones included), and whether that target's
SQNR (to 0.1 dB) is at least the best other int8 peer's. Build times follow. A peer that fails is recorded as
``failed: <reason>`` and the run goes on. The OpenVINO peers need ``openvino`` and ``nncf`` (the ``bench``
extra: ``pip install -e ".[bench]"``); without them those peers are recorded as ``skipped: ... not installed``.

Run it (``make bench-int8`` does the first):
    .venv/bin/python benchmarks/bench_int8.py
    .venv/bin/python benchmarks/bench_int8.py --models resnet18 --batch-sizes 1 --repeats 3 --image-size 64
Results are printed and written to ``benchmarks/RESULTS.md`` (``--out``) between the ``bench-int8:begin`` /
``bench-int8:end`` markers (appended at the end of the file when missing); the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from bench_cpu import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    Cell,
    PeerSkipped,
    Row,
    Runner,
    _export_onnx,
    argument_parser,
    build_fx_openvino,
    build_openvino,
    build_ort,
    check_peers,
    fmt_cell,
    machine_info,
    make_model,
    openvino_compiled,
    openvino_model,
    openvino_runner,
    ort_runner,
    ort_session,
    per_batch,
    rel_error,
    short,
    summarize,
    table,
    time_blocks,
    write_results,
)
from torch import nn
from tqdm import tqdm

import fxforge
from fxforge.quant.sqnr import outputs_sqnr_db

Calibration = list[torch.Tensor]
Builder = Callable[[nn.Module, torch.Tensor, Calibration], Runner]

DEFAULT_MODELS = "resnet18,mobilenet_v2,resnet50,mobilenet_v3_large,efficientnet_b0"
CALIBRATION_BATCH, CALIBRATION_SEED = 8, 1234  # the seed differs from the timed inputs' (their batch size)
BEGIN, END = "<!-- bench-int8:begin -->", "<!-- bench-int8:end -->"


# ---------------------------------------------------------------------------------------------- peers
@contextlib.contextmanager
def quantized_engine(engine: str) -> Iterator[None]:
    """Run with ``torch.backends.quantized.engine = engine``, restoring the previous one afterwards."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def build_eager(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return model


def build_ort_fp32(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return build_ort(model, x)


def ao_builder(engine: str) -> Builder:
    """torch.ao.quantization FX mode with the engine's default qconfig mapping, pinned to the engine."""

    def build(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        with quantized_engine(engine):  # convert_fx prepacks weights for the current engine
            prepared = prepare_fx(model, get_default_qconfig_mapping(engine), example_inputs=(x,))
            for batch in calibration:
                prepared(batch)
            converted = convert_fx(prepared)

        def run(inp: torch.Tensor) -> torch.Tensor:
            with quantized_engine(engine):
                return converted(inp)

        return run

    return build


def regroup(calibration: Calibration, batch_size: int) -> Calibration:
    """The calibration images in batches of ``batch_size``, wrapping around so that every image is seen."""
    images = torch.cat(calibration)
    count = math.ceil(len(images) / batch_size) * batch_size
    return list(images[torch.arange(count) % len(images)].split(batch_size))


def _preprocessed(source: Path, target: Path) -> Path:
    """onnxruntime's recommended pre-processing (shape inference, graph cleanup); the source if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
        return target
    except Exception:  # pre-processing is an optimisation: quantize the plain export instead
        return source


def ort_int8_model(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> bytes:
    """The ONNX model quantized by onnxruntime's ``quantize_static`` (see the module docstring)."""
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Calibration) -> None:
            self.items = iter([{"x": b.numpy()} for b in batches])

        def get_next(self) -> dict | None:
            return next(self.items, None)

    ort.set_default_logger_severity(3)  # calibration sessions warn about every unused initializer
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre, int8 = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        fp32.write_bytes(_export_onnx(model, x))
        with contextlib.redirect_stdout(sys.stderr):  # keep onnxruntime's messages out of the results
            quantize_static(_preprocessed(fp32, pre), int8, Reader(regroup(calibration, x.shape[0])),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
        return int8.read_bytes()


def build_ort_int8(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return ort_runner(ort_session(ort_int8_model(model, x, calibration)))


def build_openvino_fp32(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return build_openvino(model, x)


def openvino_int8_model(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> object:
    """The OpenVINO model quantized by ``nncf.quantize`` (NNCF's defaults: the performance preset, symmetric
    activations) on the calibration images, regrouped to the model's fixed batch size as for onnxruntime.
    Raises PeerSkipped when nncf is not installed."""
    ov_model = openvino_model(model, x)
    if importlib.util.find_spec("nncf") is None:
        raise PeerSkipped("nncf not installed")
    import nncf

    batches = regroup(calibration, x.shape[0])
    dataset = nncf.Dataset(batches, lambda batch: batch.numpy())
    with contextlib.redirect_stdout(sys.stderr):  # nncf prints progress bars
        return nncf.quantize(ov_model, dataset, subset_size=len(batches))


def build_openvino_int8(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return openvino_runner(openvino_compiled(openvino_int8_model(model, x, calibration)))


def build_pt2e_inductor(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    """torch's PT2E x86 int8 flow compiled by Inductor with freezing (see the module docstring)."""
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    for batch in regroup(calibration, x.shape[0]):  # the exported graph has x's (fixed) batch size
        prepared(batch)
    converted = move_exported_model_to_eval(convert_pt2e(prepared))
    inductor_config.freezing = True  # process-wide: only this peer uses Inductor here
    compiled = torch.compile(converted)
    with torch.inference_mode():
        compiled(x)  # Inductor compiles on the first call: part of the build time
    return compiled


def build_fx_cpu(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return fxforge.compile(model, "cpu", example_inputs=x)


def fx_builder(target: str) -> Builder:
    def build(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
        return fxforge.compile(model, target, example_inputs=x, calibration=calibration)

    return build


def build_fx_openvino_int8(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    return build_fx_openvino(model, x, "openvino-int8", calibration=calibration)


PEERS: dict[str, Builder] = {
    "eager": build_eager,
    "ort": build_ort_fp32,
    "ao_x86": ao_builder("x86"),
    "ao_fbgemm": ao_builder("fbgemm"),
    "ort_int8": build_ort_int8,
    "openvino": build_openvino_fp32,
    "openvino_int8": build_openvino_int8,
    "pt2e_inductor": build_pt2e_inductor,
    "fx_cpu": build_fx_cpu,
    "fx_x86": fx_builder("x86"),
    "fx_fbgemm": fx_builder("fbgemm"),
    "fx_qnnpack": fx_builder("qnnpack"),
    "fx_openvino_int8": build_fx_openvino_int8,
}
INT8_PEERS = {"ao_x86", "ao_fbgemm", "ort_int8", "openvino_int8", "pt2e_inductor", "fx_x86", "fx_fbgemm",
              "fx_qnnpack", "fx_openvino_int8"}
FX_INT8_PEERS = ("fx_x86", "fx_fbgemm", "fx_qnnpack", "fx_openvino_int8")


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class QCell(Cell):
    """bench_cpu's cell plus the SQNR (dB) of the peer's output against eager fp32."""

    sqnr_db: float | None = None


def build_peer(builder: Builder, model: nn.Module, x: torch.Tensor, calibration: Calibration,
               ref: torch.Tensor) -> tuple[Runner | None, QCell]:
    """Build one peer and measure its output against ``ref``; a failure gives ``(None, QCell(error=...))``."""
    try:
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():  # no_grad: calibration writes observer buffers
            warnings.simplefilter("ignore")
            run = builder(model, x, calibration)
        setup_s = time.perf_counter() - start
        with torch.inference_mode():
            out = run(x)
        return run, QCell(rel_err=rel_error(out, ref), setup_s=setup_s, sqnr_db=outputs_sqnr_db(ref, out))
    except PeerSkipped as exc:
        return None, QCell(skipped=str(exc))
    except Exception as exc:  # one peer failing must not stop the others
        return None, QCell(error=short(exc))


def make_calibration(batches: int, image_size: int) -> Calibration:
    gen = torch.Generator().manual_seed(CALIBRATION_SEED)
    return [torch.randn(CALIBRATION_BATCH, 3, image_size, image_size, generator=gen) for _ in range(batches)]


def bench_row(base: nn.Module, name: str, bs: int, peers: list[str], calibration: Calibration, warmup: int,
              repeats: int, bar: tqdm, builders: dict[str, Builder] | None = None) -> Row:
    """One (model, batch size) row: each peer built from ``builders`` (default ``PEERS``), checked, timed."""
    builders = PEERS if builders is None else builders
    size = calibration[0].shape[-1]
    x = torch.randn(bs, 3, size, size, generator=torch.Generator().manual_seed(bs))
    row, runners = Row(name, bs), {}
    with torch.inference_mode():
        ref = base(x)
    for peer in peers:
        bar.set_postfix_str(f"{name} bs{bs} build {peer}")
        model = copy.deepcopy(base)  # a fresh copy per peer: some builders convert the model in place
        run, row.cells[peer] = build_peer(builders[peer], model, x, calibration, ref)
        if run is not None:
            runners[peer] = run
        bar.update()
    bar.set_postfix_str(f"{name} bs{bs} timing")
    with torch.inference_mode():
        results = time_blocks(runners, x, warmup, repeats, bar)
    for peer, result in results.items():
        summarize(row.cells[peer], result)
    return row


# ---------------------------------------------------------------------------------------------- reporting
def fmt_ms(ms: float) -> str:
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def latency_cell(peer: str) -> Callable[[Cell], str]:
    def fmt(cell: Cell) -> str:
        sqnr = getattr(cell, "sqnr_db", None)
        tail = f" ({sqnr:.1f} dB)" if peer in INT8_PEERS and sqnr is not None else ""
        return f"{fmt_ms(cell.ms)} ms{tail}"

    return fmt


def fastest(row: Row, peers: list[str]) -> str | None:
    timed = [p for p in peers if p in row.cells and row.cells[p].ms is not None]
    return min(timed, key=lambda p: row.cells[p].ms) if timed else None


def verdict(row: Row) -> str:
    """fxforge's fastest int8 target against the fastest other peer (latency) and the best other int8 peer
    (SQNR, compared at the 0.1 dB the tables show)."""
    others = [p for p in row.cells if not p.startswith("fx_")]
    ours, theirs = fastest(row, list(FX_INT8_PEERS)), fastest(row, others)
    if ours is None or theirs is None:
        return "n/a"
    mine, ratio = row.cells[ours], row.cells[ours].ms / row.cells[theirs].ms
    rivals = [c.sqnr_db for p in others if p in INT8_PEERS and (c := row.cells[p]).ms is not None]
    problems = ["slower"] if ratio > 1 else []
    if rivals and round(mine.sqnr_db, 1) < round(max(rivals), 1):
        problems.append("lower SQNR")
    return f"{ratio:.2f}x ({ours} / {theirs}): {', '.join(problems) or 'meets goal'}"


def render(rows: list[Row], peers: list[str], batch_sizes: list[int], info: list[str]) -> str:
    goal = "best fxforge vs fastest peer"

    def value(row: Row, column: str) -> str:
        return verdict(row) if column == goal else fmt_cell(row.cells[column], latency_cell(column))

    parts = [*info, "", "Cells: median latency, and for int8 peers the SQNR of the output against eager fp32 "
             f"(dB, higher is better). *{goal}*: latency of fxforge's fastest int8 target / the fastest "
             "non-fxforge peer's (fp32 peers included; <1 means fxforge is faster); *meets goal* when that is "
             "<= 1 and the target's SQNR is at least the best non-fxforge int8 peer's.", ""]
    for bs in batch_sizes:
        parts += [f"### Batch size {bs}", "", *table([r for r in rows if r.batch_size == bs], [*peers, goal],
                                                       value), ""]
    build = table(rows, peers, lambda r, p: fmt_cell(r.cells[p], lambda c: f"{c.setup_s:.1f}"))
    parts += ["### Build time (s: export, calibration, quantization, compilation)", "", *build, ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None, peers: dict[str, Builder] | None = None,
               description: str | None = None, **defaults: str) -> argparse.Namespace:
    """The options (bench_cpu's plus calibration and image size) over ``peers`` (default ``PEERS``);
    ``defaults``: other default values (scripts reusing these peers: their models, batch sizes)."""
    peers = PEERS if peers is None else peers
    p = argument_parser(peers)
    # the int8 table's five models (bench_cpu's default adds vit_b_16)
    p.set_defaults(**{"models": DEFAULT_MODELS, **defaults})
    p.description = (description or __doc__).split("\n\n")[0]
    p.add_argument("--calibration-batches", type=int, default=8,
                   help=f"calibration batches of {CALIBRATION_BATCH} random-normal images (fixed seed)")
    p.add_argument("--image-size", type=int, default=224, help="input height and width (smoke runs: 64)")
    args = p.parse_args(argv)
    check_peers(p, args, peers)
    if args.calibration_batches < 1:
        p.error("--calibration-batches must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    models, peers = args.models.split(","), list(dict.fromkeys(args.peers.split(",")))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    calibration = make_calibration(args.calibration_batches, args.image_size)
    calls = [per_batch(DEFAULT_WARMUP, bs, args.warmup) + per_batch(DEFAULT_REPEATS, bs, args.repeats)
             for bs in batch_sizes]
    rows: list[Row] = []
    with tqdm(total=len(models) * sum(len(peers) * (1 + n) for n in calls), file=sys.stderr) as bar:
        for name in models:
            base = make_model(name)  # outside inference_mode: its parameters must stay normal tensors
            rows += [bench_row(base, name, bs, peers, calibration, per_batch(DEFAULT_WARMUP, bs, args.warmup),
                               per_batch(DEFAULT_REPEATS, bs, args.repeats), bar) for bs in batch_sizes]
    info = [*machine_info(load_before),
            f"- calibration: {args.calibration_batches} batches of {CALIBRATION_BATCH} random-normal "
            f"{args.image_size}x{args.image_size} images (seed {CALIBRATION_SEED}), the same for every int8 peer"]
    body = render(rows, peers, batch_sizes, info)
    print(body)
    write_results(args.out, body, BEGIN, END, header=None)  # the int8 block goes after the fp32 one
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
