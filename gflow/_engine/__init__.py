"""The engine: lanes of solver state, one compiled `lax.while_loop` over steps.

Every flow gflow solves runs here, built on diffrax's step API: `solver.step`, the
controller's `adapt_step_size`, and `solver.interpolation_cls` for the save times.
A lane holds one member's solve: its time, state, step size, solver and controller
states, counters and save cursor. Each iteration every running lane attempts one
step (vmapped); then, a few lanes at a time (`width`), the lanes that crossed save
times write those rows, lanes whose loss fell through `stop_at_loss` locate the
crossing, and lanes whose member is done write its results and take the next
member from the queue. `simulate` is one lane and one member; `simulate_ensemble`
is many lanes refilled from a queue until it drains, with no trip to the host.

Outputs are indexed by member: row times, loss, gradient norm and metrics at every
row; parameters and velocities only in the rows' parameter slots (`slot`), the last
slot being each member's final state; counters and the result code.

The loop stops after `budget` iterations; its whole carry (`State`) can be handed
back in to go on, which is how checkpointed runs are segmented.
"""

from ._loop import advance as advance
from ._loop import fresh_state as fresh_state
from ._problem import Controls as Controls
from ._problem import Metrics as Metrics
from ._problem import Outputs as Outputs
from ._problem import Problem as Problem
from ._problem import Row as Row
from ._problem import State as State
from ._problem import row_values as row_values
