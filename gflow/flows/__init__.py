"""What a solve integrates: the gradient flow, or a continuous model of an optimiser.

A flow turns a loss into the differential equation gflow solves. Its state may be
more than the parameters (a heavy-ball flow carries a velocity); `params(state)`
says which part they are, and `velocity(...)` gives dθ/dt at a saved state, which
`Trajectory.at` uses to interpolate between saves.

- `GradientFlow()`: dθ/dt = −∇L, the η → 0 limit of gradient descent (the default).
- `ModifiedGD(lr)`: the modified equation of gradient descent with learning rate
  `lr` to second order (backward error analysis), dθ/dt = −∇(L + (lr/4)‖∇L‖²).
- `HeavyBall(lr, momentum)`: the continuous model of heavy-ball momentum,
  m θ'' + θ' = −∇L.
- `SGD(lr, batch_size)`: the stochastic modified equation of minibatch SGD, an
  Itô SDE with the drift of `ModifiedGD` and the minibatch noise.
- `StableFlow(optimizer)`: the first-order continuous model of an optimiser of
  `gflow.optimizers` (GD, heavy ball, Nesterov, RMSProp, Adam, NAdam), in the
  phase space of the parameters and the optimiser's moments.
- `RodFlow(optimizer)`: the rod flow, consecutive iterates as the ends of a rod:
  it follows an optimiser through its edge of stability, at two gradients per
  evaluation.
- `CentralFlow(lr)`: the central flow, the time average of gradient descent at
  the edge of stability (lr·λ_max ≈ 2), where it leaves the gradient flow;
  `CentralFlow(opt)` for `GD` (a schedule too) and `RMSProp`.

To write a flow of your own, subclass `AbstractFlow` (its docstring has an
example): a `FlowState` is what it integrates, a `Work` what each piece costs,
and `grad`, `value_and_grad` and `hvp` the derivatives of the loss, traced once
however often a program evaluates them.
"""

from .._linalg import hvp as hvp
from ._base import AbstractFlow as AbstractFlow
from ._base import AbstractSDEFlow as AbstractSDEFlow
from ._base import FlowState as FlowState
from ._base import Work as Work
from ._base import grad as grad
from ._base import value_and_grad as value_and_grad
from ._central import CentralFlow as CentralFlow
from ._optimizers import SGD as SGD
from ._optimizers import GradientFlow as GradientFlow
from ._optimizers import HeavyBall as HeavyBall
from ._optimizers import ModifiedGD as ModifiedGD
from ._rod import RodFlow as RodFlow
from ._stable import StableFlow as StableFlow
