"""Reference numerics of dynamic int8: weight grids, DynamicQuantLSTM / DynamicQuantGRU against fp32 and torch."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import fxforge.quant.reference as reference
from fxforge.quant.qspec import QSpec, backend_quant
from fxforge.quant.reference import DynamicQuantGRU, DynamicQuantLSTM, dynamic_quantize, quantize_weight

WEIGHT = backend_quant("fbgemm", reduce_range=False).weight  # qint8 [-128, 127] per-channel symmetric, axis 0
PER_TENSOR = QSpec(torch.qint8, -128, 127, symmetric=True)  # what torch.ao's default_weight_observer computes
QNNPACK_WEIGHT = backend_quant("qnnpack").weight  # qint8 restricted to [-127, 127]
AFFINE_WEIGHT = QSpec(torch.quint8, 0, 127, axis=0)  # non-zero zero points and a range narrower than the dtype's

RNNS = {"LSTM": (nn.LSTM, DynamicQuantLSTM), "GRU": (nn.GRU, DynamicQuantGRU)}
CONFIGS = {
    "1-layer": {},
    "2-layer": {"num_layers": 2},
    "bidirectional": {"bidirectional": True},
    "2-layer-bidir-batch-first": {"num_layers": 2, "bidirectional": True, "batch_first": True},
    "no-bias": {"bias": False},
}
INPUT, HIDDEN, STEPS, BATCH = 6, 10, 7, 3


@pytest.fixture(autouse=True)
def _quiet_single_thread():
    """torch 2.14 warns that quantized tensor creation functions are deprecated: not what these tests check.

    One intra-op thread: quantize / dequantize of quantized tensors always open a parallel region (even for a
    few elements), which costs milliseconds per call on a loaded machine; results do not depend on it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.set_num_threads(threads)


def _float_rnn(kind: str, seed: int = 0, **kw) -> nn.RNNBase:
    torch.manual_seed(seed)
    return RNNS[kind][0](INPUT, HIDDEN, **kw).eval()


def _inputs(rnn: nn.RNNBase, unbatched: bool = False, with_state: bool = False, seed: int = 1):
    """(input, initial state or None) for ``rnn`` in its layout."""
    g = torch.Generator().manual_seed(seed)
    shape = (STEPS, INPUT) if unbatched else (BATCH, STEPS, INPUT) if rnn.batch_first else (STEPS, BATCH, INPUT)
    x = torch.randn(shape, generator=g)
    if not with_state:
        return x, None
    layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
    state_shape = (layers, HIDDEN) if unbatched else (layers, BATCH, HIDDEN)
    h0 = torch.randn(state_shape, generator=g) * 0.5
    if isinstance(rnn, nn.LSTM):
        return x, (h0, torch.randn(state_shape, generator=g) * 0.5)
    return x, h0


def _flat(result) -> list[torch.Tensor]:
    """output, h_n[, c_n] of an LSTM / GRU result, checking its structure on the way."""
    output, state = result
    if isinstance(state, tuple):
        assert len(state) == 2
        return [output, *state]
    return [output, state]


def _dequantized_weights(qrnn: nn.Module) -> dict[str, torch.Tensor]:
    """The dequantized weight buffers (not their scale / zero_point), by name."""
    qparams = ("_scale", "_zero_point")
    return {n: b for n, b in qrnn.named_buffers() if n.startswith("weight_") and not n.endswith(qparams)}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


# --- quantize_weight -------------------------------------------------------------------------------------------


def _check_on_grid(w: torch.Tensor, w_dq: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                   spec: QSpec) -> None:
    shape = [1] * w.dim()
    if spec.axis is not None:
        shape[spec.axis] = -1
        assert scale.shape == zero_point.shape == (w.shape[spec.axis],)
    else:
        assert scale.dim() == zero_point.dim() == 0
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int64
    s, z = scale.view(shape), zero_point.view(shape)
    q = w_dq / s + z
    assert (q - q.round()).abs().max() < 1e-4, "dequantized weight is not on the int8 grid"
    assert q.round().min() >= spec.quant_min and q.round().max() <= spec.quant_max
    # rounding error at most half a step in every channel (the ranges include each channel's min and max)
    assert ((w - w_dq).abs() <= s / 2 + 1e-6 * w.abs()).all()


@pytest.mark.parametrize("spec", [WEIGHT, QNNPACK_WEIGHT, AFFINE_WEIGHT, PER_TENSOR, QSpec()],
                         ids=lambda s: s.describe())
