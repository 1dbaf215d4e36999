"""The coefficients of gflow's fourth-order stabilized method ("rock4"), derived here.

Run `python -m gflow._solvers._rock4_tables` to regenerate `gflow/_solvers/rock4.npz`
(a few minutes); `tests/test_stiff.py` recomputes some degrees and checks every
stored method's order conditions.

The construction follows the idea of Abdulle's ROCK4 (2002): an s-stage method
whose stability polynomial is R(z) = P(z) w(z), with

* P of degree m = s - 4, a member of the family of polynomials orthogonal on [-l, 0]
  for the weight w(z)² / sqrt(-z (l + z)), normalised to P(0) = 1. Its three-term
  recurrence gives the first m stages, which stay bounded on [-l, 0] (internal
  stability);
* w of degree 4 with w(0) = 1, taken by a 4-stage finishing procedure.

The coefficients are our own: w is the fixed point w = [e^z / P(z)]₄ (the Taylor
polynomial of degree 4), so that R(z) = e^z + O(z⁵) whatever l, found by Newton's
method; P is normalised just outside the interval where it oscillates, which damps
it as RKC's damping does, and l is the longest interval on which |R| ≤ 1, and
|R| ≤ 0.9 away from 0 (by bisection; about 0.35 s², as for ROCK4); the recurrence
coefficients come from a discretised Stieltjes procedure on s + 16 Gauss-Chebyshev
nodes, exact for these polynomial weights. The finishing procedure's ten
coefficients solve the four conditions that its stability polynomial is w and the
four nonlinear conditions of order 4 of the whole method: of that family of
solutions, the one nearest classical RK4's coefficients. The embedded method of
order 3 that estimates the error uses the finishing stages and the field at the
step's end (its weights, of minimum norm, solve the four conditions of order 3).
That last stage makes the estimate see stiff components the method does not damp:
their error grows like h·λ there, so the step control resolves stiff transients
instead of carrying them.
"""

from __future__ import annotations

import pathlib
from math import factorial

import numpy as np

PATH = pathlib.Path(__file__).with_name("rock4.npz")
#: The damping of the orthogonal polynomial (as RKC's 2/13): inside the stability
#: interval |R| stays below about 1 / cosh(sqrt(2 damping)), so stiff components that
#: the flow's nonlinearity excites decay instead of oscillating.
DAMPING = 0.15
#: Beyond z = 2 log(BOUND) (where e^z < BOUND²), |R| must stay below BOUND: the stiff
#: modes at the far end of the interval, where a step's stage count puts the
#: stiffest, are damped too.
BOUND = 0.9
#: The stage counts: every one up to 60, then coarser (a step may take a few more
#: stages than it needs).
DEGREES = np.concatenate(
    [np.arange(5, 60), np.arange(60, 200, 5), np.arange(200, 601, 20)]
)


def _z(x, l, w0):
    """The map from x (Chebyshev variable) to z: x = w0 at z = 0, x = -1 at z = -l."""
    return l * (x - w0) / (1 + w0)


def _recurrence(w, l, w0, n):
    """Monic orthogonal polynomials for the weight w(z)² / sqrt(1 - x²), x in [-1, 1]:
    their recurrence coefficients a_j, b_j, j < n."""
    count = n + 16
    k = np.arange(1, count + 1)
    x = np.cos((2 * k - 1) * np.pi / (2 * count))
    weight = np.polyval(w[::-1], _z(x, l, w0)) ** 2
    a, b = np.zeros(n), np.zeros(n)
    previous, current = np.zeros(count), np.ones(count)
    norm_previous, norm = 1.0, np.sum(weight)
    for j in range(n):
        a[j] = np.sum(weight * x * current**2) / norm
        b[j] = norm / norm_previous if j else 0.0
        following = (x - a[j]) * current - b[j] * previous
        scale = np.max(np.abs(following))  # rescaled: the products never overflow
        previous, current = current / scale, following / scale
        norm_previous, norm = norm / scale**2, np.sum(weight * current**2)
    return a, b


def _stages(a, b, l, w0, m):
    """The recurrence Y_{j+1} = nu_j Y_j + kappa_j Y_{j-1} + mu_j h f(Y_j) that
    realises P_j(z) = pi_j(x(z)) / pi_j(w0), for j < m; and the Taylor coefficients
    of P_m at 0 up to degree 4."""
    at_one = [1.0, w0 - a[0]]
    for j in range(1, m):
        at_one.append((w0 - a[j]) * at_one[j] - b[j] * at_one[j - 1])
    slope = (1 + w0) / l  # dx/dz
    mu = np.array([slope * at_one[j] / at_one[j + 1] for j in range(m)])
    nu = np.array([(w0 - a[j]) * at_one[j] / at_one[j + 1] for j in range(m)])
    kappa = np.array(
        [-b[j] * at_one[j - 1] / at_one[j + 1] if j else 0.0 for j in range(m)]
    )
    taylor_previous, taylor = np.zeros(5), np.eye(5)[0]
    for j in range(m):
        shifted = np.concatenate([[0.0], taylor[:4]])
        taylor_previous, taylor = (
            taylor,
            nu[j] * taylor + kappa[j] * taylor_previous + mu[j] * shifted,
        )
    return mu, nu, kappa, taylor


