"""Rod flows (gflow.flows.RodFlow): closed forms on a quadratic, gradient
descent's period-2 orbit as the rod's equilibrium, each optimiser's edge as the
rod's threshold, exact work counts, saved state, ensembles and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import FROZEN_PRECONDITIONERS

import gflow
from gflow import optimizers
from gflow.flows import RodFlow

A = jnp.asarray([0.5, 2.0, 8.0])
THETA0 = {"x": jnp.asarray([1.0, -1.0, 0.5])}
TIGHT = dict(rtol=1e-11, atol=1e-13)


def quadratic(params, data):
    return 0.5 * jnp.sum(A * params["x"] ** 2)


def test_the_gd_rod_on_a_quadratic_is_its_closed_form():
    """On ½ Σ a x²: dc/dt = −a c and dr/dt = (a − 2/lr) r, from c = x0 and
    r = −lr a x0 / 2 (half the first step): c = x0 e^{−at},
    r = r0 e^{(a − 2/lr)t}. lr 0.3 puts a = 8 past the edge 2/lr: its
    half-vector grows while the others decay."""
    lr, t = 0.3, 3.0
    traj = gflow.simulate(
        quadratic, None, t, params0=THETA0, flow=RodFlow(lr), n_save=7, **TIGHT
    )
    ts = np.asarray(traj.ts)[:, None]
    x0 = np.asarray(THETA0["x"])
    a = np.asarray(A)
    # (c's rounding is relative to the ends c ± r: |r| grows to 33.)
    np.testing.assert_allclose(
        traj.params["x"], x0 * np.exp(-a * ts), rtol=1e-9, atol=1e-13
    )
    r0 = -lr * a * x0 / 2
    expected = r0 * np.exp((a - 2 / lr) * ts)
    np.testing.assert_allclose(traj.state["r"]["x"], expected, rtol=1e-8, atol=1e-15)
    # The rod's ends are the iterates' two values: the mean loss of c ± r.
    c, r = np.asarray(traj.params["x"]), np.asarray(traj.state["r"]["x"])
    mean_loss = 0.5 * np.sum(a * (c**2 + r**2), axis=1)
    np.testing.assert_allclose(traj.metrics["predicted_loss"], mean_loss, rtol=1e-9)
    np.testing.assert_allclose(
        traj.metrics["rod_length"], np.linalg.norm(r, axis=1), rtol=1e-12
    )


def test_the_rods_equilibrium_is_gradient_descents_period_two_orbit():
    """L = a x²/2 − x⁴/4 with lr·a = 2.2: gradient descent settles on the
    period-2 orbit ±√(a − 2/lr) (x − lr L'(x) = −x), which is stable for
    lr·a in (2, 3). The rod flow from the same start settles on c = 0 with the
    half-length of that orbit."""
    a, lr = 1.0, 2.2

    def loss(params, data):
        x = params["x"]
        return jnp.sum(a * x**2 / 2 - x**4 / 4)

    x0 = {"x": jnp.asarray([0.05])}
    t = 400 * lr
    gd = gflow.gradient_descent(loss, None, t, lr=lr, params0=x0, n_save=3)
    orbit = np.sqrt(a - 2 / lr)
    assert abs(float(gd.params["x"][-1, 0])) == pytest.approx(orbit, rel=1e-9)
    rod = gflow.simulate(loss, None, t, params0=x0, flow=RodFlow(lr), n_save=3)
    assert abs(float(rod.params["x"][-1, 0])) < 1e-8
    assert abs(float(rod.state["r"]["x"][-1, 0])) == pytest.approx(orbit, rel=1e-6)
    # The iterates' loss, the same at both ends of the orbit.
    predicted = float(rod.metrics["predicted_loss"][-1])
    assert predicted == pytest.approx(float(loss({"x": jnp.asarray([orbit])}, None)))


@pytest.mark.slow  # (the fast tier's 10 minutes)
@pytest.mark.parametrize("make, eps", FROZEN_PRECONDITIONERS)
def test_the_rod_grows_exactly_past_each_optimizers_edge(make, eps):
    """On ½x², the rod's half-vector decays 3% below the optimiser's edge and
    grows 3% above it: a step maps z to M z, the rod's r to −(M + I) r per step,
    which grows iff M has an eigenvalue below −1, the optimiser's own edge."""
    preconditioner = 1.0 if eps is None else eps
    limit = float(make(1.0, eps).stability_limit())
    lengths = []
    for factor in (0.97, 1.03):
        opt = make(factor * limit * preconditioner, eps)
        traj = gflow.simulate(
            lambda p, d: 0.5 * p["x"] ** 2, None, 2000 * float(opt.base_lr),
            params0={"x": jnp.asarray(1.0)}, flow=RodFlow(opt), n_save=11,
            throw=False,
        )  # fmt: skip
        lengths.append(np.asarray(traj.metrics["rod_length"]))
    below, above = lengths
    assert below[-1] < 1e-6 * below[0]
    # Growing, it may run out of steps or overflow; an adaptive method's
    # second moment grows with it until its preconditioner stops it.
    assert np.max(above[np.isfinite(above)]) > 100 * above[0]


@pytest.mark.slow  # (the fast tier's 10 minutes)
def test_rod_flows_count_their_work_save_their_state_and_run_in_ensembles():
    flow = RodFlow(optimizers.Adam(0.05))
    x0 = jnp.stack([THETA0["x"], -2 * THETA0["x"]])
    kwargs = dict(flow=flow, n_save=5, rtol=1e-9, atol=1e-12)
    single = gflow.simulate(quadratic, None, 0.5, params0={"x": x0[1]}, **kwargs)
    assert set(single.state) == {"m", "v", "r", "r_m"}
    s = single.stats
    # Tsit5, two gradients (the rod's ends) an evaluation: 6 an attempt, the
    # start's field and first step size; the start's first step (the rod's
    # seed) one gradient; each row two, besides the loss and gradient at c.
    assert s["num_solver_grad_evals"] == 2 * (6 * s["num_steps"] + 2) + 1
    assert s["num_save_grad_evals"] == 5 * (1 + 2) and s["num_hvp_evals"] == 0
    ens = gflow.simulate_ensemble(quadratic, None, 0.5, params0={"x": x0}, **kwargs)
    member = ens.member(1)
    np.testing.assert_allclose(member.params["x"], single.params["x"], rtol=1e-12)
    np.testing.assert_allclose(member.state["r_m"]["x"], single.state["r_m"]["x"])
    low = gflow.simulate(
        quadratic, None, 0.5, params0={"x": x0[1].astype(jnp.float32)}, flow=flow
    )
    assert low.result == "successful"
    assert low.params["x"].dtype == low.state["r"]["x"].dtype == jnp.float32
    np.testing.assert_allclose(low.final["x"], single.final["x"], rtol=1e-4)


def test_a_rod_flow_of_something_else_is_refused_listing_the_optimizers():
    with pytest.raises(TypeError, match="GD, HeavyBall, Nesterov, RMSProp, Adam"):
        RodFlow("adam")
    with pytest.raises(ValueError, match="`lr` must be a positive number"):
        RodFlow(-0.1)


@pytest.mark.slow  # (the fast tier's 10 minutes)
def test_a_stable_flow_restarted_from_its_own_state_goes_on_as_before():
    """From the parameters and moments the flow saved at t_k, `step0` = k steps
    in (Adam's bias corrections go on from there), the flow continues itself."""
    opt = optimizers.Adam(0.05)
    tight = dict(rtol=1e-10, atol=1e-12)
    ts = np.linspace(0.0, 1.0, 11)
    flow = gflow.flows.StableFlow(opt)
    whole = gflow.simulate(
        quadratic, None, 1.0, params0=THETA0, flow=flow, ts=ts, **tight
    )
    k = 4  # t = 0.4: step 8

    def at(tree):
        return jax.tree.map(lambda x: x[k], tree)

    restarted = gflow.flows.StableFlow(opt, moments0=at(whole.state), step0=8)
    rest = gflow.simulate(
        quadratic, None, 0.6, params0=at(whole.params), ts=ts[k:] - ts[k],
        flow=restarted, **tight,
    )  # fmt: skip
    np.testing.assert_allclose(rest.params["x"], whole.params["x"][k:], rtol=1e-8)
    np.testing.assert_allclose(
        rest.state["v"]["x"], whole.state["v"]["x"][k:], rtol=1e-8
    )
    with pytest.raises(ValueError, match="`moments0` must be Adam's moments"):
        gflow.simulate(
            quadratic, None, 0.6, params0=THETA0,
            flow=gflow.flows.StableFlow(opt, moments0={"m": THETA0}),
        )  # fmt: skip


@pytest.mark.slow  # (the fast tier's 10 minutes)
def test_a_rod_restarts_from_a_discrete_runs_state_with_its_next_step():
    """A discrete run saves the optimiser's moments at its rows (optax's, after
    k steps); a rod flow restarted there, `step0` = k, starts with half of the
    step k + 1 that the optimiser takes from that state."""
    opt = optimizers.Adam(0.05)
    run = gflow.gradient_descent(
        quadratic, None, 0.5, optimizer=opt, params0=THETA0, ts=[0.0, 0.2, 0.5]
    )
    transformation, params = opt.transformation(), THETA0
    state = transformation.init(params)
    for _ in range(4):  # t = 0.2: 4 steps
        g = jax.grad(quadratic)(params, None)
        updates, state = transformation.update(g, state)
        params = jax.tree.map(jnp.add, params, updates)
    moments = jax.tree.map(lambda x: x[1], run.state)
    np.testing.assert_allclose(moments["m"]["x"], state[0].mu["x"], rtol=1e-14)
    np.testing.assert_allclose(moments["v"]["x"], state[0].nu["x"], rtol=1e-14)
    rod = gflow.simulate(
        quadratic, None, 0.1, params0=params, n_save=2,
        flow=RodFlow(opt, moments0=moments, step0=4),
    )  # fmt: skip
    updates = transformation.update(jax.grad(quadratic)(params, None), state)[0]
    np.testing.assert_allclose(rod.state["r"]["x"][0], updates["x"] / 2, rtol=1e-12)


def test_a_rod_under_a_schedule_is_its_closed_form_on_a_quadratic():
    """lr(s) = base·(1 + s/k) (linear warm-up past base): on ½ a x² the centre
    moves at −(lr(s)/base) a c and the half-vector at (lr(s) a − 2) r / base,
    with s = t / base, so log r(t) = log r0 + (a ∫ lr ds − 2 s)."""
    base, k, a = 0.1, 40.0, 8.0
    schedule = optax.linear_schedule(base, 2 * base, int(k))  # to 2·base at k

    def loss(params, data):
        return 0.5 * a * params["x"] ** 2

    opt = optimizers.GD(schedule, base_lr=base)
    t = 2.0  # s = 20 steps: still warming up
    traj = gflow.simulate(
        loss, None, t, params0={"x": jnp.asarray(1.0)}, flow=RodFlow(opt),
        n_save=5, spacing="linear", **TIGHT,
    )  # fmt: skip
    s = np.asarray(traj.ts) / base
    integral = s + s**2 / (2 * k)  # ∫ lr(s')/base ds'
    # (To the solver's atol, 1e-13, once c is down to 1e-9.)
    np.testing.assert_allclose(
        traj.params["x"], np.exp(-a * base * integral), rtol=1e-8, atol=1e-13
    )
    r0 = -base * a / 2
    expected = r0 * np.exp(a * base * integral - 2 * s)
    np.testing.assert_allclose(traj.state["r"]["x"], expected, rtol=1e-7, atol=1e-13)
