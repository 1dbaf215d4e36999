"""`python -m gflow` runs the command line (see gflow/cli.py)."""

from .cli import main

if __name__ == "__main__":
    main()
