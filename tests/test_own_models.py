"""Bring your own model: equinox Modules and Flax NNX states as parameters."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gflow


def mlp_problem(seed=0):
    mlp = eqx.nn.MLP(3, 2, 8, 1, activation=jnp.tanh, key=jax.random.key(seed))
    mlp = jax.tree.map(
        lambda x: x.astype(jnp.float64) if eqx.is_inexact_array(x) else x, mlp
    )
    x = jax.random.normal(jax.random.key(1), (16, 3))
    data = (x, jnp.sin(x[:, :2]))

    def loss(model, data):
        x, y = data
        return 0.5 * jnp.mean(jnp.sum((jax.vmap(model)(x) - y) ** 2, axis=1))

    return mlp, data, loss


def test_an_equinox_module_flows_and_stays_a_module():
    mlp, data, loss = mlp_problem()
    traj = gflow.simulate(
        loss, data, 2.0, params0=mlp, n_save=5, rtol=1e-10, atol=1e-12
    )
    assert isinstance(traj.final, eqx.nn.MLP)
    assert traj.final(jnp.ones(3)).shape == (2,)  # callable
    # The same flow as partitioning by hand: the activation is held fixed.
    trained, fixed = eqx.partition(mlp, eqx.is_inexact_array)
    by_hand = gflow.simulate(
        lambda p, d: loss(eqx.combine(p, fixed), d),
        data,
        2.0,
        params0=trained,
        n_save=5,
        rtol=1e-10,
        atol=1e-12,
    )
    for a, b in zip(
        jax.tree.leaves(eqx.filter(traj.params, eqx.is_array)),
        jax.tree.leaves(by_hand.params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert traj.final.activation is mlp.activation
    assert traj.loss[-1] < traj.loss[0]
    # Interpolation, slicing and comparison work on the module too.
    assert isinstance(traj.at(1.0), eqx.nn.MLP)
    assert gflow.compare(traj, by_hand).max_param_distance == 0.0


def test_a_new_call_with_the_same_module_does_not_recompile():
    mlp, data, loss = mlp_problem()
    gflow.simulate(loss, data, 1.0, params0=mlp, n_save=3)
    other, _, _ = mlp_problem(seed=2)
    again = gflow.simulate(loss, data, 1.0, params0=other, n_save=3)
    assert not again.stats["compiled"]


def test_gradient_descent_metrics_and_ensembles_of_modules():
    mlp, data, loss = mlp_problem()
    gd = gflow.gradient_descent(loss, data, 1.0, 0.1, params0=mlp, n_save=3)
    assert isinstance(gd.final, eqx.nn.MLP) and gd.stats["num_steps"] == 10

    def output_norm(model, data):
        return jnp.linalg.norm(jax.vmap(model)(data[0]))

    traj = gflow.simulate(
        loss, data, 1.0, params0=mlp, n_save=3, metrics={"norm": output_norm}
    )
    np.testing.assert_allclose(
        traj.metrics["norm"][-1], output_norm(traj.final, data), rtol=1e-12
    )

    class Model(eqx.Module):  # keys -> model.init returning a Module
        def init(self, key):
            return eqx.nn.MLP(3, 2, 8, 1, activation=jnp.tanh, key=key)

        def loss(self, model, data):
            return loss(model, data)

    keys = jax.random.split(jax.random.key(0), 3)
    ens = gflow.simulate_ensemble(Model(), data, 1.0, keys=keys, save="final")
    assert isinstance(ens.final, eqx.nn.MLP)
    member = ens.member(1)
    single = gflow.simulate(
        Model(), data, 1.0, params0=Model().init(keys[1]), n_save=2, spacing="linear"
    )
    np.testing.assert_allclose(member.loss, single.loss, rtol=1e-12)
    assert isinstance(member.final, eqx.nn.MLP)


def test_save_and_load_a_module_trajectory_with_a_template(tmp_path):
    mlp, data, loss = mlp_problem()
    traj = gflow.simulate(loss, data, 1.0, params0=mlp, n_save=4)
    traj.save(tmp_path / "mlp.npz")
    with pytest.raises(ValueError, match="like=model"):
        gflow.Trajectory.load(tmp_path / "mlp.npz")
    back = gflow.Trajectory.load(tmp_path / "mlp.npz", like=mlp)
    assert isinstance(back.final, eqx.nn.MLP)
    np.testing.assert_array_equal(
        back.final.layers[0].weight, traj.final.layers[0].weight
    )
    wrong = eqx.nn.MLP(3, 2, 4, 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="not the structure"):
        gflow.Trajectory.load(tmp_path / "mlp.npz", like=wrong)


def test_a_flax_nnx_model_by_its_state():
    nnx = pytest.importorskip("flax.nnx", reason="flax is a test extra")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 8, rngs=rngs)
            self.out = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    # The recipe: split the module into its graph and its state (a pytree of
    # arrays), let the state flow, merge to evaluate.
    graph, state = nnx.split(Net(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (16, 3))
    data = (x, jnp.sin(x[:, :2]))

    def loss(state, data):
        model = nnx.merge(graph, state)
        return 0.5 * jnp.mean(jnp.sum((model(data[0]) - data[1]) ** 2, axis=1))

    traj = gflow.simulate(loss, data, 2.0, params0=state, n_save=5)
    trained = nnx.merge(graph, traj.final)
    assert trained(jnp.ones(3)).shape == (2,)
    np.testing.assert_allclose(loss(traj.final, data), traj.loss[-1], rtol=1e-6)
    assert traj.loss[-1] < traj.loss[0]


_DATA_SHARDED = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import gflow
k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(k1, (256, 8))
data = (x, jnp.sin(x @ jnp.linspace(-1.0, 1.0, 8)))
params0 = {"w1": jax.random.normal(k2, (8, 32)) / 3,
           "w2": jax.random.normal(k3, (32,)) / 6}
def loss(p, data):
    x, y = data
    return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
mesh = Mesh(np.array(jax.devices()), ("examples",))
sharded = jax.device_put(data, NamedSharding(mesh, PartitionSpec("examples")))
assert len(sharded[0].sharding.device_set) == 4
one = gflow.simulate(loss, data, 50.0, params0=params0, n_save=11)
four = gflow.simulate(loss, sharded, 50.0, params0=params0, n_save=11)
gap = max(float(np.max(np.abs(one.params[k] - four.params[k]))) for k in one.params)
print(json.dumps({"gap": gap, "steps": [int(one.stats["num_steps"]),
                                        int(four.stats["num_steps"])],
                  "loss": [float(one.loss[-1]), float(four.loss[-1])]}))
"""


def test_data_sharded_over_four_devices_gives_the_same_flow():
    import json
    import os
    import subprocess
    import sys
    import textwrap

    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_DATA_SHARDED)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    # Only the order of the sums over examples differs: round-off.
    assert out["steps"][0] == out["steps"][1]
    assert out["gap"] < 1e-12
    np.testing.assert_allclose(*out["loss"], rtol=1e-12)
