"""Lowered graphs as bytes: the portable graph codec behind ``fxforge.save``/``load`` (``codec``) and the
TorchScript export (``torchscript``).
May import: ``pipeline`` and below.
"""
