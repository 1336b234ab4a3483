"""Per-op fp32 CPU kernel candidates at the layer shapes of real models, in one process, interleaved.

Each model is compiled for "cpu" (lower-cpu's oneDNN modules give the layers, their post-ops and input shapes);
layers with equal shapes are measured once. Per layer, every candidate is called in turn (``--rounds`` rounds after a
warm-up; the best call counts), and per (model, threads, layer kind) the table sums the layers' times and gives each
candidate's ratio to the current kernel (current ms / candidate ms: >1 means the candidate is faster); for linears
the reference is eager's F.linear (lower-cpu leaves plain Linear there; linear+relu runs "onednn"), for 1x1 convs
on 1x1 maps (squeeze-excitation) the GEMM lower-cpu runs them on.
Candidates:
  conv    onednn_cl (lower-cpu's OneDnnConv2d: prepacked weight, channels-last, fused post-ops), onednn_nchw (the same
          prepacked weight on an NCHW input, post-ops fused except with add), aten_cl (F.conv2d on a channels-last
          input, dense weight; post-ops applied after), aten_cl_wcl (the same with a channels-last weight),
          blocked_nopost (oneDNN on to_mkldnn blocked tensors: kernel only, NO post-ops and no layout conversions:
          an upper bound), gemm (1x1 stride 1 only: GemmConv1x1, torch.addmm on the channels-last view),
          gemm_mkl_packed (the same with torch.ops.mkl._mkl_linear and a packed weight)
  linear  eager (F.linear, MKL), onednn (_linear_pointwise, prepacked), gemm (GemmLinear: addmm, weight transposed
          once), mkl_packed (torch.ops.mkl._mkl_linear)
    .venv/bin/python benchmarks/fp32_kernels.py --models resnet18,mobilenet_v2,efficientnet_b0,vit_b_16 --threads 1,2
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from bench_cpu import make_model

import fxforge
from fxforge.backends.cpu import GemmConv1x1, OneDnnConv2d, OneDnnLinear
from fxforge.backends.fp32_kernel_choice import GemmLinear
from fxforge.graph.matching import ACTIVATIONS
from fxforge.numerics import timing
from fxforge.passes.attention import SdpaSelfAttention

mkldnn = torch.ops.mkldnn
CL = torch.channels_last


def _act(y: torch.Tensor, activation: str) -> torch.Tensor:
    return ACTIVATIONS[activation](y) if activation else y


def layers(name: str, batch: int) -> list[tuple[str, torch.nn.Module, tuple]]:
    """(kind, module, input shape) for the lowered convs and linears of ``name`` (plus in-projections of attention)."""
    x = torch.randn(batch, 3, 224, 224)
    gm = fxforge.compile(make_model(name), "cpu", example_inputs=x).graph_module
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args or "tensor_meta" not in getattr(node.args[0], "meta", {}):
            continue
        module, shape = gm.get_submodule(str(node.target)), tuple(node.args[0].meta["tensor_meta"].shape)
        if isinstance(module, OneDnnConv2d):
            out.append((_conv_kind(module), module, shape))
        elif isinstance(module, GemmConv1x1):  # lower-cpu's choice for 1x1 convs on 1x1 maps
            out.append((MAP_1X1, _as_onednn(module, shape), shape))
        elif isinstance(module, (OneDnnLinear, torch.nn.Linear)):
            out.append(("linear", module, shape))
        elif isinstance(module, SdpaSelfAttention):
            in_proj = torch.nn.Linear(*reversed(module.in_proj_weight.shape))
            in_proj.weight.data, in_proj.bias.data = module.in_proj_weight.data, module.in_proj_bias.data
            out += [("linear", in_proj, shape), ("linear", module.out_proj, shape)]
    return out


MAP_1X1 = "1x1 on 1x1 map"  # squeeze-excitation convs: lower-cpu runs them as GEMMs (the current kernel)
CURRENT = {"linear": "eager", MAP_1X1: "gemm"}  # the kernel lower-cpu picks, per layer kind (default onednn_cl)


def _as_onednn(gemm: GemmConv1x1, shape: tuple) -> OneDnnConv2d:
    """The oneDNN conv computing what ``gemm`` computes (the candidates are built from it)."""
    conv = torch.nn.Conv2d(gemm.weight.shape[1], gemm.weight.shape[0], 1, bias=gemm.bias is not None)
    conv.weight.data = gemm.weight.reshape(conv.weight.shape).clone()
    if gemm.bias is not None:
        conv.bias.data = gemm.bias.clone()
    return OneDnnConv2d(conv, gemm.binary, gemm.activation, list(shape))


def _conv_kind(module: OneDnnConv2d) -> str:
    if module.groups > 1:
        return "dw" if module.groups == module.weight.shape[0] else "grouped"
    if tuple(module.weight.shape[2:]) == (1, 1):
        return "1x1" if module.stride == [1, 1] else "1x1/s2"
    return "stem" if module.weight.shape[1] == 3 else "kxk"


def conv_candidates(m: OneDnnConv2d, shape: tuple) -> dict:
    x = torch.randn(shape).contiguous(memory_format=CL)
    geometry = (m.stride, m.padding, m.dilation, m.groups)
    y = F.conv2d(x, m.weight, m.bias, *geometry)
    other = torch.randn_like(y) if m.binary else None
    add = (lambda t: t + other) if m.binary else (lambda t: t)
    xn, on = x.contiguous(), (other.contiguous() if m.binary else None)
    w_cl = m.weight.contiguous(memory_format=CL)
    c = {"onednn_cl": lambda: m(x, other),
         "onednn_nchw": lambda: _onednn_nchw(m, xn, on),
         "aten_cl": lambda: _act(add(F.conv2d(x, m.weight, m.bias, *geometry)), m.activation),
         "aten_cl_wcl": lambda: _act(add(F.conv2d(x, w_cl, m.bias, *geometry)), m.activation)}
    xm = x.to_mkldnn()
    wm = torch._C._nn.mkldnn_reorder_conv2d_weight(m.weight.to_mkldnn(), m.padding, m.stride, m.dilation, m.groups)
    c["blocked_nopost"] = lambda: torch.mkldnn_convolution(xm, wm, m.bias, m.padding, m.stride, m.dilation, m.groups)
    if _conv_kind(m) == "1x1":  # 1x1, stride 1, one group (1x1 maps included)
        gemm = GemmConv1x1.of(m)
        c["gemm"] = lambda: gemm(x, other)
        n, cin, h, w = shape
        w2 = m.weight.reshape(m.weight.shape[0], -1)
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w2, n * h * w)

        def mkl_packed():
            rows = x.permute(0, 2, 3, 1).reshape(-1, cin)
            out = torch.ops.mkl._mkl_linear(rows, packed, w2, m.bias, n * h * w).view(n, h, w, -1).permute(0, 3, 1, 2)
            return _act(add(out), m.activation)
        c["gemm_mkl_packed"] = mkl_packed
    return c


def _onednn_nchw(m: OneDnnConv2d, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
    args = (m.packed_weight, m.bias, m.padding, m.stride, m.dilation, m.groups)
    if not m.binary:
        return mkldnn._convolution_pointwise(x, *args, m.unary, m.unary_scalars, "")
    return _act(mkldnn._convolution_pointwise(x, *args, "none", [], "") + other, m.activation)


def linear_candidates(m: torch.nn.Module, shape: tuple) -> dict:
    x = torch.randn(shape)
    activation = getattr(m, "activation", "")
    rows = x.reshape(-1, shape[-1]).shape[0]
    onednn = m if isinstance(m, OneDnnLinear) else OneDnnLinear(m, "", rows)
    gemm = GemmLinear(m, activation)
    packed = torch.ops.mkl._mkl_reorder_linear_weight(m.weight, rows)
    return {"eager": lambda: _act(F.linear(x, m.weight, m.bias), activation),
            "onednn": lambda: onednn(x),
            "gemm": lambda: gemm(x),
            "mkl_packed": lambda: _act(torch.ops.mkl._mkl_linear(x.reshape(rows, -1), packed, m.weight, m.bias, rows),
                                       activation)}


def best_times(candidates: dict, rounds: int) -> dict[str, float]:
    """Seconds per call of each candidate: the best of ``rounds`` interleaved calls after 2 warm-up calls."""
    return timing.measure(candidates, timing.Schedule(warmup=2, rounds=rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2,efficientnet_b0,vit_b_16")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print("| model | threads | kind | layers | ms per candidate (current / candidate) |\n|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name in args.models.split(","):
            totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
            counts: dict[str, int] = defaultdict(int)
            measured: dict[tuple, dict[str, float]] = {}
            for kind, module, shape in layers(name, args.batch_size):
                key = (kind, tuple(module.weight.shape), shape, repr(module))
                if key not in measured:
                    with torch.inference_mode():
                        make = linear_candidates if kind == "linear" else conv_candidates
                        measured[key] = best_times(make(module, shape), args.rounds)
                counts[kind] += 1
                for candidate, seconds in measured[key].items():
                    totals[kind][candidate] += seconds
            for kind, times in totals.items():
                current = times[CURRENT.get(kind, "onednn_cl")]  # linear: most are plain (eager)
                cells = "  ".join(f"{c} {t * 1e3:.2f} ({current / t:.2f}x)" for c, t in times.items())
                print(f"| {name} | {threads} | {kind} | {counts[kind]} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
