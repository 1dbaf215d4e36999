"""Trajectory: interpolation, slicing, save/load."""

import collections

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quadratic_problem, tree_max_abs_diff

import gflow


@pytest.fixture(scope="module")
def quadratic():
    loss, data, params0, exact = quadratic_problem()
    traj = gflow.simulate(
        loss,
        data,
        3.0,
        params0=params0,
        rtol=1e-10,
        atol=1e-12,
        spacing="linear",
        n_save=61,
        metrics={"loss_again": loss},
    )
    return traj, exact


def test_at_is_exact_at_save_times_and_accurate_between(quadratic):
    traj, exact = quadratic
    assert (
        tree_max_abs_diff(
            traj.at(traj.ts[7]), jax.tree.map(lambda x: x[7], traj.params)
        )
        < 1e-14
    )
    # Cubic Hermite: error <= h^4 max|θ''''| / 384, with |θ''''| <= λ_max^4 |θ0 − θ*|
    # = 5^4 * 2.2 here, so below 2.3e-5 for the gap h = 0.05 between saves.
    times = (0.01, 0.777, 1.2345, 2.999)
    errors = [tree_max_abs_diff(traj.at(t), exact(t)) for t in times]
    assert max(errors) < 2.3e-5
    # Fourth order: doubling the gap multiplies the error by about 16 once the fast
    # modes have decayed (near t = 0 the fourth derivative changes within a gap).
    coarse = traj[::2]
    coarse_errors = [tree_max_abs_diff(coarse.at(t), exact(t)) for t in times]
    assert all(c > e for c, e in zip(coarse_errors, errors, strict=True))
    assert coarse_errors[2] > 12 * errors[2]
    # Vectorised: a leading axis for the times.
    many = traj.at(jnp.array([0.3, 1.1, 2.2]))
    assert many["layer"]["w"].shape == (3, 2, 2)
    assert tree_max_abs_diff(jax.tree.map(lambda x: x[1], many), traj.at(1.1)) < 1e-14


def test_at_under_jit(quadratic):
    traj, _ = quadratic
    jitted = eqx.filter_jit(lambda tr, t: tr.at(t))
    assert tree_max_abs_diff(jitted(traj, 1.5), traj.at(1.5)) < 1e-14


def test_slicing(quadratic):
    traj, _ = quadratic
    tail = traj[10:]
    assert len(tail) == len(traj) - 10
    assert tail.ts[0] == traj.ts[10]
    assert tail.metrics["loss_again"].shape == tail.loss.shape
    assert tree_max_abs_diff(tail.final, traj.final) == 0.0


def test_final_and_summary(quadratic):
    traj, _ = quadratic
    assert (
        tree_max_abs_diff(traj.final, jax.tree.map(lambda x: x[-1], traj.params)) == 0
    )
    text = traj.summary()
    assert (
        "successful" in text and "AutoTsit5" in text and "gradient evaluations" in text
    )
    assert repr(traj).startswith("<Trajectory")


def test_save_load_round_trip(quadratic, tmp_path):
    traj, _ = quadratic
    path = tmp_path / "run.npz"
    traj.save(path)
    back = gflow.Trajectory.load(path)
    assert jax.tree.structure(back.params) == jax.tree.structure(traj.params)
    for a, b in zip(
        jax.tree.leaves(
            (
                traj.ts,
                traj.params,
                traj.velocity,
                traj.loss,
                traj.grad_norm,
                traj.metrics,
            )
        ),
        jax.tree.leaves(
            (
                back.ts,
                back.params,
                back.velocity,
                back.loss,
                back.grad_norm,
                back.metrics,
            )
        ),
        strict=True,
    ):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.result == traj.result
    assert back.stats == traj.stats
    assert back.meta == traj.meta
    assert back.meta["solver"] == "AutoTsit5" and back.meta["rtol"] == 1e-10
    assert back.meta["gflow_version"] == gflow.__version__


def test_custom_pytree_nodes_load_from_a_template(tmp_path):
    Box = collections.namedtuple("Box", ["x"])
    box = Box(x=jnp.ones(2))

    def loss(params, data):
        return jnp.sum(params.x**2)

    traj = gflow.simulate(loss, None, 1.0, params0=box, n_save=3)
    traj.save(tmp_path / "box.npz")
    # Only the leaves are stored: the structure has to come from a template.
    with pytest.raises(ValueError, match="like="):
        gflow.Trajectory.load(tmp_path / "box.npz")
    back = gflow.Trajectory.load(tmp_path / "box.npz", like=box)
    assert isinstance(back.params, Box)
    np.testing.assert_array_equal(back.params.x, traj.params.x)


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.ones(2))
    with pytest.raises(ValueError, match="not a gflow trajectory"):
        gflow.Trajectory.load(path)
