"""simulate(): one flow dθ/dt = -∇L(θ; data), solved by the engine under JIT."""

from __future__ import annotations

import dataclasses
from typing import Any

import equinox as eqx

from . import _checkpoint, _run
from ._assemble import assemble, finish
from ._keywords import CHECKPOINT_KEYWORDS, FLOW_KEYWORDS, takes_options
from ._prepare import build, prepare, queue
from ._progress import TextProgress
from ._trajectory import Trajectory
from .flows import AbstractFlow


@takes_options(*FLOW_KEYWORDS, "progress", *CHECKPOINT_KEYWORDS)
def simulate(
    model: Any,
    data: Any,
    t_max: float,
    *,
    params0: Any = None,
    key: Any = None,
    flow: AbstractFlow | None = None,
    noise_key: Any = None,
    **options: Any,
) -> Trajectory:
    """Solve the gradient flow `dθ/dt = -∇θ L(θ; data)` from `t = 0` to `t_max`.

    The whole solve (the adaptive time loop, the rows at the save times with their
    loss, gradient norm and metrics) is one compiled program. `data` is an argument
    of that program, never a constant inside it: calling again with new data or new
    initial parameters of the same shapes and dtypes reuses the compiled program
    (`stats["compiled"]` is then False).

    Precision follows JAX: float32 by default, float64 after
    `jax.config.update("jax_enable_x64", True)` (and float64 parameters). Relative
    tolerances below about 1e-7 need float64.

    Args:
        model: an object with `loss(params, data) -> scalar` (and `init(key) ->
            params` when `params0` is not given), or a plain function
            `loss(params, data)` together with `params0`.
        data: the data, passed to the loss unchanged (any pytree, or None).
        t_max: the final gradient-flow time (positive). Gradient descent with
            learning rate `lr` reaches time `t = k * lr` after `k` steps.
        params0: initial parameters: any pytree (an equinox Module included).
            Its floating-point array leaves flow; every other leaf (functions,
            integers, strings, integer arrays) is held fixed, and the trajectory's
            parameters keep the structure (`traj.final` of a Module is that Module).
        key: an int seed or `jax.random.key`, for `model.init` when `params0` is
            None.
        flow: what to integrate (`gflow.flows`): the gradient flow by default
            (`GradientFlow`), or a continuous model of an optimiser: `ModifiedGD`,
            `HeavyBall`, `SGD` (stochastic, with `noise_key=`), `StableFlow(opt)`
            and `RodFlow(opt)` (any of `gflow.optimizers`) or `CentralFlow`
            (gradient descent or RMSProp at the edge of stability); or a flow of
            your own (`gflow.flows.AbstractFlow`).
        noise_key: the key of a stochastic flow's Brownian path (`gflow.flows.SGD`):
            an int seed or `jax.random.key(seed)`.

    {keyword_args}

    Returns:
        A [`gflow.Trajectory`][]: `ts`, `params`, `loss`, `grad_norm`, `velocity`,
        `metrics`, `result`, `stats`, `meta`. `stats["num_grad_evals"]` counts every
        gradient the call evaluated: the solver's stages and first step, the saved
        rows and the stopping checks (None for implicit solvers, whose Newton
        iterations are not counted); `stats["num_hvp_evals"]` the Hessian-vector
        products.

    Raises:
        ValueError, TypeError: bad arguments (the message names the argument).
        SimulationError: the solve failed and `throw=True`.

    Examples:
        >>> import jax.numpy as jnp, gflow
        >>> def loss(params, data):
        ...     return 0.5 * jnp.sum((params["w"] - data) ** 2)
        >>> traj = gflow.simulate(loss, jnp.ones(3), 5.0, params0={"w": jnp.zeros(3)})
        >>> traj.final["w"]  # 1 - exp(-5)
        Array([0.993262, 0.993262, 0.993262], dtype=float32)
    """
    prepared = prepare(
        "simulate",
        model,
        data,
        t_max,
        options,
        simulate.__gflow_keywords__,
        params0=params0,
        key=key,
        flow=flow,
        noise_key=noise_key,
    )
    opts = prepared.opts
    problem, controls, n_slots = build(prepared)
    members = queue(prepared)
    meta = prepared.meta("flow")
    segments = _run.Segments()
    saving = opts.checkpointing
    if saving.folder is not None:
        call = _checkpoint.describe(
            model, opts, meta, solver=repr(opts.solver.solver), flow=meta["flow"]
        )
        stamp = _checkpoint.fingerprint(
            "simulate",
            call,
            members,
            eqx.filter(prepared.fixed, eqx.is_array),
            data,
            controls,
            # The flow's arrays (a restarted flow's moments0) beside its settings.
            eqx.filter(prepared.flow, eqx.is_array),
        )
        segments = _run.Segments(
            saving.folder, stamp, saving.every_s, saving.every_steps
        )
    if opts.progress:
        progress = TextProgress("simulate", opts.saves.t_max)
        segments = dataclasses.replace(
            segments, report=progress, compiling=progress.compiling
        )
    state, timing, stats = _run.solve(
        problem,
        controls,
        members,
        data,
        n_slots=n_slots,
        matmul_precision=opts.matmul_precision,
        segments=segments,
        single=True,
    )
    traj = assemble(
        state.out, opts, meta, timing, batched=False, fixed=prepared.fixed, stats=stats
    )
    inputs = {"params0": prepared.params0, "data": data}
    return finish(traj, "simulate", opts.throw, inputs=inputs, flow=prepared.flow)
