"""Dynamic and weight-only quantization benchmark: a trained speech LSTM and a GPT-2-sized decoder, against peers.

LSTM table: ``fxforge.testing.speech.trained_speech_embedder`` (3 layers, ``--hidden`` units, 40 power-mel bands,
trained for a few seconds inside the script, seeded), ``--steps`` frames per utterance, batch sizes 1 and 8.
Peers: ``eager`` fp32; ``ao_dynamic`` (``torch.ao.quantization.quantize_dynamic`` on LSTM + Linear: the
deprecated upstream path, default qconfig); ``fx_plain`` (fxforge dynamic int8 with every layer forced to int8,
``min_layer_sqnr_db=-1000``: what fxforge did before it measured layers); ``fx_dynamic`` (``fxforge.compile(m,
"x86", quantization="dynamic")``). Accuracy: the minimum embedding cosine against eager on 32 held-out utterances.

Decoder table: GPT-2's shape (12 layers, 768 wide, 12 heads, 50257-token LM head, random init, seeded), bs 1,
seq ``--seq``: memory-bound, where weight-only quantization pays. fxforge's symbolic trace cannot capture
transformers' GPT2LMHeadModel, so the compiled rows use a torch-native decoder of the same shape
(``Decoder``: nn.Linear projections, ``F.scaled_dot_product_attention``, tied embedding / LM head weights
untied as a separate Linear, as GPT-2's LM head is a matmul with the embedding). Peers: ``eager`` fp32;
``fx_int8`` / ``fx_int4`` (``quantization="weight-only"``, ``weight_bits`` 8 / 4, ``group_size`` 128);
``torchao_int8`` / ``torchao_int4`` (``torchao.quantization.quantize_`` with ``Int8WeightOnlyConfig`` /
``Int4WeightOnlyConfig(group_size=128)`` on the same decoder). Accuracy: the cosine of the logits against eager.

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
import warnings
from collections.abc import Callable
from pathlib import Path

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


def lstm_peers(model: nn.Module, example: Tensor) -> dict[str, Runner]:
    plain = with_options(fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", min_layer_sqnr_db=-1000,
                         time_rnn_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.LSTM, nn.Linear})
    return {"eager": model, "ao_dynamic": ao,
            "fx_plain": fxforge.compile(model, "x86", example_inputs=example, quantization="dynamic", pipeline=plain),
            "fx_dynamic": fxforge.compile(model, "x86", example_inputs=example, quantization="dynamic")}


def torchao_peer(model: nn.Module, bits: int) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_  # optional: torchao

    peer = copy.deepcopy(model)
    quantize_(peer, Int8WeightOnlyConfig() if bits == 8 else Int4WeightOnlyConfig(group_size=128))
    return peer


def decoder_peers(model: nn.Module, example: Tensor) -> dict[str, Callable[[], Runner]]:
    def fx(bits: int) -> Callable[[], Runner]:
        return lambda: fxforge.compile(model, "x86", example_inputs=example, quantization="weight-only",
                                       quant_config={"weight_bits": bits, "group_size": 128})

    return {"eager": lambda: model, "fx_int8": fx(8), "fx_int4": fx(4),
            "torchao_int8": lambda: torchao_peer(model, 8), "torchao_int4": lambda: torchao_peer(model, 4)}


def build(builders: dict[str, Callable[[], Runner]], failures: dict[str, str]) -> dict[str, Runner]:
    built = {}
    for name, builder in builders.items():
        try:
            built[name] = builder()
        except Exception as exc:  # a peer that cannot run here is a row that says why
            failures[name] = f"failed: {short(exc)}"
    return built


def timed(runners: dict[str, Runner], x: Tensor, schedule: Schedule, failures: dict[str, str]) -> dict[str, float]:
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
    model, held_out = trained_speech_embedder(0, hidden=args.hidden, steps=args.steps)
    failures: dict[str, str] = {}
    runners = build({k: (lambda v=v: v) for k, v in lstm_peers(model, held_out[:8]).items()}, failures)
    with torch.inference_mode():
        reference = model(held_out)
        cosines = {name: min_cosine(reference, run(held_out)) for name, run in runners.items()}
    lines = [f"LSTM: 3 layers, {args.hidden} hidden, 40 bands, {args.steps} frames; min embedding cosine on 32 "
             "held-out utterances; median ms", "", "| peer | min cosine | bs 1 ms | bs 8 ms | bs 8 vs eager |",
             "|---|---|---|---|---|"]
    times = {bs: timed(runners, held_out[:bs].contiguous(), schedule, failures) for bs in (1, 8)}
    for name in runners:
        if name in failures:
            lines.append(f"| {name} | {failures[name]} | | | |")
            continue
        speed = times[8]["eager"] / times[8][name]
        lines.append(f"| {name} | {cosines[name]:.4f} | {times[1][name] * 1e3:.2f} | {times[8][name] * 1e3:.2f} "
                     f"| {speed:.2f}x |")
    lines += [f"| {name} | {why} | | | |" for name, why in failures.items() if name not in runners]
    compiled = runners.get("fx_dynamic")
    if isinstance(compiled, fxforge.CompiledModule):
        lines += ["", "fx_dynamic per layer (what each layer got and why):", "```",
                  *compiled.report.quantization.lines(), "```"]
    return lines


def decoder_table(args: argparse.Namespace, schedule: Schedule) -> list[str]:
    torch.manual_seed(0)
    model = Decoder(args.layers, args.width, heads=args.width // 64, vocab=args.vocab).eval()
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    failures: dict[str, str] = {}
    runners = build(decoder_peers(model, ids), failures)
    times = timed(runners, ids, schedule, failures)
    with torch.inference_mode():
        reference = model(ids)
        cosines = {n: min_cosine(reference[0], r(ids)[0]) for n, r in runners.items() if n not in failures}
    lines = ["", f"Decoder (GPT-2 shape as a torch-native stand-in): {args.layers} layers, {args.width} wide, "
             f"vocab {args.vocab}, bs 1, seq {args.seq}; logits cosine (min over positions); median ms", "",
             "| peer | logits cosine | ms | vs eager | weight memory |", "|---|---|---|---|---|"]
    for name, run in runners.items():
        if name in failures:
            lines.append(f"| {name} | {failures[name]} | | | |")
            continue
        memory = ""
        if isinstance(run, fxforge.CompiledModule):
            memory = next((n.split("weight memory ")[1] for p in run.report.passes for n in p.notes
                           if "weight memory" in n), "")
        lines.append(f"| {name} | {cosines[name]:.4f} | {times[name] * 1e3:.2f} | "
                     f"{times['eager'] / times[name]:.2f}x | {memory} |")
    lines += [f"| {name} | {why} | | | |" for name, why in failures.items() if name not in runners]
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
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 rounds (a dry run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.steps, args.layers, args.width, args.vocab, args.rounds = 64, 10, 2, 128, 1000, 3
    load = os.getloadavg()[0]
    schedule = Schedule(warmup=3, rounds=args.rounds, statistic=statistics.median)
    body = "\n".join([*lstm_table(args, schedule), *decoder_table(args, schedule), "", *machine_info(load)])
    print(body)
    if not args.quick:
        write_results(args.out, "## Dynamic and weight-only int8/int4 (`benchmarks/bench_dynamic.py`)\n\n" + body,
                      BEGIN, END, header=None)


if __name__ == "__main__":
    main()
