"""The `gflow` command line."""

import json
import subprocess
import sys

import pytest

from gflow import cli


def test_help_lists_the_papers(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["reproduce", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for paper in ("cooccurrence", "markov", "condensation"):
        assert paper in out
    assert "--full" in out and "--out" in out


@pytest.mark.parametrize(
    "argv, reason",
    [
        (["reproduce", "gpt"], "invalid choice: 'gpt'"),
        ([], "the following arguments are required: COMMAND"),
        (["reproduce", "markov", "--fast"], "unrecognized arguments: --fast"),
    ],
)
def test_bad_arguments_exit_with_one_line(argv, reason, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert reason in err and err.count("\n") == 1


def test_reproduce_writes_figures_and_summary(tmp_path):
    # `python -m gflow` is the same entry point as the installed `gflow` command.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gflow",
            "reproduce",
            "condensation",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "condensation_summary.json").read_text())
    assert summary["condensed_at"] < summary["rank_collapse_at"]
    for name in ("condensation_dynamics.png", "condensation_heatmaps.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert cli.examples_dir() is not None
