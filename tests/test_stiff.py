"""Stabilized solvers for stiff flows: order, stage counts, exact work counts, the
automatic switch, negative curvature, bad input, and the stored ROCK4 tables."""

import warnings

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import gflow
from gflow import RKC2, ROCK4
from gflow._solvers import _rock4_tables

STABILIZED = {"rkc2": (RKC2, 2), "rock4": (ROCK4, 4)}


def spread_quadratic(eigenvalues, seed=0):
    """½ θᵀAθ with the given spectrum in a random basis; the basis and θ(t)."""
    n = len(eigenvalues)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = q @ np.diag(eigenvalues) @ q.T

    def loss(theta, A):
        return 0.5 * theta @ A @ theta

    def exact(theta0, t):
        return scipy.linalg.expm(-t * A) @ theta0

    return loss, jnp.asarray(A), q, exact


def fixed_step_error(solver, loss, A, theta0, exact, t_max, n_steps):
    field = diffrax.ODETerm(lambda t, y, A: -jax.grad(loss)(y, A))
    sol = diffrax.diffeqsolve(
        field,
        solver,
        0.0,
        t_max,
        t_max / n_steps,
        jnp.asarray(theta0),
        A,
        stepsize_controller=diffrax.ConstantStepSize(),
        max_steps=int(n_steps) + 1,
    )
    return float(np.max(np.abs(np.asarray(sol.ys[-1]) - exact(theta0, t_max))))


def assert_order(steps, errors, order):
    """The error falls like steps^-order: the fitted slope within 0.25 of it, and
    each halving of the step within 0.5 (the stage counts change with h, which
    adds some noise to single ratios)."""
    slopes = -np.diff(np.log(errors)) / np.diff(np.log(steps))
    fitted = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(fitted - order) < 0.25, (errors, fitted)
    assert np.all(np.abs(slopes - order) < 0.5), (errors, slopes)


@pytest.mark.parametrize("name", sorted(STABILIZED))
def test_order_on_a_stiff_quadratic(name):
    # Eigenvalues 1 ... 1e4; the solution starts on the smooth modes (rounding
    # excites the stiff ones), so the stage count must cover h·λ = 1e4·h while the
    # error follows the method's order in h.
    cls, order = STABILIZED[name]
    eigenvalues = np.geomspace(1.0, 1e4, 12)
    loss, A, q, exact = spread_quadratic(eigenvalues)
    theta0 = q[:, :3] @ np.array([1.0, -0.5, 0.25])
    steps = np.array([16, 32, 64, 128])
    errors = [fixed_step_error(cls(), loss, A, theta0, exact, 1.0, n) for n in steps]
    assert_order(steps, errors, order)


@pytest.mark.parametrize("name", sorted(STABILIZED))
def test_order_on_a_nonlinear_flow(name):
    # Chen & Luo's stage-2 flow is cubic-free but bilinear in (W_Q, W_K): its
    # nonlinear order conditions matter. Closed form by cosh/sinh.
    from helpers import stage2_problem

    cls, order = STABILIZED[name]
    loss, F, params0, exact = stage2_problem()
    field = diffrax.ODETerm(
        lambda t, y, F: jax.tree.map(jnp.negative, jax.grad(loss)(y, F))
    )
    errors = []
    steps = np.array([8, 16, 32])
    for n in steps:
        sol = diffrax.diffeqsolve(
            field,
            cls(),
            0.0,
            2.0,
            2.0 / n,
            params0,
            F,
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=int(n) + 1,
        )
        errors.append(
            max(
                float(np.max(np.abs(np.asarray(sol.ys[k][-1]) - exact(2.0)[k])))
                for k in ("W_Q", "W_K")
            )
        )
    assert_order(steps, errors, order)


@pytest.mark.parametrize("stages", [2, 3, 7, 60, 400])
def test_rkc2_step_of_a_linear_flow_is_its_stability_polynomial(stages):
    # On y' = λy one RKC2 step multiplies y by R_s(hλ) = a_s + b_s T_s(w0 + w1 hλ)
    # (Sommeijer, Shampine & Verwer 1997): w0 = 1 + ε/s², w1 = T_s'(w0)/T_s''(w0),
    # b_s = T_s''(w0)/T_s'(w0)², a_s = 1 - b_s T_s(w0). The stages build it from
    # the Chebyshev recurrence; here it is NumPy's Chebyshev series (Clenshaw).
    cheb = np.polynomial.chebyshev
    t_s = np.zeros(stages + 1)
    t_s[-1] = 1.0
    w0 = 1.0 + (2.0 / 13.0) / stages**2
    t, d, dd = (cheb.chebval(w0, cheb.chebder(t_s, m)) for m in range(3))
    w1, b = d / dd, dd / d**2
    lam = -1.0
    for z in -np.array([0.01, 0.3, 0.9]) * 0.65 * stages**2:
        h = z / lam
        y1, _, _ = RKC2().advance(
            lambda t, y: lam * y,
            jnp.asarray(0.0),
            jnp.asarray(h),
            jnp.asarray(1.0),
            jnp.asarray(lam),
            jnp.asarray(stages, jnp.int32),
        )
        expected = 1.0 - b * t + b * cheb.chebval(w0 + w1 * z, t_s)
        assert abs(float(y1) - expected) < 1e-11 * max(1.0, stages / 10), (z, y1)


