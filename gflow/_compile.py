"""Measure how long JAX spends compiling during a call.

JAX reports the duration of each tracing, lowering and XLA compilation through
`jax.monitoring`. One listener is registered when gflow is imported; it adds the
durations to whichever `CompileTimer` is active on the current thread. A call that
hits JAX's compilation cache records nothing, so `compiled` is also the
"did this call recompile?" signal the tests rely on.
"""

from __future__ import annotations

import threading
import time

import jax.monitoring

_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_active = threading.local()


def _listener(event: str, duration: float, **kwargs) -> None:
    timer = getattr(_active, "timer", None)
    if timer is not None and event in _COMPILE_EVENTS:
        # Compilation happens before the program runs, and tracing may nest eager
        # compilations inside it, so durations overlap: the compile time is the
        # time from the start of the block to the end of its last compile event.
        timer._last_compile_end = time.perf_counter()
        if event == "/jax/core/compile/backend_compile_duration":
            timer.num_compilations += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


class CompileTimer:
    """Context manager: wall time of the block, split into compiling and running.

    Attributes set on exit: `wall_time_s`, `compile_time_s` (0 when everything was
    cached), `run_time_s`, `num_compilations`.
    """

    def __enter__(self) -> CompileTimer:
        self.num_compilations = 0
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
            self._outer._last_compile_end = max(
                self._outer._last_compile_end, self._last_compile_end
            )
            self._outer.num_compilations += self.num_compilations
