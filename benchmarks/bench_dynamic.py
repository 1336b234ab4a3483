"""Dynamic and weight-only quantization benchmark: a trained speech LSTM and GPT-2-sized decoders, against peers.

LSTM table: ``fxforge.testing.speech.trained_speech_embedder`` (3 layers, ``--hidden`` units, 40 power-mel bands,
trained for a few seconds inside the script, seeded), ``--steps`` frames per utterance, batch sizes 1 and 8, each
peer built and timed at each of ``--threads`` intra-op thread counts (speed-ups against eager at the same count).
Peers: ``eager`` fp32; ``ao_dynamic`` (``torch.ao.quantization.quantize_dynamic`` on LSTM + Linear: the
deprecated upstream path, default qconfig); ``fx_plain`` (fxforge dynamic int8 with every layer forced to int8,
``min_layer_sqnr_db=-1000, time_rnn_layers=False``: what fxforge did before it measured layers); ``fx_dynamic``
(``fxforge.compile(m, "x86", quantization="dynamic")``: each LSTM layer int8, bf16 or fp32 by accuracy and time);
onnxruntime on the model exported by ``torch.onnx.export`` (dynamo): ``ort`` fp32, ``ort_dynamic``
(``onnxruntime.quantization.quantize_dynamic``, QInt8 weights: its DynamicQuantizeLSTM on every layer) and
``ort_dynamic_l0_fp32`` (the same with the first LSTM node excluded), ``intra_op_num_threads`` pinned to the same
count, spinning off. Accuracy: the minimum embedding cosine against eager on 32 held-out utterances.

Decoder tables: GPT-2's shape (12 layers, 768 wide, 12 heads, 50257-token LM head, random init, seeded), bs 1,
seq ``--seq``: memory-bound, where weight-only quantization pays. Twice: a torch-native decoder of the same shape
(``Decoder``: nn.Linear projections, ``F.scaled_dot_product_attention``, LM head a separate Linear), and
transformers' ``GPT2LMHeadModel`` itself (captured through torch.export; its LM head shares the token embedding's
weight: fxforge quantizes the head and keeps an fp32 copy for the embedding lookup). Peers: ``eager`` fp32;
``fx_int8`` / ``fx_int4`` (``quantization="weight-only"``, ``weight_bits`` 8 / 4, ``group_size`` 128);
``torchao_int8`` / ``torchao_int4`` (``torchao.quantization.quantize_`` with ``Int8WeightOnlyConfig`` /
``Int4WeightOnlyConfig(group_size=128)``: nn.Linear only, so on GPT2LMHeadModel only the LM head, its
projections being transformers' Conv1D). Accuracy: the cosine of the logits against eager.

Timing: ``fxforge.numerics.timing.measure`` (warm-up, interleaved rounds, median). A peer that fails is
recorded as ``failed: <reason>``. Run:
    .venv/bin/python benchmarks/bench_dynamic.py
    .venv/bin/python benchmarks/bench_dynamic.py --quick   # small shapes, few rounds: a dry run
Results are printed and written to ``benchmarks/RESULTS.md`` between the ``bench-dynamic:begin`` / ``:end`` markers.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bench_cpu import machine_info, short, write_results
from torch import Tensor, nn

import fxforge
from fxforge.numerics.timing import Schedule, measure
from fxforge.pipeline.fragments import with_options
from fxforge.testing.speech import trained_speech_embedder

BEGIN, END = "<!-- bench-dynamic:begin -->", "<!-- bench-dynamic:end -->"
Runner = Callable[[Tensor], Tensor]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=-1)
        q, k, v = (y.reshape(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(attn)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Decoder(nn.Module):
    """A GPT-2-shaped decoder in plain torch (what fxforge's symbolic trace captures)."""

    def __init__(self, layers: int = 12, width: int = 768, heads: int = 12, vocab: int = 50257,
                 context: int = 1024) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.ln(self.blocks(self.tokens(ids) + self.positions(positions))))


def min_cosine(reference: Tensor, value: Tensor) -> float:
    return F.cosine_similarity(reference.flatten(1).double(), value.flatten(1).double()).min().item()


