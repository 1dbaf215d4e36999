"""Compilation: JAX's persistent cache, and how long a call spends compiling.

Nothing here runs at `import gflow`. At its first call, gflow turns on JAX's
persistent compilation cache (`use_persistent_cache`), so that a program compiled
once is loaded from disk by the next process instead of compiled again; and the
first `CompileTimer` registers one `jax.monitoring` listener, which adds the
durations of tracing, lowering and XLA compilation to whichever `CompileTimer` is
active on the current thread. A call that hits JAX's in-memory cache records
nothing; one that loads from the persistent cache records a cache hit, so
`num_compilations` counts real compilations only (the "did this call recompile?"
signal the tests rely on).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import threading
import time
from collections.abc import Callable

import jax
import jax.monitoring

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_active = threading.local()

#: Set to "0" (or "false", "off", "no") to keep gflow from turning on JAX's
#: persistent compilation cache.
CACHE_SWITCH = "GFLOW_COMPILATION_CACHE"
#: Where the cache lives, if not in the user's cache directory.
CACHE_DIR = "GFLOW_CACHE_DIR"
#: Programs that compile faster than this are not written to the cache (JAX's own
#: default is 1 s): gflow's loops are cached, the small programs of eager JAX
#: code (the user's too, once the cache is on) are not.
MIN_COMPILE_TIME_S = 0.1
#: The names of gflow's compiled programs, as JAX reports them.
PROGRAMS = {"jit(_advance)", "jit(_descend)"}


def _duration_listener(event: str, duration: float, **kwargs) -> None:
    timer = getattr(_active, "timer", None)
    if timer is None or event not in _COMPILE_EVENTS:
        return
    # Compilation happens before the program runs, and tracing may nest eager
    # compilations inside it, so durations overlap: the compile time is the time
    # from the start of the block to the end of its last compile event.
    timer._last_compile_end = time.perf_counter()
    if event == "/jax/core/compile/backend_compile_duration":
        # A program loaded from the persistent cache reports a cache hit first.
        hit, timer._hit = timer._hit, False
        if kwargs.get("fun_name") in PROGRAMS:
            timer.num_cache_hits += hit
            timer.num_compilations += not hit
    elif timer.on_compile is not None:
        announce, timer.on_compile = timer.on_compile, None
        announce()


def _event_listener(event: str, **kwargs) -> None:
    timer = getattr(_active, "timer", None)
    if timer is not None and event == "/jax/compilation_cache/cache_hits":
        timer._hit = True


@functools.cache
def _listen() -> None:
    """Register the listeners, once per process (at the first `CompileTimer`)."""
    jax.monitoring.register_event_duration_secs_listener(_duration_listener)
    jax.monitoring.register_event_listener(_event_listener)


def cache_directory() -> pathlib.Path:
    """$GFLOW_CACHE_DIR, else $XDG_CACHE_HOME/gflow/jax, else ~/.cache/gflow/jax."""
    if os.environ.get(CACHE_DIR):
        return pathlib.Path(os.environ[CACHE_DIR])
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "gflow" / "jax"


@functools.cache
def use_persistent_cache() -> None:
    """Turn on JAX's persistent compilation cache in `cache_directory()`, once per
    process, at gflow's first call: unless it is switched off
    (`GFLOW_COMPILATION_CACHE=0`) or the user configured JAX's own cache directory
    (which then stays as it is, with JAX's own settings)."""
    switch = os.environ.get(CACHE_SWITCH, "1").strip().lower()
    if switch in ("0", "false", "off", "no") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_directory()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)


@dataclasses.dataclass
class Timing:
    """The time of a call made of several timed blocks (segments of a run): their
    compile times and counts add up; the run time is the rest of the wall time."""

    wall_time_s: float = 0.0
    compile_time_s: float = 0.0
    num_compilations: int = 0
    num_cache_hits: int = 0

    @property
    def run_time_s(self) -> float:
        return max(self.wall_time_s - self.compile_time_s, 0.0)

    def add(self, timer: CompileTimer) -> None:
        """Count a finished block in."""
        self.wall_time_s += timer.wall_time_s
        self.compile_time_s += timer.compile_time_s
        self.num_compilations += timer.num_compilations
        self.num_cache_hits += timer.num_cache_hits


class CompileTimer:
    """Context manager: wall time of the block, split into compiling and running.

    Attributes set on exit: `wall_time_s`, `compile_time_s` (0 when everything was
    in JAX's in-memory cache; the tracing and the load when a program came from the
    persistent cache), `run_time_s`, `num_compilations` (gflow's programs compiled:
    those loaded from the persistent cache are `num_cache_hits`).
    """

    def __init__(self, on_compile: Callable[[], None] | None = None):
        #: Called once, when the block's first program has been traced (its
        #: compilation is about to start): e.g. to say "compiling...".
        self.on_compile = on_compile

    def __enter__(self) -> CompileTimer:
        _listen()
        self.num_compilations = 0
        self.num_cache_hits = 0
        self._hit = False
        self._outer = getattr(_active, "timer", None)
        _active.timer = self
        self._start = self._last_compile_end = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        end = time.perf_counter()
        self.wall_time_s = end - self._start
        self.compile_time_s = self._last_compile_end - self._start
        self.run_time_s = end - self._last_compile_end
        _active.timer = self._outer
        if self._outer is not None:
            if self._last_compile_end > self._start:  # the block compiled something
                self._outer._last_compile_end = max(
                    self._outer._last_compile_end, self._last_compile_end
                )
            self._outer.num_compilations += self.num_compilations
            self._outer.num_cache_hits += self.num_cache_hits
