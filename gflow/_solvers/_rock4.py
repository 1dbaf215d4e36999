"""ROCK4: a fourth-order stabilized method with gflow's own coefficients."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._tree import tree_combination
from ._rock4_tables import PATH
from ._stabilized import AbstractStabilized


class _Rock4Coefficients(eqx.Module):
    """The stored methods of `_rock4_tables` (see there), as arrays."""

    degrees: jax.Array
    lengths: jax.Array
    finishing: jax.Array
    embedded: jax.Array
    offset: jax.Array
    mu: jax.Array
    nu: jax.Array
    kappa: jax.Array


def _load_rock4() -> dict:
    with np.load(PATH) as tables:
        return {name: tables[name] for name in _Rock4Coefficients.__annotations__}


class ROCK4(AbstractStabilized):
    """A fourth-order stabilized method of the ROCK4 kind (Abdulle 2002), with
    coefficients derived by gflow (`gflow/_solvers/_rock4_tables.py`).

    s stages: s - 4 of a three-term recurrence of orthogonal polynomials, then a
    4-stage finishing procedure; stable on the negative real axis up to about
    0.35 s²; an embedded third-order method estimates the error. Stage counts
    run from 5 to 600 (every count to 60, then in steps of 5 and 20). Dense output:
    cubic Hermite.

    On stiff linear problems (a quadratic loss) it reaches a given error for a
    fraction of RKC2's gradients. On a sharpening network its embedded estimate
    keeps the step far below RKC2's (see "Choosing a solver" in the docs), which is
    why `"auto"` uses RKC2.

    Examples:
        >>> traj = gflow.simulate(loss, data, 1.0, params0=theta0, solver="rock4",
        ...                       rtol=1e-8, atol=1e-10)
    """

    def lands_on_saves(self, state) -> bool:
        """Its cubic dense output is of lower order than its steps: the engine ends
        steps on the save times."""
        return True

    def order(self, terms) -> int:
        return 4

    def error_order(self, terms) -> int:
        # The embedded method is of order 3: the estimate is O(h⁴).
        return 4

    @property
    def stage_limit(self) -> int:
        degrees = _rock4().degrees
        return int(degrees[np.searchsorted(degrees, self.max_stages, "right") - 1])

    def stages_for(self, h_radius):
        tables = _rock4_arrays(h_radius.dtype)
        index = jnp.searchsorted(tables.lengths, h_radius)
        return jnp.where(
            index < tables.degrees.size,
            tables.degrees[jnp.minimum(index, tables.degrees.size - 1)],
            jnp.iinfo(jnp.int32).max,
        )

    def advance(self, field, t0, h, y0, f0, stages):
        tables = _rock4_arrays(h.dtype)
        index = jnp.searchsorted(tables.degrees, stages)
        start = tables.offset[index]
        m = stages - 4

        def body(carry):
            j, c_prev, c, y_prev, y, f = carry
            k = start + j
            mu, nu, kappa = tables.mu[k], tables.nu[k], tables.kappa[k]
            y_next = tree_combination((nu, y), (kappa, y_prev), (mu * h, f))
            c_next = nu * c + kappa * c_prev + mu
            # The last stage of the recurrence is U_1: its field starts the finish.
            return j + 1, c, c_next, y, y_next, field(t0 + c_next * h, y_next)

        zero = jnp.zeros((), h.dtype)
        _, _, c, _, u1, f1 = jax.lax.while_loop(
            lambda carry: carry[0] < m,
            body,
            (jnp.asarray(0, jnp.int32), zero, zero, y0, y0, f0),
        )
        a21, a31, a32, a41, a42, a43, b1, b2, b3, b4 = tables.finishing[index]
        e1, e2, e3, e4, e5 = tables.embedded[index]
        u2 = tree_combination((1.0, u1), (a21 * h, f1))
        f2 = field(t0 + (c + a21) * h, u2)
        u3 = tree_combination((1.0, u1), (a31 * h, f1), (a32 * h, f2))
        f3 = field(t0 + (c + a31 + a32) * h, u3)
        u4 = tree_combination((1.0, u1), (a41 * h, f1), (a42 * h, f2), (a43 * h, f3))
        f4 = field(t0 + (c + a41 + a42 + a43) * h, u4)
        y1 = tree_combination(
            (1.0, u1), (b1 * h, f1), (b2 * h, f2), (b3 * h, f3), (b4 * h, f4)
        )
        f_end = field(t0 + h, y1)
        # y1 - ŷ, with ŷ the embedded third-order solution (which also uses f_end).
        error = tree_combination(
            ((b1 - e1) * h, f1),
            ((b2 - e2) * h, f2),
            ((b3 - e3) * h, f3),
            ((b4 - e4) * h, f4),
            (-e5 * h, f_end),
        )
        return y1, f_end, error


_ROCK4_CACHE: dict = {}


def _rock4() -> _Rock4Coefficients:
    if "numpy" not in _ROCK4_CACHE:
        _ROCK4_CACHE["numpy"] = _Rock4Coefficients(**_load_rock4())
    return _ROCK4_CACHE["numpy"]


def _rock4_arrays(dtype) -> _Rock4Coefficients:
    """The tables as JAX arrays of `dtype` (integers as int32)."""
    tables = _rock4()
    return jax.tree.map(
        lambda x: jnp.asarray(x, jnp.int32 if x.dtype.kind == "i" else dtype), tables
    )
