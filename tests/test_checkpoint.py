"""Checkpointed runs: cut into segments, killed and resumed, bit for bit the same."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gflow

# A flow with a few thousand steps: an MLP on random data, float64.
_PROBLEM = """
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
import gflow

def problem():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (64, 8))
    y = jnp.sin(x @ jnp.linspace(-1.0, 1.0, 8))
    params0 = {"w1": jax.random.normal(k2, (8, 32)) / 3,
               "w2": jax.random.normal(k3, (32,)) / 6}

    def loss(p, data):
        x, y = data
        return 0.5 * jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)

    return loss, (x, y), params0

KWARGS = dict(n_save=40, solver="tsit5", rtol=1e-9, atol=1e-11, max_steps=10**6)
T_MAX = 3000.0
"""
namespace: dict = {"__name__": "__main__"}  # as in the worker process
exec(textwrap.dedent(_PROBLEM), namespace)
problem, KWARGS, T_MAX = namespace["problem"], namespace["KWARGS"], namespace["T_MAX"]

_WORKER = (
    _PROBLEM
    + """
import signal, sys
# Ctrl-C raises KeyboardInterrupt, as in a terminal, even when the test runner was
# started in the background (which makes its children ignore SIGINT).
signal.signal(signal.SIGINT, signal.default_int_handler)
loss, data, params0 = problem()
# Short segments: the run (0.3 s uncut) lasts seconds, so a kill lands mid-run.
gflow.simulate(loss, data, T_MAX, params0=params0, checkpoint=sys.argv[1],
               checkpoint_steps=5, **KWARGS)
