"""`python -m cstar_dsl`: the cstar command line."""

from .cli import run

run()
