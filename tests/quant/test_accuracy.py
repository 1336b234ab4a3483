"""Real data: int8 keeps the accuracy of models trained inside the test.

- a small CNN on sklearn's digits (8x8 images): static int8 per backend loses at most 1 point;
- an LSTM classifier on a synthetic sequence task: dynamic int8 stays within 1 point;
- quantization-aware training of the digits CNN converges and converts without losing accuracy.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fxforge
from fxforge.pipeline.fragments import with_options

pytestmark = pytest.mark.slow


@functools.cache
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float = 3e-3) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


@functools.cache
def trained_digits_cnn() -> nn.Module:
    x, y, _, _ = digits()
    torch.manual_seed(0)
    model = DigitsCNN()
    train(model, x, y, epochs=6)
    return model.eval()


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_digits_cnn_static_int8_keeps_accuracy(target):
    x_train, _, x_test, y_test = digits()
    model = trained_digits_cnn()
    fp32 = accuracy(model, x_test, y_test)
    assert fp32 > 90
    calibration = [x_train[i:i + 32] for i in range(0, 320, 32)]
    compiled = fxforge.compile(model, target, example_inputs=x_test[:8], calibration=calibration)
    int8 = accuracy(compiled, x_test, y_test)
    assert int8 >= fp32 - 1.0, (fp32, int8, str(compiled.report))


class SequenceClassifier(nn.Module):
    def __init__(self, rnn: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.rnn = rnn(4, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = which of channels 0..2 has the largest sum over time (needs memory of the whole sequence)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, 4, generator=g)
    return x, x[:, :, :3].sum(1).argmax(-1)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU])
def test_rnn_classifier_dynamic_int8_keeps_accuracy(rnn):
    x, y = sequences(2000, seed=0)
    x_test, y_test = sequences(1000, seed=1)
    torch.manual_seed(0)
    model = SequenceClassifier(rnn)
    train(model, x, y, epochs=8, lr=1e-2)
    model.eval()
    fp32 = accuracy(model, x_test, y_test)
    assert fp32 > 85
    int8 = with_options(fxforge.pipeline_for("x86", "dynamic"), "quantize-dynamic", time_rnn_layers=False)
    compiled = fxforge.compile(model, "x86", example_inputs=x_test[:4], quantization="dynamic", pipeline=int8)
    types = {type(m).__name__ for m in compiled.graph_module.modules()}
    assert "DynamicInt8RNN" in types  # torch's dynamic int8 RNN kernels (not bf16, where that is timed faster)
    assert accuracy(compiled, x_test, y_test) >= fp32 - 1.0


def test_qat_digits_cnn_converges_and_converts():
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    qat = fxforge.prepare_qat(DigitsCNN(), "x86", example_inputs=x_train[:8])
    types = {type(m).__name__ for m in qat.modules()}
    assert {"QATConvBn", "FakeQuantize", "QATWeighted"} <= types
    losses = train(qat, x_train, y_train, epochs=5)
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:10]) / 10  # it learns despite the int8 rounding
    qat.eval()
    qat_accuracy = accuracy(qat, x_test, y_test)
    assert qat_accuracy > 90
    compiled = fxforge.compile(qat, "x86", example_inputs=x_test[:8])  # no calibration: qparams were trained
    assert accuracy(compiled, x_test, y_test) >= qat_accuracy - 1.0
    assert {"QATConvBn", "FakeQuantize"}.isdisjoint({type(m).__name__ for m in compiled.graph_module.modules()})
