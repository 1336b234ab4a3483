"""cuda-runtime's bookkeeping on CPU: cache keys, copy-in / clone-out, re-capture per shape, the LRU bound,
fallbacks, copies, and the TF32 policy. A fake capture stands in for CUDA graphs: like a real graph, its
replay writes into the same output buffers every time."""

import contextlib
import copy
import threading

import pytest
import torch
from torch import nn

import fxforge
from fxforge.backends import cuda_graphs
from fxforge.backends.cuda_graphs import CudaRuntime, GraphCache, cache_key, tf32_policy
from fxforge.numerics import precision


class FakeCapture:
    """capture(fn, static_args) -> (replay, static outputs); replay re-runs fn and copies into those outputs."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def __call__(self, fn, args):
        self.captures += 1
        outputs = fn(*args)

        def replay():
            self.replays += 1
            fresh = fn(*args)
            for static, new in zip(_flat(outputs), _flat(fresh), strict=True):
                static.copy_(new)

        return replay, outputs


def _flat(value):
    return list(value) if isinstance(value, (tuple, list)) else [value]


def fn(x, scale=2.0):
    return x * scale + 1


def make_cache(**kwargs) -> tuple[GraphCache, FakeCapture]:
    fake = FakeCapture()
    cache = GraphCache(capture=fake, capturable=lambda t: True, capturing=lambda: False, **kwargs)
    return cache, fake


# ---------------------------------------------------------------------------------------------- keys
def test_cache_key_is_shape_dtype_device_and_plain_values():
    key = cache_key((torch.zeros(2, 3), 1.5, "a", None), capturable=lambda t: True)
    assert key == ((torch.Size([2, 3]), torch.float32, torch.device("cpu")), (float, 1.5), (str, "a"),
                   (type(None), None))
    assert key == cache_key((torch.ones(2, 3), 1.5, "a", None), capturable=lambda t: True)  # values don't matter
    assert key != cache_key((torch.ones(2, 3, dtype=torch.float16), 1.5, "a", None), capturable=lambda t: True)


def test_cache_key_tells_true_from_one():
    assert cache_key((True,), lambda t: True) != cache_key((1,), lambda t: True)


@pytest.mark.parametrize("arg", [[1, 2], (torch.zeros(1),), {"a": 1}, object()])
def test_cache_key_rejects_containers_and_objects(arg):
    assert cache_key((torch.zeros(1), arg), capturable=lambda t: True) is None


def test_cache_key_rejects_tensors_that_cannot_be_captured():
    assert cache_key((torch.zeros(1),)) is None  # the default: CUDA tensors only


# ---------------------------------------------------------------------------------------------- replay
def test_first_call_captures_and_later_calls_replay_with_copied_in_values():
    cache, fake = make_cache()
    x1, x2 = torch.randn(4), torch.randn(4)
    assert torch.equal(cache(fn, (x1,)), fn(x1))
    assert torch.equal(cache(fn, (x2,)), fn(x2))  # the new values were copied into the static input
    assert (fake.captures, fake.replays) == (1, 2)


def test_outputs_held_by_the_caller_are_not_overwritten_by_the_next_replay():
    cache, _ = make_cache()
    x1, x2 = torch.randn(4), torch.randn(4)
    y1 = cache(fn, (x1,))
    y2 = cache(fn, (x2,))
    assert torch.equal(y1, fn(x1)) and torch.equal(y2, fn(x2))
    static = cache.entries[cache.keys[0]].outputs
    assert y1.data_ptr() != static.data_ptr() and y2.data_ptr() != static.data_ptr()


def test_the_callers_input_is_not_used_as_the_static_buffer():
    cache, _ = make_cache()
    x = torch.randn(4)
    cache(fn, (x,))
    assert cache.entries[cache.keys[0]].inputs[0].data_ptr() != x.data_ptr()


def test_a_new_shape_or_value_captures_again():
    cache, fake = make_cache()
    cache(fn, (torch.randn(4),))
    y = cache(fn, (torch.randn(2, 3),))
    cache(fn, (torch.randn(4), 3.0))
    assert y.shape == (2, 3) and fake.captures == 3 and len(cache.keys) == 3


def test_tuple_outputs_are_cloned_element_by_element():
    cache, _ = make_cache()

    def two(x):
        return x + 1, x * 2

    x1, x2 = torch.randn(3), torch.randn(3)
    a1, b1 = cache(two, (x1,))
    cache(two, (x2,))
    assert torch.equal(a1, x1 + 1) and torch.equal(b1, x1 * 2)


def test_cache_keeps_the_most_recently_used_graphs():
    cache, fake = make_cache(max_graphs=2)
    a, b, c = torch.randn(1), torch.randn(2), torch.randn(3)
    cache(fn, (a,))
    cache(fn, (b,))
    cache(fn, (a,))  # a is now the most recent
    cache(fn, (c,))  # evicts b
    assert [k[0][0] for k in cache.keys] == [torch.Size([1]), torch.Size([3])]
    cache(fn, (b,))
    assert fake.captures == 4


def test_uncapturable_calls_run_eagerly():
    fake = FakeCapture()
    cache = GraphCache(capture=fake, capturable=lambda t: False, capturing=lambda: False)
    x = torch.randn(3)
    assert torch.equal(cache(fn, (x,)), fn(x)) and fake.captures == 0


def test_calls_made_while_the_stream_is_capturing_run_eagerly():
    fake = FakeCapture()
    cache = GraphCache(capture=fake, capturable=lambda t: True, capturing=lambda: True)
    cache(fn, (torch.randn(3),))
    assert fake.captures == 0 and not cache.keys


def test_a_failed_capture_turns_capture_off_with_a_warning():
    def failing(fn, args):
        raise RuntimeError("operation not permitted when stream is capturing")

    calls = []

    def counted(x):
        calls.append(1)
        return x + 1

    cache = GraphCache(capture=failing, capturable=lambda t: True, capturing=lambda: False)
    x = torch.randn(3)
    with pytest.warns(RuntimeWarning, match="capture failed.*not permitted"):
        assert torch.equal(cache(counted, (x,)), x + 1)
    assert "not permitted" in cache.error
    assert torch.equal(cache(counted, (x,)), x + 1)  # no second attempt, no second warning
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------- runtime
class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return x * self.w


def runtime_with_fake(capture: bool = True) -> tuple[CudaRuntime, FakeCapture]:
    gm = torch.fx.symbolic_trace(Scale().eval())
    runtime = CudaRuntime(gm, capture=capture)
    fake = FakeCapture()
    runtime.graphs = GraphCache(capture=fake, capturable=lambda t: True, capturing=lambda: False)
    return runtime, fake


def test_runtime_replays_and_returns_inference_tensors():
    runtime, fake = runtime_with_fake()
    x = torch.randn(4)
    y = runtime(x)
    assert torch.equal(y, x * runtime.graph_module.w) and y.is_inference() and fake.captures == 1


def test_capture_false_runs_the_graph_directly():
    runtime, fake = runtime_with_fake(capture=False)
    x = torch.randn(4)
    assert torch.equal(runtime(x), x * runtime.graph_module.w) and fake.captures == 0


def test_runtime_on_cpu_tensors_runs_eagerly():
    gm = torch.fx.symbolic_trace(Scale().eval())
    runtime = CudaRuntime(gm)  # the real capture, which only takes CUDA tensors
    x = torch.randn(4)
    assert torch.equal(runtime(x), x * gm.w) and not runtime.graphs.keys


def test_moving_the_module_drops_captured_graphs():
    runtime, _ = runtime_with_fake()
    runtime(torch.randn(4))
    assert runtime.graphs.keys
    runtime.double()  # weights move to new memory: the captured graph would read the old one
    assert not runtime.graphs.keys


def test_copies_start_without_captured_graphs():
    runtime, _ = runtime_with_fake()
    x = torch.randn(4)
    runtime(x)
    clone = copy.deepcopy(runtime)
    assert not clone.graphs.keys and runtime.graphs.keys
    assert torch.equal(clone(x), runtime(x))


def test_eager_runs_and_captures_are_under_the_tf32_policy_replays_are_not(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def spy(allow):
        entered.append(allow)
        yield

    monkeypatch.setattr(cuda_graphs, "tf32_policy", spy)
    runtime, _ = runtime_with_fake()
    runtime.tf32 = True
    runtime.graphs.capture = lambda fn, args: (lambda: None, fn(*args))  # a replay that launches nothing
    runtime(torch.randn(4))
    runtime(torch.randn(4))
    assert entered == [True]  # the capture; the replay set no flag
    runtime.capture = False
    runtime(torch.randn(4))
    assert entered == [True, True]


def test_runtime_pass_wraps_the_graph_and_keeps_bound_arguments():
    class WithFlag(nn.Module):
        def forward(self, x, scale: float = 3.0):
            return x * scale

    compiled = fxforge.compile(WithFlag().eval(), "cpu", example_inputs=torch.randn(2),
                               pipeline="dce,cuda-runtime{capture=false,max_graphs=2}")
    assert [type(m).__name__ for m in compiled.graph_module.children()] == ["CudaRuntime"]
    runtime = compiled.graph_module.cuda_runtime
    assert (runtime.capture, runtime.max_graphs, runtime.tf32) == (False, 2, False)
    x = torch.randn(2)
    assert torch.equal(compiled(x), x * 3.0)
    assert "runtime: no graph capture, TF32 off" in str(compiled.report)


def test_runtime_pass_rejects_an_empty_cache():
    with pytest.raises(fxforge.ConfigError, match="max_graphs=0.*capture=false"):
        fxforge.PassManager.from_text("cuda-runtime{max_graphs=0}")


# ---------------------------------------------------------------------------------------------- TF32
def _flags() -> list:
    b = torch.backends
    new = [b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision] \
        if precision.has_fp32_precision_api() else []
    return [precision.read_legacy_tf32(b.cudnn), precision.read_legacy_tf32(b.cuda.matmul), *new]


@pytest.mark.parametrize("allow", [False, True])
def test_tf32_policy_sets_the_flags_inside_and_restores_them(allow):
    before = _flags()
    with tf32_policy(allow):
        assert torch.backends.cudnn.allow_tf32 is allow and torch.backends.cuda.matmul.allow_tf32 is allow
        if precision.has_fp32_precision_api():
            assert torch.backends.cudnn.conv.fp32_precision == ("tf32" if allow else "ieee")
    assert _flags() == before


def test_tf32_policy_restores_the_flags_after_an_error():
    before = _flags()
    with pytest.raises(ValueError), tf32_policy(True):
        raise ValueError
    assert _flags() == before


def test_tf32_policy_on_torch_without_the_fp32_precision_api(monkeypatch):
    monkeypatch.setattr(precision, "has_fp32_precision_api", lambda: False)
    before = _flags()
    with tf32_policy(False):
        assert torch.backends.cudnn.allow_tf32 is False
    assert _flags() == before


def test_concurrent_calls_do_not_share_the_static_buffers_mid_replay():
    """Thread A's replay waits (up to a second) for thread B to start copying in; with the lock B cannot, so A
    reads back its own values."""
    b_entered = threading.Event()
    cache = GraphCache(capture=lambda fn, args: (lambda: (b_entered.wait(1.0), args[1].copy_(args[0])), args[1]),
                       capturable=lambda t: True, capturing=lambda: False)
    a_in, b_in, out = torch.full((4,), 1.0), torch.full((4,), 2.0), torch.zeros(4)
    cache(lambda x, o: o, (a_in, out))  # captures the entry
    results = {}

    def call(name, x):
        if name == "b":
            b_entered.set()
        results[name] = cache(lambda x, o: o, (x, out))

    a = threading.Thread(target=call, args=("a", a_in))
    a.start()
    b = threading.Thread(target=call, args=("b", b_in))
    b.start()
    a.join()
    b.join()
    assert torch.equal(results["a"], a_in) and torch.equal(results["b"], b_in)


def test_cpu_tensors_for_a_model_on_the_gpu_get_a_config_error(monkeypatch):
    class NeedsGpu(nn.Module):
        def forward(self, x):
            raise RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu")

    monkeypatch.setattr(cuda_graphs, "weights_on_gpu", lambda module: True)
    runtime = CudaRuntime(NeedsGpu(), capture=True)
    with pytest.raises(fxforge.ConfigError, match=r"input\(s\) 0 are CPU tensors.*\.cuda\(\)"):
        runtime(torch.randn(2))
    monkeypatch.setattr(cuda_graphs, "weights_on_gpu", lambda module: False)  # a model on the CPU: its own error
    with pytest.raises(RuntimeError, match="same device"):
        runtime(torch.randn(2))
