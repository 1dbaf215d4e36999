"""Optimisers as values (gflow.optimizers): the discrete run equals optax's to
rounding, the stable flow is the optimiser's continuous model (exact where it has
a closed form, its distance to the iterates ∝ lr), new hyperparameters reuse the
programs, and bad input is named."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import FROZEN_PRECONDITIONERS

import gflow
from gflow import optimizers
from gflow.flows import StableFlow

A = jnp.asarray([0.5, 2.0, 8.0])
THETA0 = {"x": jnp.asarray([1.0, -1.0, 0.5])}


def quadratic(params, data):
    return 0.5 * jnp.sum(A * params["x"] ** 2)


def quartic(params, data):
    x = params["x"]
    return 0.5 * jnp.sum(A * x**2) + 0.25 * jnp.sum(x**4)


def by_optax(transformation, loss, params, steps):
    """The iterates of an optax optimiser, a training loop as users write it
    (jitted: an optax schedule computes in float32 from its int32 count, and XLA
    rounds that differently from op-by-op execution)."""

    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            updates, state = transformation.update(jax.grad(loss)(params, None), state)
            params = optax.apply_updates(params, updates)
            return (params, state), params

        carry = (params, transformation.init(params))
        return jax.lax.scan(step, carry, None, length=steps)[1]

    later = run(params)
    return jax.tree.map(lambda x0, x: jnp.concatenate([x0[None], x]), params, later)


EVERY = [
    optimizers.GD(0.05),
    optimizers.HeavyBall(0.02, 0.9),
    optimizers.Nesterov(0.02, 0.8),
    optimizers.RMSProp(0.01),
    optimizers.RMSProp(0.01, 0.95, 1e-6, eps_in_sqrt=False, bias_correction=True),
    optimizers.RMSProp(0.01, 0.9, scalar=True, nu0=1.0),
    optimizers.Adam(0.01),
    optimizers.NAdam(0.01, 0.8, 0.99),
]


@pytest.mark.parametrize("opt", EVERY, ids=lambda o: type(o).__name__)
def test_the_discrete_run_is_optax(opt):
    steps = 30
    run = gflow.gradient_descent(
        quartic, None, steps * float(opt.base_lr), optimizer=opt, params0=THETA0,
        ts=np.arange(steps + 1) * float(opt.base_lr),
    )  # fmt: skip
    if opt.scalar if isinstance(opt, optimizers.RMSProp) else False:
        reference = by_optax(_scalar_rmsprop(opt), quartic, THETA0, steps)
    else:
        reference = by_optax(_optax_of(opt), quartic, THETA0, steps)
    np.testing.assert_allclose(run.params["x"], reference["x"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("opt", EVERY, ids=lambda o: type(o).__name__)
def test_step_is_one_discrete_step_in_the_flows_moments(opt):
    """`step` (what the rod flows move by) iterated from `moments()` gives the
    discrete run's parameters: optax's update in the stable flow's variables."""
    steps = 30
    run = gflow.gradient_descent(
        quartic, None, steps * float(opt.base_lr), optimizer=opt, params0=THETA0,
        ts=np.arange(steps + 1) * float(opt.base_lr),
    )  # fmt: skip
    params, moments = THETA0, opt.moments(THETA0)
    for k in range(steps):
        gradient = jax.grad(quartic)(params, None)
        change, moment_change = opt.step(k, params, moments, gradient)
        params = jax.tree.map(jnp.add, params, change)
        moments = jax.tree.map(jnp.add, moments, moment_change)
    np.testing.assert_allclose(params["x"], run.params["x"][-1], rtol=1e-12)


def _optax_of(opt):
    """The optax optimiser of the same hyperparameters, spelled as a user would."""
    lr = float(opt.lr)
    if isinstance(opt, optimizers.GD):
        return optax.sgd(lr)
    if isinstance(opt, optimizers.HeavyBall):
        return optax.sgd(lr, momentum=float(opt.momentum))
    if isinstance(opt, optimizers.Nesterov):
        return optax.sgd(lr, momentum=float(opt.momentum), nesterov=True)
    if isinstance(opt, optimizers.RMSProp):
        return optax.rmsprop(
            lr,
            decay=float(opt.b2),
            eps=float(opt.eps),
            initial_scale=float(opt.nu0),
            eps_in_sqrt=opt.eps_in_sqrt,
            bias_correction=opt.bias_correction,
        )
    kind = optax.adam if isinstance(opt, optimizers.Adam) else optax.nadam
    return kind(lr, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps))