def export_onnx(model: nn.Module, example: Tensor, directory: str) -> str:
    """The fp32 model as ONNX (torch.onnx's dynamo exporter, batch dimension dynamic), folded by onnxruntime's
    pre-processing so that each LSTM's weights are initializers (what its ``quantize_dynamic`` needs)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process  # optional: onnxruntime

    raw, path = os.path.join(directory, "model.onnx"), os.path.join(directory, "model.pre.onnx")
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), dynamo=True, verbose=False).save(raw)
    quant_pre_process(raw, path, skip_symbolic_shape=True)  # symbolic shape inference fails on the export
    return path


def ort_runner(path: str, threads: int) -> Runner:
    import onnxruntime as ort  # optional: onnxruntime

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # spinning would slow the others
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def ort_dynamic(path: str, threads: int, keep_first_lstm: bool = False) -> Runner:
    """onnxruntime ``quantize_dynamic`` (QInt8 weights) of the exported model; ``keep_first_lstm``: its first
    LSTM node (the stack's layer 0, the one plain int8 breaks) excluded, as fxforge's per-layer choice does."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic  # optional: onnxruntime

    lstms = [n.name for n in onnx.load(path).graph.node if n.op_type == "LSTM"]
    quantized = path.replace(".onnx", f".int8{'-l0' if keep_first_lstm else ''}.onnx")
    quantize_dynamic(path, quantized, weight_type=QuantType.QInt8, nodes_to_exclude=lstms[:1] if keep_first_lstm
                     else [])
    return ort_runner(quantized, threads)


def lstm_peers(model: nn.Module, example: Tensor, onnx_path: str | None, threads: int
               ) -> dict[str, Callable[[], Runner]]:
    plain = with_options(fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", min_layer_sqnr_db=-1000,
                         time_rnn_layers=False)

    def ao() -> Runner:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.LSTM, nn.Linear})

    def fx(**options: object) -> Callable[[], Runner]:
        return lambda: fxforge.compile(model, "x86", example_inputs=example, quantization="dynamic", **options)

    peers = {"eager": lambda: model, "ao_dynamic": ao, "fx_plain": fx(pipeline=plain), "fx_dynamic": fx()}
    if onnx_path is None:  # the export failed: lstm_table says why
        return peers
    return {**peers, "ort": lambda: ort_runner(onnx_path, threads),
            "ort_dynamic": lambda: ort_dynamic(onnx_path, threads),
            "ort_dynamic_l0_fp32": lambda: ort_dynamic(onnx_path, threads, keep_first_lstm=True)}


def torchao_peer(model: nn.Module, bits: int) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # optional: torchao

    peer = copy.deepcopy(model)
    quantize_(peer, Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=128))
    return peer


def decoder_peers(model: nn.Module, example: Tensor | dict[str, Any]) -> dict[str, Callable[[], nn.Module]]:
    def fx(bits: int) -> Callable[[], nn.Module]:
        return lambda: fxforge.compile(model, "x86", example_inputs=example, quantization="weight-only",
                                       quant_config={"weight_bits": bits, "group_size": 128})

    return {"eager": lambda: model, "fx_int8": fx(8), "fx_int4": fx(4),
            "torchao_int8": lambda: torchao_peer(model, 8), "torchao_int4": lambda: torchao_peer(model, 4)}


