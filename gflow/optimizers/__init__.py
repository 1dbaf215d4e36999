"""Optimisers as values: each gives the discrete optimiser (optax's, with the same
hyperparameters and defaults) and its continuous models, so that a comparison of
the two cannot mismatch a hyperparameter.

- `GD(lr)`: gradient descent, `optax.sgd(lr)`.
- `HeavyBall(lr, momentum)`: `optax.sgd(lr, momentum)`.
- `Nesterov(lr, momentum)`: `optax.sgd(lr, momentum, nesterov=True)`.
- `RMSProp(lr, b2, eps, *, eps_in_sqrt=True, scalar=False, bias_correction=False,
  nu0=None)`: `optax.rmsprop` (`b2` is its `decay`); `scalar=True`, one second
  moment of ‖g‖².
- `Adam(lr, b1, b2, eps)`: `optax.adam`.
- `NAdam(lr, b1, b2, eps)`: `optax.nadam`.

`lr` is a number, or an optax schedule with `base_lr=`. The discrete run is
`gflow.gradient_descent(model, data, t_max, optimizer=opt)`; the continuous model
`gflow.simulate(..., flow=gflow.flows.StableFlow(opt))`; both put step k at flow
time t = k·`base_lr` (`base_lr` is `lr` for a number).
"""

from ._base import AbstractOptimizer as AbstractOptimizer
from ._optimizers import GD as GD
from ._optimizers import Adam as Adam
from ._optimizers import HeavyBall as HeavyBall
from ._optimizers import NAdam as NAdam
from ._optimizers import Nesterov as Nesterov
from ._optimizers import RMSProp as RMSProp
