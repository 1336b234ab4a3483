"""QAT modules: fake-quant straight-through numerics, weight fake quantization, conv-bn folding contracts, training."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxforge.quant.observers import make_observer
from fxforge.quant.qat_modules import FakeQuantize, QATConvBn, QATWeighted, fake_quantize_weight
from fxforge.quant.qspec import QSpec, backend_quant

ACT = QSpec()  # quint8 [0, 255] per-tensor affine
WEIGHT = backend_quant("fbgemm", reduce_range=False).weight  # qint8 [-128, 127] per-channel symmetric, axis 0

CONV_BN = {1: (nn.Conv1d, nn.BatchNorm1d), 2: (nn.Conv2d, nn.BatchNorm2d), 3: (nn.Conv3d, nn.BatchNorm3d)}


def fake_quant(kind: str = "minmax") -> FakeQuantize:
    return FakeQuantize(make_observer(kind), ACT)


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial running statistics and affine parameters (the defaults make BN the identity, hiding bugs)."""
    n = bn.num_features
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(n) * 0.5)
        bn.running_var.copy_(torch.rand(n) * 1.5 + 0.5)
        bn.weight.copy_((torch.rand(n) + 0.5) * torch.where(torch.rand(n) < 0.2, -1.0, 1.0))
        bn.bias.copy_(torch.randn(n) * 0.5)


