"""Searches over compiles: the accuracy budget (``accuracy``) and the profitability check (``profitability``);
each calls ``driver.build`` once per candidate and keeps the best.
May import: ``driver`` and below.
"""
