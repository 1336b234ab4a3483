"""fxforge.quant: int8 quantization core (qparam rules, observers, per-layer config, QAT and reference modules)."""
