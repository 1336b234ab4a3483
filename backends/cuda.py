"""The "cuda" backend (foundation level): fp32 on the GPU with the graph-level clean-ups.

Pipeline: remove no-ops, dead code elimination, normalize, fold BatchNorm; kernels are torch's own
(cuDNN/cuBLAS). Fused cuDNN conv kernels, fp16/bf16, channels-last weights and CUDA graph capture are the
CUDA backend's next steps; this target exists so that ``target="auto"`` does the right thing on a GPU
machine today. Without a visible GPU it reports itself unavailable with the reason.
"""

from __future__ import annotations

import torch

from fxforge.targets import Target, register_target


def cuda_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    return None


register_target(Target(
    name="cuda",
    description="fp32 on a CUDA GPU: BatchNorm folded, no-ops removed, torch's cuDNN/cuBLAS kernels",
    pipeline="remove-noops,dce,normalize-inplace,normalize-relu,fold-bn",
    device="cuda",
    availability=cuda_unavailable_reason,
))
