"""Built-in passes, one file per pass; importing this package registers them by name."""

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
    normalize_inplace,
    normalize_relu,
    prepare_qat,
    quantize_dynamic,
    remove_noops,
    search_observers,
    to_nhwc,
)
