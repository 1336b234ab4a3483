"""Hugging Face transformers on CPU: fxforge (torch.export front end) against fp32 and int8 peers, one process.

Models: ``BertModel`` and ``GPT2Model`` (``use_cache=False``) from configs (random init, no download), bert-base
width (768, 12 heads, 3072 FFN), ``--layers`` layers, batch 1, sequence ``--seq``. Peers:
- fp32: ``eager``; ``compile`` (torch.compile, inductor, with ``torch._inductor.config.freezing``); ``ort``
  (onnxruntime on the dynamo ONNX export; ORT_ENABLE_ALL, ``intra_op_num_threads`` = ``--threads``);
- int8: ``ao_dynamic`` (torch.ao ``quantize_dynamic`` on ``nn.Linear``: GPT-2's ``Conv1D`` stays fp32);
  ``ort_dynamic`` (onnxruntime ``quantize_dynamic``, QInt8 weights);
- fxforge: ``fx_cpu``, ``fx_x86_dynamic`` (``quantization="dynamic"``), ``fx_x86_dynamic_apart`` (the same with
  ``share_quantize=false``: Q, K and V each quantize their common input, one GEMM each), ``fx_bf16`` (``cpu-bf16``).
Each is timed on the same input under ``torch.inference_mode`` (``fxforge.numerics.timing``: warm-up, then the
median of ``--repeats`` samples, one peer after another: onnxruntime's spinning threads slow whichever
peer runs next when interleaved); the table gives ms, the build time, and the cosine of the last hidden state
against eager fp32. A peer that fails is recorded as ``failed: <reason>``.

    .venv/bin/python benchmarks/bench_transformers.py               # writes the bench-transformers block
    .venv/bin/python benchmarks/bench_transformers.py --layers 1 --seq 32 --out /tmp/t.md   # a quick check
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_cpu import machine_info, write_results
from torch import nn

import fxforge
from fxforge.numerics.timing import Schedule, samples
from fxforge.pipeline.fragments import with_options

BEGIN, END = "<!-- bench-transformers:begin -->", "<!-- bench-transformers:end -->"
Runner = Callable[[], torch.Tensor]  # returns the last hidden state
Builder = Callable[[nn.Module, dict[str, Any]], Runner]


def make_model(name: str, layers: int) -> tuple[nn.Module, dict[str, Any]]:
    import transformers as T

    torch.manual_seed(0)
    if name == "bert":
        model = T.BertModel(T.BertConfig(num_hidden_layers=layers))
        inputs: dict[str, Any] = {}
    else:
        model = T.GPT2Model(T.GPT2Config(n_layer=layers))
        inputs = {"use_cache": False}
    return model.eval(), inputs


def _last_hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


def build_eager(model: nn.Module, inputs: dict[str, Any]) -> Runner:
    return lambda: _last_hidden(model(**inputs))


def build_compile(model: nn.Module, inputs: dict[str, Any]) -> Runner:
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    compiled = torch.compile(model)
    with torch.inference_mode():
        compiled(**inputs)  # compiles
    return lambda: _last_hidden(compiled(**inputs))


def _onnx(model: nn.Module, inputs: dict[str, Any], directory: str) -> tuple[str, list[str]]:
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    path = os.path.join(directory, "model.onnx")
    program = torch.onnx.export(model, (), kwargs=inputs, dynamo=True)
    program.save(path)
    return path, list(tensors)


def _ort_runner(path: str, inputs: dict[str, Any], threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feed = {n: inputs[n].numpy() for n in names}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def ort_builder(quantize: bool, threads: int) -> Builder:
    def build(model: nn.Module, inputs: dict[str, Any]) -> Runner:
        directory = tempfile.mkdtemp()
        path, _ = _onnx(model, inputs, directory)
        if quantize:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = os.path.join(directory, "model.int8.onnx")
            quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
            path = quantized
        return _ort_runner(path, inputs, threads)

    return build


def build_ao_dynamic(model: nn.Module, inputs: dict[str, Any]) -> Runner:
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return lambda: _last_hidden(quantized(**inputs))


def fx_builder(target: str, **options: Any) -> Builder:
    def build(model: nn.Module, inputs: dict[str, Any]) -> Runner:
        compiled = fxforge.compile(model, target, example_inputs=inputs, **options)
        return lambda: _last_hidden(compiled(**inputs))

    return build


def peers(threads: int) -> dict[str, Builder]:
    return {"eager": build_eager, "compile": build_compile, "ort": ort_builder(False, threads),
            "ao_dynamic": build_ao_dynamic, "ort_dynamic": ort_builder(True, threads),
            "fx_cpu": fx_builder("cpu"), "fx_x86_dynamic": fx_builder("x86", quantization="dynamic"),
            "fx_x86_dynamic_apart": fx_builder("x86", quantization="dynamic", pipeline=with_options(
                fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", share_quantize=False)),
            "fx_bf16": fx_builder("cpu-bf16")}


def bench_model(name: str, args: argparse.Namespace) -> list[str]:
    model, inputs = make_model(name, args.layers)
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if name == "bert" else {}), **inputs}
    with torch.inference_mode():
        reference = _last_hidden(model(**inputs))
    runners: dict[str, Runner] = {}
    cells: dict[str, str] = {}
    for peer, build in peers(args.threads).items():
        if peer not in args.peers:
            continue
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                runners[peer] = build(copy.deepcopy(model), inputs)
                out = runners[peer]().float()
            cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
            cells[peer] = f"(build {time.perf_counter() - start:.1f} s, cosine {cosine:.4f})"
        except Exception as exc:  # a peer that cannot build is reported, the others still run
            cells[peer] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
            runners.pop(peer, None)
    schedule = Schedule(warmup=args.warmup, rounds=args.repeats, statistic=statistics.median)
    with torch.inference_mode():  # one peer at a time: onnxruntime's spinning threads would slow the next peer
        times = {p: samples({p: run}, schedule)[p] for p, run in runners.items()}
    row = [f"| {name} | " + " | ".join(
        f"{statistics.median(times[p]) * 1e3:.1f} {cells[p]}" if p in times else cells.get(p, "-")
        for p in args.peers) + " |"]
    print(row[0], flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="bert,gpt2")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peers", default=",".join(peers(2)))
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "RESULTS.md")
    args = p.parse_args(argv)
    args.peers = args.peers.split(",")
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = [row for name in args.models.split(",") for row in bench_model(name, args)]
    body = "\n".join([*machine_info(load),
                      f"- {args.layers} layers, 768 wide, seq {args.seq}, batch 1; ms = median latency", "",
                      "| model | " + " | ".join(args.peers) + " |", "|---|" + "---:|" * len(args.peers), *rows])
    write_results(args.out, body, BEGIN, END, header=None)
    print(body)


if __name__ == "__main__":
    main()
