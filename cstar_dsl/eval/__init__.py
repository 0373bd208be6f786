"""Evaluation: accuracy under attack during a compile (``evaluation``) and `cstar eval` (``robustness``).

Named after the `cstar eval` command: a package named ``evaluate`` would hide the lazily exported
function `cstar_dsl.evaluate` once imported.
"""
