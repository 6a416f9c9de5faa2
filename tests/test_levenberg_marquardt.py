"""Levenberg–Marquardt: the step against dense normal equations, MATLAB's μ schedule,
convergence on a linear least-squares problem, bp.fit(optimizer="lm") and bad input."""

import numpy as np
import pytest
from helpers import random_problem
from torch_oracle import TorchMLP

import bpgpu as bp
from bpgpu import engine, per_sample
from bpgpu.kernels import jit
from bpgpu.levenberg_marquardt import LevenbergMarquardt

PAIRS = [
    ("identity", "squared_error"),
    ("sigmoid", "binary_cross_entropy"),
    ("softmax", "cross_entropy"),
    ("sigmoid", "cross_entropy"),
    ("tanh", "squared_error"),
]


def make(sizes, output="identity", loss="squared_error", reduction="mean", seed=0, m=8, hidden="tanh"):
    return random_problem(sizes, hidden, output, loss, reduction, seed, m)


def weight_mask(net):
    mask = np.ones(net.n_params)
    for l in range(1, net.n_layers + 1):
        net.theta(l, mask)[:, 0] = 0.0
    return mask


@pytest.mark.parametrize("output,loss", PAIRS)
@pytest.mark.parametrize("m", [3, 30])  # N = m n_L below and above W = 35: both forms under "auto"
@pytest.mark.parametrize("damping", ["identity", "diagonal"])
@pytest.mark.parametrize("form", ["auto", "parameters", "residuals"])
def test_one_step_solves_the_damped_gauss_newton_equations(output, loss, m, damping, form):
    net, X, T, rng = make([3, 4, 3], output, loss, "sum" if m == 3 else "mean", m=m)
    s = rng.uniform(0.2, 2.0, size=m)
    alpha, mu = 0.3, 2.0
    w0 = bp.to_numpy(net.params).copy()
    c = 1.0 / s.sum() if net.reduction == "mean" else 1.0
    # the oracle: torch.func's Σ s_n J_nᵀ M_n J_n and the backprop gradient, dense solve
    G = TorchMLP(net).gauss_newton(X, T, s, net.loss_function.is_canonical(net.activations[-1]))
    P = weight_mask(net)
    D = np.ones(net.n_params) if damping == "identity" else np.maximum(np.diag(G), 1e-12 * np.diag(G).max())
    gE = bp.to_numpy(net.gradient(X, T, sample_weight=s)) / c + alpha * P * w0
    delta = -np.linalg.solve(G + np.diag(alpha * P + mu * D), gE)
    E0 = net.loss(X, T, sample_weight=s) / c + 0.5 * alpha * np.sum((P * w0) ** 2)
    solver = LevenbergMarquardt(net, X, T, s, alpha=alpha, mu=mu, damping=damping, form=form)
    assert solver.form == (("residuals" if m * 3 < net.n_params else "parameters") if form == "auto" else form)
    step = solver.step()
    assert step.accepted and step.trials == 1  # this μ lowers the loss at once here
    np.testing.assert_allclose(bp.to_numpy(net.params) - w0, delta, rtol=0, atol=1e-9 * np.abs(delta).max())
    assert step.mu == pytest.approx(mu * 0.1)
    E1 = net.loss(X, T, sample_weight=s) / c + 0.5 * alpha * np.sum((P * bp.to_numpy(net.params)) ** 2)
    assert E1 < E0 and step.loss == pytest.approx(c * E1, rel=1e-12)


@pytest.mark.parametrize("damping", ["identity", "diagonal"])
@pytest.mark.parametrize("form", ["parameters", "residuals"])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_a_step_after_rejected_trials_solves_the_equations_at_the_accepted_mu(damping, form, alpha):
    # every trial must start from the iteration's own passes: the trials' forward passes in between
    # once overwrote the residuals form's a(l) (its later trials then solved with another point's R)
    x = np.linspace(-1, 1, 30)[:, None]
    y = np.sinc(5 * x)
    net = bp.MLP(
        [1, 8, 8, 1], hidden="tanh", output="identity", dtype="float64", backend="numpy", init="glorot", seed=0
    )
    w0 = bp.to_numpy(net.params).copy()
    G = TorchMLP(net).gauss_newton(x, y, np.ones(30), True)  # Σ_n J_nᵀ J_n, the residuals' Jacobian
    P = weight_mask(net)
    D = np.ones(net.n_params) if damping == "identity" else np.maximum(np.diag(G), 1e-12 * np.diag(G).max())
    gE = bp.to_numpy(net.gradient(x, y)) * 30 + alpha * P * w0
    step = LevenbergMarquardt(net, x, y, mu=1e-6, alpha=alpha, damping=damping, form=form).step()
    assert step.accepted and step.trials >= 2  # μ = 1e-6 rejected at least
    mu = step.mu / 0.1  # the accepted μ
    delta = -np.linalg.solve(G + np.diag(alpha * P + mu * D), gE)
    np.testing.assert_allclose(bp.to_numpy(net.params) - w0, delta, rtol=0, atol=1e-9 * np.abs(delta).max())