def _scalar_rmsprop(opt):
    """Scalar RMSProp by hand: ν ← b2 ν + (1 − b2) ‖g‖², θ ← θ − lr g / √(ν + ε)."""
    b2, eps, lr = float(opt.b2), float(opt.eps), float(opt.lr)

    def init(params):
        return jnp.asarray(float(opt.nu0))

    def update(grads, nu, params=None):
        nu = b2 * nu + (1 - b2) * sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))
        return jax.tree.map(lambda g: -lr * g / jnp.sqrt(nu + eps), grads), nu

    return optax.GradientTransformation(init, update)


def test_the_stable_flow_of_gd_is_the_gradient_flow():
    kwargs = dict(params0=THETA0, n_save=9, rtol=1e-10, atol=1e-12)
    stable = gflow.simulate(
        quadratic, None, 3.0, flow=StableFlow(optimizers.GD(0.1)), **kwargs
    )
    exact = THETA0["x"] * jnp.exp(-A * stable.ts[:, None])
    np.testing.assert_allclose(stable.params["x"], exact, rtol=1e-8, atol=1e-14)
    assert stable.state == {}


def test_the_stable_flow_of_heavy_ball_is_its_closed_form_on_a_quadratic():
    """dθ/ds = −lr m, dm/ds = (−ln β)(g/(1 − β) − m) is linear on a quadratic:
    per coordinate, exp of the 2 × 2 matrix [[0, −lr], [c a, −c]] (c = −ln β,
    a scaled by 1/(1 − β)), on t = s·lr."""
    lr, beta = 0.02, 0.9
    flow = StableFlow(optimizers.HeavyBall(lr, beta))
    traj = gflow.simulate(
        quadratic,
        None,
        2.0,
        params0=THETA0,
        flow=flow,
        n_save=5,
        rtol=1e-10,
        atol=1e-12,
    )
    c = -np.log(beta)
    for i, a in enumerate(np.asarray(A)):
        generator = np.array([[0.0, -lr], [c * a / (1 - beta), -c]]) / lr
        for row, t in enumerate(np.asarray(traj.ts)):
            x, m = scipy_expm(generator * t) @ np.array([float(THETA0["x"][i]), 0.0])
            assert traj.params["x"][row, i] == pytest.approx(x, rel=1e-7, abs=1e-10)
            assert traj.state["m"]["x"][row, i] == pytest.approx(m, rel=1e-7, abs=1e-10)


def scipy_expm(matrix):
    import scipy.linalg

    return scipy.linalg.expm(matrix)


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: optimizers.Adam(lr),
        lambda lr: optimizers.NAdam(lr),
        lambda lr: optimizers.RMSProp(lr, 0.9),
        lambda lr: optimizers.HeavyBall(lr, 0.9),
        lambda lr: optimizers.Nesterov(lr, 0.9),
    ],
    ids=["Adam", "NAdam", "RMSProp", "HeavyBall", "Nesterov"],
)
def test_the_stable_flow_approaches_the_iterates_in_proportion_to_lr(make):
    """At fixed decay rates, the largest distance up to t = 0.5 between the
    optimiser's iterates and its stable flow shrinks like lr (lr/4: about 1/4).
    (RMSProp with bias correction at b2 = 0.99 gets there slowly: 0.54, 0.40,
    0.35, 0.33 for each quartering from lr 1e-3 on this quartic.)"""
    t = 0.5
    distances = []
    for lr in (4e-3, 1e-3):
        opt = make(lr)
        run = gflow.gradient_descent(quartic, None, t, optimizer=opt, params0=THETA0)
        flow = gflow.simulate(
            quartic, None, t, params0=THETA0, ts=run.ts, flow=StableFlow(opt),
            rtol=1e-10, atol=1e-12,
        )  # fmt: skip
        distances.append(gflow.compare(flow, run).max_param_distance)
    assert distances[1] / distances[0] <= 0.35, distances
    assert distances[1] / distances[0] >= 0.15, distances


