"""Tests of 2dgan.py: model sizes and Keras-equivalent details, the importable API, tiny end-to-end runs on toy
LCD showers (train, sample, resume, torchrun, streaming), bad input, --benchmark, --help."""
import importlib
import json
import math
import os

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import run_script, run_torchrun

m = importlib.import_module("2dgan")
TINY = ["--width", "0.125", "--batch-size", "8", "--val-frac", "0.25", "--log-every", "2", "--seed", "3"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """In-process model code on one thread (2 shared cores: more threads only fight)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- model units


def keras_param_count(module):
    """As Keras counts: trainable parameters plus BatchNorm moving mean and variance."""
    bns = [mod for mod in module.modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    return sum(p.numel() for p in module.parameters()) + sum(b.running_mean.numel() * 2 for b in bns)


def test_parameter_counts_of_default_models():
    # counted as Keras does (trainable + BatchNorm moving statistics); the original's 2,055,324 and 714,114
    G, D = m.Generator(), m.Discriminator()
    assert keras_param_count(G) == 2_055_324
    assert keras_param_count(D) == 714_114


def test_generate_on_device_equals_host_copy():
    """host=False (adagan.py's MIXDISC keeps its mixture samples on the device): the same showers, as a tensor."""
    torch.manual_seed(0)
    G, ep = m.Generator(latent=16, width=0.125), np.array([10.0, 250.0, 490.0], np.float32)
    G.relu_out.fill_(True)
    on_host, on_dev = (m.generate(G, ep, batch_size=2, seed=7, host=h) for h in (True, False))
    assert isinstance(on_host, np.ndarray) and torch.is_tensor(on_dev) and on_dev.device.type == "cpu"
    assert (on_host > 0).any() and np.array_equal(on_host, on_dev.numpy())


def test_shapes_output_switch_and_heads():
    torch.manual_seed(0)
    G, D = m.Generator(latent=16, width=0.125).eval(), m.Discriminator(width=0.125).eval()
    x = G(torch.randn(3, 16))
    assert x.shape == (3, 25, 25, 25)
    assert (x < 0).any()                       # linear output at first
    G.relu_out.fill_(True)
    assert (G(torch.randn(3, 16)) >= 0).all()  # ReLU after the switch
    img = torch.rand(3, 25, 25, 25)
    logit, ep, ecal = D(img)
    assert logit.shape == ep.shape == (3,)
    torch.testing.assert_close(ecal, img.sum((1, 2, 3)))


def test_keras_same_padding_is_asymmetric():
    pad = m._pad_same(8)
    assert pad.padding == (3, 4, 3, 4)
    bn = [mod for mod in m.Discriminator(width=0.125).modules() if isinstance(mod, torch.nn.BatchNorm2d)][0]
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    lrelu = [mod for mod in m.Generator(width=0.125).modules() if isinstance(mod, torch.nn.LeakyReLU)][0]
    assert lrelu.negative_slope == pytest.approx(0.3)


def test_branches_see_three_different_axis_pairs():
    v = torch.arange(24.0).view(1, 2, 3, 4)
    for p, q in zip(m._TO_BRANCH, m._FROM_BRANCH):
        torch.testing.assert_close(v.permute(*p).permute(*q), v)
    assert sorted(v.permute(*p).shape[1] for p in m._TO_BRANCH) == [2, 3, 4]


def test_validation_metric_hand_made_and_its_spread():
    # real: half the energy at depth 10, half at 12 (centre 11, variance 1); fake: 11 and 15 (centre 13,
    # variance 4); x = y = 5 in both (variance 0). Errors: z centre 2/11, z variance 3, the rest 0.
    real, fake = np.zeros((2, 6, 25, 25, 25), np.float32)
    real[:, 5, 5, [10, 12]] = 1.0
    fake[:, 5, 5, [11, 15]] = 1.0
    ep = np.full(6, 100.0)
    metric, sd = common.lcd_shower_metric(real, fake, ep, n_boot=20)
    assert metric == pytest.approx((2 / 11 + 3) / 6) and sd == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    noisy = rng.random((40, 25, 25, 25)).astype(np.float32) ** 8
    assert common.lcd_shower_metric(noisy, noisy, np.full(40, 100.0), n_boot=20) == (0.0, 0.0)
    metric, sd = common.lcd_shower_metric(noisy[:20], noisy[20:], np.full(20, 100.0), n_boot=50)
    assert metric > 0 and 0 < sd < metric
    # windows: all events, plus +-half GeV windows with at least min_count events
    w = common.lcd_val_windows(np.array([48.0, 52, 60, 99, 101, 300]), 5.0, 2)
    assert [list(x) for x in w] == [[0, 1, 2, 3, 4, 5], [0, 1], [3, 4]]


def test_labels_and_flips_the_original_way():
    g = torch.Generator().manual_seed(0)
    assert (m.flip_labels(0.9, 50, 0.0, g, "cpu") == 0.9).all()
    assert (m.flip_labels(0.9, 50, 1.0, g, "cpu") == 0.0).all()      # real 0.9 -> 0
    assert (m.flip_labels(0.0, 50, 1.0, g, "cpu") == 1.0).all()      # fake 0 -> 1
    lab = m.flip_labels(0.9, 20000, 0.05, g, "cpu")
    assert len(lab.unique()) == 2 and ((lab == 0) | (lab == lab.max())).all() and lab.max() == pytest.approx(0.9)
    assert abs((lab == 0).float().mean() - 0.05) < 0.01
    args = m.get_args([])
    assert (args.label_real, args.label_fake, args.label_flip) == (0.9, 0.0, 0.05)


def test_lr_schedule_constant_4_epochs_then_x079():
    assert m.lr_factor(0) == 1.0 and m.lr_factor(4) == 1.0
    assert m.lr_factor(10) == pytest.approx(math.exp(-0.012 * (200 - 81)))    # the original's file 200
    assert m.lr_factor(11) / m.lr_factor(10) == pytest.approx(0.787, abs=1e-3)
    assert m.lr_factor(30) / m.lr_factor(0) == pytest.approx(0.002, abs=3e-4)


def test_toy_and_paper_configurations():
    toy, paper = m.get_args([], toy_config=True), m.get_args(["--data", "x.h5"], toy_config=True)
    for k, v in m.TOY.items():
        assert getattr(toy, k) == v
    for k, v in m.PAPER.items():
        assert getattr(paper, k) == v and getattr(m.get_args([]), k) == v     # importers get the paper's
    assert m.get_args(["--width", "0.5"], toy_config=True).width == 0.5


def test_common_sf_ratio_per_50gev_hand_made():
    real, fake = np.zeros((2, 3, 2, 2), np.float32)
    ep = np.array([20.0, 100.0, 500.0])
    real[:, 0, 0] = [0.4, 2.0, 10.0]           # SF 0.02 everywhere
    fake[:, 0, 0] = [0.44, 1.8, 10.0]          # 0.022, 0.018, 0.02
    ratio, edges = common.sf_ratio_per_bin(fake, ep, real, ep)
    assert list(edges) == [10, 60, 110, 160, 210, 260, 310, 360, 410, 460, 510]
    assert ratio[0] == pytest.approx(1.1) and ratio[1] == pytest.approx(0.9) and ratio[-1] == pytest.approx(1.0)
    assert np.isnan(ratio[2:-1]).all()


def test_claim_metrics_hand_made():
    ep = np.arange(35.0, 510.0, 50.0)                        # one event per 50 GeV bin
    real = np.zeros((10, 25, 25, 25), np.float32)
    real[:, 12, 12, :] = (0.02 * ep / 25)[:, None]           # SF 0.02, flat depth profile
    c = common.lcd_claim_metrics(real, real * 1.05, ep)
    assert c["sf_ratio_per_50gev"]["ratio"] == pytest.approx([1.05] * 10) and c["sf_max_abs_dev"] == pytest.approx(0.05)
    assert c["profile_z_ratio"] == pytest.approx([1.05] * 25) and c["claim_sf_within_10pct"]
    fake = real.copy()
    fake[:, :, :, 4] *= 1.3                                  # layer 4 off by 30%
    c = common.lcd_claim_metrics(real, fake, ep)
    assert c["profile_z_max_abs_dev_layers_3_20"] == pytest.approx(0.3) and not c["claim_profile_z_within_20pct"]
    c = common.lcd_claim_metrics(real[:3], real[:3], ep[:3])  # empty bins: no claim, no NaN written
    assert c["sf_ratio_per_50gev"]["ratio"][3] is None and not c["claim_sf_within_10pct"]


# ---------------------------------------------------------------- API used by adagan.py


def test_api_train_with_weights_generate_write_load(toy, tmp_path):
    ecal, ep = m.load_lcd(toy("lcd", 32, 1))
    assert ecal.shape == (32, 25, 25, 25) and ecal.dtype == np.float32 and ep.shape == (32,)
    args = m.get_args(["--width", "0.125", "--batch-size", "8", "--epochs", "1", "--val-frac", "0.25",
                       "--device", "cpu"])
    tr, va = m.split_indices(32, args.val_frac, args.seed)
    w = np.zeros(len(tr))
    w[:4] = 1.0                                  # only 4 events may be drawn
    lines = []
    res = m.train(args, ecal, ep, weights=w / w.sum(), out_dir=str(tmp_path), log=lines.append)
    G = res["generator"]
    assert not G.training and res["best_epoch"] == 1 and len(res["history"]) == 1
    assert list(res["val_idx"]) == list(va)
    assert set(res["history"][0]["first_batch"][0]) <= set(tr[:4].tolist())
    x = m.generate(G, np.array([10.0, 250.0]), seed=0)
    assert x.shape == (2, 25, 25, 25) and x.dtype == np.float32 and (x >= 0).all()
    np.testing.assert_array_equal(x, m.generate(G, np.array([10.0, 250.0]), seed=0))
    assert x[1].sum() > x[0].sum()              # conditioned: more energy at 250 GeV than at 10 GeV
    G2, ck = m.load_checkpoint(str(tmp_path / "ckpt.pt"))
    np.testing.assert_array_equal(m.generate(G2, np.array([10.0, 250.0]), seed=0), x)
    m.write_lcd(str(tmp_path / "g.h5"), x, np.array([10.0, 250.0]))
    x3, e3 = m.load_lcd(str(tmp_path / "g.h5"))
    np.testing.assert_array_equal(x3, x)
    with pytest.raises(ValueError):
        m.train(args, ecal, ep, weights=np.ones(5))


def test_api_split_given_by_the_caller(toy):
    ecal, ep = m.load_lcd(toy("lcd", 32, 1))
    args = m.get_args(["--width", "0.125", "--batch-size", "8", "--epochs", "1", "--device", "cpu"])
    tr, va = np.arange(0, 32, 2), np.arange(1, 32, 2)       # not what split_indices would give
    w = np.zeros(len(tr))
    w[-3:] = 1.0                                           # one weight per training event
    res = m.train(args, ecal, ep, weights=w / 3, log=lambda s: None, split=(tr, va))
    assert list(res["train_idx"]) == list(tr) and list(res["val_idx"]) == list(va)
    assert set(res["history"][0]["first_batch"][0]) <= {26, 28, 30}
    for bad in (dict(split=(tr, va), weights=np.ones(len(tr) + 1)), dict(split=(tr, np.array([32])))):
        with pytest.raises(ValueError):
            m.train(args, ecal, ep, log=lambda s: None, **bad)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run2(tmp_path_factory, toy):
    """A 2-epoch tiny run on a toy LCD file as a user runs it, and the same run made in-process as
    1 epoch + --resume 1 epoch (in-process: the same code, without 2 more interpreter start-ups)."""
    data = toy("lcd", 32, 0)
    base = tmp_path_factory.mktemp("e2e")
    full = run_script("2dgan.py", "--data", data, "--epochs", "2", "--out", "full", *TINY, cwd=base)
    assert full.returncode == 0, full.stderr
    part = ["--data", data, "--out", str(base / "part"), *TINY]
    assert m.main(part + ["--epochs", "1"]) == 0
    assert m.main(part + ["--epochs", "2", "--resume"]) == 0
    return base, full


def test_train_outputs(run2):
    base, full = run2
    out = base / "full"
    for name in ("ckpt.pt", "generated.h5", "metrics.json", "log.txt", "plots/sampling_fraction.png",
                 "plots/profiles.png"):
        assert (out / name).is_file(), name
    assert "epoch 2/2 | step" in full.stdout and "samples/s | ETA" in full.stdout
    with h5py.File(out / "generated.h5") as f:
        x, t = f["ECAL"][:], f["target"][:]
    assert x.shape == (8, 25, 25, 25) and t.shape == (8, 2)
    assert np.isfinite(x).all() and (x >= 0).all() and (t[:, 1] > 0).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["toy"] is True and len(metrics["history"]) == 2 and len(metrics["val_indices"]) == 8
    assert len(metrics["sf_ratio_per_50gev"]["edges_GeV"]) == 11 and len(metrics["profile_z_ratio"]) == 25
    assert "sampling fraction gen/real per 50 GeV bin" in full.stdout.strip().splitlines()[-1]
    with h5py.File(base / metrics["data"] if not os.path.isabs(metrics["data"]) else metrics["data"]) as f:
        np.testing.assert_allclose(t[:, 1], f["target"][:, 1][metrics["val_indices"]])   # held-out Ep
    assert "epoch 2/2" in (out / "log.txt").read_text()


def test_resume_continues_and_matches_uninterrupted(run2):
    base = run2[0]
    log = (base / "part" / "log.txt").read_text()
    assert "resumed from" in log and "epoch 1/1 | step" in log and "epoch 2/2 | step" in log
    ck_full = torch.load(base / "full" / "ckpt.pt", weights_only=False)
    ck_part = torch.load(base / "part" / "ckpt.pt", weights_only=False)
    assert ck_part["epoch"] == 2 and ck_part["step"] == ck_full["step"]
    for a, b in zip(ck_full["history"], ck_part["history"]):
        assert a["loss_d"] == pytest.approx(b["loss_d"], rel=1e-4)
        assert a["val_metric"] == pytest.approx(b["val_metric"], rel=1e-4)
    for k, v in ck_full["model"]["G"].items():
        torch.testing.assert_close(ck_part["model"]["G"][k], v, rtol=1e-4, atol=1e-5)


def test_generate_from_checkpoint(run2, tmp_path):
    base = run2[0]
    assert m.main(["--generate", "7", "--ckpt", str(base / "full" / "ckpt.pt"), "--energy", "2:500",
                   "--out", str(tmp_path / "gen.h5")]) == 0
    with h5py.File(tmp_path / "gen.h5") as f:
        assert f["ECAL"].shape == (7, 25, 25, 25) and f["target"].shape == (7, 2)
        e = f["target"][:, 1]
        assert ((e >= 2) & (e <= 500)).all() and (f["ECAL"][:] >= 0).all()


def test_streamed_glob_of_files(tmp_path, toy, capsys):
    for i, seed in enumerate((4, 5)):
        os.symlink(toy("lcd", 16, seed), tmp_path / f"EleEscan_{i}.h5")
    assert m.main(["--data", str(tmp_path / "EleEscan_*.h5"), "--max-data-gb", "1e-6", "--epochs", "1",
                   "--out", str(tmp_path / "s"), *TINY]) == 0
    assert "streamed file by file" in capsys.readouterr().out
    with h5py.File(tmp_path / "s" / "generated.h5") as f:
        assert f["ECAL"].shape == (8, 25, 25, 25)


def test_torchrun_resume_per_rank_streams(tmp_path, toy):
    """2 processes (gloo): 2 epochs in one go, and 1 epoch + --resume 1 epoch; the ranks draw different
    minibatches before and after the resume, and the resumed run equals the uninterrupted one."""
    flags = ["--data", toy("lcd", 48, 0), *TINY, "--val-frac", "0.2"]
    for out, more in (("full", ["--epochs", "2"]), ("part", ["--epochs", "1"]), ("part", ["--epochs", "2", "--resume"])):
        r = run_torchrun("2dgan.py", *flags, "--out", out, *more, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and (tmp_path / "part" / "generated.h5").is_file()
    ck_full, ck_part = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "part"))
    for rec in ck_part["history"]:
        firsts = rec["first_batch"]
        assert len(firsts) == 2 and len(firsts[0]) == 4 and firsts[0] != firsts[1]
    assert [r["first_batch"] for r in ck_part["history"]] == [r["first_batch"] for r in ck_full["history"]]
    for a, b in zip(ck_full["history"], ck_part["history"]):
        assert a["loss_d"] == pytest.approx(b["loss_d"], rel=1e-4)
    for k, v in ck_full["model"]["G"].items():
        torch.testing.assert_close(ck_part["model"]["G"][k], v, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input


def _write(path, **arrays):
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return path


def _good(n=4):
    return np.zeros((n, 25, 25, 25), np.float32), np.c_[np.full(n, 11.0), np.full(n, 50.0)].astype(np.float32)


@pytest.mark.parametrize("case", ["missing", "no_ecal", "shape", "nan", "ep0", "empty", "mismatch"])
def test_bad_input_exits_2_with_one_line(tmp_path, case, capfd):
    x, t = _good()
    p = str(tmp_path / f"{case}.h5")
    if case == "no_ecal":
        _write(p, target=t)
    elif case == "shape":
        _write(p, ECAL=np.zeros((4, 25, 25, 20), np.float32), target=t)
    elif case == "nan":
        x[0, 1, 2, 3] = np.nan
        _write(p, ECAL=x, target=t)
    elif case == "ep0":
        t[1, 1] = 0.0
        _write(p, ECAL=x, target=t)
    elif case == "empty":
        _write(p, ECAL=np.zeros((0, 25, 25, 25), np.float32), target=np.zeros((0, 2), np.float32))
    elif case == "mismatch":
        _write(p, ECAL=x, target=t[:3])
    flags = ["--data", p, "--out", str(tmp_path / "o"), "--epochs", "1", *TINY]
    if case == "nan":      # one case as a user runs it; the others in-process (same code path, faster)
        r = run_script("2dgan.py", *flags, cwd=tmp_path)
        code, err = r.returncode, r.stderr
    else:
        code = m.main(flags)
        err = capfd.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("2dgan.py: error: ") and p in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_bad_checkpoint(tmp_path, capfd):
    bad = tmp_path / "ckpt.pt"
    bad.write_text("not a checkpoint")
    assert m.main(["--generate", "3", "--ckpt", str(bad), "--out", str(tmp_path / "g.h5")]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and not (tmp_path / "g.h5").exists()


def test_bad_flag_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        m.get_args(["--epochs", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        m.get_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--benchmark" in out and "--compile" in out and "--energy" in out


def test_benchmark_json_and_bf16_ignored_on_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert m.main(["--benchmark", "--device", "cpu", "--dtype", "bf16", "--width", "0.125",
                   "--gen-batch", "8", "--bench-batch", "4", "--bench-steps", "1"]) == 0
    r = capsys.readouterr()
    out = json.loads(r.out.strip().splitlines()[-1])
    assert out["script"] == "2dgan.py" and out["dtype"] == "fp32" and out["gen_showers_per_s"] > 0
    assert out["train_samples_per_s"] > 0 and "ignored" in r.err
    assert os.listdir(tmp_path) == []
    args = m.get_args(["--compile", "--dtype", "bf16"])
    assert args.compile and args.dtype == "bf16"


@pytest.mark.parametrize("bn_mode", ["frozen", "batch"])
def test_regime_during_training(toy, bn_mode):
    """frozen (default): BatchNorm on its initial moving statistics and dropout off while training; batch:
    textbook. Output linear in epochs 1-2, ReLU from 3; the lr is set per 'file' from lr_factor."""
    ecal, ep = m.load_lcd(toy("lcd", 32, 1))
    epochs = 3 if bn_mode == "frozen" else 1
    args = m.get_args(["--width", "0.125", "--batch-size", "8", "--epochs", str(epochs), "--device", "cpu",
                       "--val-frac", "0.25", "--file-events", "8", "--lr-const-epochs", "0", "--bn-mode", bn_mode])
    seen = []

    def hook(mod, inp, out):
        if isinstance(mod, torch.nn.Dropout):
            seen.append(("dropout", mod.training))
        elif isinstance(mod, m.Generator) and torch.is_grad_enabled():       # training G steps only
            seen.append(("relu", bool(mod.relu_out)))
    h = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        res = m.train(args, ecal, ep, log=lambda s: None)
    finally:
        h.remove()
    bns = [mod for net in (res["generator"], res["discriminator"]) for mod in net.modules()
           if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)]
    tracked = sum(int(b.num_batches_tracked) for b in bns)
    drop = {t for k, t in seen if k == "dropout"}
    if bn_mode == "frozen":
        assert tracked == 0 and all((b.running_mean == 0).all() and (b.running_var == 1).all() for b in bns)
        assert drop == {False}
        relu = [t for k, t in seen if k == "relu"]
        assert len(relu) == 9 and relu == [False] * 6 + [True] * 3      # 3 steps per epoch
    else:
        assert tracked > 0 and True in drop
    # 24 training events, --file-events 8: 3 files per epoch, the last at t = epoch + 2/3
    for rec in res["history"]:
        t = rec["epoch"] - 1 + 2 / 3
        assert rec["lr_g"] == pytest.approx(5e-4 * math.exp(-0.24 * max(0, t - 0.05)))
