"""Progress of a long run, as plain text on stderr, reported between segments of
the compiled loop (never from inside it: the program is the one a run without
progress compiles, and the persistent cache serves both)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import jax
import numpy as np


class TextProgress:
    """Reports `t`, the loss, the steps and the solver's mode of a single run.

    On a terminal one line is rewritten in place; elsewhere (a log) a line is
    written at most every `every_s` seconds, and always at the end.

    Args:
        entry: the entry point's name, e.g. "simulate".
        t_max: the run's end time.
        stream: where to write (default: stderr).
        every_s: the least time between two lines when not on a terminal.
    """

    def __init__(
        self, entry: str, t_max: float, stream: TextIO | None = None, every_s=5.0
    ):
        self.entry = entry
        self.t_max = t_max
        self.stream = sys.stderr if stream is None else stream
        self.every_s = every_s
        self._last_line = -np.inf
        self._width = 0

    @property
    def _terminal(self) -> bool:
        return bool(getattr(self.stream, "isatty", lambda: False)())

    def compiling(self) -> None:
        """Say that the program is being compiled (a first call takes seconds)."""
        self._write(f"gflow.{self.entry}: compiling...", end=True)

    def __call__(self, state: Any, mode: str) -> None:
        """Report the state a segment ended with."""
        # On the host: indexing device arrays would compile small programs.
        lanes, loss = jax.device_get((state.lanes, state.out.loss))
        t, steps, row = lanes.t[0], lanes.steps[0], lanes.row[0]
        fraction = min(float(t) / self.t_max, 1.0)
        last_loss = float(loss[0, max(int(row) - 1, 0)])
        line = (
            f"gflow.{self.entry}: t = {float(t):.5g} of {self.t_max:g} "
            f"({100 * fraction:6.2f}%), loss {last_loss:.6g} at the last save, "
            f"{int(steps)} steps, {mode}"
        )
        done = fraction >= 1.0 or not bool(lanes.running[0])
        now = time.perf_counter()
        if self._terminal or done or now - self._last_line >= self.every_s:
            self._last_line = now
            self._write(line, end=done or not self._terminal)

    def _write(self, line: str, end: bool) -> None:
        if self._terminal:
            pad = " " * max(self._width - len(line), 0)
            self.stream.write("\r" + line + pad + ("\n" if end else ""))
            self._width = 0 if end else len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
