"""Hugging Face transformers through the torch.export front end: small configs, random weights, no network."""

import pytest
import torch

import fxforge
from helpers import rel_error

T = pytest.importorskip("transformers")

IDS = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(2, 32, dtype=torch.long)


def _bert():
    return T.BertModel(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, vocab_size=1000)), {"input_ids": IDS, "attention_mask": MASK}


def _gpt2():
    config = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128, bos_token_id=0,
                          eos_token_id=0)
    return T.GPT2Model(config), {"input_ids": IDS, "use_cache": False}


def _t5_encoder():
    return T.T5EncoderModel(T.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                       vocab_size=1000)), {"input_ids": IDS}


def _vit():
    config = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         image_size=32, patch_size=8)
    return T.ViTModel(config), {"pixel_values": torch.randn(2, 3, 32, 32)}


def _wav2vec2():
    config = T.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3),
                              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
    return T.Wav2Vec2Model(config), {"input_values": torch.randn(2, 1600)}


def _distilbert():
    return T.DistilBertModel(T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                vocab_size=1000)), {"input_ids": IDS, "attention_mask": MASK}


MODELS = {"bert": _bert, "gpt2": _gpt2, "t5-encoder": _t5_encoder, "vit": _vit, "wav2vec2": _wav2vec2,
          "distilbert": _distilbert}


def _model(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return model.eval(), inputs


def _cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cpu_matches_eager_and_keeps_the_output_structure(name):
    model, inputs = _model(name)
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    expected, actual = model(**inputs), compiled(**inputs)
    assert type(actual) is type(expected)
    assert list(actual.keys()) == list(expected.keys())
    for key in expected:
        assert rel_error(actual[key], expected[key]) <= 1e-4, key
    assert compiled.report.front_end == "export"
    assert "symbolic tracing failed" in compiled.report.front_end_reason


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5-encoder", "vit", "wav2vec2"])
def test_x86_dynamic_int8_keeps_the_last_hidden_state(name):
    model, inputs = _model(name)
    compiled = fxforge.compile(model, "x86", example_inputs=inputs, quantization="dynamic")
    cosine = _cosine(compiled(**inputs).last_hidden_state, model(**inputs).last_hidden_state)
    assert not (cosine < 0.99)  # NaN fails too


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_linear_layers_arrive_as_modules(name):
    model, inputs = _model(name)
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs, pipeline="remove-noops")
    kinds = {type(m).__name__ for m in compiled.graph_module.modules()}
    assert ("Conv1D" if name == "gpt2" else "Linear") in kinds
    assert not any(n.op == "call_function" and "linear" in str(n.target) or "addmm" in str(n.target)
                   for n in compiled.graph_module.graph.nodes)


def test_bert_compiled_at_seq_64_runs_at_128_and_batch_4():
    model, _ = _model("bert")
    ids = torch.randint(0, 1000, (2, 64))
    compiled = fxforge.compile(model, "cpu", example_inputs={"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    for shape in ((2, 128), (4, 64), (4, 128)):
        other = torch.randint(0, 1000, shape)
        mask = torch.ones_like(other)
        expected = model(input_ids=other, attention_mask=mask).last_hidden_state
        assert rel_error(compiled(input_ids=other, attention_mask=mask).last_hidden_state, expected) <= 1e-4
    assert any("input_ids" in line and ".." in line for line in compiled.report.input_shapes)


def test_bert_outside_the_compiled_range_is_a_typed_error():
    model, inputs = _model("bert")
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    too_long = torch.randint(0, 1000, (2, 600))  # position embeddings stop at 512
    with pytest.raises(fxforge.InputShapeError, match="outside the compiled range"):
        compiled(input_ids=too_long, attention_mask=torch.ones_like(too_long))
    with pytest.raises(fxforge.InputShapeError, match="int64"):
        compiled(input_ids=IDS.float(), attention_mask=MASK)


def test_named_dynamic_dims_and_static_compile():
    model, inputs = _model("bert")
    static = fxforge.compile(model, "cpu", example_inputs=inputs, dynamic=False)
    with pytest.raises(fxforge.InputShapeError, match="compiled for exactly 32"):
        static(input_ids=IDS[:, :16], attention_mask=MASK[:, :16])
    named = fxforge.compile(model, "cpu", example_inputs=inputs,
                            dynamic={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    short = {"input_ids": IDS[:, :16], "attention_mask": MASK[:, :16]}
    assert rel_error(named(**short).last_hidden_state, model(**short).last_hidden_state) <= 1e-4
    with pytest.raises(fxforge.InputShapeError, match="dimension 0"):
        named(input_ids=IDS[:1], attention_mask=MASK[:1])


def test_gpt2_with_its_default_cache_names_use_cache_false():
    model, _ = _model("gpt2")
    with pytest.raises(fxforge.TraceError, match="use_cache=False"):
        fxforge.compile(model, "cpu", example_inputs={"input_ids": IDS})


def test_positional_and_keyword_calls_agree():
    model, inputs = _model("bert")
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    by_name = compiled(**inputs).last_hidden_state
    assert torch.equal(compiled(IDS, MASK).last_hidden_state, by_name)
    with pytest.raises(fxforge.InputShapeError):
        compiled(IDS)  # compiled with an attention mask


@pytest.mark.parametrize("make", [T.BertModel, T.DistilBertModel])
def test_eager_attention_with_padding_mask_becomes_sdpa(make):
    torch.manual_seed(0)
    config = (T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                           vocab_size=1000) if make is T.BertModel else
              T.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=1000))
    config._attn_implementation = "eager"
    model = make(config).eval()
    mask = MASK.clone()
    mask[1, 20:] = 0  # padding: the additive mask matters
    compiled = fxforge.compile(model, "cpu", example_inputs={"input_ids": IDS, "attention_mask": mask})
    targets = [str(n.target) for n in compiled.graph_module.graph.nodes if n.op == "call_function"]
    assert sum("scaled_dot_product_attention" in t for t in targets) == 2
    assert not any("softmax" in t for t in targets)
    expected = model(input_ids=IDS, attention_mask=mask).last_hidden_state
    assert rel_error(compiled(input_ids=IDS, attention_mask=mask).last_hidden_state, expected) <= 1e-4


@pytest.mark.parametrize("name", ["gpt2", "wav2vec2"])
def test_cpu_bf16_where_the_hardware_has_it(name):
    if "cpu-bf16" not in fxforge.targets():
        pytest.skip("no bf16 CPU here")
    model, inputs = _model(name)
    compiled = fxforge.compile(model, "cpu-bf16", example_inputs=inputs)
    assert not (compiled.report.output_sqnr_db < 30)
    assert compiled(**inputs).last_hidden_state.dtype == torch.float32
