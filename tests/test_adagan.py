"""Tests of adagan.py: the AdaGAN weights, beta schedules, mixture sampling and MIXDISC (unit, no 2dgan.py
needed), then a tiny end-to-end ensemble (T=3) on toy LCD showers with resume, sampling and bad input."""
import importlib
import json
import os
import warnings

import numpy as np
import pytest
import torch

from conftest import run_script, run_torchrun

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
    ep = np.random.default_rng(0).uniform(2, 500, 1500).astype(np.float32)
    out, comp = ada.sample_mixture([1.0, 2.0, 3.0], [0.2, 0.3, 0.5], ep, np.random.default_rng(1), generate)
    np.testing.assert_allclose(np.bincount(comp) / len(ep), [0.2, 0.3, 0.5], atol=0.04)
    np.testing.assert_allclose(out[:, 0, 0, 0], (comp + 1) * ep, rtol=1e-6)   # each event: its component, its Ep
    assert len(calls) == 3


# ---------------------------------------------------------------- ESS, saturation, MIXDISC


def test_ess_on_a_hand_made_weight_vector():
    assert ada.ess([0.5, 0.25, 0.25]) == pytest.approx(1 / (0.25 + 0.0625 + 0.0625))      # = 8/3
    assert ada.ess([2.0, 1.0, 1.0]) == pytest.approx(8 / 3)                               # normalised first
    assert ada.ess(np.full(40, 1 / 40)) == pytest.approx(40) and ada.ess([0, 0, 1.0]) == pytest.approx(1)


class ConstMixdisc(torch.nn.Module):
    """A MIXDISC whose real/fake head outputs D = sigmoid(logit) for every shower (logit 40: D = 1)."""

    def __init__(self, logit=40.0):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full((len(x),), self.logit), torch.zeros(len(x)), x.sum((1, 2, 3))


def test_saturation_warning_on_a_mixdisc_that_outputs_1():
    ecal = np.random.default_rng(0).uniform(0, 1e-2, (30, 25, 25, 25)).astype(np.float32)
    d = ada.mixdisc_predict(ConstMixdisc(), ecal, np.arange(30), "cpu", 50.0)
    assert np.all(d == 1.0)
    lines = []
    with pytest.warns(UserWarning, match="MIXDISC saturates"):
        assert ada.saturation(d, 0.5, lines.append) == 1.0
    assert lines and "100.0%" in lines[0]
    w, lam, _ = ada.adagan_weights(d, 0.5)                    # what saturation does to AdaGAN: uniform weights
    np.testing.assert_allclose(w, 1 / 30)
    assert ada.ess(w) == pytest.approx(30)
    # the original's labels (real 0.9, fake 0, 5% flipped): targets 0.855 and 0.05, so a MIXDISC that separates
    # perfectly gives D ~ 0.855 and never D > 0.99; saturation is D > 0.05 + 0.99 (0.855 - 0.05) = 0.84695
    ga = ada.base().get_args(["--device", "cpu"])
    d_soft = np.full(30, 0.85)
    with pytest.warns(UserWarning, match="D > 0.846"):
        assert ada.saturation(d_soft, 0.5, ga=ga) == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # hard labels, or below the threshold: no warning
        assert ada.saturation(d_soft, 0.5) == 0.0 and ada.saturation(np.full(30, 0.84), 0.5, ga=ga) == 0.0
        d_half = ada.mixdisc_predict(ConstMixdisc(0.0), ecal, np.arange(30), "cpu", 50.0)
        assert ada.saturation(d_half, 0.5) == 0.0