def test_quantize_weight_on_grid(spec: QSpec) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-2, 1, 16).view(-1, 1, 1, 1)  # very different channel ranges
    w_dq, scale, zero_point = quantize_weight(w, spec)
    assert w_dq.shape == w.shape and w_dq.dtype == torch.float32
    _check_on_grid(w, w_dq, scale, zero_point, spec)
    if spec.axis is not None:  # qparams exactly the spec's rule applied to each channel's min / max
        want_scale, want_zp = spec.qparams(w.flatten(1).amin(1), w.flatten(1).amax(1))
        torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
        torch.testing.assert_close(zero_point, want_zp, rtol=0, atol=0)


def test_quantize_weight_axis1_conv_transpose() -> None:
    torch.manual_seed(0)
    w = nn.ConvTranspose2d(4, 6, 3).weight.detach() * torch.logspace(-1, 1, 6).view(1, -1, 1, 1)  # (in, out, kh, kw)
    spec = WEIGHT.with_axis(1)
    w_dq, scale, zero_point = quantize_weight(w, spec)
    _check_on_grid(w, w_dq, scale, zero_point, spec)
    channel_max = w.abs().transpose(0, 1).flatten(1).amax(1)
    torch.testing.assert_close(scale, channel_max / 127.5)


def test_dynamic_quantize_matches_torch_per_tensor_dynamic() -> None:
    x = torch.randn(5, 7) * 3 + 1
    for reduce_range in (False, True):
        q = torch.quantize_per_tensor_dynamic(x, torch.quint8, reduce_range)
        got = dynamic_quantize(x, reduce_range)
        assert torch.equal(got, q.dequantize())
        levels = (got / q.q_scale() + q.q_zero_point()).round()
        assert levels.max() <= (127 if reduce_range else 255) and levels.min() >= 0
    assert dynamic_quantize(torch.empty(0, 3), True).shape == (0, 3)


# --- DynamicQuantLSTM / DynamicQuantGRU --------------------------------------------------------------------------

CASES = [(kind, name, kw, False, False) for kind in RNNS for name, kw in CONFIGS.items()] + [
    (kind, f"unbatched{'-state' if state else ''}", {"num_layers": 2, "bidirectional": True}, True, state)
    for kind in RNNS for state in (False, True)] + [
    (kind, "initial-state", {"num_layers": 2}, False, True) for kind in RNNS]


