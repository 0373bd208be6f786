"""Planning (pure, no torch): a `Spec` and the layer inventory -> the rank `Plan`, and diffs of specs and plans.

``allocate`` decides each layer's treatment and ranks; ``layers`` is the planning data a model
inventory produces; ``diff`` compares two specs and their plans.
"""