def test_mixdisc_loss_labels_and_flips():
    """Hand-worked _disc_loss: logit 10 with perfect Ep and Ecal heads. BCE(sigmoid(10), y) = -y log s - (1-y)
    log(1-s) = 10 (1-y) + log(1 + e^-10). Labels real 0.9 / fake 0; flipped real -> 0, fake -> 1."""
    ga = ada.base().get_args(["--device", "cpu"])
    x = torch.rand(4, 25, 25, 25)
    e = torch.tensor([10.0, 50, 100, 400])

    class D(torch.nn.Module):
        def forward(self, img):
            return torch.full((len(img),), 10.0), e / 100, img.sum((1, 2, 3))
    bce = lambda y: 10 * (1 - y) + np.log1p(np.exp(-10))  # noqa: E731
    real, fake = (ada.mixdisc_loss(D(), x, e, x.sum((1, 2, 3)), r, ga).item() for r in (True, False))
    assert real == pytest.approx(ga.w_gan * bce(0.9), rel=1e-5) and fake == pytest.approx(ga.w_gan * bce(0.0), rel=1e-5)
    ga.label_flip = 1.0
    g = torch.Generator().manual_seed(0)
    real, fake = (ada.mixdisc_loss(D(), x, e, x.sum((1, 2, 3)), r, ga, g).item() for r in (True, False))
    assert real == pytest.approx(ga.w_gan * bce(0.0), rel=1e-5) and fake == pytest.approx(ga.w_gan * bce(1.0), rel=1e-4)
    # Ep and Ecal heads: MAPE x 100, weights 0.2 and 0.1
    ga.label_flip = 0.0
    off = ada.mixdisc_loss(D(), x, e * 2, x.sum((1, 2, 3)) * 2, True, ga).item()
    assert off - ga.w_gan * bce(0.9) == pytest.approx(ga.w_ep * 50 + ga.w_ecal * 50, rel=1e-4)


@pytest.fixture(scope="module")
def toy64():
    import common
    toy = common.make_toy("lcd", 64, seed=5)
    return toy["ECAL"], toy["target"][:, 1]


def test_features_edge_ring():
    e = np.zeros((2, 25, 25, 25), np.float32)
    e[0, 12, 12, :] = 1.0                                # all in the centre
    e[1, 0, 5, 3] = 1.0                                  # one corner-row cell: ring 12
    e[1, 12, 12, 3] = 3.0
    f = ada.features(e, np.array([1250.0, 200.0]))
    assert f["edge"][0] == 0 and f["edge"][1] == pytest.approx(0.25)
    assert f["ring"][1, 12] == pytest.approx(1.0) and f["sf"][0] == pytest.approx(25 / 1250)


# ---------------------------------------------------------------- the component loop with a stand-in 2DGAN


class FakeBase:
    """Stand-in for 2dgan.py with its API: a 'generator' is a sampling fraction; it makes showers by rescaling
    real ones. The MIXDISC pieces (Discriminator, mape, get_args) are 2dgan.py's. train() can be made to stop
    (KeyboardInterrupt) during a chosen call, after a partial ckpt."""
    DataError = type("DataError", (Exception,), {})

    def __init__(self, ecal, ep, stop_at=None):
        self.ecal, self.ep, self.stop_at, self.calls = ecal, ep, stop_at, []
        self.shape = ecal / ecal.sum((1, 2, 3), keepdims=True)
        self.real = real = importlib.import_module("2dgan")
        for name in ("Discriminator", "mape", "_autocast", "flip_labels", "lr_factor"):
            setattr(self, name, getattr(real, name))

    def get_args(self, argv, toy_config=False):
        return self.real.get_args(argv, toy_config)

    def resolve_device(self, name):
        return torch.device("cpu")

    def load_lcd(self, pattern):
        return self.ecal, self.ep

    def train(self, args, ecal, ep, weights=None, out_dir=None, log=print, split=None):
        self.calls.append({"seed": args.seed, "resume": args.resume, "weights": np.array(weights),
                           "split": tuple(np.array(s) for s in split)})
        G = 0.01 * (1 + args.seed % 3)                   # components differ in their sampling fraction
        torch.save({"G": G}, os.path.join(out_dir, "ckpt.pt"))
        if self.stop_at == len(self.calls) - 1:
            raise KeyboardInterrupt
        return {"generator": G, "best_epoch": 1}

    def generate(self, G, ep, batch_size=1024, device="cpu", seed=None, dtype="fp32", host=True):
        i = np.random.default_rng(seed).integers(len(self.shape), size=len(ep))
        x = (self.shape[i] * (G * np.asarray(ep))[:, None, None, None]).astype(np.float32)
        return x if host else torch.from_numpy(x).to(device)        # as 2dgan.generate: numpy or on the device

    def load_checkpoint(self, path, device="cpu"):
        return torch.load(path)["G"], {}

    def write_lcd(self, path, ecal, ep):
        import h5py
        with h5py.File(path, "w") as f:
            f["ECAL"], f["target"] = ecal, np.c_[np.full(len(ep), 11.0), ep]


MIXDISC_TINY = ["--mixdisc-epochs", "2", "--mixdisc-batch", "16", "--width", "0.05"]