def _exp_over(p):
    """The Taylor coefficients up to degree 4 of e^z / P(z)."""
    q = np.zeros(5)
    for k in range(5):
        q[k] = 1.0 / factorial(k) - sum(p[i] * q[k - i] for i in range(1, k + 1))
    return q


#: The latest fixed point: Newton starts there (w varies slowly with s and l).
_LAST = {"w": np.array([1.0, 1.0, 1 / 2, 1 / 6, 1 / 24])}  # RK4's polynomial


def _polynomial(s, l, damping=None):
    """The fixed point w = [e^z / P]_4 for degree s on [-l, 0], and P's recurrence.
    P is normalised at w0 = 1 + damping / m² (m = s - 4), just outside [-1, 1] where
    it oscillates, which shrinks its oscillations as RKC's damping does. Solved by
    Newton's method on w's four free coefficients (plain iteration can cycle)."""
    m = s - 4
    w0 = 1.0 + (DAMPING if damping is None else damping) / m**2

    def image(w):
        mu, nu, kappa, taylor = _stages(*_recurrence(w, l, w0, m + 1), l, w0, m)
        return _exp_over(taylor), (mu, nu, kappa)

    w = _LAST["w"].copy()
    for _ in range(100):
        new, recurrence = image(w)
        gap = new[1:] - w[1:]
        if np.max(np.abs(gap) / np.abs(new[1:])) < 1e-12:
            _LAST["w"] = new
            return new, *recurrence
        jacobian = np.zeros((4, 4))
        for i in range(4):
            d = np.zeros(5)
            d[i + 1] = 1e-7 * max(abs(w[i + 1]), 1e-3)
            jacobian[:, i] = ((image(w + d)[0] - (w + d)) - (new - w))[1:] / d[i + 1]
        w = w.copy()
        w[1:] -= np.linalg.solve(jacobian, gap)
    raise RuntimeError(f"no fixed point for s = {s}, l = {l}")


def _stage_values(z, mu, nu, kappa):
    """P_0(z), ..., P_m(z) on a grid (rows: stages)."""
    values = [np.ones_like(z)]
    previous = np.zeros_like(z)
    for j in range(len(mu)):
        previous, current = (
            values[-1],
            (nu[j] * values[-1] + kappa[j] * previous + mu[j] * z * values[-1]),
        )
        values.append(current)
    return np.array(values)


def _stable(s, l, points=4000):
    """Whether |R| <= 1 on [-l, 0] and <= BOUND beyond 2 log(BOUND) (and the
    largest |P_j| there). No fixed point counts as unstable."""
    last = _LAST["w"]
    try:
        w, mu, nu, kappa = _polynomial(s, l)
    except RuntimeError:
        _LAST["w"] = last
        return False, np.inf
    z = -l * (1 - np.cos(np.linspace(0, np.pi, points))) / 2  # dense near the ends
    stages = _stage_values(z, mu, nu, kappa)
    r = np.abs(stages[-1] * np.polyval(w[::-1], z))
    far = z < 2 * np.log(BOUND)
    stable = r.max() <= 1.0 + 1e-12 and r[far].max() <= BOUND
    if not stable:  # Newton continues from stable polynomials only
        _LAST["w"] = last
    return stable, np.max(np.abs(stages))


def _longest_interval(s, guess):
    lo, hi = 0.5 * guess, guess
    while _stable(s, hi)[0]:
        lo, hi = hi, 1.2 * hi
    for _ in range(24):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _stable(s, mid)[0] else (lo, mid)
    return lo


def _tableau(mu, nu, kappa, finish):
    """The whole method's Butcher tableau (A, b): the m recurrence stages Y_0..Y_{m-1},
    then the finishing stages U_1 = Y_m, U_2, U_3, U_4."""
    m = len(mu)
    s = m + 4
    rows = [np.zeros(s)]
    for j in range(m):
        row = nu[j] * rows[j] + (kappa[j] * rows[j - 1] if j else 0.0)
        row[j] += mu[j]
        rows.append(row)
    a21, a31, a32, a41, a42, a43, b1, b2, b3, b4 = finish
    base = rows[m]
    A = np.zeros((s, s))
    A[:m] = rows[:m]
    A[m:] = base
    A[m + 1, m] += a21
    A[m + 2, m : m + 2] += (a31, a32)
    A[m + 3, m : m + 3] += (a41, a42, a43)
    b = base.copy()
    b[m:] += (b1, b2, b3, b4)
    return A, b


