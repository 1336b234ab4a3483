"""Quantization walkthrough: int8 with fxforge, from calibration to QAT, on a CNN trained right here.

Run: ``.venv/bin/python examples/quantize_walkthrough.py`` (about 20 s on 2 cores). It trains a small CNN on
scikit-learn's 8x8 digits, then shows
1. static int8 with calibration data, and the per-layer report (qparams, observer, SQNR);
2. per-layer control: another observer for the classifier, one layer kept in fp32;
3. dynamic int8 for an LSTM (no calibration data needed);
4. quantization-aware training, then compiling the trained model;
5. recalibrating after the input distribution drifted.
The int8 targets quantize into a reference graph (fp32 ops between quantize/dequantize nodes, which fixes
the numerics and the report), then lower it onto the engine's int8 kernels.
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn

import fxforge


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(y), 64):
            loss = nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


def main() -> None:
    x_train, y_train, x_test, y_test = digits()
    torch.manual_seed(0)
    model = train(cnn(), x_train, y_train)
    calibration = [x_train[i:i + 32] for i in range(0, 320, 32)]  # any iterable of model inputs
    print(f"fp32 accuracy: {accuracy(model, x_test, y_test):.1f}%")

    # 1. static int8: activations' ranges come from the calibration data
    int8 = fxforge.compile(model, "x86", example_inputs=x_test[:8], calibration=calibration)
    print(f"\n1. static int8 (x86): accuracy {accuracy(int8, x_test, y_test):.1f}%")
    print("\n".join(int8.report.quantization.lines()))

    # 2. per-layer control: percentile observer for Linear layers, the last layer ("10") kept in fp32
    config = fxforge.QuantConfig(activation="histogram").for_type(nn.Linear, activation="percentile")
    mixed = fxforge.compile(model, "x86", example_inputs=x_test[:8], calibration=calibration,
                            quant_config=config, skip=["10"])
    print(f"\n2. percentile observers on Linear, layer '10' in fp32: accuracy {accuracy(mixed, x_test, y_test):.1f}%")

    # 3. dynamic int8: weights int8, activations quantized per call, no calibration
    lstm = nn.Sequential(nn.LSTM(8, 32, batch_first=True)).eval()
    sequences = torch.randn(4, 20, 8)
    dynamic = fxforge.compile(lstm, "x86", example_inputs=sequences, quantization="dynamic")
    print(f"\n3. dynamic int8 LSTM: output SQNR {dynamic.report.quantization.model_sqnr_db:.1f} dB vs fp32")

    # 4. quantization-aware training: train with the int8 rounding simulated, then compile (no calibration)
    torch.manual_seed(0)
    qat = train(fxforge.prepare_qat(cnn(), "x86", example_inputs=x_train[:8]), x_train, y_train)
    qat_int8 = fxforge.compile(qat, "x86", example_inputs=x_test[:8])
    print(f"\n4. QAT then int8: accuracy {accuracy(qat_int8, x_test, y_test):.1f}%")

    # 5. the inputs got brighter: refresh activation qparams in place, no recompilation
    brighter = [batch * 1.5 for batch in calibration]
    changes = fxforge.recalibrate(int8, brighter)
    first = next(iter(changes.items()))
    print(f"\n5. recalibrated {len(changes)} qparam groups, e.g. {first[0]}: scale {first[1][0]:.4g} -> "
          f"{first[1][1]:.4g}; accuracy on brighter inputs {accuracy(int8, x_test * 1.5, y_test):.1f}%")


if __name__ == "__main__":
    main()
