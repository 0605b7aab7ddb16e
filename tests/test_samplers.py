"""Samplers against closed-form oracles (numpy only), then ORT-vs-PyTorch trajectory parity."""

from __future__ import annotations

import numpy as np
import pytest

from ditq.runtime.samplers import sample, seeded_noise
from ditq.schedule import NoiseSchedule

SCHED = NoiseSchedule.linear()
ABAR = SCHED.alphas_cumprod


def _bcast(t):
    return ABAR[t].reshape(-1, 1, 1, 1)


def test_schedule_is_dits_linear_schedule():
    assert SCHED.num_timesteps == 1000
    assert SCHED.betas[0] == pytest.approx(1e-4) and SCHED.betas[-1] == pytest.approx(0.02)
    # DiT's "ddim50" respacing: every 20th timestep from 0
    assert SCHED.timesteps(50).tolist() == list(range(0, 1000, 20))
    # 7 does not divide 1000: DiT's space_timesteps(1000, [7]) takes round(i * 999 / 6), Python's round
    # (half to even: 166.5 -> 166, 499.5 -> 500, 832.5 -> 832)
    assert SCHED.timesteps(7).tolist() == [0, 166, 333, 500, 666, 832, 999]
    with pytest.raises(ValueError):
        SCHED.timesteps(0)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_exact_denoiser_of_a_point_mass_returns_the_point(method, steps):
    """Data = one point x*: the ideal epsilon is (x_t - sqrt(abar) x*) / sqrt(1 - abar), so x0 is predicted
    exactly at every step and both samplers must land on x* (float rounding only)."""
    x_star = np.random.default_rng(1).standard_normal((1, 2, 4, 4))

    def oracle(x, t, y):
        return ((x - np.sqrt(_bcast(t)) * x_star) / np.sqrt(1 - _bcast(t))).astype(np.float32)

    out = sample(oracle, seeded_noise(0, 3, 2, 4), np.zeros(3), steps=steps, method=method, seed=5)
    np.testing.assert_allclose(out, np.broadcast_to(x_star, out.shape), atol=1e-5)


@pytest.mark.parametrize("method,tol", [("ddim", 0.03), ("ddpm", 0.04)])
def test_exact_denoiser_of_gaussian_data_recovers_its_spread(method, tol):
    """Data ~ N(0, 0.5^2): E[eps | x_t] = sqrt(1 - abar) x_t / (abar 0.25 + 1 - abar). With 250 steps the
    discretisation error is small, so the samples' std must be 0.5 within a few percent (the std of 16,000
    draws is itself known to about 0.6%)."""
    s = 0.5

    def oracle(x, t, y):
        a = _bcast(t)
        return (np.sqrt(1 - a) * x / (a * s * s + 1 - a)).astype(np.float32)

    out = sample(oracle, seeded_noise(0, 4000, 1, 2), np.zeros(4000), steps=250, method=method)
    assert abs(out.std() - s) < tol * s
    assert abs(out.mean()) < 0.02


def test_ddpm_learned_sigma_interpolates_between_posterior_variance_and_beta():
    """Two steps over timesteps (999, 0)... respaced to [500, 0] for steps=2: the first step's noise has
    variance beta' (v=+1) or the respaced posterior variance (v=-1), beta' = 1 - abar_500 / abar_0."""
    beta = 1 - ABAR[500] / ABAR[0]
    post = beta * (1 - ABAR[0]) / (1 - ABAR[500])
    n = 20000
    for v, want in ((1.0, beta), (-1.0, post), (0.0, np.sqrt(beta * post))):

        def model(x, t, y, v=v):
            return np.concatenate([np.zeros_like(x), np.full_like(x, v)], axis=1)

        traj: list = []
        sample(model, np.zeros((n, 1, 1, 1), np.float32), np.zeros(n), steps=2, method="ddpm", trajectory=traj, seed=3)
        assert SCHED.timesteps(2).tolist() == [0, 500]
        t, _, x_prev = traj[0]
        assert t == 500
        # eps = 0 and x = 0 give mean 0, so x_prev is pure sampler noise
        assert x_prev.var() == pytest.approx(want, rel=0.05)


def test_classifier_free_guidance_mixes_eps_and_keeps_conditional_variance():
    """A model whose eps is the label (null class 10 -> 10) and whose variance values are -label/100:
    guided eps = u + s (c - u), variance values from the conditional half."""
    seen = []

    def model(x, t, y):
        seen.append(y.copy())
        eps = np.broadcast_to(y.reshape(-1, 1, 1, 1).astype(np.float32), x.shape)
        return np.concatenate([eps, -eps / 100], axis=1)

    traj: list = []
    labels = np.array([2, 7])
    sample(model, seeded_noise(0, 2, 1, 2), labels, steps=1, cfg=3.0, null_class=10, trajectory=traj)
    assert seen[0].tolist() == [2, 7, 10, 10]
    out = traj[0][1]
    np.testing.assert_allclose(out[:, 0].reshape(2, -1)[:, 0], 10 + 3.0 * (labels - 10))
    np.testing.assert_allclose(out[:, 1].reshape(2, -1)[:, 0], -labels / 100, rtol=1e-6)
    with pytest.raises(ValueError, match="null class"):
        sample(model, seeded_noise(0, 2, 1, 2), labels, steps=1, cfg=2.0)


def test_seeded_noise_is_stable_per_sample():
    a, b = seeded_noise(3, 10, 1, 8), seeded_noise(3, 4, 1, 8)
    np.testing.assert_array_equal(a[:4], b)
    assert not np.array_equal(a, seeded_noise(4, 10, 1, 8))
