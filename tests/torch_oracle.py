"""The same MLP written in PyTorch from its configuration and flat parameters, as an
independent oracle for per-sample derivatives (torch.func's jacrev, vmap(grad), hessian).

Only the documented flat layout is shared with bpgpu (docs/guide/feedforward.rst): block l of w is
Θ(l) column-major, i.e. ``w[off:off + n_l (n_{l−1} + 1)].reshape(n_{l−1} + 1, n_l)``
holds the bias in row 0 and Wᵀ below it.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch (extra 'peers') is the oracle of these tests")
from torch.func import grad, hessian, jacrev, vmap  # noqa: E402

torch.set_default_dtype(torch.float64)

_G = {
    "identity": lambda z: z,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.01),
    "softplus": torch.nn.functional.softplus,
    "softmax": lambda z: torch.softmax(z, dim=-1),
    "exp": torch.exp,
}

_LOSS = {  # per sample, on the outputs a (away from 0 and 1, where bpgpu clips)
    "squared_error": lambda a, t: 0.5 * torch.sum((a - t) ** 2),
    "binary_cross_entropy": lambda a, t: -torch.sum(t * torch.log(a) + (1 - t) * torch.log(1 - a)),
    "cross_entropy": lambda a, t: -torch.sum(t * torch.log(a)),
    # half Poisson deviance; t log t − t log a so that t = 0 has the gradient 1, not 0/0
    "poisson": lambda a, t: torch.sum(torch.special.xlogy(t, t) - torch.special.xlogy(t, a) - t + a),
}


class TorchMLP:
    """y(w, x) and ℓ(w, x, t) for one sample x (n_0,), from bpgpu net ``net``'s configuration."""

    def __init__(self, net):
        self.sizes = list(net.sizes)
        self.g = [_G[a.name] for a in net.activations]
        self.ell = _LOSS[net.loss_function.name]
        self.w = torch.tensor(np.asarray(net.params, dtype=np.float64))

    def output(self, w, x):
        a, off = x, 0
        for l, (n_in, n_out) in enumerate(zip(self.sizes, self.sizes[1:])):
            block = w[off : off + n_out * (n_in + 1)].reshape(n_in + 1, n_out)
            a = self.g[l](a @ block[1:] + block[0])
            off += n_out * (n_in + 1)
        return a

    def loss(self, w, x, t):
        return self.ell(self.output(w, x), t)

    # --- what the tests compare against ---------------------------------------

    def parameter_jacobian(self, X):
        """(m, n_L, W) by vmap(jacrev)."""
        return vmap(jacrev(self.output), in_dims=(None, 0))(self.w, torch.tensor(X)).numpy()

    def per_sample_gradients(self, X, T):
        """(m, W) by vmap(grad)."""
        return vmap(grad(self.loss), in_dims=(None, 0, 0))(self.w, torch.tensor(X), torch.tensor(T)).numpy()

    def gauss_newton(self, X, T, s, canonical):
        """Σ_n s_n J_nᵀ (∂²ℓ/∂u²) J_n with u = z(L) (canonical) or a(L): jacrev and hessian of ℓ in u."""
        last = self.g[-1]

        def pre_output(w, x):  # z(L): the output with the last activation left out
            self.g[-1] = lambda z: z
            try:
                return self.output(w, x)
            finally:
                self.g[-1] = last

        u_of = pre_output if canonical else self.output
        ell_u = (lambda u, t: self.ell(last(u), t)) if canonical else self.ell
        X, T = torch.tensor(X), torch.tensor(T)
        Ju = vmap(jacrev(u_of), in_dims=(None, 0))(self.w, X)  # (m, n_L, W)
        U = vmap(u_of, in_dims=(None, 0))(self.w, X)
        M = vmap(hessian(ell_u), in_dims=(0, 0))(U, T)  # (m, n_L, n_L)
        G = torch.einsum("n,nkw,nkj,njv->wv", torch.tensor(s), Ju, M, Ju)
        return G.numpy()