def test_matlab_schedule_at_a_minimum_every_mu_fails_and_training_stops_at_mu_max():
    # targets the net fits exactly: E = 0, ∇E = 0, so no step can lower the loss
    net, X, _, _ = make([3, 4, 2], m=10)
    T = bp.to_numpy(net.forward(X))
    w0 = bp.to_numpy(net.params).copy()
    solver = LevenbergMarquardt(net, X, T)
    step = solver.step()
    # μ = 1e-3, 1e-2, ..., 1e10 tried (14 trials), then μ = 1e11 > μ_max = 1e10
    assert not step.accepted and step.trials == 14 and step.mu == pytest.approx(1e11)
    np.testing.assert_array_equal(bp.to_numpy(net.params), w0)
    history = bp.fit(net, X, T, optimizer="lm", epochs=5, progress=False)
    assert history.stop_reason == "mu_max" and history.epochs == 1


def test_mu_is_multiplied_by_10_per_rejected_trial_and_by_0_1_per_accepted_step():
    net, X, T, _ = make([2, 5, 1], m=20)
    solver = LevenbergMarquardt(net, X, T)
    mu, trials = solver.mu, []
    for _ in range(15):
        step = solver.step()
        expected = max(mu * 10.0 ** (step.trials - 1) * 0.1, 1e-20) if step.accepted else mu * 10.0**step.trials
        assert step.mu == pytest.approx(expected, rel=1e-12)
        mu = step.mu
        trials.append(step.trials)
    assert max(trials) > 1  # the run did reject some μ
    # MATLAB's floor: μ never goes below 1e-20 (a linear model from zero: the first step is accepted)
    net, X, T, _ = make([3, 2], m=10)
    net.set_params(np.zeros(net.n_params))
    step = LevenbergMarquardt(net, X, T, mu=1e-20).step()
    assert step.accepted and step.mu == 1e-20


def test_linear_least_squares_is_solved_in_one_iteration():
    net, X, T, _ = make([4, 3], m=12)
    net.set_params(np.zeros(net.n_params))
    bp.fit(net, X, T, optimizer="lm", epochs=1, progress=False, mu=1e-12)
    Xa = np.hstack([np.ones((12, 1)), X])
    theta = np.linalg.lstsq(Xa, T, rcond=None)[0]
    np.testing.assert_allclose(bp.to_numpy(net.params), theta.reshape(-1), atol=1e-9)


def test_lm_trains_sinc_ten_times_lower_than_adam_and_lbfgs_given_far_more_steps():
    x = np.linspace(-1, 1, 100)[:, None]
    y = np.sinc(5 * x)

    def trained(optimizer, epochs, **options):
        net = bp.MLP(
            [1, 10, 1], hidden="tanh", output="identity", dtype="float64", backend="numpy", init="glorot", seed=0
        )
        return bp.fit(net, x, y, optimizer=optimizer, epochs=epochs, tol=None, progress=False, **options).loss[-1]

    lm = trained("lm", 150)
    assert lm < trained("adam", 3000, learning_rate=0.01) / 10
    assert lm < trained("lbfgs", 150) / 10


def test_fit_options_validation_split_early_stopping_weights_and_callbacks():
    net, X, T, rng = make([2, 4, 1], m=40)
    seen = []
    s = rng.uniform(0.5, 1.5, size=40)
    history = bp.fit(
        net,
        X,
        T,
        optimizer="lm",
        epochs=30,
        progress=False,
        seed=0,
        validation_fraction=0.25,
        early_stopping=True,
        n_iter_no_change=2,
        sample_weight=s,
        alpha=1e-3,
        damping="diagonal",
        callbacks=[lambda epoch, h, n: seen.append(epoch)],
    )
    assert len(history.validation_loss) == history.epochs == len(history.mu) == len(seen)
    assert history.stop_reason in ("early_stopping", "epochs", "mu_max")
    with pytest.raises(TypeError, match="optimizer 'lm' does not take momentum"):
        bp.fit(net, X, T, optimizer="lm", momentum=0.9, progress=False)


