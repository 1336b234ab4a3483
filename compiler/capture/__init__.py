"""Capture: an ``nn.Module`` in, an ``fx.GraphModule`` out (``tracing``: symbolic tracing that binds flags and
makes untraceable submodules leaves, saying which and why).
May import: ``graph``, ``errors``.
"""
