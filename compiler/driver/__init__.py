"""Compile once: capture the model, run the target's pipeline under the PassManager and return a
``CompiledModule`` with its report (``build``); QAT preparation (``qat``). It knows nothing of searches.
May import: ``serialization``, ``testing``, ``pipeline`` and below.
"""
