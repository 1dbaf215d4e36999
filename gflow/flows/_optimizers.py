"""The gradient flow, and the flows that model optimisers at a finite learning rate."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from .._checks import check_batch_size
from .._tree import like_dtype
from ._base import AbstractFlow, AbstractSDEFlow, FlowState, Work, _rate, grad


class GradientFlow(AbstractFlow):
    """The gradient flow dθ/dt = −∇L(θ): the η → 0 limit of gradient descent.

    Examples:
        >>> traj = gflow.simulate(loss, data, 10.0, params0=p0,
        ...                       flow=gflow.flows.GradientFlow())  # the default
    """

    cost: ClassVar[Work] = Work(grads=1)
    gradient_field: ClassVar[bool] = True

    def init(self, loss_fn, params, data):
        return FlowState(params), None, Work()

    def vector_field(self, loss_fn: Callable) -> Callable:
        def field(t, state, data, carried):
            return FlowState(
                jax.tree.map(jnp.negative, grad(loss_fn, state.params, data))
            )

        return field

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        return jax.tree.map(jnp.negative, grad), {}, Work()

    def update(self, loss_fn, t, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass


class ModifiedGD(AbstractFlow):
    """The modified flow of gradient descent: dθ/dt = −∇(L + (lr/4)‖∇L‖²).

    Gradient descent θ_{k+1} = θ_k − lr ∇L(θ_k), read at t = k·lr, follows this
    flow to second order in lr (Barrett & Dherin 2021, "implicit gradient
    regularisation"): its distance to the iterates shrinks like lr², where the
    plain gradient flow's shrinks like lr. The extra term is
    (lr/2) H ∇L, one Hessian-vector product per evaluation (counted in
    `stats["num_hvp_evals"]`, as are those of the saved rows' velocities).

    Args:
        lr: the learning rate of the gradient descent it models (> 0). A new
            value reuses the compiled program.

    Examples:
        >>> gd = gflow.gradient_descent(model, data, 50.0, lr=0.01, key=0)
        >>> mod = gflow.simulate(model, data, 50.0, key=0, ts=gd.ts,
        ...                      flow=gflow.flows.ModifiedGD(0.01))
        >>> gflow.compare(mod, gd).max_param_distance  # ~ lr², not ~ lr
    """

    lr: np.ndarray
    cost: ClassVar[Work] = Work(grads=1, hvps=1)
    gradient_field: ClassVar[bool] = True

    def __init__(self, lr: float):
        self.lr = _rate("lr", lr)

    def init(self, loss_fn, params, data):
        return FlowState(params), None, Work()

    def vector_field(self, loss_fn: Callable) -> Callable:
        return _modified_field(loss_fn, self.lr)

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        return _modified_row(loss_fn, self.lr, state, data, grad)

    def update(self, loss_fn, t, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass


def _modified_velocity(loss_fn, lr, params, data, gradient):
    """−(g + (lr/2) H g), with H g the forward derivative of the gradient along g
    (one Hessian-vector product)."""
    hg = jax.jvp(lambda p: grad(loss_fn, p, data), (params,), (gradient,))[1]
    half_lr = like_dtype(lr / 2, gradient)
    return jax.tree.map(lambda g, h: -(g + half_lr * h), gradient, hg)


def _modified_row(loss_fn, lr, state, data, gradient):
    """A saved row's velocity, −(g + (lr/2) H g), and its Hessian-vector
    product."""
    velocity = _modified_velocity(loss_fn, lr, state.params, data, gradient)
    return velocity, {}, Work(hvps=1)


def _modified_field(loss_fn, lr):
    def field(t, state, data, carried):
        params = state.params
        return FlowState(
            _modified_velocity(loss_fn, lr, params, data, grad(loss_fn, params, data))
        )

    return field


class HeavyBall(AbstractFlow):
    r"""The heavy-ball flow: m θ'' + θ' = −∇L(θ).

    Models gradient descent with heavy-ball momentum, `optax.sgd(lr,
    momentum=β)`: v_{k+1} = β v_k + ∇L(θ_k), θ_{k+1} = θ_k − lr v_{k+1}, from
    v_0 = 0, with step k at time t = k·h, h = lr / (1 − β) (pass
    `time_per_step=lr / (1 - momentum)` to `gflow.gradient_descent`).

    Derivation. Eliminating v, the iterates satisfy
    (θ_{k+1} − θ_k) − β(θ_k − θ_{k−1}) = −lr ∇L(θ_k). Taylor expanding θ_{k±1}
    about t_k gives (1 − β) h θ' + (1 + β)(h²/2) θ'' + O(h³) = −lr ∇L, and
    dividing by (1 − β) h = lr,

        m θ'' + θ' = −∇L,   m = (1 + β) lr / (2 (1 − β)²).

    The start. The iterates start at rest and build up their velocity over about
    1/(1 − β) steps, a time of the order of m: this transient is not slow on the
    scale of a step, whatever lr is, so the expansion above does not describe it.
    For a constant gradient g the iterates are
    θ_k = θ_0 − g (t_k − h β/(1 − β)) + (terms decaying like β^k), and the flow
    from velocity u_0 is θ(t) = θ_0 − g t + m (g + u_0)(1 − e^{−t/m}); the two lag
    behind θ_0 − g t by the same amount when

        u_0 = −(1 − β)/(1 + β) ∇L(θ_0)     (`start="matched"`, the default),

    where θ'(0) = 0 (`start="rest"`) leaves the flow a lag of order lr behind the
    iterates for good. (On the quadratic-plus-quartic loss of the tests the
    matched start is 25 to 50 times closer to the iterates.) It costs one
    gradient.

    Solved as a first-order system in (θ, u = θ'): θ' = u, u' = −(∇L + u)/m.
    `traj.params` are θ and `traj.velocity` is u. With β = 0 it is a
    second-order model of plain gradient descent (m = lr/2), equivalent to
    `ModifiedGD` to that order. Its Jacobian is not symmetric (its eigenvalues
    (−1 ± √(1 − 4mλ)) / 2m are complex where mλ > 1/4), so the stabilized solvers
    do not apply: `"auto"` runs Tsit5, and `"rkc2"` / `"rock4"` are refused.
    The model needs lr·λ ≪ (1 − β)² for the curvatures λ that matter: stiffer
    directions oscillate at a different frequency in the iterates than in the flow.

    Args:
        lr: the learning rate (> 0).
        momentum: β in [0, 1).
        start: `"matched"` (default) or `"rest"`: the initial velocity, as above.

    Examples:
        >>> hb = gflow.simulate(model, data, 50.0, key=0,
        ...                     flow=gflow.flows.HeavyBall(0.01, momentum=0.9))
        >>> sgd = gflow.gradient_descent(model, data, 50.0, lr=0.01, key=0,
        ...     optimizer=optax.sgd(0.01, momentum=0.9), time_per_step=0.1)
    """

    lr: np.ndarray
    momentum: np.ndarray
    start: str = eqx.field(static=True)
    cost: ClassVar[Work] = Work(grads=1)
    gradient_field: ClassVar[bool] = False

    def __init__(self, lr: float, momentum: float, start: str = "matched"):
        self.lr = _rate("lr", lr)
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, int | float | np.integer | np.floating)
            or not 0 <= momentum < 1
        ):
            raise ValueError(f"`momentum` must be in [0, 1); got {momentum!r}.")
        self.momentum = np.asarray(momentum, np.float64)
        if start not in ("matched", "rest"):
            raise ValueError(f"`start` must be 'matched' or 'rest'; got {start!r}.")
        self.start = start

    @property
    def mass(self) -> np.ndarray:
        """m = (1 + β) lr / (2 (1 − β)²)."""
        beta = self.momentum
        return (1 + beta) * self.lr / (2 * (1 - beta) ** 2)

    def init(self, loss_fn, params, data):
        if self.start == "rest":
            return (
                FlowState(params, {"u": jax.tree.map(jnp.zeros_like, params)}),
                None,
                Work(),
            )
        beta = like_dtype(self.momentum, params)
        g = grad(loss_fn, params, data)
        u = jax.tree.map(lambda x: -(1 - beta) / (1 + beta) * x, g)
        return FlowState(params, {"u": u}), None, Work(grads=1)

    def vector_field(self, loss_fn: Callable) -> Callable:
        def field(t, state, data, carried):
            params, u = state.params, state.extra["u"]
            rate = -1 / like_dtype(self.mass, params)
            du = jax.tree.map(
                lambda g, v: rate * (g + v), grad(loss_fn, params, data), u
            )
            return FlowState(u, {"u": du})

        return field

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        return state.extra["u"], {}, Work()

    def update(self, loss_fn, t, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass


class SGD(AbstractSDEFlow):
    """The stochastic modified equation of minibatch SGD (Li, Tai & E 2017/2019).

        dθ = −∇(L + (lr/4)‖∇L‖²) dt + sqrt(lr·c/B) Σ(θ)^{1/2} dW,   c = (n − B)/(n − 1)

    models SGD with learning rate `lr` and batches of B = `batch_size` of the n
    examples drawn without replacement within a step (`gflow.gradient_descent(...,
    batch_size=B, batch_key=...)`), read at t = k·lr. Σ(θ) is the covariance of
    the per-example gradients g_i (over the n examples), so that a batch
    gradient's covariance is c Σ / B. It is applied matrix-free: with G the n × P
    matrix of centred per-example gradients, Σ = GᵀG/n, and Σ^{1/2} dW has the law
    of Gᵀ dW' / √n for an n-dimensional Brownian motion W', which is one
    vector–Jacobian product of the per-example losses with weights
    dW' − mean(dW'); the n × P matrix is never formed.

    The drift uses the loss (`model.loss`), the noise `per_example_loss(params,
    data)`, shape (n,), whose mean should be the loss. It is taken from the model
    unless given here. Every run needs `noise_key=` (one key for
    `gflow.simulate`, one per member for `gflow.simulate_ensemble`: one path
    each). It is solved by Euler–Maruyama (diffrax's Euler, an Itô method) with a
    fixed step `dt0` (default lr/4) on a diffrax VirtualBrownianTree (resolution
    dt0/2). One step costs 2 gradients (the loss's and the per-example
    vector–Jacobian product) and 1 Hessian-vector product.

    Args:
        lr: the learning rate (> 0).
        batch_size: B, at least 1 and at most the number of examples.
        per_example_loss: `fn(params, data) -> (n,)`; default `model.per_example_loss`.

    Examples:
        >>> model = gflow.models.LinearRegression(...)
        >>> sde = gflow.simulate_ensemble(model, data, 5.0, params0=p0s,
        ...     flow=gflow.flows.SGD(0.05, batch_size=16),
        ...     noise_key=jax.random.split(jax.random.key(0), 64))
        >>> sde.loss.mean(0), sde.loss.std(0)   # SGD's mean and spread over time
    """

    lr: np.ndarray
    batch_size: int = eqx.field(static=True)
    per_example_loss: Callable | None = None
    cost: ClassVar[Work] = Work(grads=2, hvps=1)
    gradient_field: ClassVar[bool] = True

    def __init__(
        self, lr: float, batch_size: int, per_example_loss: Callable | None = None
    ):
        self.lr = _rate("lr", lr)
        self.batch_size = check_batch_size(batch_size)
        if per_example_loss is not None and not callable(per_example_loss):
            raise TypeError("`per_example_loss` must be a function (params, data).")
        self.per_example_loss = per_example_loss

    @property
    def default_dt0(self) -> float:
        """The Euler–Maruyama step used unless `dt0=` is given: lr / 4."""
        return float(self.lr) / 4

    def prepared(self, model, bind, params, data):
        fn = self.per_example_loss
        if fn is None:
            fn = getattr(model, "per_example_loss", None)
            if not callable(fn):
                raise ValueError(
                    "flow SGD needs per-example losses for its noise: the model has "
                    "no `per_example_loss(params, data)` method. Give one as "
                    "gflow.flows.SGD(lr, batch_size, per_example_loss=fn)."
                )
        fn = bind(fn)
        try:
            losses = jax.eval_shape(fn, params, data)
        except Exception as e:  # noqa: BLE001 - re-raised with context below
            raise ValueError(
                f"per_example_loss(params, data) failed: {type(e).__name__}: {e}"
            ) from e
        if len(getattr(losses, "shape", ())) != 1:
            raise ValueError(
                "per_example_loss(params, data) must return one loss per example, "
                f"shape (n,); got shape {getattr(losses, 'shape', None)}."
            )
        check_batch_size(self.batch_size, losses.shape[0])
        return eqx.tree_at(
            lambda f: f.per_example_loss, self, fn, is_leaf=lambda x: x is None
        )

    def noise_shape(self, params, data) -> jax.ShapeDtypeStruct:
        """The Brownian motion's shape: one component per example."""
        return jax.eval_shape(self.per_example_loss, params, data)

    def init(self, loss_fn, params, data):
        return FlowState(params), None, Work()

    def vector_field(self, loss_fn: Callable) -> Callable:
        return _modified_field(loss_fn, self.lr)

    def evaluation_cost(self, carried):
        return self.cost

    def row(self, loss_fn, t, state, carried, data, loss, grad):
        """The drift (the flow's mean velocity)."""
        return _modified_row(loss_fn, self.lr, state, data, grad)

    def update(self, loss_fn, t, state, carried, data):
        return carried, Work()

    def check(self, trajectory) -> None:
        pass

    def diffusion(self) -> Callable:
        """`g(t, θ, data)`: the diffusion as a linear operator on dW (matrix-free)."""

        def g(t, state, data):
            params = state.params
            losses, pull = jax.vjp(lambda p: self.per_example_loss(p, data), params)
            n = losses.shape[0]
            b = self.batch_size
            # sqrt(lr c / B) / sqrt(n), c = (n − B)/(n − 1); c = 0 when B = n.
            c = (n - b) / (n - 1) if n > 1 else 0.0
            scale = jnp.sqrt(like_dtype(self.lr, params) * c / (b * n))

            def apply(dw):
                pulled = pull(dw - jnp.mean(dw))[0]
                return FlowState(jax.tree.map(lambda x: scale * x, pulled))

            structure = jax.ShapeDtypeStruct(losses.shape, losses.dtype)
            return lx.FunctionLinearOperator(apply, structure)

        return g
