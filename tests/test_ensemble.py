"""simulate_ensemble, basins and grid: agreement with single runs and closed forms,
work that stops with the members, multi-device agreement, bad input."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import quadratic_problem, tree_max_abs_diff

import gflow
from gflow.models import MarkovCanonical, markov_reference_losses


def _decay_loss(params, data):
    # dθ/dt = -a θ per coordinate: θ(t) = θ0 exp(-a t), a mix of fast and slow rates.
    return 0.5 * jnp.sum(data * params["x"] ** 2)


def test_members_follow_the_closed_form_and_their_own_steps():
    rates = jnp.array([0.5, 40.0])
    x0 = jnp.array([[1.0, -2.0], [3.0, 0.5], [-0.1, 0.2]])
    ens = gflow.simulate_ensemble(
        _decay_loss, rates, 2.0, params0={"x": x0}, rtol=1e-9, atol=1e-12, n_save=11
    )
    assert ens.batch_size == 3 and ens.ts.shape == (3, 11)
    assert ens.params["x"].shape == (3, 11, 2)
    exact = x0[:, None, :] * jnp.exp(-rates * ens.ts[..., None])
    assert float(jnp.max(jnp.abs(ens.params["x"] - exact))) < 1e-8
    assert np.all(ens.result == "successful")


def test_each_member_matches_simulate():
    loss, data, params0, _ = quadratic_problem()
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), params0)
    ens = gflow.simulate_ensemble(loss, data, 3.0, params0=batch, n_save=9)
    for i in range(3):
        start = jax.tree.map(lambda x, i=i: x[i], batch)
        single = gflow.simulate(loss, data, 3.0, params0=start, n_save=9)
        member = ens.member(i)
        assert member.result == single.result == "successful"
        assert member.stats["num_steps"] == single.stats["num_steps"]
        np.testing.assert_allclose(member.ts, single.ts)
        np.testing.assert_allclose(member.loss, single.loss, rtol=1e-12)
        assert tree_max_abs_diff(member.params, single.params) < 1e-12


def _two_rate_loss(params, data):
    # Each member reads its own two rates data[i]: dx_k/dt = -rate_k x_k.
    return 0.5 * jnp.sum(data[params["i"].astype(int)] * params["x"] ** 2)


def test_finished_members_free_their_lanes():
    # 63 members with two fast rates converge fast and stop. The last one has a
    # fast and a slow rate: the fast one caps its steps (stability), the slow one
    # keeps it going for thousands of steps. Four lanes: while the slow member runs
    # in one, the others take the rest of the queue, so the lanes pay for little
    # more than the slow member's steps. (Tsit5: "auto" would take the stiff member
    # in a hundred steps.)
    rates = jnp.array([[50.0, 50.0]] * 63 + [[50.0, 0.05]])
    params0 = {"x": jnp.ones((64, 2)), "i": jnp.arange(64.0)}
    ens = gflow.simulate_ensemble(
        _two_rate_loss,
        rates,
        400.0,
        params0=params0,
        stop_at_grad_norm=1e-6,
        n_save=3,
        lanes=4,
        solver="tsit5",
    )
    steps = ens.stats["num_steps"]
    assert np.all(ens.result == "stopped_at_grad_norm")
    assert steps[-1] > 20 * steps[:-1].max()  # the slow member needs far more
    # The slow member is last in the queue: it starts once four lanes have worked
    # through the others, and then runs alone.
    iterations = ens.stats["lane_steps"] / 4
    assert iterations <= steps[-1] + steps[:-1].sum() / 4 + steps[:-1].max()
    # Without refilling, 64 lanes would run for every step of the slowest member.
    assert ens.stats["lane_steps"] < 0.1 * 64 * steps.max()
    assert ens.stats["member_steps"] == steps.sum()
    # Until the queue drained, every lane was busy.
    assert ens.stats["useful_share_until_drained"] == 1.0


@pytest.mark.parametrize("small_member", [1024, 0], ids=["gathered", "one_by_one"])
def test_members_in_both_modes_of_auto_match_simulate(small_member, monkeypatch):
    # "auto" in an ensemble steps its Tsit5 lanes and its stiff lanes apart: lanes
    # in both modes at once must each take the steps simulate takes alone. These
    # members are tiny, so their stiff lanes are served all three at once (vmapped);
    # counted as large ones, one lane at a time (not vmapped).
    monkeypatch.setattr(gflow._ensemble, "_SMALL_MEMBER", small_member)
    rates = jnp.array([[1e4, 1.0], [2.0, 1.0]] * 3)
    params0 = {"x": jnp.ones((6, 2)), "i": jnp.arange(6.0)}
    kwargs = dict(n_save=5, rtol=1e-7, atol=1e-10)
    ens = gflow.simulate_ensemble(
        _two_rate_loss, rates, 20.0, params0=params0, lanes=3, **kwargs
    )
    for i in range(6):
        start = jax.tree.map(lambda x, i=i: x[i], params0)
        single = gflow.simulate(_two_rate_loss, rates, 20.0, params0=start, **kwargs)
        member = ens.member(i)
        for count in ("num_steps", "num_grad_evals", "num_hvp_evals"):
            assert member.stats[count] == single.stats[count], (i, count)
        assert (single.stats["num_hvp_evals"] > 0) == (i % 2 == 0)  # stiff ones
        np.testing.assert_allclose(member.ts, single.ts)
        assert tree_max_abs_diff(member.params, single.params) < 1e-12


def test_float32_members_near_the_saddle_switch_to_the_stiff_method_and_finish():
    # These float32 members of the canonical Markov flow creep along e ≈ 1e-25,
    # where Tsit5's stages are tiny: the stiff direction they hand to the
    # stabilized method (k7 - k6) has a norm that underflows. It once became an
    # inf/NaN start vector, a NaN step and a NaN next step size, and the member
    # stalled until max_steps; simulate alone never switches there.
    points = np.random.default_rng(0).uniform(-2.0, 2.0, (1000, 2))[40:60]
    points = jnp.asarray(points, jnp.float32)
    ens = gflow.simulate_ensemble(
        MarkovCanonical(0.5, 0.8),
        None,
        2000.0,
        params0={"e": points[:, 0], "w": points[:, 1]},
        save="final",
    )
    assert (np.asarray(ens.result) == "successful").all()
    assert np.asarray(ens.stats["num_steps"]).max() < 5000


# Float32 starts of the canonical Markov flow that once ended "diverged" (or ran
# out of steps) at the minimum, loss at its floor and |grad| ~ 1e-7: RKC2 formed
# its error estimate from y0 - y1, a few ulps of |y| there, which no step size
# brought under rtol, and the step shrank to the resolution of t. Drawn as basin
# studies draw them: uniform(-2, 2, (1000, 2)) with default_rng(seed).
_ONCE_DIVERGED = {
    (0.5, 0.8, 0): [62, 384, 392, 591, 624, 772, 936],
    (0.3, 0.6, 2): [7, 178, 837, 866],
}


@pytest.mark.parametrize(
    "p, q, seed, solver",
    [
        (0.5, 0.8, 0, "auto"),
        # Their twins, in the slow tier (15 s each).
        pytest.param(0.3, 0.6, 2, "auto", marks=pytest.mark.slow),
        pytest.param(0.5, 0.8, 0, "rkc2", marks=pytest.mark.slow),
    ],
)
def test_converged_float32_members_never_diverge_and_match_simulate(p, q, seed, solver):
    points = np.random.default_rng(seed).uniform(-2.0, 2.0, (1000, 2))
    points = jnp.asarray(points[_ONCE_DIVERGED[p, q, seed]], jnp.float32)
    model = MarkovCanonical(p, q)
    params0 = {"e": points[:, 0], "w": points[:, 1]}
    kwargs = dict(solver=solver)
    ens = gflow.simulate_ensemble(
        model, None, 2000.0, params0=params0, save="final", **kwargs
    )
    assert (np.asarray(ens.result) == "successful").all()
    # Each ends at one of the two minima.
    floors = np.asarray(markov_reference_losses(p, q))
    assert np.all(np.abs(np.asarray(ens.loss[:, -1])[:, None] - floors).min(1) < 1e-5)
    for i in range(points.shape[0]):
        start = jax.tree.map(lambda x, i=i: x[i], params0)
        single = gflow.simulate(model, None, 2000.0, params0=start, n_save=2, **kwargs)
        member = ens.member(i)
        assert single.result == "successful"
        if solver == "rkc2":  # one method: the same steps, bit for bit
            for count in ("num_steps", "num_grad_evals", "num_hvp_evals"):
                assert member.stats[count] == single.stats[count], (i, count)
            assert tree_max_abs_diff(member.final, single.final) == 0
        else:
            # One member finishes a late switch to RKC2 with Tsit5 (compiling
            # RKC2 would cost more than it saves); the ensemble, which has it
            # compiled, switches: the same minimum, to the tolerances.
            assert tree_max_abs_diff(member.final, single.final) < 1e-5


def test_unit_vectors_of_tiny_and_huge_float32_trees_are_finite():
    from gflow._tree import tree_norm, tree_unit

    for scale in (1e-30, 1e30):
        tree = {
            "a": jnp.array([3.0, 0.0], jnp.float32) * scale,
            "b": jnp.array(4.0 * scale, jnp.float32),
        }
        unit = tree_unit(tree)
        np.testing.assert_allclose(float(tree_norm(unit)), 1.0, rtol=1e-6)
        np.testing.assert_allclose(unit["a"], [0.6, 0.0], rtol=1e-6)
    zero = tree_unit({"a": jnp.zeros(3, jnp.float32)})
    assert (np.asarray(zero["a"]) == 0).all()


def test_stopped_member_rows_repeat_its_end():
    model = MarkovCanonical(0.5, 0.8)
    params0 = {"e": jnp.array([0.1, 1.5]), "w": jnp.array([-1.0, -0.3])}
    _, bigram = markov_reference_losses(0.5, 0.8)
    ens = gflow.simulate_ensemble(
        model, None, 2000.0, params0=params0, stop_at_loss=bigram + 1e-4, n_save=41
    )
    assert np.all(ens.result == "stopped_at_loss")
    for i in range(2):
        n = ens.stats["num_saved"][i]
        assert n < 41
        np.testing.assert_allclose(ens.loss[i, n - 1], bigram + 1e-4, rtol=1e-9)
        # The rows after its end repeat its end: time and state.
        assert np.all(ens.ts[i, n - 1 :] == ens.ts[i, n - 1])
        assert np.all(ens.params["e"][i, n - 1 :] == ens.params["e"][i, n - 1])
        assert len(ens.member(i)) == n
        assert ens.stats["t_end"][i] == ens.ts[i, -1] < 2000.0


def test_keys_initialise_with_model_init():
    model = MarkovCanonical(0.5, 0.8, init_scale=0.3)
    keys = jax.random.split(jax.random.key(0), 5)
    ens = gflow.simulate_ensemble(model, None, 10.0, keys=keys, save="final")
    expected = jax.vmap(model.init)(keys)
    assert tree_max_abs_diff(jax.tree.map(lambda x: x[:, 0], ens.params), expected) == 0
    assert ens.ts.shape == (5, 2) and np.all(ens.ts[:, -1] == 10.0)


# p + q < 1 in the slow tier (20 s).
@pytest.mark.parametrize(
    "p, q", [(0.5, 0.8), pytest.param(0.2, 0.3, marks=pytest.mark.slow)]
)
def test_basins_of_the_canonical_markov_flow_match_the_separatrix(p, q):
    # A 24 x 24 grid of the (e, w) plane, p + q > 1 and < 1: each flow's limit
    # against the analytical basins of Makkuva et al.
    model = MarkovCanonical(p, q)
    axis = jnp.linspace(-2.0, 2.0, 24)
    params0 = gflow.grid({"e": axis, "w": axis})
    local, bigram = markov_reference_losses(p, q)
    ens = gflow.simulate_ensemble(
        model,
        None,
        2000.0,
        params0=params0,
        save="final",
        stop_at_loss=bigram + 1e-4,
        stop_at_grad_norm=1e-8,
    )
    # Members of two numbers run four to a lane: 576 members, 144 lanes.
    assert ens.meta["lanes"] == 24 * 24 // 4
    found = gflow.basins(ens, {"local": local, "global": bigram}, atol=1e-3)
    assert found.counts["unresolved"] == 0
    exact = np.asarray(model.reaches_global(params0["e"], params0["w"]))
    assert np.array_equal(found.mask("global"), exact)
    assert 0.05 < found.fractions["global"] < 0.95


def test_grid_is_row_major():
    params0 = gflow.grid({"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.0, 5.0, 7.0])})
    np.testing.assert_array_equal(params0["a"], [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(params0["b"], [0, 5, 7, 0, 5, 7])


def test_ensemble_save_and_load_round_trip(tmp_path):
    params0 = {"x": jnp.array([[1.0], [2.0]])}
    ens = gflow.simulate_ensemble(
        _decay_loss, jnp.array([1.0]), 1.0, params0=params0, n_save=5
    )
    ens.save(tmp_path / "ens.npz")
    back = gflow.Trajectory.load(tmp_path / "ens.npz")
    np.testing.assert_array_equal(back.result, ens.result)
    np.testing.assert_array_equal(back.stats["num_steps"], ens.stats["num_steps"])
    np.testing.assert_array_equal(back.params["x"], ens.params["x"])
    assert back.member(1).result == "successful"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(params0={"a": jnp.zeros(3), "b": jnp.zeros(4)}), "params0.*batch size"),
        (dict(params0={"a": jnp.zeros((0, 2))}), "params0.*empty"),
        (dict(params0={"a": jnp.zeros(())}), "params0.*scalar"),
        (dict(keys=jnp.zeros((3, 4), jnp.uint32)), "keys"),
        (dict(keys=jax.random.split(jax.random.key(0), 4).reshape(2, 2)), "keys"),
        (dict(params0={"a": jnp.zeros(3)}, lanes=0), "lanes"),
        (dict(params0={"a": jnp.zeros(3)}, memory_budget=100), "too small for one"),
        (dict(params0={"a": jnp.zeros(3)}, memory_budget=0), "memory_budget"),
        (dict(), "exactly one of `params0`"),
        (dict(params0={"a": jnp.zeros(3)}, save="all"), "save"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    def loss(params, data):
        return jnp.sum(jax.tree.leaves(params)[0] ** 2)

    target = MarkovCanonical(0.5, 0.8) if "keys" in kwargs else loss
    with pytest.raises(ValueError, match=match):
        gflow.simulate_ensemble(target, None, 1.0, **kwargs)


def _quartic_loss(params, data):
    # Each member reads its own sign data[i]: dx/dt = -2 s x^3, which blows up in
    # finite time (t = 1/4 from x = 1) when s = -1.
    return 0.5 * data[params["i"].astype(int)] * params["x"] ** 4


def test_failed_members_raise_or_are_reported():
    params0 = {"x": jnp.array([1.0, 1.0]), "i": jnp.array([0.0, 1.0])}
    signs = jnp.array([1.0, -1.0])
    kwargs = dict(params0=params0, max_steps=1000)
    with pytest.raises(gflow.SimulationError, match="1 of 2 members failed"):
        gflow.simulate_ensemble(_quartic_loss, signs, 10.0, **kwargs)
    ens = gflow.simulate_ensemble(_quartic_loss, signs, 10.0, throw=False, **kwargs)
    assert ens.result[0] == "successful"
    assert ens.result[1] in ("max_steps_reached", "diverged")
    # It ends at the blow-up time t = 1/4, to the solver's tolerance (rtol 1e-6).
    assert abs(ens.stats["t_end"][1] - 0.25) < 1e-6
    assert np.all(np.isfinite(ens.loss))


def test_basins_bad_input():
    loss, data, params0, _ = quadratic_problem()
    single = gflow.simulate(loss, data, 1.0, params0=params0)
    with pytest.raises(TypeError, match="ensemble"):
        gflow.basins(single, {"a": 0.0})
    batch = jax.tree.map(lambda x: x[None], params0)
    ens = gflow.simulate_ensemble(loss, data, 1.0, params0=batch, save="final")
    with pytest.raises(ValueError, match="references"):
        gflow.basins(ens, {})
    with pytest.raises(ValueError, match="no basin named"):
        gflow.basins(ens, {"a": 0.0}).mask("b")


_SHARDED = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
import gflow
assert len(jax.devices()) == 4
model = gflow.models.MarkovCanonical(0.5, 0.8)
axis = jnp.linspace(-2.0, 2.0, 9)
params0 = gflow.grid({"e": axis, "w": axis})
kwargs = dict(params0=params0, n_save=11, stop_at_grad_norm=1e-6, lanes=8)
sharded = gflow.simulate_ensemble(model, None, 500.0, **kwargs)
one = jax.devices()[:1]
single = gflow.simulate_ensemble(model, None, 500.0, devices=one, **kwargs)
assert sharded.meta["num_devices"] == 4 and single.meta["num_devices"] == 1
np.testing.assert_array_equal(sharded.result, single.result)
np.testing.assert_array_equal(sharded.stats["num_steps"], single.stats["num_steps"])
np.testing.assert_allclose(sharded.loss, single.loss, rtol=1e-12, atol=0)
np.testing.assert_allclose(sharded.params["e"], single.params["e"], rtol=1e-12)
print("AGREE", sharded.batch_size)
"""