@pytest.mark.parametrize(("kind", "name", "kw", "unbatched", "with_state"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_close_to_float(kind: str, name: str, kw: dict, unbatched: bool, with_state: bool) -> None:
    rnn = _float_rnn(kind, **kw)
    x, state = _inputs(rnn, unbatched, with_state)
    qrnn = RNNS[kind][1].from_float(rnn, WEIGHT, reduce_range=True)
    assert not qrnn.training
    with torch.no_grad():
        want, got = rnn(x, state), qrnn(x, state)
    assert type(got) is type(want) and type(got[1]) is type(want[1])
    for g, w in zip(_flat(got), _flat(want), strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert _rel_err(g, w) < 2e-2  # measured worst case ~1.4e-2 (7-bit activations, per-row int8 weights)


@pytest.mark.parametrize(("kind", "name", "kw", "unbatched", "with_state"), CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_recurrence_exact_without_activation_rounding(monkeypatch: pytest.MonkeyPatch, kind: str, name: str, kw: dict,
                                                      unbatched: bool, with_state: bool) -> None:
    """With activation rounding off, the module is exactly torch's RNN with its (int8-grid) weights."""
    rnn = _float_rnn(kind, **kw)
    x, state = _inputs(rnn, unbatched, with_state)
    qrnn = RNNS[kind][1].from_float(rnn, WEIGHT, reduce_range=True)
    on_grid = copy.deepcopy(rnn)
    with torch.no_grad():
        for name_, buf in _dequantized_weights(qrnn).items():
            getattr(on_grid, name_).copy_(buf)
            assert not torch.equal(buf, getattr(rnn, name_))  # the rounding did something
    calls = []
    monkeypatch.setattr(reference, "dynamic_quantize", lambda t, reduce_range: calls.append(t.shape) or t)
    with torch.no_grad():
        got, want = qrnn(x, state), on_grid(x, state)
    assert calls, "dynamic_quantize must be looked up at run time"
    for g, w in zip(_flat(got), _flat(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_int8_values_recoverable_from_buffers() -> None:
    qrnn = DynamicQuantLSTM.from_float(_float_rnn("LSTM", num_layers=2, bidirectional=True), WEIGHT, True)
    names = list(_dequantized_weights(qrnn))
    assert len(names) == 8
    for name in names:
        w, scale, zp = getattr(qrnn, name), getattr(qrnn, f"{name}_scale"), getattr(qrnn, f"{name}_zero_point")
        assert scale.shape == (4 * HIDDEN,) and (zp == 0).all()
        q = w / scale[:, None]
        assert (q - q.round()).abs().max() < 1e-4 and q.abs().max() <= 128
    assert "qint8[-128,127] per-channel(axis=0) symmetric" in repr(qrnn) and "reduce_range=True" in repr(qrnn)


@pytest.mark.parametrize("kind", list(RNNS))
@pytest.mark.parametrize("kw", [{}, {"num_layers": 2, "bidirectional": True, "batch_first": True}],
                         ids=["1-layer", "2-layer-bidir-batch-first"])
def test_matches_torch_ao_dynamic(kind: str, kw: dict) -> None:
    """Same numerics as torch.ao's dynamic int8 RNNs (fbgemm: per-tensor symmetric qint8 weights, reduce_range)."""
    nnqd = pytest.importorskip("torch.ao.nn.quantized.dynamic")
    qconfig = pytest.importorskip("torch.ao.quantization").default_dynamic_qconfig
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("fbgemm engine not available")
    rnn = _float_rnn(kind, **kw)
    x, _ = _inputs(rnn)
    # torch.ao's default weight observer is per-tensor symmetric qint8 [-128, 127]; its dynamic RNN cells are made
    # with reduce_range=True. Build ours the same way (per tensor, not our default per-row) to compare the numerics.
    ours = RNNS[kind][1].from_float(rnn, PER_TENSOR, reduce_range=True)
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        rnn.qconfig = qconfig
        theirs = getattr(nnqd, kind).from_float(rnn)
        with torch.no_grad():
            want, got = theirs(x), ours(x)
    finally:
        torch.backends.quantized.engine = before
    for g, w in zip(_flat(got), _flat(want), strict=True):
        # measured max abs difference ~1.2e-7: int32 accumulation vs fp32 matmul of the dequantized values
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


def test_state_dict_round_trip_and_deepcopy() -> None:
    rnn = _float_rnn("LSTM", num_layers=2, bidirectional=True)
    x, state = _inputs(rnn, with_state=True)
    qrnn = DynamicQuantLSTM.from_float(rnn, WEIGHT, True)
    with torch.no_grad():
        want = _flat(qrnn(x, state))
    buffer = io.BytesIO()
    torch.save(qrnn.state_dict(), buffer)
    buffer.seek(0)
    fresh = DynamicQuantLSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, weight_spec=WEIGHT).eval()
    fresh.load_state_dict(torch.load(buffer))
    other = DynamicQuantLSTM.from_float(_float_rnn("LSTM", seed=5, num_layers=2, bidirectional=True), WEIGHT, True)
    other.load_state_dict(qrnn.state_dict())
    clone = copy.deepcopy(qrnn)
    with torch.no_grad():
        for mod in (fresh, other, clone):
            for g, w in zip(_flat(mod(x, state)), want, strict=True):
                assert torch.equal(g, w)
        clone.weight_ih_l0.zero_()
    assert not torch.equal(qrnn.weight_ih_l0, clone.weight_ih_l0)
    assert clone.reduce_range == qrnn.reduce_range and clone.weight_spec == qrnn.weight_spec

    gru = DynamicQuantGRU.from_float(_float_rnn("GRU", bias=False), PER_TENSOR, False)
    gru_copy = copy.deepcopy(gru)
    gru_fresh = DynamicQuantGRU(INPUT, HIDDEN, bias=False, reduce_range=False, weight_spec=PER_TENSOR).eval()
    gru_fresh.load_state_dict(gru.state_dict())
    assert not any("bias" in n for n in gru.state_dict())
    xg, _ = _inputs(gru)
    with torch.no_grad():
        assert torch.equal(gru_copy(xg)[0], gru(xg)[0]) and torch.equal(gru_fresh(xg)[0], gru(xg)[0])


def test_unsupported_configurations() -> None:
    with pytest.raises(NotImplementedError, match="proj_size"):
        DynamicQuantLSTM.from_float(nn.LSTM(INPUT, HIDDEN, proj_size=4), WEIGHT, True)
    rnn = nn.GRU(INPUT, HIDDEN, num_layers=2, dropout=0.3)  # training mode
    qrnn = DynamicQuantGRU.from_float(rnn, WEIGHT, True)
    x, _ = _inputs(rnn)
    with pytest.raises(NotImplementedError, match="dropout"):
        qrnn(x)
    qrnn.eval()(x)  # eval: dropout is inactive, fine
    with pytest.raises(TypeError):
        DynamicQuantLSTM.from_float(rnn, WEIGHT, True)
    with pytest.raises(ValueError, match="input_size"):
        qrnn(torch.randn(STEPS, BATCH, INPUT + 1))
