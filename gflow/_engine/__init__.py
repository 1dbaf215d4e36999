"""The engine: one compiled `lax.while_loop` over solver steps, by layer.

* `_problem`: the data model (`Problem`, `Controls`, `Lane`, `Outputs`, `State`);
* `_batch`: work on batches of lanes (vmapped per-lane functions, gathered loops);
* `_step`: one lane's work, built on diffrax's step API (`solver.step`, the
  controller's `adapt_step_size`, `solver.interpolation_cls` for the save times);
* `_one` and `_many`: the loop of one member (`simulate`), and of an ensemble's
  lanes refilled from a queue (`simulate_ensemble`);
* `_entry`: the compiled program (`advance`) and the state it starts from.

Outputs are indexed by member: row times, loss, gradient norm and metrics at every
row; parameters and velocities only in the rows' parameter slots (`slot`), a
member's last row in its final slot; counters and the result code. The loop stops
after `budget` iterations, or when a lane wants a solver mode its program does not
step with; its whole carry (`State`) can be handed back in to go on, which is how
runs are cut into segments (checkpoints, progress, "auto"'s stiff mode).
"""

from ._batch import if_any as if_any
from ._entry import advance as advance
from ._entry import blank_state as blank_state
from ._problem import MODES as MODES
from ._problem import Controls as Controls
from ._problem import Metrics as Metrics
from ._problem import Outputs as Outputs
from ._problem import Problem as Problem
from ._problem import Row as Row
from ._problem import State as State
from ._problem import row_from as row_from
from ._problem import row_values as row_values
from ._problem import size_class as size_class
