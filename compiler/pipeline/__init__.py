"""Pass infrastructure: the Pass contract and registry (``pass_api``), pipeline text (``text``) and composition,
the ``PassContext``, instruments, graph invariants (``verify``), the ``PassManager``, the target registry
(``targets``) and the ``CompileReport`` a pipeline fills in.
May import: ``numerics``, ``quant``, ``capture``, ``graph``, ``errors``.
"""
