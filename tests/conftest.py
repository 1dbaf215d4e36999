"""Test configuration: float64 for oracle comparisons.

x64 is enabled before any test module creates arrays. Tests that exercise the
float32 default build their parameters with an explicit float32 dtype.
"""

import jax

jax.config.update("jax_enable_x64", True)
