"""Running the engine: one call, timed (compiling apart from running) under the
requested matmul precision; or cut into segments with a checkpoint after each."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from . import _checkpoint, _engine
from ._compile import CompileTimer
from ._options import Options, matmul_precision_context

#: Iterations of the engine's loop when a run is not cut into segments.
UNBOUNDED = np.iinfo(np.int32).max


def run(
    problem,
    controls,
    queue,
    data,
    opts: Options,
    *,
    mesh=None,
    n_devices=None,
    state=None,
    budget=UNBOUNDED,
):
    """Run the engine (from a fresh state unless `state` is given); returns the
    final state and the timer of the call."""
    with CompileTimer() as timer, matmul_precision_context(opts.matmul_precision):
        if state is None:
            state = _engine.fresh_state(
                problem,
                controls,
                queue,
                data,
                int(opts.saves.params_at.sum()),
                n_devices,
            )
        state = _engine.advance(
            problem, controls, queue, data, state, jnp.asarray(budget, jnp.int32), mesh
        )
        state = jax.block_until_ready(state)
    return state, timer


def run_in_segments(problem, controls, queue, data, opts: Options, stamp: str):
    """`run`, cut into segments with a checkpoint after each (`_checkpoint`),
    resumed from the checkpoint in `opts.checkpointing.folder` if there is one.
    The segments run the same compiled program as an uncut run from the same
    states, so the steps are the same bit for bit."""
    n_members = jax.tree.leaves(queue)[0].shape[0]
    saving = opts.checkpointing

    def advance(state, budget):
        return run(problem, controls, queue, data, opts, state=state, budget=budget)[0]

    def finished(state):  # every member taken from the queue, none still running
        # (On the host: a jnp reduction here would compile, inside the timer.)
        next_member, running = jax.device_get((state.next_member, state.lanes.running))
        return int(next_member) >= n_members and not np.any(running)

    def fresh():
        n_slots = int(opts.saves.params_at.sum())
        return _engine.fresh_state(problem, controls, queue, data, n_slots)

    return _checkpoint.run_in_segments(
        fresh,
        advance,
        finished,
        lambda state: int(state.iterations),
        saving.folder,
        stamp,
        saving.every_s,
        saving.every_steps,
    )
