"""What a model declares for gflow's analysis and figures.

Models import these small declarations; the analysis (`gflow.detect_phases`) and
the figures (`gflow.plot`) read them, so neither side imports the other.
Besides a `PhaseSpec` (`model.phase_spec`), a model may declare:

* `group_names`: the names of the groups of `group_losses(params, data)`;
* `attention_pairs`: `{label: (i, j)}`, the pairs whose attention score
  `attention_score(params, i, j)` its figures draw.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax

#: What names a part of the parameters: a top-level name (`"W_Q"`), a path into
#: the pytree (`"attn.W_Q"`, `"layers[0].weight"`, `"['blocks'][1]['W']"`), or a
#: function of the parameters returning an array or a pytree of arrays
#: (`lambda m: (m.attn.W_Q, m.attn.W_K)`).
Selector = str | Callable[[Any], Any]

_STEP = re.compile(r"\.?([A-Za-z_]\w*)|\[(-?\d+)\]|\[(['\"])(.*?)\3\]")


class PhaseSpec(eqx.Module):
    """What the phase detector watches in a model.

    Each part of the parameters is named by a `Selector`: a top-level name of a
    dict of parameters, a path into any pytree (an Equinox module, a Flax NNX
    state), or a function of the parameters. So the same detector serves the
    built-in models (dicts) and your own.

    Attributes:
        attention: the attention parameters: a selector or a tuple of them. Their
            drift (relative change since t = 0) must stay small in Phase 1. May be
            empty (a model without attention: the drift is then 0).
        mlp: the MLP parameters (checked to exist, reported).
        alignment: `fn(params, data) -> bool`: the MLP has aligned with the signals
            (for a classifier, e.g. `gflow.classifier_alignment(output)`: every
            training margin positive).
        products: pairs `(A, B)` of selectors of matrices whose product `Aᵀ B` is
            watched too, e.g. `("W_K", "W_Q")` for the attention scores W_Kᵀ W_Q.

    Examples:
        >>> spec = gflow.PhaseSpec(attention=("W_Q", "W_K"), mlp=("W",),
        ...                        products=(("W_K", "W_Q"),), alignment=my_fn)
        >>> # An Equinox transformer, by selector functions or paths:
        >>> spec = gflow.PhaseSpec(
        ...     attention=lambda m: (m.attn.W_Q, m.attn.W_K), mlp="mlp",
        ...     products=((lambda m: m.attn.W_K, "attn.W_Q"),), alignment=my_fn)
    """

    attention: tuple[Selector, ...]
    mlp: tuple[Selector, ...]
    alignment: Callable[[Any, Any], Any]
    products: tuple[tuple[Selector, Selector], ...] = ()

    def __init__(self, attention=(), mlp=(), alignment=None, products=()):
        self.attention = _selectors("attention", attention)
        self.mlp = _selectors("mlp", mlp)
        if not callable(alignment):
            raise TypeError(
                "PhaseSpec.alignment must be a function fn(params, data) -> bool; "
                f"got {type(alignment).__name__}."
            )
        self.alignment = alignment
        if (
            isinstance(products, tuple | list)
            and len(products) == 2
            and all(isinstance(p, str) or callable(p) for p in products)
        ):
            products = (tuple(products),)  # one pair
        if not isinstance(products, tuple | list) or not all(
            isinstance(pair, tuple | list) and len(pair) == 2 for pair in products
        ):
            raise TypeError(
                "PhaseSpec.products must be pairs (A, B) of selectors, e.g. "
                f"(('W_K', 'W_Q'),); got {products!r}."
            )
        self.products = tuple(
            (_selector("products", a), _selector("products", b)) for a, b in products
        )

    def check(self, params: Any) -> None:
        """A ValueError naming any selector that does not resolve on `params` to
        floating-point arrays (and, for products, to one matrix)."""
        if isinstance(params, Mapping):
            named = [*self.attention, *self.mlp, *(x for p in self.products for x in p)]
            missing = sorted(
                {
                    x
                    for x in named
                    if isinstance(x, str) and _is_name(x) and x not in params
                }
            )
            if missing:
                raise ValueError(
                    f"PhaseSpec names parameters {missing} that the model does not "
                    f"have; its parameters are {sorted(map(str, params))}."
                )
        for field in ("attention", "mlp"):
            for selector in getattr(self, field):
                select(params, selector, f"PhaseSpec.{field}")
        for a, b in self.products:
            for selector in (a, b):
                matrix(params, selector, "PhaseSpec.products")


def _selectors(field: str, value: Any) -> tuple[Selector, ...]:
    if isinstance(value, str) or callable(value):
        return (value,)
    if not isinstance(value, tuple | list):
        raise TypeError(
            f"PhaseSpec.{field} must be a selector (a name, a path or a function of "
            f"the parameters) or a tuple of them; got {type(value).__name__}."
        )
    return tuple(_selector(field, v) for v in value)


def _selector(field: str, value: Any) -> Selector:
    if isinstance(value, str) or callable(value):
        return value
    raise TypeError(
        f"PhaseSpec.{field}: {value!r} is not a selector (a name, a path such as "
        "'attn.W_Q', or a function of the parameters)."
    )


def describe(selector: Selector) -> str:
    """A selector as a reader would name it."""
    if isinstance(selector, str):
        return repr(selector)
    return getattr(selector, "__name__", type(selector).__name__)


def select(params: Any, selector: Selector, what: str = "selector") -> Any:
    """The part of `params` a selector names (a pytree of floating-point arrays),
    or a ValueError saying what is missing."""
    try:
        if callable(selector):
            part = selector(params)
        elif isinstance(params, Mapping) and selector in params:
            part = params[selector]
        else:
            part = _follow(params, selector)
    except (KeyError, AttributeError, IndexError, TypeError) as e:
        raise ValueError(
            f"{what} {describe(selector)} does not name a part of the parameters "
            f"({type(e).__name__}: {e}). {_available(params)}"
        ) from None
    part = jax.tree.map(_value, part, is_leaf=_is_variable)
    arrays = [x for x in jax.tree.leaves(part) if eqx.is_inexact_array(x)]
    if not arrays:
        raise ValueError(
            f"{what} {describe(selector)} selects no floating-point array. "
            f"{_available(params)}"
        )
    return arrays


def matrix(params: Any, selector: Selector, what: str) -> Any:
    """The one matrix a selector names (with any leading time axis)."""
    arrays = select(params, selector, what)
    if len(arrays) != 1:
        raise ValueError(
            f"{what} {describe(selector)} must select one matrix; it selects "
            f"{len(arrays)} arrays."
        )
    return arrays[0]


def _follow(params: Any, path: str) -> Any:
    """The node at a path such as 'attn.W_Q', 'layers[0].weight' or "['W']"."""
    node, at = params, 0
    while at < len(path):
        step = _STEP.match(path, at)
        if step is None or step.end() == at:
            raise KeyError(f"cannot read the path {path!r} at {path[at:]!r}")
        name, index, _, key = step.groups()
        if name is not None:
            node = node[name] if isinstance(node, Mapping) else getattr(node, name)
        elif index is not None:
            node = node[int(index)]
        else:
            node = node[key]
        at = step.end()
    return node


def _is_name(selector: str) -> bool:
    """Whether a selector is a plain top-level name (not a path)."""
    return selector.isidentifier()


def _is_variable(x) -> bool:
    """A Flax NNX variable (its array is `.value`)."""
    return hasattr(x, "value") and not isinstance(x, jax.Array)


def _value(x):
    return x.value if _is_variable(x) else x


def _available(params: Any) -> str:
    if isinstance(params, Mapping):
        return f"Its parameters are {sorted(map(str, params))}."
    paths = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
        if eqx.is_inexact_array(leaf)
    ]
    return f"Its array leaves are at {paths[:12]}{' ...' if len(paths) > 12 else ''}."
