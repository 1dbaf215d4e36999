"""gflow: the true continuous gradient flow of machine-learning models.

`gflow.simulate(model, data, t_max)` integrates dθ/dt = -∇L(θ; data) with an adaptive
Diffrax solver in one compiled JAX program and returns a `gflow.Trajectory`.
"""

from . import flows as flows
from . import metrics as metrics
from . import models as models
from . import optimizers as optimizers
from ._basins import Basins as Basins
from ._basins import basins as basins
from ._basins import grid as grid
from ._compare import Comparison as Comparison
from ._compare import compare as compare
from ._declarations import PhaseSpec as PhaseSpec
from ._discrete import gradient_descent as gradient_descent
from ._ensemble import simulate_ensemble as simulate_ensemble
from ._errors import SimulationError as SimulationError
from ._phases import Phases as Phases
from ._phases import classifier_alignment as classifier_alignment
from ._phases import detect_condensation_stages as detect_condensation_stages
from ._phases import detect_phases as detect_phases
from ._simulate import simulate as simulate
from ._solvers import RKC2 as RKC2
from ._solvers import ROCK4 as ROCK4
from ._solvers import SOLVERS as SOLVERS
from ._solvers import AutoTsit5 as AutoTsit5
from ._times import save_times as save_times
from ._trajectory import Trajectory as Trajectory
from ._version import gflow_version as _gflow_version

__version__ = _gflow_version()


def __getattr__(name: str):
    # gflow.plot (and with it matplotlib) loads on first use, so that `import gflow`
    # stays light for runs that draw nothing.
    if name == "plot":
        import importlib

        return importlib.import_module(".plot", __name__)
    raise AttributeError(f"module 'gflow' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "plot"])
