"""Built-in passes, one file per pass; importing this package registers them by name."""

from . import dce, fold_bn, fuse, normalize_inplace, normalize_relu, remove_noops  # noqa: F401
