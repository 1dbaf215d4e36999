"""Test configuration: float64 for oracle comparisons.

x64 is enabled before any test module creates arrays. Tests that exercise the
float32 default build their parameters with an explicit float32 dtype.
"""

import os

# Tests compile from scratch (and can then assert what compiled): gflow's persistent
# compilation cache is tested on its own, in a fresh process with its own folder.
os.environ["GFLOW_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. XLA's CPU backend maps
    every loaded executable into memory; a whole suite's worth of programs in one
    process nears the kernel's limit on memory maps (vm.max_map_count), where XLA
    aborts."""
    yield
    jax.clear_caches()
