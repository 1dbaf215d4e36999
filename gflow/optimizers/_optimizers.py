"""Optimisers as values: one object gives the discrete optimiser (optax's, with
the same hyperparameters and defaults) and its continuous models."""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._tree import like_dtype
from ._base import (
    AbstractOptimizer,
    checked_lr,
    debiased,
    fraction,
    nonnegative,
    relax,
    taken_in,
    unbiased,
)


class GD(AbstractOptimizer):
    """Gradient descent, `optax.sgd(lr)`. Its continuous model is the gradient
    flow (with the schedule's rate, lr(s)/base_lr, for a schedule).

    Args:
        lr: the learning rate (> 0), or an optax schedule with `base_lr`.
        base_lr: for a schedule: the rate whose steps set the time axis.

    Examples:
        >>> opt = gflow.optimizers.GD(0.1)
        >>> gd = gflow.gradient_descent(model, data, 10.0, optimizer=opt, key=0)
    """

    def __init__(self, lr: Any, *, base_lr: Any = None):
        self.lr, self.base_lr = checked_lr(lr, base_lr)

    oscillating: ClassVar[tuple[str, ...]] = ()
    optax_fields: ClassVar[dict[str, str]] = {}

    def transformation(self):
        return optax.sgd(self.lr)

    def stability_limit(self):
        """θ ← (1 − lr λ) θ: stable while lr λ < 2."""
        return np.asarray(2.0)

    def moments(self, params):
        return {}

    def preconditioner(self, s, moments, grad):
        return 1.0

    def increments(self, s, params, moments, grad, discrete):
        lr = like_dtype(self.rate(s), params)
        return jax.tree.map(lambda g: -lr * g, grad), {}


class _AbstractMomentum(AbstractOptimizer):
    """A momentum's hyperparameter and moment, shared by HeavyBall and
    Nesterov."""

    momentum: np.ndarray
    oscillating: ClassVar[tuple[str, ...]] = ("m",)
    optax_fields: ClassVar[dict[str, str]] = {"m": "trace"}

    def __init__(self, lr: Any, momentum: float, *, base_lr: Any = None):
        self.lr, self.base_lr = checked_lr(lr, base_lr)
        self.momentum = fraction("momentum", momentum, "GD(lr)")

    def moments(self, params):
        return {"m": jax.tree.map(jnp.zeros_like, params)}

    def preconditioner(self, s, moments, grad):
        return 1.0


class HeavyBall(_AbstractMomentum):
    """Heavy-ball momentum, `optax.sgd(lr, momentum)`: m ← β m + g, θ ← θ − lr m.

    Continuous model (per step s): dm/ds = (−ln β)(g/(1 − β) − m),
    dθ/ds = −lr m, from m = 0. (Unlike the adaptive methods' moments, using the
    momentum after it takes in g, β m + g, measured further from the iterates:
    0.49 against 0.19 at lr 0.016 on the tests' quartic.)

    Args:
        lr: the learning rate (> 0), or an optax schedule with `base_lr`.
        momentum: β in (0, 1).
        base_lr: for a schedule: the rate whose steps set the time axis.
    """

    def transformation(self):
        return optax.sgd(self.lr, momentum=self.momentum)

    def stability_limit(self):
        """On λ: z² − (1 + β − lr λ) z + β = 0, whose root z = −1 is at
        lr λ = 2(1 + β)."""
        return 2 * (1 + self.momentum)

    def increments(self, s, params, moments, grad, discrete):
        lr, beta = (like_dtype(x, params) for x in (self.rate(s), self.momentum))
        m = moments["m"]
        target = jax.tree.map(lambda g: g / (1 - beta), grad)
        rates = {"m": relax(beta, target, m, discrete)}
        # A step moves along the momentum after it takes in g, β m + g.
        used = jax.tree.map(lambda v, g: beta * v + g, m, grad) if discrete else m
        return jax.tree.map(lambda v: -lr * v, used), rates


class Nesterov(_AbstractMomentum):
    """Nesterov momentum, `optax.sgd(lr, momentum, nesterov=True)`: m ← β m + g,
    θ ← θ − lr (g + β m).

    Continuous model (per step s): dm/ds = (−ln β)(g/(1 − β) − m),
    dθ/ds = −lr (g + β m), from m = 0.

    Args:
        lr: the learning rate (> 0), or an optax schedule with `base_lr`.
        momentum: β in (0, 1).
        base_lr: for a schedule: the rate whose steps set the time axis.
    """

    def transformation(self):
        return optax.sgd(self.lr, momentum=self.momentum, nesterov=True)

    def stability_limit(self):
        """On λ, with a = lr λ: z² − (1 + β)(1 − a) z + β(1 − a) = 0, whose root
        z = −1 is at a = 2(1 + β)/(1 + 2β)."""
        beta = self.momentum
        return 2 * (1 + beta) / (1 + 2 * beta)

    def increments(self, s, params, moments, grad, discrete):
        lr, beta = (like_dtype(x, params) for x in (self.rate(s), self.momentum))
        m = moments["m"]
        target = jax.tree.map(lambda g: g / (1 - beta), grad)
        rates = {"m": relax(beta, target, m, discrete)}
        if discrete:  # the step takes in g first: m' = β m + g, θ ← θ − lr (g + β m')
            m = jax.tree.map(lambda v, g: beta * v + g, m, grad)
        velocity = jax.tree.map(lambda g, v: -lr * (g + beta * v), grad, m)
        return velocity, rates