def test_chunks_do_not_change_the_step():
    results = []
    for chunk_size in (None, 1, 7):
        for form in ("parameters", "residuals"):
            net, X, T, _ = make([3, 4, 2], m=20)
            LevenbergMarquardt(net, X, T, form=form, chunk_size=chunk_size, mu=1.0).step()
            results.append(bp.to_numpy(net.params))
    for r in results[1:]:
        np.testing.assert_allclose(r, results[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("output,loss", [("identity", "squared_error"), ("softmax", "cross_entropy")])  # K = 1, 3
@pytest.mark.parametrize("split", [False, True])
def test_compiled_residual_matrices_match_the_dense_factor(output, loss, split):
    """The compiled N × N matrices of the residuals form (bpgpu.kernels.jit.kronecker_gram) against
    R Rᵀ of the dense Gauss–Newton factor (its weight and bias columns apart with ``split``), float64."""
    # m = 70: three blocks of the kernel's 32 rows, the last one partial
    net, X, T, _ = make([3, 5, 4, 1 if output == "identity" else 3], output, loss, m=70)
    A, seeds = per_sample.gauss_newton_seeds(net, X, T)
    K, N = seeds.shape[0], seeds.shape[0] * seeds.shape[1]
    deltas = {l: np.reshape(D, (N, net.sizes[l])) for l, D in engine.seeded_deltas(net, A, seeds)}
    layers = range(1, net.n_layers + 1)
    Q, S = jit.kronecker_gram(net, [deltas[l] for l in layers], [A[l - 1] for l in layers], K, split)
    R = per_sample.gauss_newton_factor(net, X, T)
    weight = weight_mask(net) == 1.0
    wants = [(Q, R[:, weight] @ R[:, weight].T), (S, R[:, ~weight] @ R[:, ~weight].T)] if split else [(Q, R @ R.T)]
    assert split or S is None
    for got, want in wants:
        np.testing.assert_allclose(np.triu(got), np.triu(want), rtol=0, atol=1e-12 * np.abs(want).max())
        assert not np.any(np.tril(got, -1))  # the lower triangle is left alone


def test_compiled_residual_matrix_in_float32_matches_float64():
    net, X, T, _ = make([3, 5, 4, 2], m=40)
    net32 = bp.MLP(net.sizes, hidden="tanh", output="identity", dtype="float32", backend="numpy")
    net32.set_params(bp.to_numpy(net.params).astype(np.float32))
    got = []
    for n, x, t in ((net, X, T), (net32, X.astype(np.float32), T.astype(np.float32))):
        A, seeds = per_sample.gauss_newton_seeds(n, x, t)
        N = seeds.shape[0] * seeds.shape[1]
        deltas = {l: np.reshape(D, (N, n.sizes[l])) for l, D in engine.seeded_deltas(n, A, seeds)}
        layers = range(1, n.n_layers + 1)
        got.append(jit.kronecker_gram(n, [deltas[l] for l in layers], [A[l - 1] for l in layers], 2, False)[0])
    assert got[1].dtype == np.float32
    np.testing.assert_allclose(got[1], got[0], rtol=0, atol=1e-5 * np.abs(got[0]).max())


@pytest.mark.parametrize("output,loss", [("identity", "squared_error"), ("softmax", "cross_entropy")])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_compiled_and_array_residual_forms_take_the_same_steps(monkeypatch, output, loss, alpha):
    runs = []
    for compiled in (True, False):
        if not compiled:  # the array path: what every backend but numpy runs
            monkeypatch.setattr(jit, "kronecker_gram", lambda *args: None)
        net, X, T, _ = make([3, 6, 1 if output == "identity" else 3], output, loss, m=40)
        w0 = bp.to_numpy(net.params).copy()
        step = LevenbergMarquardt(net, X, T, alpha=alpha, mu=0.1, form="residuals").step()
        runs.append((bp.to_numpy(net.params) - w0, step))
    (ours, ours_step), (theirs, theirs_step) = runs
    assert ours_step.accepted and ours_step.trials == theirs_step.trials
    # the step, from matrices equal to rounding (previous test), at a μ where the solve is well conditioned
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12 * np.abs(theirs).max())
    assert ours_step.loss == pytest.approx(theirs_step.loss, rel=1e-12)


def test_bad_input():
    net, X, T, _ = make([2, 3, 1])
    for mu in (0.0, -1.0):
        with pytest.raises(ValueError, match="mu must be a number > 0"):
            LevenbergMarquardt(net, X, T, mu=mu)
    with pytest.raises(ValueError, match="mu must be a number > 0"):
        bp.fit(net, X, T, optimizer="lm", mu=0.0, progress=False)
    with pytest.raises(ValueError, match="need mu_dec < 1 < mu_inc"):
        LevenbergMarquardt(net, X, T, mu_inc=0.5)
    with pytest.raises(ValueError, match="damping must be one of"):
        LevenbergMarquardt(net, X, T, damping="fletcher")
    with pytest.raises(ValueError, match="form must be one of"):
        LevenbergMarquardt(net, X, T, form="dense")
    with pytest.raises(ValueError, match="alpha must be a number >= 0"):
        LevenbergMarquardt(net, X, T, alpha=-1.0)


def test_a_net_too_large_for_its_matrix_is_refused_before_allocating():
    net, X, T, _ = make([4, 50, 50, 1], m=3000)  # W = 2,851 < N = 3,000: the W × W form
    W = net.n_params
    with pytest.raises(ValueError, match=rf"W={W} parameters.*more than the .* allowed.*'lbfgs' or 'adam'"):
        LevenbergMarquardt(net, X, T, max_memory=W * W * 8)  # one copy fits, the factorisation's copy does not
    assert LevenbergMarquardt(net, X, T, max_memory=4 * W * W * 8).form == "parameters"
    net, X, T, _ = make([4, 50, 50, 1], m=100)  # N = 100 < W: the N × N form
    with pytest.raises(ValueError, match=r"N × N matrix R Rᵀ \(N=100 residuals = 100 samples × 1 outputs"):
        LevenbergMarquardt(net, X, T, max_memory=2 * 100 * 100 * 8)
    with pytest.raises(ValueError, match=r"R Rᵀ and R itself \(N=100 residuals"):  # D = diag(RᵀR) forms R
        LevenbergMarquardt(net, X, T, damping="diagonal", max_memory=100 * W * 8)


def test_a_loss_without_a_gauss_newton_factor_is_refused():
    from dataclasses import replace

    net, X, T, _ = make([2, 3, 1])
    net.loss_function = replace(net.loss_function, name="absolute_error")
    with pytest.raises(ValueError, match="cannot serve loss='absolute_error'.*serves squared_error"):
        LevenbergMarquardt(net, X, T)


def test_estimators_take_solver_lm_and_fit_better_than_lbfgs():
    from sklearn.datasets import make_classification
    from sklearn.exceptions import ConvergenceWarning

    x = np.linspace(-1, 1, 120)[:, None]
    y = np.sinc(5 * x).ravel()
    common = dict(
        hidden_layer_sizes=(10,), activation="tanh", max_iter=80, random_state=0, dtype="float64", device="cpu", tol=0.0
    )
    with pytest.warns(ConvergenceWarning, match="Levenberg–Marquardt: Maximum iterations \\(80\\) reached"):
        lm = bp.MLPRegressor(solver="lm", **common).fit(x, y)
    assert lm.n_iter_ == len(lm.loss_curve_) <= 80 and lm.loss_ == lm.loss_curve_[-1]
    with pytest.warns(ConvergenceWarning):  # L-BFGS stops at max_iter too
        lbfgs = bp.MLPRegressor(solver="lbfgs", **common).fit(x, y)
    assert lm.loss_ < lbfgs.loss_ / 5 and lm.score(x, y) > 0.99
    X, c = make_classification(n_samples=150, n_features=5, n_classes=3, n_informative=3, random_state=0)
    clf = bp.MLPClassifier(
        solver="lm",
        hidden_layer_sizes=(6,),
        max_iter=40,
        random_state=0,
        dtype="float64",
        device="cpu",
        early_stopping=True,
        validation_fraction=0.2,
    ).fit(X, c)
    assert len(clf.validation_scores_) == clf.n_iter_ and clf.score(X, c) > 0.8
    with pytest.raises(AttributeError, match="has no attribute .partial_fit."):  # as for lbfgs
        clf.partial_fit(X, c)


GPU = bp.gpu_status()


@pytest.mark.gpu
@pytest.mark.skipif(not GPU.usable, reason=f"no usable GPU: {GPU.reason}")
@pytest.mark.parametrize("form", ["parameters", "residuals"])
def test_gpu_step_eigenvalues_and_per_sample_gradients_match_numpy(form):
    results = {}
    for backend in ("numpy", "cupy"):
        net = bp.MLP(
            [3, 6, 2], hidden="tanh", output="identity", dtype="float64", backend=backend, seed=0, init="glorot"
        )
        rng = np.random.default_rng(1)
        X, T = (
            rng.normal(size=(40 if form == "parameters" else 5, 3)),
            rng.normal(size=(40 if form == "parameters" else 5, 2)),
        )
        LevenbergMarquardt(net, X, T, form=form, alpha=0.1).step()  # cuSOLVER's Cholesky on the GPU
        results[backend] = [
            bp.to_numpy(net.params),
            bp.to_numpy(bp.hessian_eigenvalues(net, X, T, k=2)),
            bp.to_numpy(bp.per_sample_gradients(net, X, T)),
        ]
    for ours, reference in zip(results["cupy"], results["numpy"]):
        np.testing.assert_allclose(ours, reference, rtol=1e-9, atol=1e-12)


def test_readme_second_order_example_runs():
    import contextlib
    import io
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Second-order training\n\n```python\n(.*?)```", readme, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    reason, mse = out.getvalue().split("\n")[0].split()
    assert reason == "epochs" and float(mse) < 1e-3
