"""The `gflow` command line: reproduce a paper's figures with the true flow.

    gflow reproduce cooccurrence [--full] [--out DIR]
    gflow reproduce markov       [--full] [--out DIR]
    gflow reproduce condensation [--full] [--out DIR]

Each runs the corresponding example script (examples/ in a source checkout, shipped
inside the wheel as gflow/_examples) and writes its figures and a JSON summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from ._version import gflow_version

# name -> (example script, its arguments for --full, what --full means)
PAPERS = {
    "cooccurrence": (
        "cooccurrence_phases",
        ["--t-max", "1e6"],
        "Yang et al. 2024 at their scale; --full runs to t = 1e6 instead of 300",
    ),
    "markov": (
        "markov_local_to_global",
        ["--full"],
        "Makkuva et al. 2024: portrait, basins, inits; --full: larger (12 min)",
    ),
    "condensation": (
        "condensation_rank_collapse",
        ["--full"],
        "Chen & Luo 2025 at d_m = 8; --full uses d_m = 16 and 256 samples",
    ),
}


class _Parser(argparse.ArgumentParser):
    """Bad arguments: exit 2 with a one-line reason (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def examples_dir() -> pathlib.Path | None:
    """Where the example scripts are: inside the package (wheel) or beside it."""
    package = pathlib.Path(__file__).parent
    for candidate in (package / "_examples", package.parent / "examples"):
        if (candidate / "quickstart.py").is_file():
            return candidate
    return None


def _run_example(script: str, argv: list[str]):
    folder = examples_dir()
    if folder is None:
        sys.exit(
            "gflow: error: the example scripts are not installed; run gflow from a "
            "source checkout or a wheel built with them"
        )
    spec = importlib.util.spec_from_file_location(script, folder / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gflow",
        description="gflow: the true gradient flow of machine-learning models.",
    )
    parser.add_argument("--version", action="version", version=gflow_version())
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    reproduce = commands.add_parser(
        "reproduce",
        help="reproduce a paper's figures with the true flow",
        description="Run a paper's reproduction and write its figures (PNG) and a "
        "JSON summary to --out.",
        epilog="papers:\n"
        + "\n".join(f"  {name:<13} {what}" for name, (_, _, what) in PAPERS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    reproduce.add_argument("paper", choices=sorted(PAPERS), help="which paper")
    reproduce.add_argument("--full", action="store_true", help="the larger setting")
    reproduce.add_argument(
        "--out", default=None, help="output folder (default: out/<paper>)"
    )
    return parser


def reproduce(paper: str, *, full: bool = False, out: str | None = None):
    """Run one paper's reproduction; returns the summary its example computes."""
    script, full_args, _ = PAPERS[paper]
    out = out or f"out/{paper}"
    return _run_example(script, ["--out", out] + (full_args if full else []))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `gflow` command (returns None: exit status 0)."""
    args = build_parser().parse_args(argv)
    reproduce(args.paper, full=args.full, out=args.out)


if __name__ == "__main__":
    main()