class RMSProp(AbstractOptimizer):
    """RMSProp, `optax.rmsprop(lr, decay=b2, eps=eps, initial_scale=nu0,
    eps_in_sqrt=eps_in_sqrt, bias_correction=bias_correction)`:
    ν ← b2 ν + (1 − b2) g², θ ← θ − lr g / √(ν̂ + ε) (ε inside the root, as
    optax), or g / (√ν̂ + ε) with `eps_in_sqrt=False` (PyTorch's and the central
    flows authors'); ν̂ = ν / (1 − b2^k) with `bias_correction`.

    `scalar=True` keeps one second moment for all parameters, the EMA of ‖g‖²
    (the central flows authors' scalar RMSProp; not in optax).

    Continuous model (per step s): dν/ds = (−ln b2)(g² − ν),
    dθ/ds = −lr g / √(ν̂ + ε) (or its ε outside), from ν = nu0, where ν̂ is
    ν' = b2 ν + (1 − b2) g² (the moment after taking in g, as the step uses it),
    divided by 1 − b2^(s+1) with `bias_correction`.

    Args:
        lr: the learning rate (> 0), or an optax schedule with `base_lr`.
        b2: the second moment's decay in (0, 1) (optax's `decay`; 0.9).
        eps: ε ≥ 0 (1e-8).
        eps_in_sqrt: ε inside the square root (default, as optax).
        scalar: one second moment, of ‖g‖².
        bias_correction: divide ν by 1 − b2^k.
        nu0: the initial second moment (default 0, as optax).
        base_lr: for a schedule: the rate whose steps set the time axis.
    """

    b2: np.ndarray
    eps: np.ndarray
    nu0: np.ndarray
    eps_in_sqrt: bool = eqx.field(static=True)
    scalar: bool = eqx.field(static=True)
    bias_correction: bool = eqx.field(static=True)
    oscillating: ClassVar[tuple[str, ...]] = ()
    optax_fields: ClassVar[dict[str, str]] = {"nu": "nu"}

    def __init__(
        self,
        lr: Any,
        b2: float = 0.9,
        eps: float = 1e-8,
        *,
        eps_in_sqrt: bool = True,
        scalar: bool = False,
        bias_correction: bool = False,
        nu0: float | None = None,
        base_lr: Any = None,
    ):
        self.lr, self.base_lr = checked_lr(lr, base_lr)
        self.b2 = fraction("b2", b2, "a learning rate divided by |g| instead")
        self.eps = nonnegative("eps", eps)
        self.nu0 = nonnegative("nu0", 0.0 if nu0 is None else nu0)
        for name, flag in (
            ("eps_in_sqrt", eps_in_sqrt),
            ("scalar", scalar),
            ("bias_correction", bias_correction),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be True or False; got {flag!r}.")
        self.eps_in_sqrt, self.scalar = eps_in_sqrt, scalar
        self.bias_correction = bias_correction

    def transformation(self):
        if not self.scalar:
            return optax.rmsprop(
                self.lr,
                decay=self.b2,
                eps=self.eps,
                initial_scale=self.nu0,
                eps_in_sqrt=self.eps_in_sqrt,
                bias_correction=self.bias_correction,
            )
        return optax.chain(
            _scale_by_scalar_rms(self),
            optax.scale_by_learning_rate(self.lr),
        )

    def stability_limit(self):
        """Preconditioned gradient descent, P = diag(√(ν̂ + ε)) (or √ν̂ + ε; one
        scalar for `scalar`): stable while lr λ(P⁻¹H) < 2."""
        return np.asarray(2.0)

    def moments(self, params):
        if self.scalar:
            nu = jnp.asarray(self.nu0, jnp.result_type(*jax.tree.leaves(params)))
            return {"nu": nu}
        return {"nu": jax.tree.map(lambda p: jnp.full_like(p, self.nu0), params)}

    def preconditioner(self, s, moments, grad):
        b2 = like_dtype(self.b2, grad)
        return self.scale(s, taken_in(b2, moments["nu"], _squares(grad, self.scalar)))

    def scale(self, s, nu):
        """P of step s + 1 from the second moment that step uses (ν after it
        took in g²): √(ν̂ + ε), or √ν̂ + ε; ν̂ bias-corrected if asked."""
        b2, eps = (like_dtype(x, nu) for x in (self.b2, self.eps))
        nu_hat = unbiased(b2, s, nu) if self.bias_correction else nu
        if self.eps_in_sqrt:
            return jax.tree.map(lambda n: jnp.sqrt(n + eps), nu_hat)
        return jax.tree.map(lambda n: jnp.sqrt(n) + eps, nu_hat)

    def _divided(self, grad, p):
        """g / P, P per coordinate or one for all."""
        if self.scalar:
            return jax.tree.map(lambda g: g / p, grad)
        return jax.tree.map(jnp.divide, grad, p)

    def increments(self, s, params, moments, grad, discrete):
        lr, b2 = (like_dtype(x, params) for x in (self.rate(s), self.b2))
        p = self.preconditioner(s, moments, grad)
        velocity = jax.tree.map(lambda x: -lr * x, self._divided(grad, p))
        squares = _squares(grad, self.scalar)
        return velocity, {"nu": relax(b2, squares, moments["nu"], discrete)}


def _squares(grad, scalar: bool):
    """g² per coordinate, or ‖g‖² for a scalar second moment."""
    if scalar:
        return sum(jnp.sum(g**2) for g in jax.tree.leaves(grad))
    return jax.tree.map(jnp.square, grad)


class _ScalarRmsState(eqx.Module):
    count: jax.Array
    nu: jax.Array


def _scale_by_scalar_rms(opt: RMSProp) -> optax.GradientTransformation:
    """RMSProp's scaling with one second moment, the EMA of ‖g‖²."""

    def init(params):
        dtype = jnp.result_type(*jax.tree.leaves(params))
        return _ScalarRmsState(jnp.zeros((), jnp.int32), jnp.asarray(opt.nu0, dtype))

    def update(updates, state, params=None):
        del params
        b2 = jnp.asarray(opt.b2, state.nu.dtype)
        nu = b2 * state.nu + (1 - b2) * _squares(updates, True)
        scaled = opt._divided(updates, opt.scale(state.count, nu))  # step count + 1
        return scaled, _ScalarRmsState(state.count + 1, nu)

    return optax.GradientTransformation(init, update)


class _AbstractAdam(AbstractOptimizer):
    """Adam's hyperparameters and moments, shared by Adam and NAdam."""

    b1: np.ndarray
    b2: np.ndarray
    eps: np.ndarray
    oscillating: ClassVar[tuple[str, ...]] = ("m",)
    optax_fields: ClassVar[dict[str, str]] = {"m": "mu", "v": "nu"}

    def __init__(
        self,
        lr: Any,
        b1: float = 0.9,
        b2: float = 0.999,
        eps: float = 1e-8,
        *,
        base_lr: Any = None,
    ):
        self.lr, self.base_lr = checked_lr(lr, base_lr)
        self.b1 = fraction("b1", b1, "RMSProp(lr, b2, bias_correction=True)")
        self.b2 = fraction("b2", b2, "a sign method")
        self.eps = nonnegative("eps", eps)

    def moments(self, params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"m": zeros, "v": zeros}

    def preconditioner(self, s, moments, grad):
        b2, eps = (like_dtype(x, grad) for x in (self.b2, self.eps))
        v_hat = debiased(b2, s, moments["v"], _squares(grad, False))
        return jax.tree.map(lambda v: jnp.sqrt(v) + eps, v_hat)


class Adam(_AbstractAdam):
    """Adam, `optax.adam(lr, b1, b2, eps)`: m ← b1 m + (1 − b1) g,
    v ← b2 v + (1 − b2) g², θ ← θ − lr m̂ / (√v̂ + ε), with the bias
    corrections m̂ = m / (1 − b1^k), v̂ = v / (1 − b2^k).

    Continuous model (per step s, the "stable flow"): dm/ds = (−ln b1)(g − m),
    dv/ds = (−ln b2)(g² − v), dθ/ds = −lr m̂ / (√v̂ + ε), from m = v = 0, with
    m̂ = (b1 m + (1 − b1) g) / (1 − b1^(s+1)) and v̂ likewise: the moments after
    taking in g, bias-corrected, as the step at s uses them.

    Args:
        lr: the learning rate (> 0), or an optax schedule with `base_lr`.
        b1: the first moment's decay in (0, 1) (0.9).
        b2: the second moment's decay in (0, 1) (0.999).
        eps: ε ≥ 0 (1e-8).
        base_lr: for a schedule: the rate whose steps set the time axis.

    Examples:
        >>> adam = gflow.optimizers.Adam(1e-3)
        >>> run = gflow.gradient_descent(model, data, 2.0, optimizer=adam, key=0)
        >>> flow = gflow.simulate(model, data, 2.0, key=0, ts=run.ts,
        ...                       flow=gflow.flows.StableFlow(adam))
    """

    def transformation(self):
        return optax.adam(self.lr, b1=self.b1, b2=self.b2, eps=self.eps)

    def stability_limit(self):
        """With P = diag(√v̂ + ε) frozen and a = lr λ(P⁻¹H), the moving average
        m ← b1 m + (1 − b1) g gives z² − (1 + b1 − (1 − b1) a) z + b1 = 0, whose
        root z = −1 is at a = 2(1 + b1)/(1 − b1) (38 at b1 = 0.9)."""
        return 2 * (1 + self.b1) / (1 - self.b1)

    def increments(self, s, params, moments, grad, discrete):
        lr, b1, b2, eps = (
            like_dtype(x, params) for x in (self.rate(s), self.b1, self.b2, self.eps)
        )
        m_hat, v_hat, rates = _adam_moments(b1, b2, s, moments, grad, discrete)
        velocity = jax.tree.map(
            lambda m, v: -lr * m / (jnp.sqrt(v) + eps), m_hat, v_hat
        )
        return velocity, rates


def _adam_moments(b1, b2, s, moments, grad, discrete):
    """Adam's moments as step s uses them (taken in g, bias-corrected), and the
    moments' derivatives."""
    squares = _squares(grad, False)
    m_hat = debiased(b1, s, moments["m"], grad)
    v_hat = debiased(b2, s, moments["v"], squares)
    rates = {
        "m": relax(b1, grad, moments["m"], discrete),
        "v": relax(b2, squares, moments["v"], discrete),
    }
    return m_hat, v_hat, rates


class NAdam(_AbstractAdam):
    """NAdam (Adam with Nesterov momentum), `optax.nadam(lr, b1, b2, eps)`:
    θ ← θ − lr (b1 m̂' + (1 − b1) ĝ) / (√v̂ + ε), with m̂' the first moment
    corrected for the next step and ĝ = g / (1 − b1^k).

    Continuous model (per step s): Adam's moments, and
    dθ/ds = −lr (b1 m̂' + (1 − b1) g / (1 − b1^(s+1))) / (√v̂ + ε), with m̂' the
    first moment after taking in g, corrected by 1 − b1^(s+2).

    Args:
        lr: the learning rate (> 0), or an optax schedule with `base_lr`.
        b1: the first moment's decay in (0, 1) (0.9).
        b2: the second moment's decay in (0, 1) (0.999).
        eps: ε ≥ 0 (1e-8).
        base_lr: for a schedule: the rate whose steps set the time axis.
    """

    def transformation(self):
        return optax.nadam(self.lr, b1=self.b1, b2=self.b2, eps=self.eps)

    def stability_limit(self):
        """With P frozen and a = lr λ(P⁻¹H), the step along b1 m + (1 − b1) g
        gives z² − (1 + b1 − (1 − b1²) a) z + b1 − b1 (1 − b1) a = 0, whose root
        z = −1 is at a = 2(1 + b1)/((1 − b1)(1 + 2 b1))."""
        b1 = self.b1
        return 2 * (1 + b1) / ((1 - b1) * (1 + 2 * b1))

    def increments(self, s, params, moments, grad, discrete):
        lr, b1, b2, eps = (
            like_dtype(x, params) for x in (self.rate(s), self.b1, self.b2, self.eps)
        )
        m_hat, v_hat, rates = _adam_moments(b1, b2, s, moments, grad, discrete)
        # Step s + 1's correction of the first moment, and step s's of g.
        later, now = (-jnp.expm1(k * jnp.log(b1)) for k in (s + 2, s + 1))
        velocity = jax.tree.map(
            lambda m, g, v: (
                -lr
                * (b1 * m * (now / later) + (1 - b1) * g / now)
                / (jnp.sqrt(v) + eps)
            ),
            m_hat,
            grad,
            v_hat,
        )
        return velocity, rates


def describe(opt: AbstractOptimizer) -> str:
    """The optimiser and its settings, e.g. "Adam(lr=0.001, b1=0.9, ...)", the
    same in every process (a schedule by its name): for `Trajectory.meta` and
    checkpoint fingerprints."""

    def shown(value):
        if isinstance(value, np.ndarray):
            return value.item()
        if callable(value):
            return f"<schedule {getattr(value, '__qualname__', type(value).__name__)}>"
        return value

    settings = [f"{name}={shown(value)}" for name, value in vars(opt).items()]
    return f"{type(opt).__name__}({', '.join(settings)})"


OPTIMIZERS: tuple[type[AbstractOptimizer], ...] = (
    GD,
    HeavyBall,
    Nesterov,
    RMSProp,
    Adam,
    NAdam,
)
