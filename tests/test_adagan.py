"""Tests of adagan.py: the AdaGAN weights, beta schedules, mixture sampling and MIXDISC (unit, no 2dgan.py
needed), then a tiny end-to-end ensemble (T=3) on toy LCD showers with resume, sampling and bad input."""
import importlib
import json
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import REPO, run_script

ada = importlib.import_module("adagan")


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("beta", [0.5, 0.1, 1 / 3])
def test_covered_point_gets_less_weight_than_missed_point(beta):
    rng = np.random.default_rng(0)
    d = rng.uniform(0.2, 0.9, 200)
    d[0], d[1] = 0.5, 0.999          # covered by the mixture (D=0.5) vs missed (D->1)
    w, lam, fallback = ada.adagan_weights(d, beta)
    assert not fallback
    assert w[0] < w[1]
    # weights decrease as D falls (as r=(1-D)/D grows)
    order = np.argsort(d)
    assert np.all(np.diff(w[order]) >= -1e-15)


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.2, 0.05])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_nonnegative_sum_to_one(beta, seed):
    d = np.random.default_rng(seed).uniform(0.01, 0.99, 500)
    w, lam, fallback = ada.adagan_weights(d, beta)
    assert not fallback and w.shape == d.shape
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0, abs=1e-12)
    if beta == 1.0:                  # the first component: plain uniform data
        np.testing.assert_allclose(w, 1 / len(d))
    else:                            # points the mixture over-covers get zero weight for a small beta
        assert w.min() >= 0


@pytest.mark.parametrize("beta", [0.5, 0.2, 0.05])
def test_lambda_star_in_its_bracket(beta):
    r = np.random.default_rng(3).exponential(1.0, 300)
    lam, k = ada.lambda_star(r, beta)
    rs = np.sort(r)
    assert lam is not None and 1 <= k <= len(r)
    assert (1 - beta) * rs[k - 1] <= lam + 1e-12
    if k < len(r):
        assert lam <= (1 - beta) * rs[k] + 1e-12
    # it is the first such k, and the unnormalised weights (lambda - (1-beta) r)_+ / (N beta) sum to 1
    for j in range(1, k):
        lj = (beta * len(r) + (1 - beta) * rs[:j].sum()) / j
        assert not ((1 - beta) * rs[j - 1] <= lj <= (1 - beta) * rs[j])
    assert (np.maximum(lam - (1 - beta) * r, 0).sum() / (len(r) * beta)) == pytest.approx(1.0)


def test_degenerate_discriminator_falls_back_to_uniform_with_warning():
    d = np.full(50, np.nan)
    messages = []
    with pytest.warns(UserWarning, match="uniform"):
        w, lam, fallback = ada.adagan_weights(d, 0.5, log=messages.append)
    assert fallback and lam is None
    np.testing.assert_allclose(w, 1 / 50)
    assert messages and "uniform" in messages[0]


def test_clipping_keeps_ratios_finite():
    d = np.array([0.0, 1.0, 0.5, 0.5])           # D exactly 0 or 1 must not give inf/nan
    w, lam, fallback = ada.adagan_weights(d, 0.3)
    assert not fallback and np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    assert w[1] > w[2] >= w[0] == 0.0


# ---------------------------------------------------------------- betas and mixtures


@pytest.mark.parametrize("T", [1, 2, 5, 10])
def test_uniform_beta_schedule_gives_uniform_mixture(T):
    betas = [ada.beta_for(t, "uniform") for t in range(T)]
    assert betas[0] == 1.0
    np.testing.assert_allclose(betas, 1 / (np.arange(T) + 1))
    np.testing.assert_allclose(ada.mixture_weights(betas), np.full(T, 1 / T))


def test_constant_beta_schedule():
    betas = [ada.beta_for(t, "constant", 0.5) for t in range(4)]
    assert betas == [1.0, 0.5, 0.5, 0.5]
    np.testing.assert_allclose(ada.mixture_weights(betas), [0.125, 0.125, 0.25, 0.5])
    w = ada.mixture_weights([ada.beta_for(t, "constant", 0.3) for t in range(6)])
    assert w.sum() == pytest.approx(1.0) and np.all(np.diff(w[1:]) > 0)


def test_sample_mixture_picks_components_by_weight_and_passes_ep():
    calls = []

    def generate(G, ep, seed):
        calls.append((G, ep.copy()))
        return np.full((len(ep), 25, 25, 25), G, np.float32) * ep[:, None, None, None]
    ep = np.random.default_rng(0).uniform(2, 500, 4000).astype(np.float32)
    out, comp = ada.sample_mixture([1.0, 2.0, 3.0], [0.2, 0.3, 0.5], ep, np.random.default_rng(1), generate)
    np.testing.assert_allclose(np.bincount(comp) / len(ep), [0.2, 0.3, 0.5], atol=0.03)
    np.testing.assert_allclose(out[:, 0, 0, 0], (comp + 1) * ep, rtol=1e-6)   # each event: its component, its Ep
    assert len(calls) == 3


# ---------------------------------------------------------------- MIXDISC


def test_mixdisc_shapes():
    net = ada.MixDisc(width=4)
    x = torch.rand(3, 25, 25, 25) * 1e-2
    assert net(x, torch.tensor([2.0, 100.0, 500.0])).shape == (3,)
    assert sum(p.numel() for p in net.parameters()) < 200_000


def test_mixdisc_weights_move_mass_to_the_missed_mode():
    """Real data has two modes (normal showers and showers at half the sampling fraction); the 'mixture'
    only has the first. MIXDISC must learn it, and the AdaGAN weights must go to the missed mode."""
    import common
    toy = common.make_toy("lcd", 160, seed=5)
    ecal, ep = toy["ECAL"], toy["target"][:, 1]
    missed = np.arange(len(ep)) % 2 == 1
    real = ecal.copy()
    real[missed] *= 0.5
    fake = ecal.copy()                                   # the mixture covers the normal mode only

    class A:
        mixdisc_test_frac, mixdisc_width, mixdisc_lr, mixdisc_batch, mixdisc_epochs, dtype = 0.25, 4, 3e-3, 32, 8, "fp32"
    torch.set_num_threads(1)
    net, info = ada.train_mixdisc(real, ep, fake, A, "cpu", 0, log=lambda s: None)
    assert 1 <= info["best_epoch"] <= A.mixdisc_epochs
    assert info["best_test_loss"] == min(h["test_loss"] for h in info["history"])
    d = ada.mixdisc_predict(net, real, ep, "cpu")
    assert d[missed].mean() > d[~missed].mean() + 0.2
    w, lam, _ = ada.adagan_weights(d, 0.5)
    assert w[missed].sum() > 0.7


def test_features_edge_ring():
    e = np.zeros((2, 25, 25, 25), np.float32)
    e[0, 12, 12, :] = 1.0                                # all in the centre
    e[1, 0, 5, 3] = 1.0                                  # one corner-row cell: ring 12
    e[1, 12, 12, 3] = 3.0
    f = ada.features(e, np.array([1250.0, 200.0]))
    assert f["edge"][0] == 0 and f["edge"][1] == pytest.approx(0.25)
    assert f["ring"][1, 12] == pytest.approx(1.0) and f["sf"][0] == pytest.approx(25 / 1250)
