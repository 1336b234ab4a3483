"""The CPU facts a saved int8 model depends on, recorded at save and checked at load.

fbgemm / x86 int8 kernels sum pairs of u8 x s8 products into int16 with saturation unless the CPU has VNNI
(``quant/qspec.py``); oneDNN (the x86 target's runtime engine and some of its layers' packing) follows
``ONEDNN_MAX_CPU_ISA`` too. A static or dynamic int8 model compiled without ``reduce_range`` (on a VNNI CPU)
therefore gives wrong outputs on a CPU, or under an oneDNN ISA limit, without VNNI: ``check_isa`` refuses
it with ``BackendUnavailableError`` rather than run it. qnnpack and weight-only int8 (fp32 activations) do
not depend on VNNI.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fxforge.errors import BackendUnavailableError
from fxforge.quant import qspec

_VNNI_BACKENDS = ("fbgemm", "x86")
_SATURATING_MODES = ("static", "dynamic")  # u8 activations x s8 weights in the kernels
# ONEDNN_MAX_CPU_ISA values below the first ISA with VNNI (AVX512_CORE_VNNI / AVX2_VNNI)
_ONEDNN_WITHOUT_VNNI = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})


def onednn_max_isa() -> str | None:
    return os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA")) or None


def vnni_here() -> bool:
    """Whether int8 kernels here sum u8 x s8 products without int16 saturation (fbgemm and oneDNN)."""
    limit = onednn_max_isa()
    return qspec.cpu_has_vnni() and (limit is None or limit.upper() not in _ONEDNN_WITHOUT_VNNI)


def isa_facts(compiled: Any) -> dict[str, Any]:
    """What the compiled model's kernels assume about the CPU (the ``isa`` entry of saved metadata)."""
    opts, summary = compiled.quant_options, compiled.report.quantization
    reduce_range = None if opts is None or summary is None else bool(summary.reduce_range)
    requires = (opts is not None and opts.backend in _VNNI_BACKENDS and opts.mode in _SATURATING_MODES
                and reduce_range is False)
    return {"requires_vnni": requires, "engine": None if opts is None else opts.runtime_engine,
            "reduce_range": reduce_range,
            "built_on": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "vnni": vnni_here(),
                         "onednn_max_cpu_isa": onednn_max_isa()}}


def check_isa(isa: dict[str, Any]) -> None:
    """BackendUnavailableError when this CPU cannot run kernels that assumed ``isa`` correctly."""
    if isa["requires_vnni"] and not vnni_here():
        limit = onednn_max_isa()
        here = f"CPU capability {torch.backends.cpu.get_cpu_capability()}" + (
            f", ONEDNN_MAX_CPU_ISA={limit}" if limit else "")
        raise BackendUnavailableError(
            f"the model was compiled with 8-bit int8 kernels for a CPU with VNNI (engine {isa['engine']}, "
            f"reduce_range off), and int8 sums saturate here without VNNI ({here}): its outputs would be wrong. "
            f"Compile the original model again on this machine (fxforge.compile picks reduce_range without VNNI)")
