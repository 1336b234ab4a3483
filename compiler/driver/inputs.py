"""What a compile accepts and what a compiled model was built for, checked with errors that say what to do.

- The model must hold real tensors (not ``meta`` ones) and be deep-copyable: compile works on a copy and never
  changes the user's model; an attribute that cannot be copied (a lock, an open file) is named.
- The example inputs must hold real tensors.
- A compiled model remembers each tensor input's dtype, shape and device (``InputSpec``). Calls are not
  checked up front (that would cost every call); when a call fails, its inputs are compared with those and a
  mismatch (a float64 input, another channel count, a tensor on another device) becomes a ``ConfigError``
  saying what was compiled, instead of a kernel's raw message.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fxforge.errors import ConfigError


def _meta_tensors(model: nn.Module) -> Iterator[str]:
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_meta:
            yield name


def check_model(model: nn.Module) -> None:
    """The model holds real weights (meta-device ones have no values to fold, quantize or run)."""
    meta = list(_meta_tensors(model))
    if meta:
        raise ConfigError(f"the model has {len(meta)} tensor(s) on the meta device ({', '.join(meta[:3])}"
                          f"{', ...' if len(meta) > 3 else ''}): they hold no values. Load real weights first "
                          f"(e.g. model.to_empty(device='cpu') then model.load_state_dict(...))")


def check_inputs(inputs: tuple[Any, ...]) -> None:
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.is_meta:
            raise ConfigError(f"example input {i} is a meta tensor (shape {tuple(x.shape)}, no values): give real "
                              f"tensors, e.g. torch.randn({', '.join(map(str, x.shape))})")


def _uncopyable(model: nn.Module) -> str | None:
    """The first attribute (module path.name) of ``model`` that deepcopy fails on, or None."""
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules") or name.startswith("_forward") \
                    or name.startswith("_backward") or name.startswith("_state_dict"):
                continue
            try:
                copy.deepcopy(value)
            except Exception:
                return f"{path}.{name}" if path else name
    return None


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (compile never touches the original); ConfigError naming what cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:
        culprit = _uncopyable(model)
        where = f": attribute '{culprit}'" if culprit else ""
        raise ConfigError(f"the model cannot be copied (copy.deepcopy raised {type(exc).__name__}: {exc}){where}. "
                          f"fxforge compiles a copy so that your model stays untouched: drop such members before "
                          f"compiling, or give their class a __deepcopy__") from exc


@dataclass(frozen=True)
class InputSpec:
    """A tensor input as the model was compiled for it."""

    index: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    device: torch.device

    def describe(self) -> str:
        return f"{'x'.join(map(str, self.shape)) or 'scalar'} {str(self.dtype).removeprefix('torch.')} on {self.device}"


def input_specs(inputs: tuple[Any, ...]) -> tuple[InputSpec, ...]:
    return tuple(InputSpec(i, x.dtype, tuple(x.shape), x.device) for i, x in enumerate(inputs)
                 if isinstance(x, torch.Tensor))


def _mismatch(spec: InputSpec, x: Any) -> str:
    if not isinstance(x, torch.Tensor):
        return f"got {type(x).__name__}"
    got = InputSpec(spec.index, x.dtype, tuple(x.shape), x.device)
    problems = []
    if got.dtype != spec.dtype:
        problems.append("dtype")
    if got.device.type != spec.device.type:
        problems.append("device")
    # the batch dimension may differ; any other dimension (channels, features) is a different input
    if len(got.shape) != len(spec.shape) or got.shape[1:] != spec.shape[1:]:
        problems.append("shape")
    return f"{'/'.join(problems)}: got {got.describe()}" if problems else ""


def explain_call_failure(specs: tuple[InputSpec, ...] | None, args: tuple[Any, ...], exc: BaseException
                         ) -> ConfigError | None:
    """A ConfigError saying how the failed call's inputs differ from the compiled ones, or None when they do
    not (the failure is then not the inputs')."""
    if not specs:
        return None
    wrong = [(s, _mismatch(s, args[s.index] if s.index < len(args) else None)) for s in specs]
    wrong = [(s, why) for s, why in wrong if why]
    if not wrong:
        return None
    lines = "; ".join(f"input {s.index}: compiled for {s.describe()}, {why}" for s, why in wrong)
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return ConfigError(f"the compiled model failed on inputs unlike those it was compiled for ({lines}). Convert "
                       f"the inputs (e.g. x.float(), x.to(device)) or compile again with example inputs like them "
                       f"(the kernel said: {type(exc).__name__}: {first})")
