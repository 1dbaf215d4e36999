"""gflow.metrics against exact values."""

import jax
import jax.numpy as jnp
import numpy as np

from gflow import metrics


def test_effective_rank():
    assert abs(float(metrics.effective_rank(jnp.eye(5))) - 5.0) < 1e-12
    rank_one = jnp.outer(jnp.arange(1.0, 4.0), jnp.array([1.0, -1.0, 2.0, 0.5]))
    assert abs(float(metrics.effective_rank(rank_one)) - 1.0) < 1e-12
    # Two equal singular values and zeros: exactly 2.
    two = jnp.diag(jnp.array([3.0, 3.0, 0.0]))
    assert abs(float(metrics.effective_rank(two)) - 2.0) < 1e-12
    # Entropy of p = (0.75, 0.25).
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    value = metrics.effective_rank(jnp.diag(jnp.array([3.0, 1.0])))
    assert abs(float(value) - expected) < 1e-12
    # Scale-invariant.
    w = jax.random.normal(jax.random.key(0), (6, 4))
    assert abs(float(metrics.effective_rank(w) - metrics.effective_rank(7 * w))) < 1e-12


def test_stable_rank():
    value = metrics.stable_rank(jnp.diag(jnp.array([2.0, 1.0])))
    assert abs(float(value) - 1.25) < 1e-12


def test_row_condensation():
    parallel = jnp.array([[1.0, 2.0], [-2.0, -4.0], [0.5, 1.0]])
    assert abs(float(metrics.row_condensation(parallel)) - 1.0) < 1e-12
    assert abs(float(metrics.row_condensation(jnp.eye(3)))) < 1e-12
    sim = metrics.row_cosine_similarity(parallel)
    np.testing.assert_allclose(sim, [[1, -1, 1], [-1, 1, -1], [1, -1, 1]], atol=1e-12)


def test_relative_drift():
    x0 = {"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}
    x = {"a": jnp.array([3.0, 1.0]), "b": jnp.array(4.0)}
    assert abs(float(metrics.relative_drift(x, x0)) - 0.2) < 1e-12


def test_moving_average_keeps_lines_and_averages_an_oscillation_out():
    ramp = np.arange(200.0)
    averaged = metrics.moving_average(ramp, 5)
    # A symmetric kernel keeps a line where it does not reach the ends.
    np.testing.assert_allclose(averaged[20:-20], ramp[20:-20], rtol=1e-12)
    # GD's period-2 oscillation about a mean: the mean, away from the ends
    # (padded with the end values).
    flipping = 3.0 + (-1.0) ** np.arange(200)
    smoothed = metrics.moving_average(flipping, 10)
    # (To the weight the kernel has where it is cut, 4 widths out: 1e-5.)
    np.testing.assert_allclose(smoothed[50:-50], 3.0, atol=2e-5)
