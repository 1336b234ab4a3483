"""quantize-weight-only + lower-weight-only: int8 / group-wise int4 weights on torch's weight-only kernels."""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch
import torch.nn.functional as F
from quant_helpers import sqnr
from torch import nn

import fxforge
from fxforge.backends.weight_only import Int4WeightLinear, Int8WeightLinear
from fxforge.passes.weight_only import WeightOnlyLinear
from fxforge.passes.weight_only_bits import Candidate, hold_floor
from fxforge.pipeline.fragments import with_options, without
from fxforge.quant.sqnr import outputs_sqnr_db
from helpers import assert_unchanged, state_snapshot


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.head = nn.Linear(128, 256), nn.Linear(256, 128), nn.Linear(128, 96, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


X = torch.randn(2, 8, 128, generator=torch.Generator().manual_seed(1))


def compile_mlp(target: str = "x86", reference: bool = False, **kwargs) -> tuple[nn.Module, fxforge.CompiledModule]:
    torch.manual_seed(0)
    model = Mlp().eval()
    if reference:
        kwargs["pipeline"] = without(fxforge.pipeline_for(target, "weight-only"), "lower-weight-only")
    return model, fxforge.compile(model, target, example_inputs=X, quantization="weight-only", **kwargs)


def linears(compiled: fxforge.CompiledModule, kind: type) -> list[str]:
    return [name for name, m in compiled.graph_module.named_modules() if isinstance(m, kind)]


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_int8_weight_only_runs_the_int8pack_kernel(target):
    model, compiled = compile_mlp(target)
    assert linears(compiled, Int8WeightLinear) == ["up", "down", "head"]
    assert not (sqnr(model, compiled, X) < 35)
    _, reference = compile_mlp(target, reference=True)
    assert linears(reference, WeightOnlyLinear) == ["up", "down", "head"]
    assert not (sqnr(reference, compiled, X) < 40)  # the kernel chosen may round activations to bf16


def test_without_autotune_the_exact_aten_kernels_run():
    _, compiled = compile_mlp(pipeline=with_options(fxforge.pipeline_for("x86", "weight-only"), "lower-weight-only",
                                                    autotune=False))
    _, reference = compile_mlp(reference=True)
    assert {compiled.graph_module.get_submodule(n).kernel for n in ("up", "down", "head")} == {"int8pack"}
    with torch.inference_mode():
        torch.testing.assert_close(compiled(X), reference(X), rtol=1e-4, atol=1e-4)


def test_int4_groups_match_the_reference_and_shrink_the_weights():
    model, compiled = compile_mlp(quant_config={"weight_bits": 4, "group_size": 32})
    assert linears(compiled, Int4WeightLinear) == ["up", "down", "head"]
    _, reference = compile_mlp(reference=True, quant_config={"weight_bits": 4, "group_size": 32})
    assert not (sqnr(reference, compiled, X) < 40)  # the kernel chosen may round activations to bf16
    assert not (sqnr(model, compiled, X) < 15)
    (note,) = [n for p in compiled.report.passes if p.name == "lower-weight-only" for n in p.notes if "memory" in n]
    units = {"KiB": 2**10, "MiB": 2**20}
    before, after = (float(part.split()[0]) * units[part.split()[1]]
                     for part in note.split("weight memory ")[1].split(" -> "))
    assert after < before / 5  # 4-bit values plus one (scale, zero) pair per group of 32


@pytest.mark.parametrize("kind", [Int8WeightLinear, Int4WeightLinear])
def test_every_kernel_candidate_computes_the_reference(kind):
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 40), torch.randn(3, 5, 64)  # 40 rows: int4 packing pads them to 48
    reference = WeightOnlyLinear(linear, 8 if kind is Int8WeightLinear else 4, 32)
    with torch.inference_mode():
        expected = reference(x)
        for kernel in kind.KERNELS:
            got = kind(reference, kernel)(x)
            if kernel.endswith("-bf16"):  # activations rounded to bf16 on the way in: 8 significant bits
                assert not (outputs_sqnr_db(expected, got) < 40)
            else:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_weight_bits_and_group_size_per_layer():
    config = fxforge.QuantConfig(weight_bits=4).for_name("head", weight_bits=8).for_name("down", group_size=64)
    _, compiled = compile_mlp(reference=True, quant_config=config)
    gm = compiled.graph_module
    assert (gm.get_submodule("up").bits, gm.get_submodule("up").group_size) == (4, 128)
    assert (gm.get_submodule("down").bits, gm.get_submodule("down").group_size) == (4, 64)
    assert gm.get_submodule("head").bits == 8
    assert {r.layer: r.weight for r in compiled.report.quantization.layers}["head"] == "int8 per output channel"