def _fake_run(tmp, toy64, monkeypatch, argv, stop_at=None):
    fake = FakeBase(*toy64, stop_at=stop_at)
    monkeypatch.setattr(ada, "base", lambda: fake)
    monkeypatch.setattr(ada, "write_plots", lambda st, out: None)     # plots: tested end to end below
    args = ada.get_args(["--data", "toy64.h5", "--out", str(tmp), "--val-frac", "0.2", "--gan-val-frac", "0.15",
                         "--device", "cpu"] + MIXDISC_TINY + argv)
    def log(msg):                                       # train() sets log.path (its log.txt); we keep lines
        lines.append(msg)
    lines, log.path = [], None
    try:
        st = ada.train(args, log)
    except KeyboardInterrupt:
        st = None
    return fake, st, lines


def test_interrupted_component_resumes_with_same_weights(tmp_path, toy64, monkeypatch):
    torch.set_num_threads(1)
    _, full, _ = _fake_run(tmp_path / "full", toy64, monkeypatch, ["--components", "3"])
    fake, st, _ = _fake_run(tmp_path / "cut", toy64, monkeypatch, ["--components", "3"], stop_at=2)
    assert st is None and len(fake.calls) == 3
    saved = ada.load_state(str(tmp_path / "cut" / "ensemble.pt"))
    assert len(saved["components"]) == 2 and int(saved["pending"]["t"]) == 2
    fake, st, lines = _fake_run(tmp_path / "cut", toy64, monkeypatch, ["--components", "3", "--resume"])
    assert len(fake.calls) == 1 and fake.calls[0]["resume"] and fake.calls[0]["seed"] == 2
    assert any("reusing the saved data weights" in s for s in lines)
    assert st["components"] == full["components"] == ["component_0", "component_1", "component_2"]
    np.testing.assert_allclose(st["betas"], [1, 1 / 2, 1 / 3])
    np.testing.assert_allclose(st["mix_weights"][-1], [1 / 3] * 3)
    for a, b in zip(st["data_weights"], full["data_weights"]):  # resumed == uninterrupted
        np.testing.assert_allclose(a, b)
        assert np.all(a >= 0) and a.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(fake.calls[0]["weights"], full["data_weights"][2])
    np.testing.assert_allclose(st["ess"], full["ess"])
    m = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert m["ess_frac"][0] == pytest.approx(1.0) and len(m["sf_max_dev"]) == len(m["edge_ratio"]) == 3
    assert (tmp_path / "cut" / "generated.h5").exists()


def test_one_split_for_the_ensemble_no_held_out_event_in_any_component(tmp_path, toy64, monkeypatch):
    torch.set_num_threads(1)
    fake, st, _ = _fake_run(tmp_path, toy64, monkeypatch, ["--components", "3"])
    held = set(st["val_idx"].tolist())
    assert len(held) == round(0.2 * 64) and held == set(json.loads((tmp_path / "metrics.json").read_text())
                                                          ["val_indices"])
    for call in fake.calls:                              # every component: the same split, none of the held-out
        tr, gv = call["split"]
        np.testing.assert_array_equal(tr, st["train_idx"])
        np.testing.assert_array_equal(gv, st["gan_val_idx"])
        assert not held & set(tr.tolist()) and not held & set(gv.tolist()) and not set(tr) & set(gv)
        assert len(call["weights"]) == len(tr) and call["weights"].sum() == pytest.approx(1.0)
    assert len(held) + len(st["gan_val_idx"]) + len(st["train_idx"]) == 64
    np.testing.assert_allclose(fake.calls[0]["weights"], 1 / len(st["train_idx"]))   # component 0: uniform
    assert np.all(fake.calls[1]["weights"] > 0) or not np.allclose(fake.calls[1]["weights"], 1 / 64)


@pytest.mark.parametrize("folds", [1, 2, 3])
def test_weights_come_from_a_mixdisc_that_did_not_train_on_the_event(tmp_path, toy64, monkeypatch, folds):
    """Cross-fitting: each fold's MIXDISC trains on the other folds and gives D on its own fold; together the
    folds cover every training event once (folds=1: the original, D on its own training events)."""
    fits, preds = [], []

    def fake_train(gens, mix_w, ecal, ep, fit, *a):
        fits.append(set(fit.tolist()))
        return ConstMixdisc(float(len(fits))), {"best_epoch": 1, "best_test_loss": 0.0}

    def fake_predict(net, ecal, idx, device, xscale):
        preds.append(set(idx.tolist()))
        return np.full(len(idx), 0.3 + 0.1 * len(preds))
    monkeypatch.setattr(ada, "train_mixdisc", fake_train)
    monkeypatch.setattr(ada, "mixdisc_predict", fake_predict)
    fake, st, lines = _fake_run(tmp_path, toy64, monkeypatch, ["--components", "2", "--mixdisc-folds", str(folds)])
    tr = set(st["train_idx"].tolist())
    assert len(fits) == len(preds) == folds
    assert set().union(*preds) == tr and sum(map(len, preds)) == len(tr)
    for f, p in zip(fits, preds):
        assert f == tr if folds == 1 else (not f & p and f | p == tr)
    assert not any("saturates" in s for s in lines)