@pytest.mark.slow
def test_sharded_across_four_devices_agrees_with_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SHARDED)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "AGREE 81" in run.stdout


_DISTRIBUTED = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax
jax.config.update("jax_enable_x64", True)
rank, port = int(sys.argv[1]), sys.argv[2]
if rank >= 0:  # one of two processes; rank -1: a process alone
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
import jax.numpy as jnp
import gflow
axis = jnp.linspace(-2.0, 2.0, 7)
ens = gflow.simulate_ensemble(gflow.models.MarkovCanonical(0.5, 0.8), None, 300.0,
                              params0=gflow.grid({"e": axis, "w": axis}), n_save=5,
                              stop_at_grad_norm=1e-6)
print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                  "loss": ens.loss.tolist(), "steps": ens.stats["num_steps"].tolist(),
                  "e": ens.params["e"].tolist(), "result": ens.result.tolist()}))
"""


@pytest.mark.slow
def test_two_processes_give_what_one_gives():
    import json
    import socket

    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)

    def start(rank):
        return subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_DISTRIBUTED), str(rank), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    workers = [start(0), start(1)]
    outputs = [w.communicate(timeout=600) for w in workers]
    alone = start(-1).communicate(timeout=600)
    results = []
    for (out, err), worker in zip(outputs + [alone], workers + [None], strict=True):
        assert worker is None or worker.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    two_a, two_b, one = results
    assert two_a["processes"] == 2 and two_a["devices"] == 4
    assert one["processes"] == 1 and one["devices"] == 2
    # Every process ends with the whole ensemble, equal to one process's.
    for key in ("steps", "result", "loss", "e"):
        assert two_a[key] == two_b[key]
    assert two_a["steps"] == one["steps"] and two_a["result"] == one["result"]
    np.testing.assert_allclose(two_a["loss"], one["loss"], rtol=1e-12, atol=0)
    # (round-off: the members run in lanes of different widths)
    np.testing.assert_allclose(two_a["e"], one["e"], rtol=1e-12, atol=1e-12)