@pytest.mark.parametrize("name", sorted(STABILIZED))
def test_stage_count_grows_like_the_square_root_of_h_rho(name):
    cls, _ = STABILIZED[name]
    solver = cls()
    h_rho = np.array([50.0, 200.0, 800.0, 3200.0, 12800.0])
    stages = np.array([int(solver.stages_for(jnp.asarray(x))) for x in h_rho])
    # Stable on [-c s², 0]: c = 0.65 for RKC2, 0.35 for ROCK4; so s ≈ sqrt(hρ/c),
    # and quadrupling hρ doubles s (up to the rounding of the stage counts).
    c = 0.65 if name == "rkc2" else 0.35
    np.testing.assert_allclose(stages, np.sqrt(h_rho / c), rtol=0.15, atol=2)
    np.testing.assert_allclose(stages[1:] / stages[:-1], 2.0, rtol=0.1)


def counting_quadratic():
    calls = []
    loss_fn, A, _, _ = spread_quadratic(np.geomspace(1.0, 1e3, 6), seed=3)

    def loss(theta, A):
        jax.debug.callback(lambda _: calls.append(1), theta)  # once per forward pass
        return loss_fn(theta, A)

    return loss, A, calls


# "auto" here switches even for a run this short (min_steps=0).
@pytest.mark.parametrize("solver", ["rkc2", "rock4", gflow.AutoTsit5(min_steps=0)])
def test_gradient_and_hvp_counts_are_exact(solver):
    loss, A, calls = counting_quadratic()
    traj = gflow.simulate(loss, A, 2.0, params0=jnp.ones(6), solver=solver, n_save=7)
    assert traj.stats["num_hvp_evals"] > 0
    # A gradient and a Hessian-vector product each run the loss forward once.
    assert traj.stats["num_grad_evals"] + traj.stats["num_hvp_evals"] == len(calls)


def test_auto_stays_tsit5_on_a_flow_that_is_not_stiff():
    loss, A, q, _ = spread_quadratic(np.array([0.5, 1.0, 2.0, 3.0]))
    theta0 = jnp.asarray(q.sum(axis=1))
    kwargs = dict(params0=theta0, n_save=9)
    auto = gflow.simulate(loss, A, 5.0, solver="auto", **kwargs)
    tsit5 = gflow.simulate(loss, A, 5.0, solver="tsit5", **kwargs)
    assert auto.stats["num_hvp_evals"] == 0
    assert auto.stats["num_steps"] == tsit5.stats["num_steps"]
    np.testing.assert_array_equal(np.asarray(auto.params), np.asarray(tsit5.params))


def test_auto_switches_on_a_stiff_flow():
    loss, A, q, exact = spread_quadratic(np.geomspace(1.0, 1e4, 12))
    theta0 = q.sum(axis=1)
    kwargs = dict(params0=jnp.asarray(theta0), n_save=9, rtol=1e-6, atol=1e-9)
    auto = gflow.simulate(loss, A, 20.0, solver="auto", **kwargs)
    tsit5 = gflow.simulate(loss, A, 20.0, solver="tsit5", **kwargs)
    assert auto.stats["num_hvp_evals"] > 0  # the stabilized method took over
    assert auto.stats["num_grad_evals"] < tsit5.stats["num_grad_evals"] / 10
    errors = [
        np.max(np.abs(np.asarray(auto.params[i]) - exact(theta0, float(t))))
        for i, t in enumerate(auto.ts)
    ]
    assert max(errors) < 1e-5


@pytest.mark.parametrize("solver", ["rkc2", "rock4", "auto"])
def test_saddle_is_solved_accurately(solver):
    # An indefinite quadratic: negative curvature along two directions (the flow
    # grows there as e^{t}, e^{0.5 t}), stiff positive curvature up to 1e3.
    eigenvalues = np.array([-1.0, -0.5, 1.0, 10.0, 100.0, 1e3])
    loss, A, q, exact = spread_quadratic(eigenvalues, seed=5)
    theta0 = q.sum(axis=1)
    traj = gflow.simulate(
        loss,
        A,
        3.0,
        params0=jnp.asarray(theta0),
        solver=solver,
        n_save=7,
        rtol=1e-8,
        atol=1e-10,
    )
    for i, t in enumerate(traj.ts):
        expected = exact(theta0, float(t))
        error = np.max(np.abs(np.asarray(traj.params[i]) - expected))
        # The growing modes reach e^3 ≈ 20 times their start; the error control
        # follows them (RKC2, second order, to a few hundred times rtol).
        assert error < 1e-5 * np.max(np.abs(expected)), (t, error)


