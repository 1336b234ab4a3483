"""A saved exported model keeps its call signature: keyword calls, the model's output class, the shape contract
and the input specs that explain a failed call; the stored types are data, rebuilt only when allowed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile

import pytest
import torch
from tiny_bert import tiny_bert
from torch import nn

import fxforge
from fxforge.errors import ArtifactError, ConfigError, InputShapeError
from fxforge.serialization.calls import node_type
from helpers import one_intra_op_thread

_fixture = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread)


@pytest.fixture(scope="module")
def saved_bert(tmp_path_factory):
    model, inputs = tiny_bert()
    compiled = fxforge.compile(model, "cpu", example_inputs=inputs)
    path = fxforge.save(compiled, tmp_path_factory.mktemp("bert") / "bert.fxf")
    return compiled, path, inputs


def test_loaded_bert_takes_keyword_calls_and_returns_the_same_output_bit_identical(saved_bert):
    compiled, path, inputs = saved_bert
    loaded = fxforge.load(path)
    expected, got = compiled(**inputs), loaded(**inputs)
    assert type(got) is type(expected)
    assert type(got).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert list(got.keys()) == list(expected.keys())
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    positional = loaded(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(positional.last_hidden_state, expected.last_hidden_state)


def test_loaded_bert_keeps_the_dynamic_shape_contract(saved_bert):
    compiled, path, inputs = saved_bert
    loaded = fxforge.load(path)
    longer = {"input_ids": torch.randint(0, 100, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    assert torch.equal(loaded(**longer).pooler_output, compiled(**longer).pooler_output)
    with pytest.raises(InputShapeError, match="same dimension"):
        loaded(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 6, dtype=torch.long))
    with pytest.raises(InputShapeError, match="float32"):
        loaded(input_ids=inputs["input_ids"].float(), attention_mask=inputs["attention_mask"])
    with pytest.raises(InputShapeError, match="compiled for calls with"):
        loaded(input_ids=inputs["input_ids"], token_type_ids=inputs["attention_mask"])


def _rewrite_metadata(path, edit) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    meta = json.loads(members["fxforge.json"])
    edit(meta)
    members["fxforge.json"] = json.dumps(meta).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("name", ["os:system", "builtins:eval", "subprocess:Popen", "torch:_C",
                                  "fxforge.no_such_module:Thing", "antigravity:Fly"])
def test_only_containers_dataclasses_and_namedtuples_are_rebuilt(name):
    with pytest.raises(ArtifactError):
        node_type(name)
    assert "antigravity" not in sys.modules  # a library the file names is never imported


def test_output_classes_are_rebuilt_from_already_imported_libraries():
    pytest.importorskip("transformers")
    assert node_type("transformers.modeling_outputs:BaseModelOutput").__name__ == "BaseModelOutput"
    assert node_type("builtins:dict") is dict


def test_a_tampered_output_type_is_refused_not_imported(saved_bert, tmp_path):
    _, path, _ = saved_bert
    copy = tmp_path / "tampered.fxf"
    copy.write_bytes(path.read_bytes())
    _rewrite_metadata(copy, lambda meta: meta["signature"]["out_spec"].update(type="os:system"))
    with pytest.raises(ArtifactError, match="os:system"):
        fxforge.load(copy)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": torch.relu(self.conv(x))}


def test_symbolic_model_keeps_its_contract_and_input_specs(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    compiled = fxforge.compile(Conv().eval(), "cpu", example_inputs=(x,))
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "conv.fxf"))
    assert torch.equal(loaded(x=x)["features"], compiled(x)["features"])
    with pytest.raises(InputShapeError, match="dimension 1"):
        loaded(torch.randn(2, 4, 8, 8))
    with pytest.raises(ConfigError, match="float64"):
        loaded(x.double())


def test_a_fixed_argument_that_is_not_plain_data_is_refused_at_save(saved_bert, tmp_path):
    compiled, _, _ = saved_bert
    signature = compiled.signature
    compiled.__dict__["signature"] = dataclasses.replace(signature, leaves=[*signature.leaves[:-1], object()])
    try:
        with pytest.raises(ArtifactError, match="fixed argument"):
            fxforge.save(compiled, tmp_path / "refused.fxf")
    finally:
        compiled.__dict__["signature"] = signature
    assert not (tmp_path / "refused.fxf").exists()


def test_keyword_example_inputs_reach_save_and_torchscript_as_the_graph_inputs(saved_bert, tmp_path):
    compiled, _, inputs = saved_bert
    loaded = fxforge.load(fxforge.save(compiled, tmp_path / "with_inputs.fxf", example_inputs=inputs))
    assert torch.equal(loaded(**inputs).pooler_output, compiled(**inputs).pooler_output)
    scripted = compiled.to_torchscript(inputs)
    flat = scripted(inputs["input_ids"], inputs["attention_mask"])
    assert torch.equal(flat[0], compiled(**inputs).last_hidden_state)


FRESH_LOADER = """
import sys
import torch
import fxforge
from fxforge.errors import ArtifactError
path, inputs_path = sys.argv[1:]
try:
    fxforge.load(path)
except ArtifactError as exc:
    print("refused:", exc)
assert "transformers" not in sys.modules
import transformers
inputs, expected = torch.load(inputs_path)
got = fxforge.load(path)(**inputs)
print(type(got).__name__, all(torch.equal(got[k], expected[k]) for k in expected))
"""


def test_a_fresh_process_loads_the_output_class_once_its_library_is_imported(saved_bert, tmp_path):
    compiled, path, inputs = saved_bert
    torch.save((inputs, dict(compiled(**inputs))), tmp_path / "io.pt")
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH_LOADER, str(path), str(tmp_path / "io.pt")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused:" in done.stdout and "import transformers before fxforge.load" in done.stdout
    assert "BaseModelOutputWithPoolingAndCrossAttentions True" in done.stdout
