"""Running a compiled loop to the end, in segments when the host has something to
do between them: write a checkpoint, report progress, or switch "auto" between its
explicit and stabilized programs. Every segment runs the same compiled program(s)
from the state the last one left, so a run cut into segments takes the same steps,
bit for bit, as one that is not; and the programs are the same as without progress
or checkpoints, so the persistent compilation cache serves them all.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _checkpoint, _engine
from ._compile import CompileTimer, Timing
from ._engine import Controls, Problem, State
from ._options import matmul_precision_context
from ._prepare import auto_falls_back, hvp_failure
from ._solvers import modes, needs_hvps, solver_name

#: A budget of loop iterations that never runs out.
UNBOUNDED = int(np.iinfo(np.int32).max)
# The first segment of a timed run is short: it measures how fast the work goes.
_FIRST_SEGMENT = 50


@dataclasses.dataclass
class Segments:
    """How a run is cut: a checkpoint after each segment (`folder`, `stamp`,
    every `every_s` seconds or `every_steps` units of work), and/or a progress
    report (`report(state)`) every `report_s` seconds."""

    folder: Any = None
    stamp: str = ""
    every_s: float = float("inf")
    every_steps: int | None = None
    report: Callable[[Any], None] | None = None
    report_s: float = 0.5
    compiling: Callable[[], None] | None = None

    @property
    def seconds(self) -> float:
        """The longest a segment should run (inf: no timed segments)."""
        checkpoint_s = self.every_s if self.folder is not None else float("inf")
        report_s = self.report_s if self.report is not None else float("inf")
        return min(checkpoint_s, report_s)


def run_in_segments(
    fresh: Callable[[], Any],
    advance: Callable[[Any, int], Any],
    finished: Callable[[Any], bool],
    work: Callable[[Any], int],
    segments: Segments,
) -> tuple[Any, Timing, dict]:
    """Run `advance(state, budget)` from `fresh()` (or the stored checkpoint) until
    `finished(state)`; between segments, write a checkpoint and report progress as
    `segments` asks. `work(state)` counts the work done (loop iterations, steps):
    budgets are in its units. `advance` may return before its budget is spent
    (e.g. to switch programs): it is then called again.

    Returns the final state, the timing of the whole call and the checkpoint's
    counters for `stats`."""
    timing = Timing()
    start = time.perf_counter()
    with CompileTimer() as first:
        state = fresh()
    timing.add(first)
    stored = None
    if segments.folder is not None:
        stored = _checkpoint.read(segments.folder, segments.stamp, state)
        state = state if stored is None else jax.device_put(stored)
    budget = segments.every_steps or (
        _FIRST_SEGMENT if np.isfinite(segments.seconds) else UNBOUNDED
    )
    writes, write_s = 0, 0.0
    while not finished(state):
        before = work(state)
        with CompileTimer(segments.compiling) as segment:
            state = jax.block_until_ready(advance(state, budget))
        timing.add(segment)
        if segments.folder is not None:
            begin = time.perf_counter()
            _checkpoint.write(segments.folder, segments.stamp, state)
            write_s += time.perf_counter() - begin
            writes += 1
        if segments.report is not None:
            segments.report(state)
        if segments.every_steps is None and np.isfinite(segments.seconds):
            rate = (work(state) - before) / max(segment.run_time_s, 1e-3)
            budget = int(np.clip(rate * segments.seconds, 1, UNBOUNDED))
    timing.wall_time_s = time.perf_counter() - start
    stats = {}
    if segments.folder is not None:
        stats = dict(
            resumed=stored is not None,
            checkpoint_writes=writes,
            checkpoint_write_time_s=write_s,
        )
    return state, timing, stats


def solve(
    problem: Problem,
    controls: Controls,
    queue,
    data,
    *,
    n_slots: int,
    matmul_precision: str | None,
    mesh=None,
    n_devices: int | None = None,
    segments: Segments | None = None,
    single: bool = False,
) -> tuple[State, Timing, dict]:
    """Run the engine from a blank state until every member is done. `single`:
    one member (`gflow.simulate`), its queue entry without a member axis.

    A solver of two methods (gflow's "auto"), for one member, starts with the
    program of its common method alone; only when the member wants the other is
    the program that holds it compiled, and the run goes on from the same state (a
    program per method, switching back and forth). Compiling it costs time, and a
    run that is nearly done would not win it back: while the member would take
    fewer than `Modes.min_steps` more steps, it goes on in the common method
    (`_step.wanting_other_mode`).

    An ensemble compiles the program of both methods at once. Its lanes in both
    modes need that program, which holds the common one; and among many members
    one that stiffens is the rule (every grid of `benchmarks/ensemble.py`, even
    to t = 20), so starting with the common program alone would usually compile
    both programs, most of the cost twice.
    """
    n_members = 1 if single else jax.tree.leaves(queue)[0].shape[0]
    mode = first_mode(problem, single)
    checked = False  # whether the rare method's derivatives were checked

    def rare_usable(state) -> bool:
        """Whether the rare method's Hessian-vector products work for this loss,
        checked before its program is first compiled. If not, "auto" says so and
        no lane switches to it."""
        nonlocal controls, checked
        if checked:
            return True
        if failure := _rare_fails(problem, state, data):
            auto_falls_back(failure)
            controls = _no_switch(controls)
            return False
        checked = True
        return True

    def fresh():
        nonlocal mode
        # (The problem as the first program sees it: their traces of a member's
        # start are then one.)
        first = dataclasses.replace(problem, mode=mode)
        state = _engine.blank_state(
            first, controls, queue, data, n_slots, n_devices, single
        )
        if mode == "both" and not rare_usable(state):
            mode = "common"
        return state

    def advance(state, budget):
        nonlocal mode, controls
        stepping = dataclasses.replace(problem, mode=mode)
        budget = np.asarray(budget, np.int32)
        state = _engine.advance(
            stepping, controls, queue, data, state, budget, mesh, single
        )
        # Some lane wants the other method, and enough steps are left to be
        # worth compiling it (`_step.wanting_other_mode`).
        if np.any(jax.device_get(state.switch)) and (
            mode != "common" or rare_usable(state)
        ):
            mode = other_mode(mode)
        return state

    def finished(state):  # every member taken from the queue, none still running
        next_member, running = jax.device_get((state.next_member, state.lanes.running))
        return int(np.sum(next_member)) >= n_members and not np.any(running)

    def work(state):
        return int(np.sum(jax.device_get(state.iterations)))

    segments = segments or Segments()
    if segments.report is not None:
        report = segments.report
        segments = dataclasses.replace(
            segments, report=lambda state: report(state, mode_name(problem, mode))
        )
    with matmul_precision_context(matmul_precision):
        return run_in_segments(fresh, advance, finished, work, segments)


def _no_switch(controls: Controls) -> Controls:
    """Controls under which no lane switches to the rare method again."""
    never = np.asarray(np.inf, controls.ts.dtype)
    return dataclasses.replace(controls, switch_after=never)


def _rare_fails(problem: Problem, state: State, data) -> Exception | None:
    """Why the rare method's Hessian-vector products fail for this loss, or
    None."""
    if not needs_hvps(problem.solver):
        return None
    one = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state.lanes.y.params
    )
    return hvp_failure(problem.flow, problem.loss_fn, one, data)


def mode_name(problem: Problem, mode: str | None) -> str:
    """The solver and the method it steps with, for progress reports."""
    name = solver_name(problem.solver)
    split = modes(problem.solver)
    if split is None or mode is None:
        return name
    if mode == "both":
        return f"{name} ({' and '.join(split.names)})"
    return f"{name} ({split.names[mode == 'rare']})"


def first_mode(problem: Problem, single: bool) -> str | None:
    """The mode a run starts in, for a solver of two methods: one member, its
    common method; an ensemble, both."""
    if modes(problem.solver) is None:
        return None
    return "common" if single else "both"


def other_mode(mode: str) -> str:
    """The mode after one member asked for the other method (an ensemble runs in
    both from the start)."""
    return "rare" if mode == "common" else "common"
