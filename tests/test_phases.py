"""Phase detection and the diagnostics it rests on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quadratic_problem
from jax.flatten_util import ravel_pytree

import gflow
from gflow import metrics
from gflow.models import (
    CondensationTransformer,
    CooccurrenceTransformer,
    anchor_data,
    cooccurrence_data,
)


@pytest.fixture(scope="module")
def cooccurrence():
    model = CooccurrenceTransformer(d=64, L=5, m=128, m1=256)
    data = cooccurrence_data(jax.random.key(0), n=60, L=5, d=64)
    ts = gflow.save_times(300.0, 121, t_first=1e-3)
    return model, data, gflow.simulate(model, data, 300.0, key=1, ts=ts)


def test_phases_of_the_cooccurrence_flow(cooccurrence):
    model, data, traj = cooccurrence
    phases = gflow.detect_phases(traj, model, data)
    assert phases.found and phases.t1 is not None
    i1 = int(np.nonzero(phases.ts == phases.t1)[0][0])
    # At t1 every sample is right and the signs of G are right...
    at_t1 = jax.tree.map(lambda x: x[i1], traj.params)
    assert bool(model.is_aligned(at_t1, data))
    assert np.all(np.asarray(model.margins(at_t1, data)) > 0)
    # ...but not one save earlier: t1 is the first such time.
    before = jax.tree.map(lambda x: x[i1 - 1], traj.params)
    assert not bool(model.is_aligned(before, data))
    drift = phases.signals["attention_drift"]
    assert drift[i1] < 0.01 and drift[-1] > 5 * drift[i1]
    assert phases.labels[i1] == "phase 1" and phases.labels[i1 + 1] == "phase 2"
    assert "Phase 1 ends at t1" in phases.summary()


def test_stop_when_ends_the_flow_at_the_phase_boundary(cooccurrence):
    model, data, traj = cooccurrence
    phases = gflow.detect_phases(traj, model, data)
    stopped = gflow.simulate(
        model, data, 300.0, key=1, stop_when=model.phase_spec.alignment
    )
    assert stopped.result == "stopped_by_condition"
    assert bool(model.is_aligned(stopped.final, data))
    # The flow stops at the end of the first solver step past the boundary, which
    # the saves bracket: between the last unaligned save and t1.
    i1 = int(np.nonzero(phases.ts == phases.t1)[0][0])
    assert phases.ts[i1 - 1] < float(stopped.ts[-1]) <= phases.t1 * 1.5


def test_quadratic_has_no_phases():
    # Two groups relaxing on the same time scale: no phase of one moving alone.
    def quad(p, d):
        return 0.5 * jnp.sum((p["a"] - 1.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)

    params0 = {"a": jnp.array([0.2, -0.3, 0.5]), "b": jnp.array([0.4, 0.1])}
    traj = gflow.simulate(quad, None, 20.0, params0=params0)
    half = 0.5 * float(traj.loss[0])
    spec = gflow.PhaseSpec(
        attention=("a",), mlp=("b",), alignment=lambda p, d: quad(p, d) < half
    )
    phases = gflow.detect_phases(traj, None, None, spec=spec)
    assert not phases.found and phases.t1 is None
    assert phases.summary().startswith("No phases")
    never = gflow.PhaseSpec(attention=("a",), mlp=("b",), alignment=lambda p, d: False)
    assert "never aligned" in gflow.detect_phases(traj, None, None, spec=never).reason


def test_condensation_stages():
    model = CondensationTransformer(d_m=8, s=10, eps=1e-3)
    data = anchor_data(jax.random.key(0), n=64, d_m=8)
    ts = np.union1d(np.geomspace(1.0, 12000.0, 100), np.linspace(0, 12000.0, 241))
    traj = gflow.simulate(model, data, 12000.0, ts=ts, key=1)
    stages = gflow.detect_condensation_stages(traj)
    assert stages.found and stages.t1 < stages.t2
    rank = stages.signals["effective_rank_W_Q"]
    assert rank[0] > 6 and rank[list(stages.ts).index(stages.t2)] < 1.6
    assert set(stages.labels) == {"condensation", "rank collapse", "further training"}


def test_bad_phase_inputs(cooccurrence):
    model, data, traj = cooccurrence
    bad = gflow.PhaseSpec(
        attention=("W_Q", "W_attn"), mlp=("W",), alignment=model.is_aligned
    )
    with pytest.raises(ValueError, match=r"names parameters \['W_attn'\]"):
        gflow.detect_phases(traj, model, data, spec=bad)
    with pytest.raises(ValueError, match="at least 3 are needed"):
        gflow.detect_phases(traj[:2], model, data)
    vector = gflow.PhaseSpec(
        attention=("W_Q",), mlp=("W",), alignment=lambda p, d: model.margins(p, d) > 0
    )
    with pytest.raises(ValueError, match="one boolean per state"):
        gflow.detect_phases(traj, model, data, spec=vector)
    with pytest.raises(ValueError, match="declares no phase_spec"):
        gflow.detect_phases(traj, object(), data)
    with pytest.raises(ValueError, match="`drift_threshold` must be positive"):
        gflow.detect_phases(traj, model, data, drift_threshold=0.0)


# --- diagnostics ---------------------------------------------------------------------


def test_sharpness_on_a_quadratic():
    loss, data, params0, _ = quadratic_problem()  # eigenvalues linspace(0.2, 5, n)
    value, _ = metrics.sharpness(loss, params0, data, iters=200)
    assert abs(float(value) - 5.0) / 5.0 < 1e-4
    traj = gflow.simulate(loss, data, 1.0, params0=params0, n_save=5)
    along = metrics.sharpness_along(traj, loss, data, iters=200)
    np.testing.assert_allclose(along, 5.0, rtol=1e-4)
    assert bool(metrics.gd_is_stable(value, 0.39)) and not bool(
        metrics.gd_is_stable(value, 0.41)
    )


def test_sharpness_matches_the_dense_hessian_of_a_model():
    model = CondensationTransformer(d_m=3, s=4, eps=0.5)
    data = anchor_data(jax.random.key(1), n=16, d_m=3, s=4)
    params = model.init(jax.random.key(2))
    flat, unravel = ravel_pytree(params)
    hessian = jax.hessian(lambda x: model.loss(unravel(x), data))(flat)
    exact = float(np.linalg.eigvalsh(np.asarray(hessian))[-1])
    value, _ = metrics.sharpness(model.loss, params, data, iters=500)
    assert abs(float(value) - exact) / abs(exact) < 1e-4


def test_sharpness_when_the_largest_magnitude_is_negative():
    def saddle(p, d):
        return 0.5 * (p[0] ** 2 - 4.0 * p[1] ** 2)

    value, vector = metrics.sharpness(saddle, jnp.array([0.3, 0.2]), None, iters=100)
    assert abs(float(value) - 1.0) < 1e-6
    assert abs(abs(float(vector[0])) - 1.0) < 1e-6


def test_sharpness_along_an_equinox_model_s_trajectory():
    # An Equinox model's parameters hold non-array leaves (its activation),
    # which have no row axis: only the trained leaves are rows.
    import equinox as eqx

    model = eqx.nn.MLP(2, 1, 3, 1, activation=jnp.tanh, key=jax.random.key(0))
    data = (jnp.linspace(-1.0, 1.0, 8).reshape(4, 2), jnp.ones((4, 1)))

    def loss(m, d):
        return jnp.mean((jax.vmap(m)(d[0]) - d[1]) ** 2)

    traj = gflow.simulate(loss, data, 1.0, params0=model, n_save=3)
    along = metrics.sharpness_along(traj, loss, data, iters=30)
    rows = [traj.at(t) for t in traj.ts]  # exact at the save times
    for value, params in zip(along, rows, strict=True):
        exact, _ = metrics.sharpness(loss, params, data, iters=200)
        assert abs(float(value) - float(exact)) <= 1e-8 * abs(float(exact))


def test_sharpness_separates_close_top_eigenvalues_in_few_iterations():
    # λ_max 10 and the next 9.9: power iteration's error shrinks by 0.99² an
    # iteration (0.045 off after 10, 0.040 after 20); LOBPCG's, as a Krylov
    # method's, with the gap to the rest of the spectrum.
    h = jnp.concatenate([jnp.array([10.0, 9.9]), jnp.linspace(0.1, 5.0, 18)])

    def loss(p, d):
        return 0.5 * jnp.sum(h * p**2)

    for iters, within in ((10, 1e-5), (20, 1e-11)):
        value, _ = metrics.sharpness(loss, jnp.zeros(20), None, v0=jnp.ones(20),
                                     iters=iters)  # fmt: skip
        assert 0 <= 10.0 - float(value) < within


def test_the_sharpness_metric_is_the_dense_hessian_s_top_eigenvalue_at_every_row():
    model = CondensationTransformer(d_m=3, s=4, eps=0.5)
    data = anchor_data(jax.random.key(1), n=16, d_m=3, s=4)
    params0 = model.init(jax.random.key(2))
    unravel = ravel_pytree(params0)[1]

    @jax.jit
    @jax.vmap
    def exact(params):
        flat = ravel_pytree(params)[0]
        hessian = jax.hessian(lambda x: model.loss(unravel(x), data))(flat)
        return jnp.linalg.eigvalsh(hessian)[-1]

    sharp = {"sharpness": metrics.Sharpness(model.loss, iters=30)}
    flow = gflow.simulate(model, data, 20.0, params0=params0, n_save=9, metrics=sharp)
    np.testing.assert_allclose(flow.metrics["sharpness"], exact(flow.params), rtol=1e-6)
    # Warm-started from row to row (each member of an ensemble from its own: see
    # the next test), also in gradient descent's program.
    gd = gflow.gradient_descent(
        model, data, 20.0, params0=params0, lr=0.05, n_save=9, metrics=sharp
    )
    np.testing.assert_allclose(gd.metrics["sharpness"], exact(gd.params), rtol=1e-6)


class _RowCount(metrics.AbstractCarriedMetric):
    """The number of rows evaluated before this one (and a fixed leaf's value)."""

    def init(self, params, data):
        return jnp.zeros((), jnp.int32)

    def __call__(self, params, data, carried):
        return {"row": carried, "k": params["k"]}, carried + 1


def test_a_carried_metric_sees_each_member_s_rows_in_order():
    def loss(p, d):
        return 0.5 * jnp.sum((p["w"] - d) ** 2) * p["k"]

    params0 = {"w": jnp.array([1.0, -2.0]), "k": jnp.asarray(3)}  # k: fixed (int)
    count = {"count": _RowCount()}
    traj = gflow.simulate(loss, 0.5, 3.0, params0=params0, n_save=7, metrics=count)
    np.testing.assert_array_equal(traj.metrics["count"]["row"], np.arange(7))
    np.testing.assert_array_equal(traj.metrics["count"]["k"], 3)
    gd = gflow.gradient_descent(
        loss, 0.5, 3.0, params0=params0, lr=0.1, n_save=7, metrics=count
    )
    np.testing.assert_array_equal(gd.metrics["count"]["row"], np.arange(len(gd.ts)))
    starts = {"w": jnp.linspace(-3.0, 3.0, 40).reshape(20, 2), "k": jnp.asarray(3)}
    ens = gflow.simulate_ensemble(
        loss, 0.5, 3.0, params0=starts, n_save=7, metrics=count, lanes=4
    )
    np.testing.assert_array_equal(
        ens.metrics["count"]["row"], np.tile(np.arange(7), (20, 1))
    )


def test_carried_metrics_are_checked():
    class Incomplete(metrics.AbstractCarriedMetric):
        def init(self, params, data):
            return 0

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
    with pytest.raises(TypeError, match="`loss` must be a function"):
        metrics.Sharpness(3.0)
    with pytest.raises(ValueError, match="`iters` must be at least 1"):
        metrics.Sharpness(lambda p, d: p, iters=0)


def test_balance_groups_and_norms():
    weights = jnp.array([0.1, 0.2, 0.3, 0.3, 0.5])
    groups = jnp.array([0, 1, 1, 2, 2])
    # Σ_group1 = 0.5, Σ_group2 = 0.8: |0.5 − 0.8| / 0.5 = 0.6.
    assert abs(float(metrics.gradient_balance(weights, groups, 1, 2)) - 0.6) < 1e-12
    np.testing.assert_allclose(
        metrics.group_means(weights, groups, 3), [0.1, 0.25, 0.4]
    )
    norms = metrics.norms_by_key({"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.ones(4)}})
    assert float(norms["a"]) == 5.0 and float(norms["b"]) == 2.0

    def loss(p, d):  # ∂/∂a = a, ∂/∂b = 2 b
        return 0.5 * jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)

    grads = metrics.grad_norms_by_key(loss)(
        {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}, None
    )
    assert float(grads["a"]) == 5.0 and float(grads["b"]) == 2.0
    assert (
        abs(
            float(metrics.cosine(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0])))
            - 2**-0.5
        )
        < 1e-12
    )
    assert float(metrics.drift(jnp.array([1.0, 1.5, 0.2]))) == 0.8
