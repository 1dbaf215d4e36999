"""gflow: the true continuous gradient flow of machine-learning models.

`gflow.simulate(model, data, t_max)` integrates dθ/dt = -∇L(θ; data) with an adaptive
Diffrax solver in one compiled JAX program and returns a `gflow.Trajectory`.
"""

from . import metrics as metrics
from . import models as models
from . import plot as plot
from ._errors import SimulationError as SimulationError
from ._simulate import __version__ as __version__
from ._simulate import simulate as simulate
from ._solvers import SOLVERS as SOLVERS
from ._times import save_times as save_times
from ._trajectory import Trajectory as Trajectory
