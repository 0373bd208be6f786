"""The model stage (torch): build a model from the zoo, inventory its layers, decompose, rewrite, prune.

``zoo`` builds the model a `ModelSpec` names; ``inventory`` traces it with torch.fx; ``decompose``
holds the SVD / Tucker-2 math; ``factorized`` the low-rank layers; ``rewrite`` swaps them in by plan;
``prune`` is the channel-prune baseline.
"""