def test_new_hyperparameters_reuse_the_programs():
    first = gflow.gradient_descent(
        quadratic, None, 0.2, optimizer=optimizers.Adam(0.01), params0=THETA0
    )
    assert first.stats["compiled"]
    again = gflow.gradient_descent(
        quadratic, None, 0.4, optimizer=optimizers.Adam(0.02, 0.8, 0.99, 1e-6),
        params0=THETA0,
    )  # fmt: skip
    assert not again.stats["compiled"]
    kwargs = dict(params0=THETA0, n_save=5)
    flow = StableFlow(optimizers.Adam(0.01))
    assert gflow.simulate(quadratic, None, 0.2, flow=flow, **kwargs).stats["compiled"]
    flow = StableFlow(optimizers.Adam(0.03, 0.5, 0.9))
    assert not gflow.simulate(quadratic, None, 0.3, flow=flow, **kwargs).stats[
        "compiled"
    ]


def test_a_schedule_runs_with_its_base_rate():
    schedule = optax.linear_schedule(0.0, 0.02, 10)
    opt = optimizers.Adam(schedule, base_lr=0.02)
    run = gflow.gradient_descent(
        quartic, None, 0.4, optimizer=opt, params0=THETA0, ts=np.arange(21) * 0.02
    )
    reference = by_optax(optax.adam(schedule), quartic, THETA0, 20)
    np.testing.assert_allclose(run.params["x"], reference["x"], rtol=1e-12)
    flow = gflow.simulate(
        quartic, None, 0.4, params0=THETA0, ts=run.ts, flow=StableFlow(opt)
    )
    assert flow.result == "successful"


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: optimizers.GD(0.0), "`lr` must be a positive number"),
        (lambda: optimizers.GD(-1e-3), "`lr` must be a positive number"),
        (lambda: optimizers.Adam("fast"), "`lr` must be a positive number"),
        (lambda: optimizers.Adam(optax.constant_schedule(0.1)), "base_lr"),
        (lambda: optimizers.Adam(0.1, base_lr=0.1), "base_lr"),
        (lambda: optimizers.Adam(0.1, b1=1.0), r"`b1` must be in \[0, 1\)"),
        (lambda: optimizers.Adam(0.1, b2=-0.1), r"`b2` must be in \[0, 1\)"),
        (lambda: optimizers.HeavyBall(0.1, 0.0), "GD"),
        (lambda: optimizers.RMSProp(0.1, eps=-1.0), "`eps` must be"),
        (lambda: optimizers.RMSProp(0.1, scalar="yes"), "`scalar`"),
    ],
)
def test_bad_hyperparameters_are_named(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_a_flow_of_something_else_is_refused_listing_the_optimizers():
    with pytest.raises(TypeError, match="GD, HeavyBall, Nesterov, RMSProp, Adam"):
        StableFlow(optax.adam(0.1))


def test_stable_flows_in_ensembles_and_float32_with_exact_counts():
    flow = StableFlow(optimizers.Adam(0.01))
    x0 = jnp.stack([THETA0["x"], -2 * THETA0["x"]])
    kwargs = dict(flow=flow, n_save=5, rtol=1e-9, atol=1e-12)
    ens = gflow.simulate_ensemble(quartic, None, 0.5, params0={"x": x0}, **kwargs)
    single = gflow.simulate(quartic, None, 0.5, params0={"x": x0[1]}, **kwargs)
    member = ens.member(1)
    assert member.stats["num_steps"] == single.stats["num_steps"]
    np.testing.assert_allclose(member.params["x"], single.params["x"], rtol=1e-12)
    np.testing.assert_allclose(member.state["v"]["x"], single.state["v"]["x"])
    s = single.stats
    # Tsit5 (the field is not a gradient): 6 gradients an attempt, the start's
    # field (the state is more than the parameters) and first step size; one
    # gradient per saved row.
    assert s["num_solver_grad_evals"] == 6 * s["num_steps"] + 2
    assert s["num_save_grad_evals"] == 5 and s["num_hvp_evals"] == 0
    low = gflow.simulate(
        quartic, None, 0.5, params0={"x": x0[1].astype(jnp.float32)}, flow=flow
    )
    assert low.result == "successful"
    assert low.params["x"].dtype == low.state["m"]["x"].dtype == jnp.float32
    np.testing.assert_allclose(low.final["x"], single.final["x"], rtol=1e-4)


@pytest.mark.parametrize("make, eps", FROZEN_PRECONDITIONERS)
def test_each_optimizers_edge_is_where_its_steps_on_a_quadratic_turn_unstable(
    make, eps
):
    """On ½x², optax's own steps decay just below `edge()` and grow just above it
    (the edge of λ(P⁻¹H) = 1/P, P = 1 or ε). From x = 1e-30: Adam's first,
    bias-corrected steps are up to ten times longer and blow the iterates up
    by some 1e12 before the edge governs, which must leave √v̂ ≪ ε."""
    preconditioner = 1.0 if eps is None else eps
    limit = float(make(1.0, eps).stability_limit())
    runs = []
    for factor in (0.97, 1.03):
        opt = make(factor * limit * preconditioner, eps)
        assert float(opt.edge()) * factor == pytest.approx(1 / preconditioner)
        steps = 3000
        runs.append(
            gflow.gradient_descent(
                lambda p, d: 0.5 * p["x"] ** 2, None, steps * float(opt.base_lr),
                optimizer=opt, params0={"x": jnp.asarray(1e-30)}, n_save=2,
                throw=False,
            )
        )  # fmt: skip
    below, above = (abs(float(run.params["x"][-1])) for run in runs)
    assert runs[0].result == "successful" and below < 1e-40
    assert runs[1].result == "diverged" or above > 1e-10


def test_the_preconditioned_sharpness_is_the_top_of_p_inverse_h():
    """On ½ Σ a x², λ_max(P⁻¹H) = max a / P, P the next step's: 1 for gradient
    descent and momentum; for Adam after k steps √(v' / (1 − b2^(k+1))) + ε,
    v' = b2 v + (1 − b2) g²; for scalar RMSProp √(ν' + ε), ν' of ‖g‖²."""
    x = THETA0["x"]
    g = np.asarray(A * x)
    v = {"x": jnp.asarray([4.0, 0.01, 1.0])}
    adam = optimizers.Adam(0.01, eps=0.1)
    v_next = 0.999 * v["x"] + 0.001 * g**2
    adam_p = np.sqrt(v_next / (1 - 0.999**4)) + 0.1
    scalar = optimizers.RMSProp(0.1, scalar=True, eps=0.5)
    nu_next = 0.9 * 2.0 + 0.1 * np.sum(g**2)
    cases = [
        (optimizers.HeavyBall(0.1, 0.9), None, 0, np.max(A)),
        (adam, {"m": v, "v": v}, 3, np.max(A / adam_p)),
        (scalar, {"nu": 2.0}, 7, np.max(A) / np.sqrt(nu_next + 0.5)),
    ]
    for opt, moments, step, expected in cases:
        value, _ = gflow.metrics.preconditioned_sharpness(
            quadratic, {"x": x}, None, opt, moments, step=step, iters=200
        )
        assert float(value) == pytest.approx(float(expected), rel=1e-9)


def test_the_preconditioned_sharpness_along_a_run_uses_its_saved_moments():
    """Along Adam's run on ½ Σ a x², each row's λ_max(P⁻¹H) is max a / P with
    the moments the run saved there and the gradient at that row."""
    adam = optimizers.Adam(0.05, eps=0.1)
    run = gflow.gradient_descent(
        quadratic, None, 1.0, optimizer=adam, params0=THETA0, ts=[0.0, 0.25, 1.0]
    )
    values = gflow.metrics.preconditioned_sharpness_along(
        run, quadratic, None, adam, iters=100
    )
    for row, value in enumerate(np.asarray(values)):
        k = round(float(run.ts[row]) / 0.05)
        g = np.asarray(A * run.params["x"][row])
        v = 0.999 * np.asarray(run.state["v"]["x"][row]) + 0.001 * g**2
        p = np.sqrt(v / (1 - 0.999 ** (k + 1))) + 0.1
        assert value == pytest.approx(float(np.max(A / p)), rel=1e-9)
    with pytest.raises(ValueError, match="holds no moments of Adam"):
        plain = gflow.gradient_descent(quadratic, None, 1.0, lr=0.05, params0=THETA0)
        gflow.metrics.preconditioned_sharpness_along(plain, quadratic, None, adam)