"""
)


def assert_identical(a, b):
    np.testing.assert_array_equal(a.ts, b.ts)
    np.testing.assert_array_equal(a.loss, b.loss)
    for name in ("w1", "w2"):
        np.testing.assert_array_equal(a.params[name], b.params[name])
    for key in ("num_steps", "num_accepted_steps", "num_grad_evals"):
        assert a.stats[key] == b.stats[key], key


def start_worker(folder):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_WORKER), str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_checkpoint(worker, folder, timeout=300):
    path = folder / "checkpoint.npz"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert worker.poll() is None, worker.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.05)


def checkpointed(loss, data, params0, folder, steps):
    """The test flow, checkpointed to `folder` every `steps` loop iterations."""
    return gflow.simulate(
        loss,
        data,
        T_MAX,
        params0=params0,
        checkpoint=folder,
        checkpoint_steps=steps,
        **KWARGS,
    )


def test_segments_give_the_uncut_run_bit_for_bit(tmp_path):
    loss, data, params0 = problem()
    whole = gflow.simulate(loss, data, T_MAX, params0=params0, **KWARGS)
    cut = checkpointed(loss, data, params0, tmp_path, 100)
    assert_identical(whole, cut)
    # A checkpoint after every 100 loop iterations (a step each).
    assert cut.stats["checkpoint_writes"] == -(-whole.stats["num_steps"] // 100)
    assert not cut.stats["resumed"] and "resumed" not in whole.stats
    # Finished: a second call returns the result from the checkpoint at once.
    again = checkpointed(loss, data, params0, tmp_path, 100)
    assert again.stats["resumed"] and again.stats["checkpoint_writes"] == 0
    assert not again.stats["compiled"]
    assert_identical(whole, again)


@pytest.mark.parametrize("optimizer", [None, optax.sgd(0.05, momentum=0.9)])
def test_gradient_descent_in_segments_is_the_uncut_descent(tmp_path, optimizer):
    loss, data, params0 = problem()
    kwargs = dict(params0=params0, optimizer=optimizer, n_save=30)
    whole = gflow.gradient_descent(loss, data, 200.0, 0.05, **kwargs)
    cut = gflow.gradient_descent(
        loss, data, 200.0, 0.05, checkpoint=tmp_path, checkpoint_steps=300, **kwargs
    )
    assert_identical(whole, cut)
    # A checkpoint after every 300 steps, and one after the final row.
    assert cut.stats["checkpoint_writes"] == 4000 // 300 + 1
    again = gflow.gradient_descent(
        loss, data, 200.0, 0.05, checkpoint=tmp_path, checkpoint_steps=300, **kwargs
    )
    assert again.stats["resumed"] and again.stats["checkpoint_writes"] == 0
    assert_identical(whole, again)


def test_a_killed_run_resumes_to_the_same_result(tmp_path):
    loss, data, params0 = problem()
    worker = start_worker(tmp_path)
    wait_for_checkpoint(worker, tmp_path)
    time.sleep(random.uniform(0.0, 0.5))  # a random moment of the run
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    assert worker.returncode == -signal.SIGKILL
    resumed = checkpointed(loss, data, params0, tmp_path, 25)
    # It was killed mid-run: the resumed call had segments left to run.
    assert resumed.stats["resumed"] and resumed.stats["checkpoint_writes"] > 0
    whole = gflow.simulate(loss, data, T_MAX, params0=params0, **KWARGS)
    assert_identical(whole, resumed)


def test_ctrl_c_leaves_the_last_checkpoint(tmp_path):
    worker = start_worker(tmp_path)
    wait_for_checkpoint(worker, tmp_path)
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode != 0 and "KeyboardInterrupt" in err
    loss, data, params0 = problem()
    resumed = checkpointed(loss, data, params0, tmp_path, 25)
    assert resumed.stats["resumed"] and resumed.succeeded


def test_a_checkpoint_of_another_call_is_refused(tmp_path):
    loss, data, params0 = problem()
    short = dict(KWARGS, max_steps=10**5)
    gflow.simulate(loss, data, 5.0, params0=params0, checkpoint=tmp_path, **short)
    with pytest.raises(ValueError, match="written by a different call"):
        gflow.simulate(loss, data, 6.0, params0=params0, checkpoint=tmp_path, **short)
    other = dict(params0, w2=params0["w2"] + 1e-12)
    with pytest.raises(ValueError, match="written by a different call"):
        gflow.simulate(loss, data, 5.0, params0=other, checkpoint=tmp_path, **short)
    with pytest.raises(ValueError, match="written by a different call"):
        gflow.simulate(
            loss,
            (data[0], data[1] * 2),
            5.0,
            params0=params0,
            checkpoint=tmp_path,
            **short,
        )

    # A flow restarted from other moments is another call too.
    def restarted(nu):
        opt = gflow.optimizers.RMSProp(0.01)
        moments = {"nu": jax.tree.map(lambda p: jnp.full_like(p, nu), params0)}
        flow = gflow.flows.StableFlow(opt, moments0=moments)
        return gflow.simulate(
            loss, data, 0.5, params0=params0, checkpoint=tmp_path / "nu", flow=flow
        )

    restarted(1.0)
    with pytest.raises(ValueError, match="written by a different call"):
        restarted(2.0)


def test_a_damaged_checkpoint_is_refused(tmp_path):
    loss, data, params0 = problem()
    short = dict(KWARGS, max_steps=10**5)
    gflow.simulate(loss, data, 5.0, params0=params0, checkpoint=tmp_path, **short)
    path = tmp_path / "checkpoint.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged or incomplete.*to start over"):
        gflow.simulate(loss, data, 5.0, params0=params0, checkpoint=tmp_path, **short)


def test_checkpoint_bad_input(tmp_path):
    loss = lambda p, d: jnp.sum(p**2)  # noqa: E731
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a directory")
    with pytest.raises(ValueError, match="is a file"):
        gflow.simulate(loss, None, 1.0, params0=jnp.ones(2), checkpoint=a_file)
    with pytest.raises(ValueError, match="cannot be written to"):
        gflow.simulate(
            loss, None, 1.0, params0=jnp.ones(2), checkpoint=a_file / "below"
        )
    with pytest.raises(ValueError, match="checkpoint_every"):
        gflow.simulate(
            loss,
            None,
            1.0,
            params0=jnp.ones(2),
            checkpoint=tmp_path,
            checkpoint_every=0,
        )
    with pytest.raises(ValueError, match="checkpoint_steps"):
        gflow.simulate(
            loss,
            None,
            1.0,
            params0=jnp.ones(2),
            checkpoint=tmp_path,
            checkpoint_steps=0,
        )
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="cannot be written to"):
            gflow.simulate(loss, None, 1.0, params0=jnp.ones(2), checkpoint=locked)


def test_segments_that_compile_nothing_count_as_run_time(tmp_path):
    loss, data, params0 = problem()
    kwargs = dict(KWARGS, max_steps=10**5, checkpoint_steps=20)
    gflow.simulate(
        loss, data, 20.0, params0=params0, checkpoint=tmp_path / "a", **kwargs
    )
    # The same program again: every segment runs, none compiles.
    warm = gflow.simulate(
        loss, data, 20.0, params0=params0, checkpoint=tmp_path / "b", **kwargs
    )
    assert warm.stats["checkpoint_writes"] > 1 and not warm.stats["compiled"]
    assert warm.stats["compile_time_s"] == 0.0
    assert warm.stats["run_time_s"] == warm.stats["wall_time_s"]
