"""What a model declares for gflow's analysis and figures.

Models import these small declarations; the analysis (`gflow.detect_phases`) and
the figures (`gflow.plot`) read them, so neither side imports the other.
Besides a `PhaseSpec` (`model.phase_spec`), a model may declare:

* `group_names`: the names of the groups of `group_losses(params, data)`;
* `attention_pairs`: `{label: (i, j)}`, the pairs whose attention score
  `attention_score(params, i, j)` its figures draw.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx


class PhaseSpec(eqx.Module):
    """What the phase detector watches in a model.

    Attributes:
        attention: names of the attention parameters (top-level keys of params).
        mlp: names of the MLP parameters (reported, and checked to exist).
        products: pairs `(A, B)` whose product `Aᵀ B` is watched too, e.g.
            `("W_K", "W_Q")` for the attention scores W_Kᵀ W_Q.
        alignment: `fn(params, data) -> bool`: the MLP has aligned with the signals
            (for a classifier: every margin positive and signal directions right).

    Example:
        >>> spec = gflow.PhaseSpec(attention=("W_Q", "W_K", "W_V"), mlp=("W",),
        ...                        products=(("W_K", "W_Q"),), alignment=my_fn)
    """

    attention: tuple[str, ...]
    mlp: tuple[str, ...]
    alignment: Callable[[Any, Any], Any]
    products: tuple[tuple[str, str], ...] = ()

    def check(self, params: Any) -> None:
        """A ValueError naming any parameter the spec refers to but params lacks."""
        if not isinstance(params, dict):
            raise ValueError(
                "PhaseSpec names parameters by their keys: params must be a dict."
            )
        named = set(self.attention) | set(self.mlp)
        named |= {name for pair in self.products for name in pair}
        missing = sorted(named - set(params))
        if missing:
            raise ValueError(
                f"PhaseSpec names parameters {missing} that the model does not have; "
                f"its parameters are {sorted(params)}."
            )
        if not self.attention:
            raise ValueError("PhaseSpec.attention must name at least one parameter.")
