"""Built-in passes, one file per pass; importing this package registers them by name, and the ``canonicalize``
pipeline fragment that every target's pipeline starts with."""

from fxforge.pipeline.fragments import register_fragment

from . import (  # noqa: F401
    attention,
    calibrate,
    correct_bias,
    dce,
    equalize,
    fold_bn,
    fuse,
    insert_observers,
    insert_qdq,
    normalize_gelu,
    normalize_inplace,
    normalize_relu,
    prepare_qat,
    quantize_dynamic,
    remove_noops,
    search_observers,
    to_nhwc,
    weight_only,
)

# one spelling per op: no-ops and dead code gone, in-place ops out of place, every relu one relu
register_fragment("canonicalize", "remove-noops,dce,normalize-inplace,normalize-relu,normalize-gelu")