def order_conditions(A, b):
    """The residuals of the 8 conditions of order 4 (Butcher trees up to order 4)."""
    c = A.sum(1)
    return np.array(
        [
            b.sum() - 1,
            b @ c - 1 / 2,
            b @ c**2 - 1 / 3,
            b @ A @ c - 1 / 6,
            b @ c**3 - 1 / 4,
            b @ (c * (A @ c)) - 1 / 8,
            b @ A @ c**2 - 1 / 12,
            b @ A @ A @ c - 1 / 24,
        ]
    )


def _finishing_polynomial(finish):
    a21, a31, a32, a41, a42, a43, b1, b2, b3, b4 = finish
    c2, c3, c4 = a21, a31 + a32, a41 + a42 + a43
    return np.array(
        [
            b1 + b2 + b3 + b4,
            b2 * c2 + b3 * c3 + b4 * c4,
            b3 * a32 * c2 + b4 * (a42 * c2 + a43 * c3),
            b4 * a43 * a32 * a21,
        ]
    )


#: Classical RK4's finishing coefficients (a21, a31, a32, a41, a42, a43, b1..b4):
#: of the finishing procedures that solve the conditions, we take the nearest.
_RK4 = np.array([0.5, 0, 0.5, 0, 0, 1, 1 / 6, 1 / 3, 1 / 3, 1 / 6])


def _finishing(mu, nu, kappa, w, start=_RK4):
    """The finishing procedure's ten coefficients: eight conditions leave a family
    of solutions; the one nearest classical RK4's, by minimum-distance Newton
    steps (x <- RK4 + J⁺ (J (x - RK4) - F(x))) from `start` (a neighbouring
    degree's solution: they converge from near it). The solution does not depend on
    the start."""

    def residual(x):
        conditions = order_conditions(*_tableau(mu, nu, kappa, x))
        matched = _finishing_polynomial(x) - w[1:]
        return np.concatenate([matched, conditions[[2, 4, 5, 6]]])

    x = np.array(start, float)
    for _ in range(100):
        r = residual(x)
        jacobian = np.stack(
            [(residual(x + d) - residual(x - d)) / 2e-7 for d in 1e-7 * np.eye(10)], 1
        )
        new = _RK4 + np.linalg.pinv(jacobian) @ (jacobian @ (x - _RK4) - r)
        # (the steps along the family settle to the Jacobian's round-off, ~1e-9)
        if np.max(np.abs(r)) < 1e-14 and np.max(np.abs(new - x)) < 1e-8:
            return x
        x = new
    raise RuntimeError(f"the finishing procedure did not converge: residual {r}")


def embedded_weights(A, b):
    """Weights of order 3 on (U_1, ..., U_4, y_1), the last stage being the field at
    the step's end, added to U_1's: of minimum norm."""
    s = len(b)
    m = s - 4
    # The tableau extended by the field at y_1 (its row is b, its time 1).
    A_ext = np.zeros((s + 1, s + 1))
    A_ext[:s, :s] = A
    A_ext[s, :s] = b
    c = A_ext.sum(1)
    columns = np.zeros((s + 1, 5))
    columns[m:, :] = np.eye(5)
    tests = [np.ones(s + 1), c, c**2, A_ext @ c]
    base = np.append(A[m], 0.0)
    matrix = np.array([v @ columns for v in tests])
    rhs = np.array(
        [t - base @ v for v, t in zip(tests, (1, 1 / 2, 1 / 3, 1 / 6), strict=True)]
    )
    return np.linalg.lstsq(matrix, rhs, rcond=None)[0]


def make(degrees=DEGREES) -> dict[str, np.ndarray]:
    """Every degree's method, as ragged arrays (`offset` indexes the recurrence)."""
    lengths, finishes, embedded, mus, nus, kappas, growth = [], [], [], [], [], [], []
    finish = _RK4
    for s in degrees:
        l = _longest_interval(int(s), 0.35 * s * s)
        w, mu, nu, kappa = _polynomial(int(s), l)
        finish = _finishing(mu, nu, kappa, w, finish)
        A, b = _tableau(mu, nu, kappa, finish)
        assert np.max(np.abs(order_conditions(A, b))) < 1e-12, s
        lengths.append(l)
        finishes.append(finish)
        embedded.append(embedded_weights(A, b))
        mus.append(mu), nus.append(nu), kappas.append(kappa)
        growth.append(_stable(int(s), l)[1])
        print(
            f"s = {s:3d}: l = {l:10.2f} = {l / s**2:.4f} s^2, largest stage "
            f"{growth[-1]:.3g}",
            flush=True,
        )
    return dict(
        degrees=np.asarray(degrees),
        lengths=np.array(lengths),
        finishing=np.array(finishes),
        embedded=np.array(embedded),
        offset=np.concatenate([[0], np.cumsum([len(m) for m in mus])]),
        mu=np.concatenate(mus),
        nu=np.concatenate(nus),
        kappa=np.concatenate(kappas),
        largest_stage=np.array(growth),
    )


if __name__ == "__main__":
    np.savez_compressed(PATH, **make())
    print(f"wrote {PATH}")
