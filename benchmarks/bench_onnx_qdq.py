"""fxforge's static int8 models exported to ONNX (QDQ), run by ONNX Runtime and OpenVINO, beside their peers.

Peers (``--peers``, default all), built per model from a fresh deep copy, on the same calibration batches:
- ``eager``: the fp32 model (the reference for SQNR);
- ``fx_x86``: ``fxforge.compile(model, "x86", calibration=...)`` run by fxforge;
- ``fx_x86_ort`` / ``fx_x86_openvino``: that compiled model written by ``fxforge.serialization.onnx.export_onnx``
  and run by onnxruntime (CPUExecutionProvider, ORT_ENABLE_ALL) / OpenVINO's CPU plugin (bench_cpu's settings,
  the file's batch dimension fixed to the input's: NNCF's model and bench_cpu's OpenVINO peer have static
  shapes, and OpenVINO runs a dynamic batch with shape inference and allocation on every call:
  ``benchmarks/openvino_profile.py`` times both);
- ``fx_fbgemm_ort``: the fbgemm target exported the same way (its residual adds are int8 ops of their own, so ORT
  runs every conv as QLinearConv; x86 fuses conv + add into one int8 kernel, which ORT runs in fp32);
- ``ort_int8`` / ``openvino_int8``: onnxruntime's ``quantize_static`` (QDQ) and NNCF, as in bench_int8.py.
Timing, SQNR (against eager fp32, on the timed input) and the machine lines are bench_int8's and bench_cpu's.
ONNX Runtime runs the exported file with its batch dimension left dynamic.

Run it:
    .venv/bin/python benchmarks/bench_onnx_qdq.py
    .venv/bin/python benchmarks/bench_onnx_qdq.py --models resnet18 --repeats 3 --image-size 64
Results are printed and written to ``benchmarks/RESULTS.md`` (``--out``) between the ``bench-onnx-qdq:begin`` /
``bench-onnx-qdq:end`` markers (appended at the end of the file when missing).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
from bench_cpu import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    Cell,
    PeerSkipped,
    Row,
    Runner,
    fmt_cell,
    machine_info,
    make_model,
    openvino_compiled,
    openvino_runner,
    ort_session,
    per_batch,
    table,
    write_results,
)
from bench_int8 import (
    CALIBRATION_BATCH,
    CALIBRATION_SEED,
    PEERS,
    Builder,
    Calibration,
    bench_row,
    fmt_ms,
    make_calibration,
    parse_args,
)
from torch import nn
from tqdm import tqdm

import fxforge
from fxforge.serialization.onnx import export_onnx

DEFAULT_MODELS = "resnet18,mobilenet_v2,mobilenet_v3_large,efficientnet_b0"
BEGIN, END = "<!-- bench-onnx-qdq:begin -->", "<!-- bench-onnx-qdq:end -->"


def exported(target: str, model: nn.Module, x: torch.Tensor, calibration: Calibration) -> bytes:
    """``model`` compiled for ``target`` on the calibration batches and exported to ONNX (the file's bytes)."""
    compiled = fxforge.compile(model, target, example_inputs=x, calibration=calibration)
    with tempfile.TemporaryDirectory() as tmp:
        return export_onnx(compiled, Path(tmp) / "model.onnx").read_bytes()


def ort_export_builder(target: str) -> Builder:
    def build(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
        session = ort_session(exported(target, model, x, calibration))
        name = session.get_inputs()[0].name  # the graph's input: forward's parameter name
        return lambda inp: torch.from_numpy(session.run(None, {name: inp.numpy()})[0])

    return build


def build_openvino_export(model: nn.Module, x: torch.Tensor, calibration: Calibration) -> Runner:
    try:
        import openvino as ov
    except ImportError:
        raise PeerSkipped("openvino not installed") from None
    ov_model = ov.Core().read_model(exported("x86", model, x, calibration), b"")
    ov_model.reshape(list(x.shape))  # the batch fixed, as the NNCF peer's (see the module docstring)
    return openvino_runner(openvino_compiled(ov_model))


BUILDERS: dict[str, Builder] = {
    "eager": PEERS["eager"],
    "fx_x86": PEERS["fx_x86"],
    "fx_x86_ort": ort_export_builder("x86"),
    "fx_x86_openvino": build_openvino_export,
    "fx_fbgemm_ort": ort_export_builder("fbgemm"),
    "ort_int8": PEERS["ort_int8"],
    "openvino_int8": PEERS["openvino_int8"],
}


def cell_text(cell: Cell, peer: str) -> str:
    sqnr = getattr(cell, "sqnr_db", None)
    tail = f" ({sqnr:.1f} dB)" if peer != "eager" and sqnr is not None else ""
    return f"{fmt_ms(cell.ms)} ms{tail}"


def render(rows: list[Row], peers: list[str], info: list[str]) -> str:
    parts = [*info, "", "Cells: median latency, and the SQNR of the output against eager fp32 (dB, higher is "
             "better). fx_x86_ort / fx_x86_openvino run fxforge's x86 int8 model exported by `export_onnx`.", ""]
    parts += table(rows, peers, lambda r, p: fmt_cell(r.cells[p], lambda c: cell_text(c, p)))
    build = table(rows, peers, lambda r, p: fmt_cell(r.cells[p], lambda c: f"{c.setup_s:.1f}"))
    parts += ["", "Build time (s: compile, calibration, export, session creation):", "", *build, ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, BUILDERS, __doc__, models=DEFAULT_MODELS, batch_sizes="1")
    load_before = os.getloadavg()[0]
    if args.threads:
        torch.set_num_threads(args.threads)
    models, peers = args.models.split(","), list(dict.fromkeys(args.peers.split(",")))
    calibration = make_calibration(args.calibration_batches, args.image_size)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    calls = {bs: (per_batch(DEFAULT_WARMUP, bs, args.warmup), per_batch(DEFAULT_REPEATS, bs, args.repeats))
             for bs in batch_sizes}
    rows: list[Row] = []
    with tqdm(total=len(models) * sum(len(peers) * (1 + w + r) for w, r in calls.values()), file=sys.stderr) as bar:
        for name in models:
            base = make_model(name)
            rows += [bench_row(base, name, bs, peers, calibration, *calls[bs], bar, BUILDERS) for bs in batch_sizes]
    info = [*machine_info(load_before),
            f"- calibration: {args.calibration_batches} batches of {CALIBRATION_BATCH} random-normal "
            f"{args.image_size}x{args.image_size} images (seed {CALIBRATION_SEED}), the same for every int8 peer"]
    body = render(rows, peers, info)
    print(body)
    write_results(args.out, body, BEGIN, END, header=None)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
