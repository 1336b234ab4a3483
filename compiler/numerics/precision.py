"""Float precision policies shared by the compile checks and the CUDA runtime.

``tf32_policy(allow)``: TF32 on or off for cuDNN convolutions / RNNs and cuBLAS matmuls inside a block, every
flag restored after. torch turns TF32 on for cuDNN convolutions by default, so fp32 numbers computed on a GPU
under the defaults differ from exact fp32 by TF32's 10-bit mantissa: compile computes its references and
numeric checks with TF32 off (``exact_fp32``), and the CUDA runtime runs under the policy its target asks for.
On a machine without a GPU the flags exist and setting them changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def has_fp32_precision_api() -> bool:
    """torch >= 2.9 spells TF32 as ``fp32_precision`` per backend; mixing it with the legacy ``allow_tf32``
    flags makes torch raise when the flags disagree, so only one API is ever used."""
    return hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision")


def _flag_owners() -> tuple[Any, Any]:
    return torch.backends.cudnn, torch.backends.cuda.matmul


def read_legacy_tf32(owner: Any) -> bool | None:
    try:
        return owner.allow_tf32
    except RuntimeError:  # torch >= 2.9 when the caller mixed the legacy and new APIs: no single legacy value
        return None


@contextlib.contextmanager
def tf32_policy(allow: bool) -> Iterator[None]:
    """TF32 on (``allow``) or off for cuDNN (convolutions, RNNs) and cuBLAS matmuls inside the block; every
    flag is restored after.

    torch >= 2.9 keeps the legacy ``allow_tf32`` flags beside the new ``fp32_precision`` ones and raises when a
    legacy flag is read while the two disagree; so the legacy flags are set to agree first (setting one resets
    the new flags it shadows), then the new ones, and they are restored in the same order.
    """
    owners = _flag_owners()
    new_api = [torch.backends.cudnn.conv, torch.backends.cudnn.rnn, torch.backends.cuda.matmul] \
        if has_fp32_precision_api() else []
    saved_legacy = [read_legacy_tf32(owner) for owner in owners]
    saved_new = [b.fp32_precision for b in new_api]
    for owner in owners:
        owner.allow_tf32 = allow
    for b in new_api:
        b.fp32_precision = "tf32" if allow else "ieee"
    try:
        yield
    finally:
        for owner, value in zip(owners, saved_legacy, strict=True):
            if value is not None:
                owner.allow_tf32 = value
        for b, value in zip(new_api, saved_new, strict=True):
            b.fp32_precision = value


def exact_fp32() -> contextlib.AbstractContextManager[None]:
    """fp32 without TF32 (references and numeric checks: what eager fp32 means on a CPU)."""
    return tf32_policy(False)
