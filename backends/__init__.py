"""Backends, one file each: a target's pipeline recipe, its lowering pass and its runtime modules.
Importing this package registers them: targets, passes, and the TorchScript and ONNX twins of runtime modules."""

import fxforge.passes  # noqa: F401  isort: skip  (first: the recipes compose its `canonicalize` fragment)

from . import (  # noqa: F401
    cpu,
    cpu_bf16,
    cpu_onnx,
    cpu_script,
    cuda,
    fp32_kernel_choice,
    int8,
    int8_lowering,
    int8_rnn_onnx,
    int8_rnn_script,
    openvino,
    weight_only,
)