def test_saturated_mixdisc_in_the_loop_warns_and_gives_uniform_weights(tmp_path, toy64, monkeypatch):
    monkeypatch.setattr(ada, "train_mixdisc", lambda *a: (ConstMixdisc(), {"best_epoch": 1, "best_test_loss": 0.0}))
    with pytest.warns(UserWarning, match="MIXDISC saturates"):
        fake, st, lines = _fake_run(tmp_path, toy64, monkeypatch, ["--components", "2"])
    assert any("MIXDISC saturates: 100.0%" in s for s in lines)
    np.testing.assert_allclose(fake.calls[1]["weights"], 1 / len(st["train_idx"]))
    assert st["saturation"] == [None, 1.0] and st["ess"][1] == pytest.approx(len(st["train_idx"]))


def test_mixdisc_learns_a_missed_mode_and_weights_go_there(toy64, monkeypatch):
    """Real data: normal showers and showers at 1/20 of the sampling fraction; the mixture (one stand-in
    generator) has only the normal ones. The 2DGAN discriminator as MIXDISC (cross-fitted, tiny, a few dozen
    steps at a raised learning rate) must find the missed mode."""
    torch.set_num_threads(1)
    ecal, ep = toy64
    missed = np.arange(len(ep)) % 2 == 1
    real = ecal.copy()
    real[missed] *= 0.05
    fake = FakeBase(ecal, ep)
    monkeypatch.setattr(ada, "base", lambda: fake)
    args = ada.get_args(["--mixdisc-epochs", "6", "--mixdisc-batch", "8", "--mixdisc-lr", "3e-3"])
    ga = fake.get_args(["--width", "0.1", "--device", "cpu"])
    sf = float(np.median(ecal.sum((1, 2, 3)) / ep))
    d, info = ada.mixdisc_outputs([sf], [1.0], real, ep, np.arange(len(ep)), args, ga, "cpu", 0, lambda s: None)
    assert len(info) == 2 and all(1 <= i["best_epoch"] <= 6 for i in info)
    lr = [h["lr"] for h in info[0]["history"]]          # 2dgan.py's schedule: 4.05 epochs at the start value,
    np.testing.assert_allclose(lr, 3e-3 * np.exp(-0.24 * np.maximum(0, np.arange(6) - 4.05)))   # then x0.79
    assert lr[:5] == [3e-3] * 5 and lr[5] < 3e-3                  # epoch 5 starts at t = 5 > 4.05
    assert d[missed].mean() > d[~missed].mean() + 0.08
    w, lam, _ = ada.adagan_weights(d, 0.5)
    assert w[missed].sum() > 0.55


# ---------------------------------------------------------------- end to end with the real 2dgan.py (T = 3)

TINY = ["--epochs", "1", "--width", "0.05", "--batch-size", "8", "--mixdisc-epochs", "1", "--mixdisc-batch", "16",
        "--gan-args=--log-every 1000 --val-min 1", "--device", "cpu"]


@pytest.fixture(scope="module")
def ens(tmp_path_factory, toy):
    """A T=3 ensemble on 48 toy LCD showers: 2 components of 2 epochs under torchrun (2 CPU processes, gloo;
    DDP inside each 2DGAN), stopped, then resumed to 3 components by one process."""
    data = toy("lcd", 48)
    cwd = tmp_path_factory.mktemp("ada")
    out = cwd / "run"
    r1 = run_torchrun("adagan.py", "--data", data, "--out", out, "--components", "2", *TINY, "--epochs", "2", cwd=cwd)
    assert r1.returncode == 0, r1.stderr[-3000:]
    st2 = ada.load_state(str(out / "ensemble.pt"))
    r2 = run_script("adagan.py", "--data", data, "--out", out, "--components", "3", "--resume", *TINY, cwd=cwd)
    assert r2.returncode == 0, r2.stderr[-3000:]
    return {"data": data, "cwd": cwd, "out": out, "r1": r1, "r2": r2, "st2": st2,
            "st3": ada.load_state(str(out / "ensemble.pt"))}