def logits_of(output: Any) -> Tensor:
    """The logits of a decoder's output: the tensor itself, a transformers output's ``logits``, or its first item."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output[0]


def build(builders: dict[str, Callable[[], Runner]], failures: dict[str, str]) -> dict[str, Runner]:
    built = {}
    for name, builder in builders.items():
        try:
            built[name] = builder()
        except Exception as exc:  # a peer that cannot run here is a row that says why
            failures[name] = f"failed: {short(exc)}"
    return built


def timed(runners: dict[str, Runner], x: Any, schedule: Schedule, failures: dict[str, str]) -> dict[str, float]:
    ok = {}
    for name, run in runners.items():
        try:
            with torch.inference_mode():
                run(x)
            ok[name] = run
        except Exception as exc:
            failures[name] = f"failed: {short(exc)}"
    with torch.inference_mode():
        return measure({name: (lambda r=run: r(x)) for name, run in ok.items()}, schedule)


def lstm_table(args: argparse.Namespace, schedule: Schedule) -> list[str]:
    """Each peer built and timed at each thread count (fxforge's timed choices are made at that count, ORT's
    ``intra_op_num_threads`` is set to it); speed-ups against eager at the same thread count."""
    model, held_out = trained_speech_embedder(0, hidden=args.hidden, steps=args.steps)
    failures: dict[str, str] = {}
    onnx_path = None
    try:
        onnx_path = export_onnx(model, held_out[:8], tempfile.mkdtemp())
    except Exception as exc:
        failures.update(dict.fromkeys(("ort", "ort_dynamic", "ort_dynamic_l0_fp32"), f"failed: {short(exc)}"))
    with torch.inference_mode():
        reference = model(held_out)
    cosines: dict[str, float] = {}
    times: dict[tuple[int, int], dict[str, float]] = {}
    reports: dict[int, list[str]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        runners = build(lstm_peers(model, held_out[:8], onnx_path, threads), failures)
        with torch.inference_mode():
            cosines.update({name: min_cosine(reference, run(held_out)) for name, run in runners.items()})
        for bs in (1, 8):
            times[threads, bs] = timed(runners, held_out[:bs].contiguous(), schedule, failures)
        compiled = runners.get("fx_dynamic")
        if isinstance(compiled, fxforge.CompiledModule):
            reports[threads] = compiled.report.quantization.lines()
    header = " | ".join(f"{t} thr bs 1 ms | {t} thr bs 8 ms | {t} thr vs eager (bs 1 / 8)" for t in args.threads)
    lines = [f"LSTM: 3 layers, {args.hidden} hidden, 40 bands, {args.steps} frames; min embedding cosine on 32 "
             "held-out utterances; median ms at each intra-op thread count", "",
             f"| peer | min cosine | {header} |", "|---|---|" + "---|---|---|" * len(args.threads)]
    for name in cosines:
        if name in failures:
            lines.append(f"| {name} | {failures[name]} |" + " | | |" * len(args.threads))
            continue
        cells = []
        for t in args.threads:
            ms = {bs: times[t, bs][name] * 1e3 for bs in (1, 8)}
            speed = {bs: times[t, bs]["eager"] / times[t, bs][name] for bs in (1, 8)}
            cells.append(f"{ms[1]:.2f} | {ms[8]:.2f} | {speed[1]:.2f}x / {speed[8]:.2f}x")
        lines.append(f"| {name} | {cosines[name]:.4f} | " + " | ".join(cells) + " |")
    lines += [f"| {name} | {why} |" + " | | |" * len(args.threads) for name, why in failures.items()
              if name not in cosines]
    for threads, report in reports.items():
        lines += ["", f"fx_dynamic per layer at {threads} thread(s) (what each layer got and why):", "```", *report,
                  "```"]
    return lines


def decoder_table(args: argparse.Namespace, schedule: Schedule) -> list[str]:
    torch.manual_seed(0)
    model = Decoder(args.layers, args.width, heads=args.width // 64, vocab=args.vocab).eval()
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    return ["", f"Decoder (GPT-2 shape as a torch-native stand-in): {args.layers} layers, {args.width} wide, "
            f"vocab {args.vocab}, bs 1, seq {args.seq}; logits cosine (min over positions); median ms", "",
            *weight_only_rows(model, ids, schedule)]


def gpt2_table(args: argparse.Namespace, schedule: Schedule) -> list[str]:
    """transformers' GPT2LMHeadModel itself (captured through torch.export), random init, seeded."""
    import transformers  # optional: transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64,
                                     vocab_size=args.vocab)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    return ["", f"transformers GPT2LMHeadModel (GPT2Config, random init; tied LM head): {args.layers} layers, "
            f"{args.width} wide, vocab {args.vocab}, bs 1, seq {args.seq}, use_cache=False; logits cosine (min over "
            "positions); median ms", "", *weight_only_rows(model, {"input_ids": ids, "use_cache": False}, schedule)]


def weight_only_rows(model: nn.Module, example: Tensor | dict[str, Any], schedule: Schedule) -> list[str]:
    failures: dict[str, str] = {}
    modules = build(decoder_peers(model, example), failures)
    runners = {name: (lambda x, m=m: logits_of(m(**x) if isinstance(x, dict) else m(x))) for name, m in modules.items()}
    times = timed(runners, example, schedule, failures)
    with torch.inference_mode():
        reference = runners["eager"](example)
        cosines = {n: min_cosine(reference[0], r(example)[0]) for n, r in runners.items() if n not in failures}
    lines = ["| peer | logits cosine | ms | vs eager | weight memory |", "|---|---|---|---|---|"]
    for name, module in modules.items():
        if name in failures:
            lines.append(f"| {name} | {failures[name]} | | | |")
            continue
        memory = ""
        if isinstance(module, fxforge.CompiledModule):
            memory = next((n.split("weight memory ")[1] for p in module.report.passes for n in p.notes
                           if "weight memory" in n), "")
        lines.append(f"| {name} | {cosines[name]:.4f} | {times[name] * 1e3:.2f} | "
                     f"{times['eager'] / times[name]:.2f}x | {memory} |")
    lines += [f"| {name} | {why} | | | |" for name, why in failures.items() if name not in modules]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=lambda text: [int(t) for t in text.split(",")], default=[1, 2],
                        help="intra-op thread counts of the LSTM table, comma-separated")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (a dry run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.steps, args.layers, args.width, args.vocab, args.rounds = 64, 10, 2, 128, 1000, 3
    load = os.getloadavg()[0]
    schedule = Schedule(warmup=3, rounds=args.rounds, statistic=statistics.median)
    tables = [*lstm_table(args, schedule), *decoder_table(args, schedule), *gpt2_table(args, schedule)]
    body = "\n".join([*tables, "", *machine_info(load)])
    print(body)
    if not args.quick:
        write_results(args.out, "## Dynamic and weight-only int8/int4 (`benchmarks/bench_dynamic.py`)\n\n" + body,
                      BEGIN, END, header=None)


if __name__ == "__main__":
    main()