def test_int4_falls_back_to_int8_where_groups_do_not_divide_the_width():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(48, 16)).eval(), torch.randn(3, 48)
    compiled = fxforge.compile(model, "x86", example_inputs=x, quantization="weight-only",
                               quant_config={"weight_bits": 4, "group_size": 32})
    assert linears(compiled, Int8WeightLinear) == ["0"]
    assert "do not divide 48" in compiled.report.quantization.layers[0].weight


def test_per_tensor_setting_gives_one_scale():
    _, compiled = compile_mlp(reference=True, quant_config={"per_channel": False})
    scales = compiled.graph_module.get_submodule("up").scales
    assert torch.equal(scales, scales[0].expand_as(scales))


@pytest.mark.parametrize("bad", [{"weight_bits": 3}, {"weight_bits": 4, "group_size": 48}])
def test_bad_weight_settings_are_config_errors(bad):
    with pytest.raises(fxforge.ConfigError, match="weight_bits|group_size"):
        compile_mlp(quant_config=bad)


def test_weight_only_does_not_touch_the_model():
    torch.manual_seed(0)
    model = Mlp().eval()
    snapshot = state_snapshot(model)
    fxforge.compile(model, "x86", example_inputs=X, quantization="weight-only", quant_config={"weight_bits": 4})
    assert_unchanged(model, snapshot)


def test_transformers_conv1d_weights_are_transposed_into_the_kernel():
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = nn.Sequential(conv1d(96, 64), nn.GELU(), conv1d(64, 96)).eval()
    x = torch.randn(1, 8, 64)
    for bits, kind, floor in ((8, Int8WeightLinear, 35), (4, Int4WeightLinear, 15)):
        compiled = fxforge.compile(model, "x86", example_inputs=x, quantization="weight-only", leaf_modules=[conv1d],
                                   quant_config={"weight_bits": bits, "group_size": 32})
        assert linears(compiled, kind) == ["0", "2"]
        assert not (sqnr(model, compiled, x) < floor)


def test_a_tied_lm_head_is_quantized_and_the_embedding_keeps_its_fp32_copy():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=96, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()  # the LM head shares the token embedding's weight
    snapshot = state_snapshot(model)
    inputs = {"input_ids": torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(0)),
              "use_cache": False}
    compiled = fxforge.compile(model, "x86", example_inputs=inputs, quantization="weight-only")
    assert isinstance(compiled.graph_module.get_submodule("lm_head"), Int8WeightLinear)
    untied = [n for n in compiled.graph_module.graph.nodes if n.op == "get_attr" and "lm_head" in str(n.target)]
    assert untied and all(torch.equal(getattr(compiled.graph_module, str(n.target)), model.lm_head.weight)
                          for n in untied)
    with torch.inference_mode():
        got, want = compiled(**inputs), model(**inputs).logits
    got = got if isinstance(got, torch.Tensor) else getattr(got, "logits", got[0])
    assert not (outputs_sqnr_db(want, got) < 30)
    assert_unchanged(model, snapshot)


