"""Lowered graphs as bytes: the portable graph codec behind ``fxforge.save``/``load`` (``codec``, with what loading
may build or call in ``allowlist`` and the CPU facts a saved model needs in ``isa``) and the
TorchScript export (``torchscript``).
May import: ``pipeline`` and below.
"""
