"""Compile once: capture the model, run the target's pipeline under the PassManager and return a
``CompiledModule`` (``compiled``) with its report (``build``); QAT preparation (``qat``). It knows nothing of
searches: ``fxforge.compile`` (``compile.py``) and ``search`` call ``build``.
May import: ``serialization``, ``testing``, ``pipeline`` and below.
"""