def _check_lcd(path, n=None, lo=0.0, hi=1e9):
    import h5py
    with h5py.File(path, "r") as f:
        ecal, target = f["ECAL"][:], f["target"][:]
    assert ecal.shape[1:] == (25, 25, 25) and target.shape == (len(ecal), 2)
    assert n is None or len(ecal) == n
    assert np.isfinite(ecal).all() and (ecal >= 0).all()
    assert (target[:, 1] >= lo).all() and (target[:, 1] <= hi).all()
    return ecal, target


def test_e2e_ensemble_files_and_state(ens):
    out, st2, st3 = ens["out"], ens["st2"], ens["st3"]
    assert len(st2["components"]) == 2 and st2["pending"] is None
    assert ens["r1"].stdout.count("component 2/2 done") == 1            # rank 0 alone logs
    assert st3["components"] == ["component_0", "component_1", "component_2"]
    for t in range(3):
        assert (out / f"component_{t}" / "ckpt.pt").exists()
    np.testing.assert_allclose(st3["betas"], [1, 1 / 2, 1 / 3])
    np.testing.assert_allclose(st3["mix_weights"][-1], [1 / 3] * 3)
    for w in st3["data_weights"]:
        assert np.all(w >= 0) and w.sum() == pytest.approx(1.0) and len(w) == len(st3["train_ep"])
    for a, b in zip(st2["data_weights"], st3["data_weights"]):     # resuming left the done components alone
        np.testing.assert_array_equal(a, b)
    assert "resuming" in (out / "log.txt").read_text() and "resuming" in ens["r2"].stdout
    assert "component 3/3" in ens["r2"].stdout and "component 1/3" not in ens["r2"].stdout
    for name in ("sampling_fraction.png", "shower_shapes.png", "data_weights.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    m = json.loads((out / "metrics.json").read_text())
    assert m["components"] == 3 and m["toy"] is False and m["ess_frac"][0] == pytest.approx(1.0)
    for k in ("sf_max_dev", "edge_ratio", "ess_frac", "sf_ratio_per_50gev"):
        assert len(m[k]) == 3, k
    assert all(0 < v <= 1 + 1e-12 for v in m["ess_frac"])
    assert len(m["sf_ratio_per_50gev"][0]) == len(m["sf_bin_edges_gev"]) - 1 == 10
    held = set(st3["val_idx"].tolist())                  # the real 2dgan.py validated on the shared split only
    for t in range(3):
        ck = torch.load(out / f"component_{t}" / "ckpt.pt", weights_only=False)
        assert set(ck["val_idx"]) == set(st3["gan_val_idx"].tolist()) and not held & set(ck["val_idx"])
    _check_lcd(out / "generated.h5", n=len(st3["val_idx"]))
    assert not list(out.rglob("*.tmp*"))


def test_torchrun_resume_of_an_interrupted_component(ens):
    """Under torchrun (2 processes): component 0 (2 epochs), then component 1 for 1 epoch, 'interrupted' there
    (its state set back to pending, as a kill after its first epoch leaves it), then --resume: its 2DGAN continues
    from epoch 1 with 2dgan.py's per-rank streams. The ranks draw different minibatches after the resume and the
    component equals the one of the uninterrupted run (ens: 2 components of 2 epochs)."""
    cwd, out = ens["cwd"], ens["cwd"] / "cut"
    flags = ["--data", ens["data"], "--out", out, *TINY]
    for more in (["--components", "1", "--epochs", "2"], ["--components", "2", "--resume"]):
        r = run_torchrun("adagan.py", *flags, *more, cwd=cwd)
        assert r.returncode == 0, r.stderr[-3000:]
    st = ada.load_state(str(out / "ensemble.pt"))
    st["pending"] = {"t": 1, "beta": st["betas"][1], "weights": st["data_weights"][1]}
    for k in ("components", "betas", "mix_weights", "data_weights", "best_epochs", "eval_comp"):
        st[k] = st[k][:1]
    torch.save(st, out / "ensemble.pt")
    r = run_torchrun("adagan.py", *flags, "--components", "2", "--resume", "--epochs", "2", cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reusing the saved data weights" in r.stdout and "resumed from" in r.stdout
    full, cut = (torch.load(d / "component_1" / "ckpt.pt", weights_only=False) for d in (ens["out"], out))
    assert cut["epoch"] == full["epoch"] == 2
    for rec in cut["history"]:
        assert len(rec["first_batch"]) == 2 and rec["first_batch"][0] != rec["first_batch"][1]
    assert [h["first_batch"] for h in cut["history"]] == [h["first_batch"] for h in full["history"]]
    for k, v in full["model"]["G"].items():
        torch.testing.assert_close(cut["model"]["G"][k], v, rtol=1e-4, atol=1e-5)
    w_cut = ada.load_state(str(out / "ensemble.pt"))["data_weights"][1]
    np.testing.assert_allclose(w_cut, ens["st2"]["data_weights"][1])


def test_e2e_generate_from_the_ensemble(ens):
    gen = ens["cwd"] / "gen.h5"
    r = run_script("adagan.py", "--generate", "24", "--ckpt", ens["out"], "--energy", "10:200", "--out", gen,
                   "--device", "cpu", cwd=ens["cwd"])
    assert r.returncode == 0, r.stderr[-2000:]
    _check_lcd(gen, n=24, lo=10, hi=200)
    assert "3 components" in r.stdout


def test_e2e_bad_input_subprocess(ens):
    out = ens["cwd"] / "bad_run"
    r = run_script("adagan.py", "--data", ens["cwd"] / "missing.h5", "--out", out, *TINY, cwd=ens["cwd"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adagan.py: error: ") and "missing.h5" in lines[0]
    assert not out.exists()


def _bad(tmp_path, name, **arrays):
    import h5py
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def test_bad_inputs_exit_2_one_line_nothing_written(tmp_path, capsys):
    good_e = np.zeros((20, 25, 25, 25), np.float32)
    tgt = np.c_[np.full(20, 11.0), np.linspace(2, 500, 20)].astype(np.float32)
    nan_e = good_e.copy()
    nan_e[0, 0, 0, 0] = np.nan
    cases = {
        "nokey.h5": ["--data", str(_bad(tmp_path, "nokey.h5", target=tgt))],
        "nan.h5": ["--data", str(_bad(tmp_path, "nan.h5", ECAL=nan_e, target=tgt))],
        "neg.h5": ["--data", str(_bad(tmp_path, "neg.h5", ECAL=good_e - 1, target=tgt))],
        "shape.h5": ["--data", str(_bad(tmp_path, "shape.h5", ECAL=good_e[:, :10, :10, :10], target=tgt))],
        "count.h5": ["--data", str(_bad(tmp_path, "count.h5", ECAL=good_e, target=tgt[:5]))],
        "ensemble.pt": ["--data", str(_bad(tmp_path, "ok.h5", ECAL=good_e + 1e-3, target=tgt)), "--resume"],
    }
    for name, argv in cases.items():
        out = tmp_path / f"out_{name}"
        assert ada.main(argv + ["--out", str(out)] + TINY) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("adagan.py: error: ") and name in err[0], (name, err)
        assert not out.exists(), name
    # sampling from a folder that holds no ensemble, and to a folder that does not exist
    assert ada.main(["--generate", "5", "--ckpt", str(tmp_path), "--out", str(tmp_path / "g.h5")]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert ada.main(["--generate", "5", "--ckpt", str(tmp_path), "--out", str(tmp_path / "no" / "g.h5")]) == 2
    assert "g.h5" in capsys.readouterr().err and not (tmp_path / "g.h5").exists()


@pytest.mark.parametrize("argv", [["--components", "0"], ["--energy", "500:2"], ["--beta-const", "1.5"],
                                  ["--generate", "5"], ["--beta", "cosine"]])
def test_bad_flags_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        ada.get_args(argv)
    assert e.value.code == 2


def test_help_on_every_flag(capsys, monkeypatch):
    import argparse
    with pytest.raises(SystemExit) as e:
        ada.get_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--components" in text and "--mixdisc-epochs" in text and "--gan-args" in text
    seen = []
    orig = argparse._ActionsContainer.add_argument

    def record(self, *names, **kw):
        seen.append((names, kw.get("help")))
        return orig(self, *names, **kw)
    monkeypatch.setattr(argparse._ActionsContainer, "add_argument", record)
    ada.get_args([])
    assert len(seen) > 25 and all(h for _, h in seen), [n for n, h in seen if not h]


def test_benchmark_prints_json(capsys):
    assert ada.main(["--benchmark", "--width", "0.05", "--mixdisc-batch", "4",
                     "--device", "cpu"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["script"] == "adagan.py" and rec["gen_showers_per_s"] > 0 and rec["train_samples_per_s"] > 0
