"""Backends, one file each: a target's pipeline recipe, its lowering pass and its runtime modules.
Importing this package registers them: targets, passes, and the TorchScript twins of runtime modules."""

from . import (  # noqa: F401
    cpu,
    cpu_bf16,
    cpu_script,
    cuda,
    fp32_kernel_choice,
    int8,
    int8_lowering,
    int8_rnn_script,
    weight_only,
)
