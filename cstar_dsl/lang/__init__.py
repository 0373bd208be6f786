"""The language: recipe text -> syntax tree -> sections -> the validated `Spec`, and diagnostics.

Parse, lower, load/extend (resolve), coerce and validate, the formatter and the diagnostic
renderer, the registry of names a recipe may use, and the `spec` models. Nothing here imports
torch (tests/test_layering.py checks it), so `cstar check` and `cstar fmt` answer at once.
"""
