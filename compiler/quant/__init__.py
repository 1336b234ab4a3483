"""int8 quantization core: qparam rules and engines (``qspec``), observers, per-layer config, how each op is
quantized (``ops``, ``plan``), reference QDQ modules, QAT modules, calibration, the observer search and SQNR.
Passes and backends build on it; it knows nothing of pipelines or compile.
May import: ``graph``, ``errors``.
"""
