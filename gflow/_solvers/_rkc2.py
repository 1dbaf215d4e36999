"""RKC2: the second-order Runge-Kutta-Chebyshev method, for stiff gradient flows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .._tree import tree_combination
from ._stabilized import AbstractStabilized


def _chebyshev(j, theta):
    """T_j(w0), T_j'(w0), T_j''(w0) at w0 = cosh(theta) > 1, j >= 1 (array)."""
    j = jnp.asarray(j, theta.dtype)
    t = jnp.cosh(j * theta)
    d = j * jnp.sinh(j * theta) / jnp.sinh(theta)
    w0 = jnp.cosh(theta)
    # (w0² - 1) T'' = j² T - w0 T', with w0² - 1 = sinh²(theta).
    dd = (j * j * t - w0 * d) / jnp.sinh(theta) ** 2
    return t, d, dd


class RKC2(AbstractStabilized):
    """The second-order Runge-Kutta-Chebyshev method of Sommeijer, Shampine & Verwer
    (1997): s stages built on damped Chebyshev polynomials, stable on the negative
    real axis up to about 0.65 s², with their embedded error estimate and a cubic
    Hermite dense output. Each step costs s gradients, with s = 1 +
    ceil(sqrt(1 + 1.54 h ρ)).

    The embedded estimate is of the local error of one step; on sharpening flows
    the global error it leaves grows well past the tolerance (about 8× on the
    digits MLP of `benchmarks/stiff.py` at rtol 1e-6), so by default the estimate is
    scaled by 4, which brings the error at the default tolerances under 1e-5 there.
    The radius bound of the power iteration (|q| + residual) is already an upper
    bound once the vector lies in the top eigenvectors' span, hence the small
    safety factor.

    Attributes:
        damping: the damping ε of the Chebyshev polynomial (2/13, as in RKC).

    Examples:
        >>> traj = gflow.simulate(model, data, 1000.0, solver="rkc2")
        >>> traj.stats["num_hvp_evals"]  # the power iterations' cost
        >>> # The raw local-error control, and at most 200 stages a step:
        >>> traj = gflow.simulate(model, data, 1000.0,
        ...                       solver=gflow.RKC2(error_scale=1.0, max_stages=200))
    """

    safety: float = 1.1
    error_scale: float = 4.0
    damping: float = 2.0 / 13.0

    def order(self, terms) -> int:
        return 2

    def stages_for(self, h_radius):
        return 1 + jnp.ceil(jnp.sqrt(1.0 + 1.54 * h_radius)).astype(jnp.int32)

    def advance(self, field, t0, h, y0, f0, stages):
        s = stages.astype(h.dtype)
        x = self.damping / s**2  # w0 = 1 + x; theta = acosh(w0) without 1 + x
        theta = jnp.log1p(x + jnp.sqrt(x * (2.0 + x)))
        w0 = jnp.cosh(theta)
        _, ds, dds = _chebyshev(s, theta)
        w1 = ds / dds

        # The stages' coefficients come from T_j, T_j', T_j'' at w0, carried by the
        # three-term recurrence T_j = 2 w0 T_{j-1} - T_{j-2} and its derivatives,
        # as in Sommeijer et al.'s code: a stage then costs a few multiply-adds
        # instead of some eight cosh and sinh evaluations (a 20-stage step of 39
        # vmapped lanes of a 2-parameter flow measured 30% faster).
        _, d_at2, dd_at2 = _chebyshev(2.0, theta)
        b2 = dd_at2 / d_at2**2  # b_j = T_j''/T_j'^2 for j >= 2; b_0 = b_1 = b_2
        c1 = w1 * dd_at2 / d_at2 / (4.0 * w0)  # the stage times (fractions of h)
        mu1 = b2 * w1

        # The stages are carried as increments y_j - y0, so that rounding is
        # relative to the step, not to |y|: near a minimum in float32, y0 - y1
        # formed from the stages themselves is a few ulps of |y|, an error estimate
        # that no step size can bring under rtol (the controller then shrinks the
        # step to the resolution of t, a false "diverged").
        def body(carry):
            j, dy_prev2, dy_prev, last, before, b_last, b_before = carry
            t1, d1, dd1 = last  # T, T', T'' at j - 1
            t2, d2, dd2 = before  # at j - 2
            t = 2.0 * w0 * t1 - t2
            d = 2.0 * t1 + 2.0 * w0 * d1 - d2
            dd = 4.0 * d1 + 2.0 * w0 * dd1 - dd2
            b = dd / d**2
            mu = 2.0 * w0 * b / b_last
            nu = -b / b_before
            mu_tilde = 2.0 * w1 * b / b_last
            gamma_tilde = -(1.0 - b_last * t1) * mu_tilde  # -a_{j-1} mu_tilde
            c_last = jnp.where(j >= 3, w1 * dd1 / d1, c1)  # c_{j-1}
            f = field(t0 + c_last * h, tree_combination((1.0, y0), (1.0, dy_prev)))
            increment = tree_combination(
                (mu, dy_prev),
                (nu, dy_prev2),
                (mu_tilde * h, f),
                (gamma_tilde * h, f0),
            )
            return j + 1, dy_prev, increment, (t, d, dd), last, b, b_last

        one, zero = jnp.ones_like(w0), jnp.zeros_like(w0)
        start = (
            jnp.asarray(2, jnp.int32),
            jax.tree.map(jnp.zeros_like, y0),  # y_0 - y0
            tree_combination((mu1 * h, f0)),  # y_1 - y0
            (w0, one, zero),  # T_1, T_1', T_1''
            (one, zero, zero),  # T_0, T_0', T_0''
            b2,  # b_1
            b2,  # b_0
        )
        _, _, increment, *_ = jax.lax.while_loop(
            lambda carry: carry[0] <= stages, body, start
        )
        y1 = tree_combination((1.0, y0), (1.0, increment))
        f1 = field(t0 + h, y1)
        # Their estimate of the local error: (12 (y0 - y1) + 6 h (f0 + f1)) / 15.
        error = tree_combination((-0.8, increment), (0.4 * h, f0), (0.4 * h, f1))
        return y1, f1, error
