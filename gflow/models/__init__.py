"""Built-in models: each a pure-pytree model (`init(key)`, `loss(params, data)`) with
its data generator.

* `LinearRegression`, `DeepLinearNetwork`: the simplest models with known flows.
* `MarkovTransformer`, `MarkovCanonical`, `markov_data`, `markov_reference_losses`,
  `markov_energy`: Makkuva et al. 2024, local to global.
"""

from ._base import AbstractExampleModel as AbstractExampleModel
from ._base import AbstractModel as AbstractModel
from ._condensation import CondensationTransformer as CondensationTransformer
from ._condensation import anchor_data as anchor_data
from ._cooccurrence import ATTENTION_PAIRS as ATTENTION_PAIRS
from ._cooccurrence import COMMON as COMMON
from ._cooccurrence import GROUP_NAMES as GROUP_NAMES
from ._cooccurrence import TARGET_1 as TARGET_1
from ._cooccurrence import TARGET_2 as TARGET_2
from ._cooccurrence import CooccurrenceTransformer as CooccurrenceTransformer
from ._cooccurrence import cooccurrence_data as cooccurrence_data
from ._linear import DeepLinearNetwork as DeepLinearNetwork
from ._linear import LinearRegression as LinearRegression
from ._markov import MARKOV_SEPARATRIX_ENERGY as MARKOV_SEPARATRIX_ENERGY
from ._markov import MarkovCanonical as MarkovCanonical
from ._markov import MarkovTransformer as MarkovTransformer
from ._markov import markov_data as markov_data
from ._markov import markov_energy as markov_energy
from ._markov import markov_reference_losses as markov_reference_losses