def test_hold_floor_keeps_the_costliest_layers_per_byte_in_int8():
    # additive noise: each layer adds its cost to the output noise energy in int4, 1e-6 in int8
    costs, saved = {"a": 0.004, "b": 0.0004, "c": 0.0004, "d": 0.0003}, {"a": 100, "b": 100, "c": 100, "d": 10}
    placed: dict[str, str] = {}
    candidates = [Candidate(name, "int4", "int8", lambda bits, n=name: placed.__setitem__(n, bits), saved[name])
                  for name in costs]
    for c in candidates:
        c.place(c.int4)

    def measure() -> float:
        return -10 * math.log10(sum(costs[n] if bits == "int4" else 1e-6 for n, bits in placed.items()))

    final = hold_floor(candidates, measure, 30.0, measure())  # 30 dB: a noise budget of 0.001
    assert {c.name for c in candidates if c.int8_kept} == {"a", "d"}  # "d" costs less than "b" but saves a tenth
    assert placed == {"a": "int8", "b": "int4", "c": "int4", "d": "int8"}
    assert not (final < 30.0)
    for c in candidates:  # alone: itself in int4, the three others in int8
        assert c.alone_db == pytest.approx(-10 * math.log10(costs[c.name] + 3e-6))


def small_gpt2() -> tuple[nn.Module, dict, dict]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=128, n_head=2, vocab_size=512, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    example, held_out = ({"input_ids": torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(seed)),
                          "use_cache": False} for seed in (0, 1))
    return model, example, held_out


def gpt2_int4(model: nn.Module, example: dict, floor: float | None = None, **config) -> fxforge.CompiledModule:
    pipeline = fxforge.pipeline_for("x86", "weight-only")
    if floor is not None:
        pipeline = with_options(pipeline, "quantize-weight-only", min_output_sqnr_db=floor)
    return fxforge.compile(model, "x86", example_inputs=example, quantization="weight-only", pipeline=pipeline,
                           quant_config=fxforge.QuantConfig(weight_bits=4, group_size=32, **config))


def min_cosine(model: nn.Module, compiled: nn.Module, inputs: dict) -> float:
    with torch.inference_mode():
        want, got = model(**inputs).logits, compiled(**inputs)[0]
    return F.cosine_similarity(want.flatten(0, -2).double(), got.flatten(0, -2).double()).min().item()


def test_int4_layers_the_output_cannot_afford_go_int8_by_measured_sensitivity():
    model, example, held_out = small_gpt2()
    everywhere, chosen = gpt2_int4(model, example, floor=-math.inf), gpt2_int4(model, example)
    weights = {r.layer: r.weight for r in chosen.report.quantization.layers}
    kept = [layer for layer, weight in weights.items() if weight.startswith("int8") and "int4 alone" in weight]
    assert kept and len(kept) < len(weights) // 2  # the few layers that cannot take int4, not all of them
    assert all(isinstance(everywhere.graph_module.get_submodule(k), Int4WeightLinear) for k in kept)
    assert all(isinstance(chosen.graph_module.get_submodule(k), Int8WeightLinear) for k in kept)
    assert min_cosine(model, chosen, held_out) >= 0.992  # int4 everywhere: about 0.989 on held-out tokens
    assert min_cosine(model, chosen, held_out) > min_cosine(model, everywhere, held_out) + 0.002


def test_the_layers_chosen_for_int8_buy_more_output_sqnr_than_the_least_sensitive_ones():
    model, example, _ = small_gpt2()
    chosen = gpt2_int4(model, example)
    alone = {r.layer: float(re.search(r"int4 alone: output ([-\d.]+) dB", r.weight).group(1))
             for r in chosen.report.quantization.layers if "int4 alone" in r.weight}
    kept = [layer for layer in alone if isinstance(chosen.graph_module.get_submodule(layer), Int8WeightLinear)]
    assert kept and all(alone[k] < statistics.median(alone.values()) for k in kept)  # they cost the output most
    least = sorted(alone, key=alone.get)[-len(kept):]  # the same number of layers, those int4 costs least
    config = {"names": {name: {"weight_bits": 8} for name in least}}
    elsewhere = fxforge.compile(model, "x86", example_inputs=example, quantization="weight-only",
                                pipeline=with_options(fxforge.pipeline_for("x86", "weight-only"),
                                                      "quantize-weight-only", min_output_sqnr_db=-math.inf),
                                quant_config={"weight_bits": 4, "group_size": 32, **config})
    with torch.inference_mode():
        want = model(**example).logits
        assert outputs_sqnr_db(want, chosen(**example)[0]) > outputs_sqnr_db(want, elsewhere(**example)[0]) + 1
