"""The GMRES bound of bench/krylov_bound.py: its Arnoldi and least squares against first principles."""

import numpy as np
import torch

from bench.krylov_bound import arnoldi, first_below, gmres_residuals, power_residuals


def _matvec(mats: torch.Tensor):
    return lambda u: torch.einsum("bij,bj->bi", mats, u)


def test_gmres_residuals_equal_least_squares_over_the_krylov_space():
    g = torch.Generator().manual_seed(0)
    b, d, k = 3, 24, 10
    mats = 0.3 * torch.randn(b, d, d, generator=g, dtype=torch.float64) / d ** 0.5 * 3
    r0 = torch.randn(b, d, generator=g, dtype=torch.float64)
    h, beta = arnoldi(_matvec(mats), r0, k)
    got = gmres_residuals(h, beta)
    powers = power_residuals(h, beta)  # plain iteration's ||J^j r0||, read from H without products
    for s in range(b):
        r = r0[s].numpy()
        for j in range(k + 1):
            assert abs(powers[s, j] - np.linalg.norm(r)) <= 1e-9 * np.linalg.norm(r0[s].numpy())
            r = mats[s].numpy() @ r
        a = np.eye(d) - mats[s].numpy()
        cols, v = [], r0[s].numpy()
        for j in range(k + 1):
            basis = np.linalg.qr(np.stack(cols, 1))[0] if cols else np.zeros((d, 0))
            y, *_ = np.linalg.lstsq(a @ basis, r0[s].numpy(), rcond=None)
            want = np.linalg.norm(r0[s].numpy() - a @ basis @ y)
            assert abs(got[s, j] - want) <= 1e-9 * np.linalg.norm(r0[s].numpy())
            cols.append(v)
            v = mats[s].numpy() @ v


def test_on_a_spectrum_filling_a_circle_gmres_gains_only_a_constant():
    # J = rho * cyclic shift: eigenvalues rho * (roots of unity). With r0 = e_1, the least residual
    # over polynomials p(J) r0 with p(1) = 1 is 1 / sqrt(sum_{i<=k} rho^(-2i)): the rate rho of plain
    # iteration, times a constant. No Krylov solver beats plain iteration's rate here.
    d, k, rho = 40, 12, 0.5
    shift = torch.roll(torch.eye(d, dtype=torch.float64), 1, dims=0)[None]
    r0 = torch.zeros(1, d, dtype=torch.float64)
    r0[0, 0] = 1.0
    h, beta = arnoldi(_matvec(rho * shift), r0, k)
    got = gmres_residuals(h, beta)[0]
    want = [1 / np.sqrt(sum(rho ** (-2 * i) for i in range(j + 1))) for j in range(k + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    plain = np.array([rho ** j for j in range(k + 1)])
    np.testing.assert_allclose(power_residuals(h, beta)[0], plain, rtol=1e-10)
    assert np.all(got <= plain + 1e-15) and got[-1] > 0.85 * plain[-1]


def test_an_outlying_eigenvalue_is_removed_in_one_product():
    # J = diag(0.99, 0.1, ..., 0.1): plain iteration crawls at 0.99, GMRES needs ~2 products to
    # kill the outlier and then contracts at 0.1 per product.
    d = 30
    diag = torch.full((d,), 0.1, dtype=torch.float64)
    diag[0] = 0.99
    r0 = torch.ones(1, d, dtype=torch.float64)
    h, beta = arnoldi(_matvec(torch.diag(diag)[None]), r0, 8)
    got = gmres_residuals(h, beta)[0]
    plain = np.array([np.linalg.norm(diag.numpy() ** j) for j in range(9)])
    thresh = np.array([1e-3 * beta[0]])
    assert first_below(got[None], thresh)[0] <= 5
    assert first_below(plain[None], thresh)[0] == 9  # never within 8 products: 0.99^8 > 1e-3
