"""`python -m gflow` runs the command line (see gflow/cli.py)."""

from .cli import main

main()