def test_a_loss_without_hessian_vector_products_is_refused_clearly():
    curvature = jnp.array([1.0, 1e3])

    @jax.custom_vjp
    def opaque(x):
        return 0.5 * jnp.sum(curvature * x**2)

    opaque.defvjp(lambda x: (opaque(x), x), lambda x, g: (g * curvature * x,))

    def loss(params, data):
        return opaque(params)

    with pytest.raises(ValueError, match="solver 'rkc2' needs Hessian-vector"):
        gflow.simulate(loss, None, 1.0, params0=jnp.ones(2), solver="rkc2")
    # Tsit5 needs gradients only.
    kwargs = dict(params0=jnp.ones(2), n_save=5)
    tsit5 = gflow.simulate(loss, None, 20.0, solver="tsit5", **kwargs)
    # "auto" (the default) needs them only once the flow stiffens: then it says
    # it falls back to Tsit5, and does.
    with pytest.warns(UserWarning, match="'auto' falls back to 'tsit5'") as record:
        auto = gflow.simulate(loss, None, 20.0, **kwargs)
    assert record[0].filename == __file__  # the user's call, not gflow's inside
    assert auto.stats["num_hvp_evals"] == 0
    np.testing.assert_array_equal(np.asarray(auto.params), np.asarray(tsit5.params))
    # An ensemble compiles both methods from the start, so it says so at once.
    with pytest.warns(UserWarning, match="'auto' falls back to 'tsit5'") as record:
        ens = gflow.simulate_ensemble(loss, None, 20.0, params0=jnp.ones((3, 2)))
    assert record[0].filename == __file__
    assert np.sum(ens.stats["num_hvp_evals"]) == 0
    np.testing.assert_allclose(ens.final[0], np.asarray(tsit5.final), rtol=1e-6)
    # A flow that never stiffens runs without a word.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calm = gflow.simulate(loss, None, 2e-3, **kwargs)
    assert calm.result == "successful"


def test_stored_rock4_tables_are_the_derivation_and_of_order_4():
    tables = np.load(_rock4_tables.PATH)
    # Every stored method satisfies the conditions of order 4 and its embedded
    # method those of order 3.
    for i, s in enumerate(tables["degrees"]):
        start, stop = tables["offset"][i], tables["offset"][i + 1]
        rec = [tables[k][start:stop] for k in ("mu", "nu", "kappa")]
        A, b = _rock4_tables._tableau(*rec, tables["finishing"][i])
        assert np.max(np.abs(_rock4_tables.order_conditions(A, b))) < 1e-11, s
    # A few degrees derived again give the stored numbers.
    some = np.array([5, 17, 60])
    again = _rock4_tables.make(some)
    index = np.searchsorted(tables["degrees"], some)
    np.testing.assert_allclose(again["lengths"], tables["lengths"][index], rtol=1e-9)
    np.testing.assert_allclose(
        again["finishing"], tables["finishing"][index], rtol=1e-7, atol=1e-8
    )
    # Stable to about 0.35 s², as ROCK4 (damped: |R| <= 0.9 away from 0).
    lengths = tables["lengths"] / tables["degrees"] ** 2
    assert 0.345 < lengths[-1] < 0.36 and np.all(lengths[10:] > 0.33)


def test_auto_in_an_ensemble_counts_the_tsit5_attempt_a_stiff_lane_also_takes():
    # Lanes of both modes share an ensemble's program: every lane takes Tsit5's
    # attempt, the stiff ones a stabilized step besides. That attempt's six
    # gradients are part of what a stabilized step costs such a lane, in the
    # rate "auto" weighs against Tsit5's; alone (simulate) it is not.
    split = gflow.AutoTsit5().modes()
    term = diffrax.ODETerm(lambda t, y, args: -jnp.array([1.0, 400.0]) * y)
    y0 = jnp.ones(2)
    t0, t1 = jnp.asarray(0.0), jnp.asarray(0.05)
    start = split.rare.start(term, t0, 10.0, y0, None, term.vf(t0, y0, None))
    stiff = eqx.tree_at(lambda s: s.stiff, start, jnp.array(True))
    costs = [
        solver.step(term, t0, t1, y0, None, stiff, False)[3].stabilized_rate.cost
        for solver in (split.rare, split.rare_beside_common)
    ]
    assert float(costs[1]) - float(costs[0]) == 6