def channel_qparams(weight: torch.Tensor, spec: QSpec, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    flat = weight.detach().transpose(0, axis).reshape(weight.shape[axis], -1)
    return spec.qparams(flat.amin(1), flat.amax(1))


def quiet_dequantize(fn, *args):
    """torch.quantize_* (the oracle) warns that quantized tensors are deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args).dequantize()


# ---------------------------------------------------------------------------------------------- FakeQuantize


def test_fake_quantize_train_output_is_on_the_grid() -> None:
    torch.manual_seed(0)
    fq = fake_quant().train()
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    y = fq(x)
    assert fq.batches_seen == 1
    scale, zero_point = fq.observer.qparams(ACT)
    assert torch.equal(fq.scale, scale.reshape(())) and torch.equal(fq.zero_point, zero_point.reshape(()))
    assert fq.scale.dtype == torch.float32 and fq.zero_point.dtype == torch.int64 and fq.scale.dim() == 0
    q = y / fq.scale + fq.zero_point
    assert torch.allclose(q, q.round(), atol=1e-3)
    assert q.round().min() >= ACT.quant_min and q.round().max() <= ACT.quant_max
    assert (y - x).abs().max() <= fq.scale / 2 + 1e-6  # min/max observer: nothing clipped, error <= scale / 2


def test_fake_quantize_straight_through_gradient() -> None:
    torch.manual_seed(0)
    fq = fake_quant().train()
    x = torch.randn(256, requires_grad=True)
    fq(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # all observed values are inside the range

    fq.eval()
    lo = float((ACT.quant_min - fq.zero_point) * fq.scale)
    hi = float((ACT.quant_max - fq.zero_point) * fq.scale)
    wide = torch.cat([torch.linspace(lo * 3, hi * 3, 101), torch.tensor([lo * 2, hi * 2, 0.0])]).requires_grad_()
    y = fq(wide)
    y.sum().backward()
    q = torch.round(wide.detach() / fq.scale) + fq.zero_point  # STE: gradient 1 where the rounding did not clip
    inside = (q >= ACT.quant_min) & (q <= ACT.quant_max)
    assert (wide.detach()[~inside].abs() > min(-lo, hi)).all() and (~inside).sum() > 10 and inside.sum() > 10
    assert torch.equal(wide.grad, inside.float())
    assert torch.allclose(y[~inside].detach().abs().max(), torch.tensor(max(-lo, hi)), atol=1e-6)  # clipped


def test_fake_quantize_eval_freezes_qparams() -> None:
    torch.manual_seed(0)
    fq = fake_quant().train()
    fq(torch.rand(8, 4))
    scale, zero_point = fq.qparams()
    fq.eval()
    fq(torch.randn(8, 4) * 100)
    assert fq.batches_seen == 1
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zero_point)
    assert torch.equal(fq.qparams(ACT)[0], scale)  # observer-compatible signature, frozen values


def test_fake_quantize_observe_false_freezes_in_training() -> None:
    fq = fake_quant().train()
    fq(torch.rand(8, 4))
    scale = fq.scale.clone()
    fq.observe = False
    fq(torch.randn(8, 4) * 100)
    assert fq.batches_seen == 1 and torch.equal(fq.scale, scale)
    fq.observe = True
    fq(torch.randn(8, 4) * 100)
    assert fq.batches_seen == 2 and fq.scale > scale


def test_fake_quantize_needs_data_before_eval() -> None:
    fq = fake_quant().eval()
    with pytest.raises(RuntimeError, match="saw no data"):
        fq(torch.randn(3))
    with pytest.raises(RuntimeError, match="saw no data"):
        fq.qparams()
    fq.train().observe = False
    with pytest.raises(RuntimeError, match="saw no data"):
        fq(torch.randn(3))


def test_fake_quantize_disabled_is_identity() -> None:
    fq = fake_quant().train()
    fq.enabled = False
    x = torch.randn(4, 4)
    assert fq(x) is x
    assert fq.batches_seen == 0
    assert fq.eval()(x) is x  # no data needed either


def test_fake_quantize_describe_and_repr() -> None:
    fq = fake_quant("moving-average")
    assert fq.describe().startswith("fake-quant(") and fq.observer.describe() in fq.describe()
    fq.train()(torch.randn(10))
    assert "scale=" in repr(fq) and "zero_point=" in repr(fq)


def test_fake_quantize_rejects_per_channel_spec() -> None:
    with pytest.raises(ValueError, match="per-tensor"):
        FakeQuantize(make_observer("minmax"), ACT.with_axis(1))


# ------------------------------------------------------------------------------------- fake_quantize_weight


@pytest.mark.parametrize("backend", ["fbgemm", "qnnpack"])
def test_fake_quantize_weight_per_channel_matches_quantize_per_channel(backend: str) -> None:
    torch.manual_seed(0)
    spec = backend_quant(backend, reduce_range=False).weight
    w = torch.randn(16, 8, 3, 3) * torch.rand(16, 1, 1, 1)
    scale, zero_point = channel_qparams(w, spec)
    ref = quiet_dequantize(torch.quantize_per_channel, w, scale.double(), zero_point, 0, torch.qint8)
    assert torch.equal(fake_quantize_weight(w, spec), ref)


def test_fake_quantize_weight_per_tensor_and_axis_1() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    scale, zero_point = ACT.qparams(w.min(), w.max())
    ref = quiet_dequantize(torch.quantize_per_tensor, w, float(scale), int(zero_point), torch.quint8)
    assert torch.equal(fake_quantize_weight(w, ACT), ref)

    wt = torch.randn(3, 7, 2, 2)  # conv-transpose layout: output channels on dim 1
    spec = WEIGHT.with_axis(1)
    scale, zero_point = channel_qparams(wt, spec, axis=1)
    ref = quiet_dequantize(torch.quantize_per_channel, wt, scale.double(), zero_point, 1, torch.qint8)
    assert torch.equal(fake_quantize_weight(wt, spec), ref)


def test_fake_quantize_weight_gradient_is_straight_through() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    upstream = torch.arange(1.0, 5.0).reshape(4, 1, 1, 1).expand_as(w)
    qnnpack = backend_quant("qnnpack").weight  # symmetric [-127, 127]: the extremes land on the grid
    (fake_quantize_weight(w, qnnpack) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)

    # fbgemm's [-128, 127] with scale max|w| / 127.5 (torch.ao's formula): a positive extreme rounds to 128 and
    # is clipped, so it alone gets no gradient
    w.grad = None
    (fake_quantize_weight(w, WEIGHT) * upstream).sum().backward()
    scale, _ = channel_qparams(w, WEIGHT)
    clipped = torch.round(w.detach() / scale.reshape(4, 1, 1, 1)) > WEIGHT.quant_max
    assert torch.equal(w.grad, torch.where(clipped, 0.0, upstream))
    assert clipped.sum() <= 4


# ------------------------------------------------------------------------------------------------ QATWeighted


@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 5), lambda: nn.Conv1d(3, 4, 3, padding=1),
                                  lambda: nn.Conv2d(3, 4, 3, stride=2, groups=1, bias=False),
                                  lambda: nn.Conv3d(2, 4, 2), lambda: nn.Conv2d(4, 4, 3, groups=2, dilation=2)],
                         ids=["linear", "conv1d", "conv2d", "conv3d", "conv2d-grouped"])
def test_qat_weighted_uses_fake_quantized_weight(make) -> None:
    torch.manual_seed(0)
    layer = make()
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn((2, layer.in_channels) + (7,) * (
        layer.weight.dim() - 2))
    qat = QATWeighted.from_float(layer, WEIGHT)
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(fake_quantize_weight(layer.weight, WEIGHT))
    assert torch.allclose(qat(x), ref(x), atol=1e-6)
    qat.fake_quant_weights = False
    assert torch.allclose(qat(x), layer(x), atol=1e-6)

    plain = qat.to_float()
    assert type(plain) is type(layer) and plain is not layer and plain.weight is not layer.weight
    assert torch.equal(plain.weight, layer.weight)
    qat(x).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_qat_weighted_conv_transpose_uses_axis_1() -> None:
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1, output_padding=1)
    qat = QATWeighted.from_float(layer, WEIGHT)  # axis 0 in, the layer's output-channel axis (1) used
    assert qat.weight_spec.axis == 1
    x = torch.randn(2, 3, 5, 5)
    ref = copy.deepcopy(layer)
    with torch.no_grad():
        ref.weight.copy_(fake_quantize_weight(layer.weight, WEIGHT.with_axis(1)))
    assert qat(x).shape == layer(x).shape == (2, 6, 10, 10)
    assert torch.allclose(qat(x), ref(x), atol=1e-6)


def test_qat_weighted_rejects_other_modules() -> None:
    with pytest.raises(TypeError):
        QATWeighted.from_float(nn.ReLU(), WEIGHT)


# -------------------------------------------------------------------------------------------------- QATConvBn


def make_conv_bn(dims: int, bias: bool, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    conv_cls, bn_cls = CONV_BN[dims]
    conv, bn = conv_cls(3, 6, 3, padding=1, bias=bias), bn_cls(6)
    randomize_bn(bn)
    return conv, bn


def sample(dims: int, batch: int = 4) -> torch.Tensor:
    return torch.randn((batch, 3) + (6,) * dims)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_qat_conv_bn_to_float_contract(dims: int, bias: bool) -> None:
    conv, bn = make_conv_bn(dims, bias)
    qat = QATConvBn.from_float(conv, bn, WEIGHT).eval()
    x = sample(dims)
    plain = qat.to_float()
    assert type(plain) is type(conv) and plain is not conv and plain.bias is not None
    assert torch.allclose(plain(x), bn(conv(x)), atol=1e-5)  # folding itself is right

    expected = plain._conv_forward(x, fake_quantize_weight(plain.weight, WEIGHT), plain.bias)
    with torch.no_grad():
        assert torch.allclose(qat(x), expected, atol=1e-5)
        assert not torch.allclose(qat(x), plain(x), atol=1e-5)  # the rounding is really simulated
        qat.fake_quant_weights = False
        assert torch.allclose(qat(x), plain(x), atol=1e-5)
    assert torch.equal(conv.weight, qat.conv.weight)  # to_float did not touch the trained layer


def test_qat_conv_bn_training_updates_bn_and_reaches_parameters() -> None:
    conv, bn = make_conv_bn(2, bias=True)
    qat = QATConvBn.from_float(conv, bn, WEIGHT).train()
    mean, batches = bn.running_mean.clone(), int(bn.num_batches_tracked)
    x = sample(2, batch=8) + 2
    y = qat(x)
    assert not torch.allclose(bn.running_mean, mean) and int(bn.num_batches_tracked) == batches + 1
    # training mode normalizes with batch statistics: per-channel mean ~ beta
    assert torch.allclose(y.mean(dim=(0, 2, 3)), bn.bias, atol=1e-4)
    (y * torch.randn_like(y)).sum().backward()
    for p in (conv.weight, conv.bias, bn.weight, bn.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_qat_conv_bn_checks_its_layers() -> None:
    with pytest.raises(TypeError):
        QATConvBn.from_float(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4), WEIGHT)
    with pytest.raises(ValueError):
        QATConvBn.from_float(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5), WEIGHT)
    with pytest.raises(ValueError):
        QATConvBn.from_float(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False), WEIGHT)


# ---------------------------------------------------------------------------------------------------- training


class TinyQATNet(nn.Module):
    """fake-quant -> conv-bn -> relu -> fake-quant -> max-pool -> linear -> fake-quant."""

    def __init__(self) -> None:
        super().__init__()
        self.fq_in = fake_quant("moving-average")
        self.conv_bn = QATConvBn.from_float(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), WEIGHT)
        self.fq_act = fake_quant("moving-average")
        self.pool = nn.MaxPool2d(2)
        self.fc = QATWeighted.from_float(nn.Linear(4 * 4 * 4, 2), WEIGHT)
        self.fq_out = fake_quant("moving-average")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fq_act(F.relu(self.conv_bn(self.fq_in(x))))
        return self.fq_out(self.fc(self.pool(x).flatten(1)))


def brighter_half(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """1x8x8 noise images; label 1 when the right half is brighter (by 0.5 on average)."""
    x = torch.rand(n, 1, 8, 8, generator=generator)
    y = torch.randint(0, 2, (n,), generator=generator)
    x[y == 1, :, :, 4:] += 0.5
    x[y == 0, :, :, :4] += 0.5
    return x, y


def test_short_qat_training_learns_a_separable_task() -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    net = TinyQATNet().train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        x, y = brighter_half(64, gen)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5
    net.eval()
    x, y = brighter_half(512, gen)
    with torch.no_grad():
        accuracy = (net(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9

    # converted: fake-quant weights folded into plain layers give the same eval outputs
    with torch.no_grad():
        conv = net.conv_bn.to_float()
        h = conv._conv_forward(net.fq_in(x), fake_quantize_weight(conv.weight, WEIGHT), conv.bias)
        h = net.pool(net.fq_act(F.relu(h))).flatten(1)
        fc = net.fc.to_float()
        out = net.fq_out(F.linear(h, fake_quantize_weight(fc.weight, WEIGHT), fc.bias))
        assert torch.allclose(out, net(x), atol=1e-5)


# ------------------------------------------------------------------------------------ deepcopy and state_dict


def trained_modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    fq = fake_quant("moving-average").train()
    for _ in range(3):
        fq(torch.randn(16, 4))
    conv, bn = make_conv_bn(2, bias=True)
    conv_bn = QATConvBn.from_float(conv, bn, WEIGHT).train()
    conv_bn(sample(2))
    return {"fake_quant": fq.eval(), "conv_bn": conv_bn.eval(),
            "weighted": QATWeighted.from_float(nn.Conv2d(3, 4, 3), WEIGHT).eval()}


def module_input(name: str) -> torch.Tensor:
    return torch.randn(16, 4) * 2 if name == "fake_quant" else sample(2)


@pytest.mark.parametrize("name", ["fake_quant", "conv_bn", "weighted"])
def test_deepcopy_round_trip(name: str) -> None:
    module = trained_modules()[name]
    clone = copy.deepcopy(module)
    x = module_input(name)
    assert torch.equal(clone(x), module(x))
    original, copied = module.state_dict(), clone.state_dict()
    assert list(original) == list(copied)
    for k, a in original.items():
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, copied[k]) and a.data_ptr() != copied[k].data_ptr(), k
        else:  # extra state (an observer's batch count)
            assert a == copied[k], k
    if name == "fake_quant":
        assert clone.batches_seen == module.batches_seen == 3


@pytest.mark.parametrize("name", ["fake_quant", "conv_bn", "weighted"])
def test_state_dict_round_trip(name: str) -> None:
    module = trained_modules()[name]
    fresh = {"fake_quant": lambda: fake_quant("moving-average"),
             "conv_bn": lambda: QATConvBn.from_float(*make_conv_bn(2, bias=True, seed=1), WEIGHT),
             "weighted": lambda: QATWeighted.from_float(nn.Conv2d(3, 4, 3), WEIGHT)}[name]().eval()
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = module_input(name)
    assert torch.equal(fresh(x), module(x))  # a loaded fake-quant has its qparams: no "saw no data" error
    if name == "fake_quant":
        assert torch.equal(fresh.qparams()[0], module.qparams()[0])
        assert fresh.batches_seen == module.batches_seen == 3
