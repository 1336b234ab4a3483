"""Helpers for testing compiled models, shared by users and fxforge's own tests: BatchNorm statistics that make
numeric checks meaningful (``helpers``) and the random-graph generator (``fuzz``, needs hypothesis).
May import: ``pipeline`` and below.
"""

from .helpers import randomize_bn, reestimate_bn

_FUZZ_NAMES = ("FuzzGraph", "FuzzModel", "Op", "OpChoices", "graphs")
__all__ = ["randomize_bn", "reestimate_bn", *_FUZZ_NAMES]


def __getattr__(name: str):
    """``graphs``, ``FuzzGraph``, ``FuzzModel``, ``Op`` and ``OpChoices`` (from ``fuzz``) need hypothesis, a test
    extra: they are imported on first use (optional dependency), so ``import fxforge`` works without it."""
    if name in _FUZZ_NAMES:
        from . import fuzz  # optional dependency: hypothesis (a test extra)

        return getattr(fuzz, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
