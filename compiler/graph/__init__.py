"""The fx graph vocabulary every other layer speaks: per-node metadata (``meta``), the op table (``ops``: every
spelling of an op), node queries (``matching``), rewrite rules (``patterns``), the fused module types passes
rewrite into (``fused``) and graphs as plain data for reports and viz (``snapshot``).
May import: ``fxforge.errors`` only.
"""
