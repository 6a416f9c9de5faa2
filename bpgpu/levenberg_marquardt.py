"""Levenberg–Marquardt: full-batch Gauss–Newton steps with an adaptive damping μ.

Notation (docs/guide/feedforward.rst, per_sample.py): J = c Σ_n s_n ℓ_n + (α c / 2) ‖W‖², with c = 1/m,
1/Σ s ("mean") or 1 ("sum"). LM works on E = J / c = Σ_n s_n ℓ_n + (α/2) ‖W‖², so μ
means what it means in MATLAB's ``trainlm`` (which damps the unnormalised JᵀJ of the
errors) whatever the reduction. Each iteration solves

    (RᵀR + α P + μ D) δ = −∇E,          w ← w + δ if E(w + δ) < E(w)

with R the Gauss–Newton factor (per_sample.py: RᵀR = Σ_n s_n J_nᵀ M_n J_n, for squared
error the Jacobian of the residuals a − t, so RᵀR is the outer product Σ_n ∇y_n ∇y_nᵀ), P the
0/1 mask of the weights (biases are not penalised), D = I (``damping="identity"``,
MATLAB's) or diag(RᵀR) (``"diagonal"``, Marquardt's scale-invariant choice), by Cholesky
in whichever form is smaller (N = m n_L residual rows, W parameters):

    parameters (W ≤ N):  A = RᵀR accumulated over chunks of samples (W × W), then per μ
                         Cholesky of A + diag(Λ), Λ = μ D + α P
    residuals  (N < W):  Woodbury, with Λ = σ Λ̃ (σ = μ, Λ̃ = D when α = 0; σ = 1,
                         Λ̃ = Λ otherwise) and h = Λ̃⁻¹ ∇E:
                         δ = −(h − Λ̃⁻¹ Rᵀ (σ I + R Λ̃⁻¹ Rᵀ)⁻¹ R h) / σ,
                         an N × N Cholesky; Q = R Λ̃⁻¹ Rᵀ is formed once per iteration
                         when α = 0 (a rejected μ only changes σ)

μ follows MATLAB's documented schedule: μ = 1e-3 at the start, ×0.1 (``mu_dec``) after
a step that lowers E, ×10 (``mu_inc``) after one that does not (and after a μ at which
the matrix is not numerically positive definite); the iteration ends when a step is
accepted, and training stops once μ > μ_max = 1e10, with the last accepted parameters.

The part of an iteration that does not touch the data (μ and its schedule, D, the L2
term, the parameters-form Cholesky, the μ trials) is :class:`LMDamping`;
:class:`LevenbergMarquardt` adds the data in memory, and ``bpgpu.dask.fit(optimizer="lm")``
sums :func:`gram` and ∇E over the chunks of a cluster and drives the same LMDamping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bpgpu import engine, validation
from bpgpu.network import MLP
from bpgpu.per_sample import gauss_newton_rows, gauss_newton_seeds

DAMPINGS = ("identity", "diagonal")
FORMS = ("auto", "parameters", "residuals")
# Output/loss pairs with a Gauss–Newton factor (per_sample.py): canonical pairs factor
# ∂²ℓ/∂z², the others diag(ℓ″) with ℓ″ ≥ 0; every loss of bpgpu.losses is served.
SERVED_LOSSES = ("squared_error", "binary_cross_entropy", "cross_entropy")
# Rows of R computed at once: about this many bytes per chunk of samples.
_CHUNK_BYTES = 1 << 26
_MU_MIN = 1e-20  # MATLAB's floor after a decrease


@dataclass(frozen=True)
class LMStep:
    """One Levenberg–Marquardt iteration.

    loss: J after it (the net's loss, L2 term included, as ``History.loss``);
    mu: μ after it; accepted: whether a step lowered the loss (False only when μ passed
    μ_max, the parameters then unchanged); trials: how many μ were tried.
    """

    loss: float
    mu: float
    accepted: bool
    trials: int


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def default_chunk_size(net: MLP, dtype: str | None = None) -> int:
    """Samples per chunk of the Gauss–Newton factor R: about 64 MiB of its rows and of the two
    arrays of the same size its backprop holds.

    Parameters
    ----------
    net : MLP
        The net (its W = ``n_params`` and n_L outputs set the bytes per sample).
    dtype : str or None
        The numbers' type; None: the net's.

    Returns
    -------
    int
        The number of samples, at least 1.
    """
    itemsize = np.dtype(net.dtype if dtype is None else dtype).itemsize
    return max(1, _CHUNK_BYTES // (3 * net.sizes[-1] * net.n_params * itemsize))


def check_memory(
    net: MLP,
    m: int,
    form: str,
    damping: str,
    chunk_size: int,
    max_memory: int | None,
    dtype: str | None = None,
    advice: str | None = None,
) -> int:
    """Refuse, before anything is allocated, an LM iteration that needs more memory than allowed.

    Parameters
    ----------
    net : MLP
        The net, W = ``net.n_params`` parameters and n_L outputs.
    m : int
        Samples of one solve (N = m n_L residual rows).
    form : str
        "parameters" (W × W RᵀR) or "residuals" (N × N R Rᵀ).
    damping : str
        "identity" or "diagonal" (the residuals form then holds R itself).
    chunk_size : int
        Samples per chunk of R.
    max_memory : int or None
        Bytes allowed; None: half the backend's free memory.
    dtype : str or None
        The numbers' type; None: the net's.
    advice : str or None
        What to use instead, ending the error; None: the in-process choices.

    Returns
    -------
    int
        The bytes needed.

    Raises
    ------
    ValueError
        Naming W (or N, m and n_L), the MLP's sizes, the bytes needed and allowed, and ``advice``.
    """
    dtype = net.dtype if dtype is None else dtype
    itemsize = np.dtype(dtype).itemsize
    W, n_out = net.n_params, net.sizes[-1]
    N = m * n_out
    chunk_bytes = 3 * min(chunk_size, m) * n_out * W * itemsize
    if form == "parameters":
        need = 2 * W * W * itemsize + chunk_bytes
    elif damping == "identity":  # R is never formed: three N × N arrays and the δ(l) of every seed
        need = (3 * N * N + 2 * N * sum(net.sizes)) * itemsize
    else:
        need = (2 * N * W + 2 * N * N) * itemsize + chunk_bytes
    limit = net.backend.free_memory() // 2 if max_memory is None else int(max_memory)
    if need > limit:
        matrix = (
            f"the W × W matrix RᵀR (W={W} parameters)"
            if form == "parameters"
            else f"the N × N matrix R Rᵀ{' and R itself' if damping != 'identity' else ''} (N={N} residuals = "
            f"{m} samples × {n_out} outputs, W={W})"
        )
        if advice is None:
            advice = (
                "Use a first-order optimizer ('lbfgs' or 'adam'), a smaller net, or fewer samples "
                "(with N = m·n_L < W the N × N form is used)"
            )
        raise ValueError(
            f"Levenberg–Marquardt in form={form!r} needs {_gib(need)} in {dtype} for {matrix} of MLP "
            f"{list(net.sizes)}, more than the {_gib(limit)} allowed (max_memory). {advice}"
        )
    return need


def row_chunks(net: MLP, X: Any, T: Any, s_col: Any, chunk_size: int):
    """The Gauss–Newton factor R of (X, T), chunk by chunk.

    Parameters
    ----------
    net : MLP
        The net, at its current parameters.
    X, T : arrays (m, n_0), (m, n_L)
        The samples, on the net's backend (as ``net.check_inputs`` returns them).
    s_col : array (m, 1) or None
        Sample weights s_n.
    chunk_size : int
        Samples per chunk.

    Yields
    ------
    lo, hi : int
        The chunk's first and one-past-last sample.
    R_chunk : array ((hi − lo) n_L, W)
        R's rows of samples lo..hi−1, ordered (k, n) (per_sample.gauss_newton_rows).
    """
    m = X.shape[0]
    for lo in range(0, m, chunk_size):
        hi = min(lo + chunk_size, m)
        # every axis indexed: the array API standard does not define X[lo:hi] on a matrix
        yield lo, hi, gauss_newton_rows(net, X[lo:hi, :], T[lo:hi, :], None if s_col is None else s_col[lo:hi, :])


def gram(net: MLP, X: Any, T: Any, s_col: Any, chunk_size: int) -> Any:
    """A = RᵀR = Σ_n s_n J_nᵀ M_n J_n, the Gauss–Newton matrix without its factor c.

    Parameters
    ----------
    net, X, T, s_col, chunk_size
        As :func:`row_chunks`, whose chunks are summed so that only one chunk of R is held.

    Returns
    -------
    array (W, W)
        A on the net's backend, in its dtype.
    """
    xp, W = net.backend.xp, net.n_params
    A = xp.zeros((W, W), dtype=net.xp_dtype)
    for _, _, R in row_chunks(net, X, T, s_col, chunk_size):
        A += R.T @ R
    return A


class LMDamping:
    """The half of a Levenberg–Marquardt iteration that does not touch the data: μ and its
    schedule, the damping D, the L2 term, the parameters-form solve and the μ trials.
    :class:`LevenbergMarquardt` (data in memory) and ``bpgpu.dask.fit(optimizer="lm")`` (data
    summed over the chunks of a cluster) drive it.

    Parameters
    ----------
    net : MLP
        The net; its loss must be one of ``SERVED_LOSSES``.
    alpha : float
        L2 penalty on the weights, α ≥ 0 (E gains (α/2) ‖P w‖²).
    mu, mu_dec, mu_inc, mu_max : float
        The damping μ > 0 and its schedule, mu_dec < 1 < mu_inc (MATLAB ``trainlm``'s defaults).
    damping : str
        "identity" (D = I) or "diagonal" (D = diag(RᵀR), floored at 1e-12 of its largest
        entry so that a dead unit keeps the matrix definite).
    """

    def __init__(
        self,
        net: MLP,
        *,
        alpha: float = 0.0,
        mu: float = 1e-3,
        mu_dec: float = 0.1,
        mu_inc: float = 10.0,
        mu_max: float = 1e10,
        damping: str = "identity",
    ):
        if net.loss_function.name not in SERVED_LOSSES:
            raise ValueError(
                f"Levenberg–Marquardt cannot serve loss={net.loss_function.name!r}: it has no "
                f"Gauss–Newton factor; LM serves {', '.join(SERVED_LOSSES)}"
            )
        self.mu = _positive(mu, "mu")
        self.mu_dec, self.mu_inc, self.mu_max = (
            _positive(mu_dec, "mu_dec"),
            _positive(mu_inc, "mu_inc"),
            _positive(mu_max, "mu_max"),
        )
        if not (self.mu_dec < 1.0 < self.mu_inc):
            raise ValueError(f"need mu_dec < 1 < mu_inc, got mu_dec={mu_dec!r}, mu_inc={mu_inc!r}")
        if self.mu > self.mu_max:
            raise ValueError(f"mu={mu!r} is already above mu_max={mu_max!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
            raise ValueError(f"alpha must be a number >= 0, got {alpha!r}")
        if damping not in DAMPINGS:
            raise ValueError(f"damping must be one of {', '.join(map(repr, DAMPINGS))}, got {damping!r}")
        self.net, self.alpha, self.damping = net, float(alpha), damping
        self.mask = None if self.alpha == 0.0 else net.backend.asarray(net.layout.weight_mask(), net.xp_dtype)

    def penalty(self, w: Any) -> float:
        """(α/2) ‖P w‖², the L2 term of E at parameters ``w`` (W,), as a float."""
        if self.mask is None:
            return 0.0
        weights = self.mask * w
        return 0.5 * self.alpha * float(self.net.backend.xp.vecdot(weights, weights))

    def penalty_gradient(self, w: Any) -> Any:
        """α P w (W,), the L2 term of ∇E (0.0 when α = 0)."""
        return 0.0 if self.mask is None else self.alpha * (self.mask * w)

    def damping_diagonal(self, column_squares: Any) -> Any:
        """D's diagonal (W,): ones, or ``column_squares()`` (diag(RᵀR), computed only then) floored."""
        xp, W = self.net.backend.xp, self.net.n_params
        if self.damping == "identity":
            return xp.ones(W, dtype=self.net.xp_dtype)
        d = column_squares()
        top = float(xp.max(d))
        if top <= 0.0:
            return xp.ones_like(d)
        return xp.maximum(d, xp.full_like(d, 1e-12 * top))

    def add_diagonal(self, M: Any, lam: Any) -> Any:
        """M + diag(lam) as a new array (M (n, n), lam (n,))."""
        xp, n = self.net.backend.xp, M.shape[0]
        if self.net.backend.name in ("numpy", "cupy"):  # a strided view of the diagonal: O(n), not O(n²)
            out = xp.asarray(M, copy=True)
            xp.reshape(out, (-1,))[:: n + 1] += lam
            return out
        return M + xp.eye(n, dtype=M.dtype) * lam[None, :]

    def damping_terms(self, d: Any) -> Any:
        """Λ = μ D + α P (W,) at the current μ, d = D's diagonal."""
        return self.mu * d if self.mask is None else self.mu * d + self.alpha * self.mask

    def parameter_solver(self, A: Any, g: Any):
        """The parameters-form solve of one iteration.

        Parameters
        ----------
        A : array (W, W)
            RᵀR, on the net's backend (kept: each solve factors a copy).
        g : array (W,)
            ∇E.

        Returns
        -------
        callable
            ``solve()`` → δ (W,) = −(A + Λ)⁻¹ ∇E at the current μ, by Cholesky
            (``backend.cholesky_solve``), or None when A + Λ is not numerically positive definite.
        """
        backend = self.net.backend
        d = self.damping_diagonal(lambda: backend.xp.linalg.diagonal(A))

        def solve() -> Any:
            x = backend.cholesky_solve(self.add_diagonal(A, self.damping_terms(d)), g)
            return None if x is None else -x

        return solve

    def try_steps(self, E: float, solve, losses, growth: int = 1) -> tuple[Any, float, int]:
        """The μ trials of one iteration, MATLAB's schedule: μ, μ·mu_inc, μ·mu_inc², ... up to
        mu_max until a step lowers E.

        Parameters
        ----------
        E : float
            E(w) at the iteration's parameters w.
        solve : callable
            ``solve()`` → δ at the current μ, or None (not positive definite: a rejected trial).
        losses : callable
            ``losses(deltas)`` → [E(w + δ) for δ in deltas], one call per round of trials.
        growth : int
            Rounds hold 1, growth, growth², ... μ (1 each with growth=1). A caller whose
            evaluation costs a round trip (Dask) asks for several at once: r rejected μ then
            cost about log_growth(r) calls, and at most growth× the solves and losses needed.

        Returns
        -------
        delta : array (W,) or None
            The step of the first μ of the sequence whose E(w + δ) < E (μ then ×mu_dec, floored
            at 1e-20), or None when none up to mu_max does (μ then past mu_max).
        E : float
            E(w + δ), or the E given.
        trials : int
            How many μ the sequence went through (the candidates of a round after the accepted
            one are not counted).
        """
        trials, size = 0, 1
        while self.mu <= self.mu_max:
            tried = []  # (μ, δ) of this round
            while len(tried) < size and self.mu <= self.mu_max:
                tried.append((self.mu, solve()))
                self.mu *= self.mu_inc
            deltas = [delta for _, delta in tried if delta is not None]
            values = iter(losses(deltas) if deltas else ())
            for mu, delta in tried:
                trials += 1
                if delta is None:
                    continue
                E_new = next(values)
                if E_new < E:  # False for NaN: a non-finite trial is a rejected one
                    self.mu = max(mu * self.mu_dec, _MU_MIN)
                    return delta, E_new, trials
            size *= growth
        return None, E, trials


class LevenbergMarquardt(LMDamping):
    """The solver state for one net and data set: μ, the chosen form and the buffers.

    Parameters
    ----------
    net : the MLP, trained in place.
    X (m, n_0), T (m, n_L) : the training data (full batch).
    sample_weight : one weight s_n ≥ 0 per row, or None.
    form : "auto" (the smaller of W × W and N × N), "parameters" or "residuals".
    chunk_size : samples per chunk when building R (None: about 64 MiB of rows).
    max_memory : bytes the solver may allocate (None: half the device's free memory);
        a larger need raises ValueError before anything is allocated.
    **options : alpha (L2 penalty on the weights, as ``bp.fit``'s), mu, mu_dec, mu_inc,
        mu_max (the damping and its schedule, MATLAB ``trainlm``'s defaults) and damping
        ("identity": D = I, or "diagonal": D = diag(RᵀR)), as :class:`LMDamping` takes them.
    """

    def __init__(
        self,
        net: MLP,
        X: Any,
        T: Any,
        sample_weight: Any = None,
        *,
        form: str = "auto",
        chunk_size: int | None = None,
        max_memory: int | None = None,
        **options: Any,
    ):
        super().__init__(net, **options)  # alpha, mu, mu_dec, mu_inc, mu_max, damping: their defaults live there
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(map(repr, FORMS))}, got {form!r}")
        self.X, self.T = net.check_inputs(X, T)
        m, W = self.X.shape[0], net.n_params
        self.sample_weight = None if sample_weight is None else validation.sample_weight(sample_weight, m)
        self.weights = net.weighting(self.sample_weight)  # (s_col, c) or None, for the engine's passes
        self.s_col = None if self.weights is None else self.weights[0]
        self.c = net.reduction_factor(m, self.weights)
        N = m * net.sizes[-1]
        if chunk_size is None:
            chunk_size = default_chunk_size(net)
        elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
        self.chunk_size = min(int(chunk_size), m)
        self.form = ("residuals" if N < W else "parameters") if form == "auto" else form
        check_memory(net, m, self.form, self.damping, self.chunk_size, max_memory)
        self.E = self.objective()
        if not np.isfinite(self.E):
            raise FloatingPointError(f"the loss at the starting parameters is {self.E} (not finite)")

    # --- pieces ----------------------------------------------------------------

    def objective(self) -> float:
        """E = J / c at the net's parameters (L2 term included)."""
        net = self.net
        ws = net.workspace(self.X.shape[0])
        return float(engine.loss(net, self.X, self.T, ws, net.params, self.weights)) / self.c + self.penalty(net.params)

    def reset(self, mu: float | None = None) -> None:
        """Start over from the net's current parameters (e.g. after ``net.set_params``), with
        damping ``mu`` (None: keep the current μ)."""
        if mu is not None:
            self.mu = _positive(mu, "mu")
        self.E = self.objective()

    def _gradient(self) -> Any:
        """∇E = ∇J / c + α P w."""
        net = self.net
        ws = net.workspace(self.X.shape[0])
        engine.forward(net, self.X, ws, net.params)
        engine.backward(net, self.X, self.T, ws, net.params, ws.grad, self.weights)
        g = ws.grad / self.c
        return g if self.mask is None else g + self.penalty_gradient(net.params)

    def chunks(self):
        """(lo, hi, R_chunk) for consecutive chunks of ``chunk_size`` samples, R_chunk the Gauss–Newton
        factor's rows of samples lo..hi−1 ((hi − lo) n_L × W)."""
        return row_chunks(self.net, self.X, self.T, self.s_col, self.chunk_size)

    def gram(self) -> Any:
        """A = RᵀR (W × W), summed over chunks of samples."""
        return gram(self.net, self.X, self.T, self.s_col, self.chunk_size)

    def residual_factor(self) -> Any:
        """R (N × W), built chunk by chunk."""
        xp, n_out = self.net.backend.xp, self.net.sizes[-1]
        R = xp.empty((self.X.shape[0] * n_out, self.net.n_params), dtype=self.net.xp_dtype)
        for lo, hi, rows in self.chunks():
            R[lo * n_out : hi * n_out, :] = rows
        return R

    # --- one iteration ----------------------------------------------------------

    def step(self) -> LMStep:
        """One LM iteration: R, ∇E, then μ trials until E drops or μ passes μ_max."""
        net, xp = self.net, self.net.backend.xp
        g = self._gradient()
        if self.form == "parameters":
            solve = self.parameter_solver(self.gram(), g)
        else:
            solve = self._kronecker_solver(g) if self.damping == "identity" else self._residual_solver(g)
        w0 = xp.asarray(net.params, copy=True)

        def losses(deltas: list[Any]) -> list[float]:  # one δ per round here: no round trips to save
            values = []
            for delta in deltas:
                net.params[...] = w0 + delta
                values.append(self.objective())
            return values

        delta, self.E, trials = self.try_steps(self.E, solve, losses)
        if delta is None:
            net.params[...] = w0
        return LMStep(self.c * self.E, self.mu, delta is not None, trials)

    def _kronecker_solver(self, g: Any):
        """The residuals form with D = I, without forming R. Row (k, n) of R's layer-l block is
        [1, a_n(l−1)] ⊗ δ_kn(l), and Λ̃ is λ_b on every bias and λ_w on every weight, so

            (R Λ̃⁻¹ Rᵀ)[(k,n), (k′,n′)] = Σ_l ⟨δ_kn(l), δ_k′n′(l)⟩ (1/λ_b + ⟨a_n(l−1), a_n′(l−1)⟩ / λ_w)
            (R h)_kn = Σ_l δ_kn(l) · (h_b(l) + a_n(l−1) H(l))        (H(l): h's Wᵀ block)
            Rᵀ z = per layer Σ_{k,n} z_kn [1, a_n(l−1)] ⊗ δ_kn(l)     (a weighted backprop gradient)

        all GEMMs on activation-sized arrays: N² Σ_l (n_{l−1} + n_l + 1) flops for the N × N
        matrix instead of N² W, and no N × W array.
        """
        net, backend, xp, layout = self.net, self.net.backend, self.net.backend.xp, self.net.layout
        A, seeds = gauss_newton_seeds(net, self.X, self.T, self.s_col)
        K, m = seeds.shape[0], seeds.shape[1]
        N = K * m
        deltas = {l: xp.reshape(D, (N, net.sizes[l])) for l, D in engine.seeded_deltas(net, A, seeds)}
        # α = 0: Q = Σ_l δδᵀ ⊙ (1 + aaᵀ); α > 0: S_b = Σ_l δδᵀ and S_w = Σ_l δδᵀ ⊙ aaᵀ, Q = S_b/λ_b + S_w/λ_w.
        # (N, N) each, the same for every μ; accumulated in place (one N × N temporary per layer).
        if self.mask is None:
            Q = xp.zeros((N, N), dtype=net.xp_dtype)
        else:
            S_b, S_w = xp.zeros((N, N), dtype=net.xp_dtype), xp.zeros((N, N), dtype=net.xp_dtype)
        for l, D in deltas.items():
            DD = D @ D.T
            AA = A[l - 1] @ A[l - 1].T
            if K > 1:
                AA = xp.tile(AA, (K, K))
            if self.mask is None:
                AA += 1.0
                AA *= DD
                Q += AA
            else:
                S_b += DD
                AA *= DD
                S_w += AA

        def R_times(h: Any) -> Any:
            rows = 0.0
            for l, D in deltas.items():
                hb, hwt = layout.split(xp.reshape(h, (1, -1)), l, xp)
                P = A[l - 1] @ hwt[0, ...] + hb  # (m, n_l)
                rows = rows + xp.sum(xp.reshape(D, (K, m, -1)) * P[None, :, :], axis=-1)
            return xp.reshape(rows, (N,))

        def R_transpose_times(z: Any) -> Any:
            blocks = []
            for l in range(1, net.n_layers + 1):
                E = xp.sum(xp.reshape(z, (K, m, 1)) * xp.reshape(deltas[l], (K, m, -1)), axis=0)  # (m, n_l)
                blocks.append((xp.sum(E, axis=0)[None, :], (A[l - 1].T @ E)[None, :, :]))
            return layout.join(blocks, xp)[0, :]

        def solve() -> Any:
            if self.mask is None:  # Λ̃ = I, σ = μ
                sigma, lam, C = self.mu, 1.0, Q
            else:  # Λ̃ = μ on biases, μ + α on weights, σ = 1
                sigma, lam = 1.0, self.mu + self.alpha * self.mask
                C = S_b / self.mu + S_w / (self.mu + self.alpha)
            h = g / lam
            z = backend.cholesky_solve(self.add_diagonal(C, xp.full((N,), sigma, dtype=C.dtype)), R_times(h))
            return None if z is None else -(h - R_transpose_times(z) / lam) / sigma

        return solve

    def _residual_solver(self, g: Any):
        backend, xp = self.net.backend, self.net.backend.xp
        R = self.residual_factor()
        d = self.damping_diagonal(lambda: xp.sum(R * R, axis=0))
        N = R.shape[0]
        cached = {}

        def system() -> tuple[float, Any, Any]:
            """(σ, Λ̃, Q = R Λ̃⁻¹ Rᵀ)."""
            if self.mask is None:
                if not cached:
                    scale = None if self.damping == "identity" else 1.0 / xp.sqrt(d)
                    K = R if scale is None else R * scale[None, :]
                    cached["Q"] = K @ K.T
                return self.mu, d, cached["Q"]
            lam = self.damping_terms(d)
            K = R * (1.0 / xp.sqrt(lam))[None, :]
            return 1.0, lam, K @ K.T

        def solve() -> Any:
            sigma, lam, Q = system()
            h = g / lam
            z = backend.cholesky_solve(self.add_diagonal(Q, xp.full((N,), sigma, dtype=Q.dtype)), R @ h)
            return None if z is None else -(h - (R.T @ z) / lam) / sigma

        return solve


__all__ = [
    "DAMPINGS",
    "FORMS",
    "SERVED_LOSSES",
    "LMDamping",
    "LMStep",
    "LevenbergMarquardt",
    "check_memory",
    "default_chunk_size",
    "gram",
    "row_chunks",
]
