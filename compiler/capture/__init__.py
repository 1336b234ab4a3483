"""Capture: an ``nn.Module`` in, an ``fx.GraphModule`` out (``front_end``: which of the two; ``tracing``: symbolic
tracing that binds flags and makes untraceable submodules leaves, saying which and why; ``export``: torch.export
with module calls restored; ``signature``: user calls onto the flat graph, and the input shape contract).
May import: ``graph``, ``errors``.
"""
