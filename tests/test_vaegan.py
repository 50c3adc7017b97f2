"""Tests of vaegan.py: the locally connected layer, the model, end-to-end tiny runs (ILD 30x30x30
and pre-reduced input, ensemble of 2), sampling, resume, torchrun, bad input, amplification."""
import importlib
import json
import math

import h5py
import numpy as np
import pytest
import torch

from conftest import run_script, run_torchrun

vaegan = importlib.import_module("vaegan")
common = importlib.import_module("common")

# tiny everything: 100 training showers, 2 members, small layers
TINY = ["--n-train", "100", "--ensemble", "2", "--batch-size", "32", "--channels", "4,8", "--latent", "4",
        "--mbd-kernels", "4", "--select-bins", "5"]


def check_generated(path, n):
    with h5py.File(path, "r") as f:
        assert "showers" in f
        s = f["showers"][:]
    assert s.shape == (n, 10, 10)
    assert np.isfinite(s).all() and (s >= 0).all()
    assert ((s == 0) | (s >= common.ILD_MIP_CUT_MEV)).all()      # MIP cut applied
    return s


# ---------------------------------------------------------------- unit tests


def test_locally_connected_parameter_count():
    lc = vaegan.LocallyConnected2d(2, 3, (5, 5), kernel=3, stride=1, padding=1)
    assert lc.out_size == (5, 5)
    # 25 positions, each its own 3 x (2*3*3) weights, plus a bias per output channel and position
    assert sum(p.numel() for p in lc.parameters()) == 25 * 3 * 18 + 3 * 25
    lc2 = vaegan.LocallyConnected2d(4, 6, (10, 10), kernel=3, stride=2, padding=1)
    assert lc2.out_size == (5, 5)
    assert sum(p.numel() for p in lc2.parameters()) == 25 * 6 * 36 + 6 * 25
    assert lc2(torch.zeros(7, 4, 10, 10)).shape == (7, 6, 5, 5)


def test_locally_connected_is_a_conv_with_tied_weights():
    """With the same weights at every position it must equal Conv2d (checks the patch layout)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
    lc = vaegan.LocallyConnected2d(2, 3, (6, 6), kernel=3, stride=2, padding=1)
    with torch.no_grad():
        lc.weight.copy_(conv.weight.reshape(3, 18).t().expand_as(lc.weight))
        lc.bias.copy_(conv.bias.view(3, 1, 1).expand_as(lc.bias))
    x = torch.randn(4, 2, 6, 6)
    torch.testing.assert_close(lc(x), conv(x), rtol=1e-5, atol=1e-5)


def test_locally_connected_not_translation_equivariant():
    torch.manual_seed(0)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 3, 3] = 1.0
    xs = torch.roll(x, 1, dims=3)                  # the same input, shifted by one pixel
    conv = torch.nn.Conv2d(1, 2, 3, padding=1, bias=False)
    lc = vaegan.LocallyConnected2d(1, 2, (8, 8), 3, 1, 1)
    with torch.no_grad():
        lc.bias.zero_()
        # a convolution's response shifts with its input ...
        torch.testing.assert_close(conv(xs), torch.roll(conv(x), 1, dims=3))
        # ... a locally connected layer's does not
        assert not torch.allclose(lc(xs), torch.roll(lc(x), 1, dims=3), atol=1e-3)


def test_model_shapes():
    m = vaegan.VAEGAN(latent=5, channels=(4, 8), mbd_kernels=3)
    x = torch.rand(6, 1, 10, 10)
    mu, logvar = m.enc(x)
    assert mu.shape == logvar.shape == (6, 5)
    y = m.dec(mu)
    assert y.shape == (6, 1, 10, 10) and (y >= 0).all()
    assert m.disc(x).shape == (6,)
    assert m.disc.features(x).shape == (6, 64)
    assert vaegan.VAEGAN(5, (4, 8), 0).disc.mbd is None and m.disc.mbd.shape == (65, 3 * 8)


def test_observables_known_shower():
    s = np.zeros((2, 10, 10), np.float32)
    s[0, 0, 0], s[0, 9, 0] = 3.0, 1.0          # x is the first axis: pixel centres at -67.5 ... 67.5 mm
    s[1, 4, 5] = 0.05                          # below the MIP cut
    o = common.ild10_observables(s)
    np.testing.assert_allclose(o["e_vis"], [4.0, 0.05], rtol=1e-6)
    np.testing.assert_array_equal(o["n_hits"], [2, 0])
    np.testing.assert_allclose(o["cog_x"][0], (3 * -67.5 + 1 * 67.5) / 4)
    np.testing.assert_allclose(o["cog_y"][0], -67.5)
    assert o["pixel"].shape == (2, 100) and np.isnan(o["pixel"]).sum() == 198     # NaN: below the cut
    np.testing.assert_allclose(np.sort(common._values(o["pixel"])), [1.0, 3.0])


def test_mip_cut_in_training_path():
    """No generated pixel strictly between 0 and the MIP cut: in the training path (what the
    discriminator sees) and in sampling; the gradient passes straight through the cut."""
    y = (torch.rand(2000, 1, 10, 10, generator=torch.Generator().manual_seed(0)) * 0.05).requires_grad_()
    out = vaegan.mip_cut(y, torch.tensor(6.0))
    cut = math.log1p(common.ILD_MIP_CUT_MEV) / 6.0                   # model space: log1p(E) / scale
    assert ((out == 0) | (out >= cut)).all() and (out == 0).any() and (out > 0).any()
    out.sum().backward()
    assert torch.equal(y.grad, torch.ones_like(y))
    torch.manual_seed(0)
    decs = [vaegan.VAEGAN(4, (4, 8), 0).dec.eval()]
    with torch.no_grad():
        scale = math.log1p(common.ILD_MIP_CUT_MEV) / float(decs[0](torch.randn(500, 4)).median())  # half cut
    s = vaegan.sample_decoders(decs, 3000, 4, scale, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert (s == 0).any() and (s > 0).any()
    assert ((s == 0) | (s >= common.ILD_MIP_CUT_MEV)).all()


def test_equivalent_size_hand_made_crossing():
    """JSD falling like 1/size: the truth curve crosses the generated JSD 10^-2.5 at 10^2.5 showers
    (log-log interpolation between 100 and 1000); never reached: inf; already worse: None."""
    sizes, jsd = np.array([10, 100, 1000, 10000]), np.array([1e-1, 1e-2, 1e-3, 1e-4])
    assert common._crossing_size(sizes, jsd, 10 ** -2.5) == pytest.approx(10 ** 2.5)
    assert common._crossing_size(sizes, jsd, 2e-3) == pytest.approx(500.0)
    assert common._crossing_size(sizes, jsd, 1e-5) == math.inf
    assert common._crossing_size(sizes, jsd, 0.5) is None


def test_amplification_scan_known_cases():
    rng = np.random.default_rng(0)
    ref, pool = rng.normal(size=1000), rng.normal(size=(4000, 1))
    r = common.amplification_scan(ref, pool, ref.copy(), (5, 10, 100, 200))   # 200 needs 2000 reference values
    assert r["n_quantiles"] == [5, 10, 100] and r["truth_jsd"].shape == (3, len(r["sizes"]))
    assert r["sizes"][-1] == 4000 and (r["gen_jsd"] == 0).all()                # the reference itself: JSD 0
    assert all(v == math.inf for v in r["equivalent_size"].values())           # better than the whole pool
    r = common.amplification_scan(ref, pool, ref + 100.0, (5, 10))             # disjoint support: JSD 1
    assert (r["gen_jsd"] == 1).all() and all(v is None for v in r["equivalent_size"].values())
    # a truth sample of 300 is worth about 300 truth showers
    eq = common.amplification_scan(ref, pool, rng.normal(size=300), (5, 10, 20), seed=1)["equivalent_size"]
    assert all(100 < v < 900 for v in eq.values()), eq
    # rows with NaN (a pixel spectrum): subsets are of events, their values pooled
    rows = np.where(rng.random((4000, 8)) < 0.5, rng.normal(size=(4000, 8)), np.nan)
    r = common.amplification_scan(ref, rows, rows[:2000], (10,), sizes=[10, 100, 4000])
    assert list(r["sizes"]) == [10, 100, 4000] and r["truth_jsd"][0, 0] > r["truth_jsd"][0, 2]


def test_amplification_study_grows_with_generated_size():
    """Generated and truth from one known distribution: the equivalent size grows with the size
    of the generated sample, for all five observables."""
    rng = np.random.default_rng(1)

    def showers(n):   # a random 10x10 'shower': gaussian blob, random centre and energy
        g = np.arange(10) - 4.5
        cx, cy = rng.normal(0, 0.7, (2, n, 1, 1))
        e = rng.gamma(50.0, 10.0, (n, 1, 1))
        img = np.exp(-((g[None, :, None] - cx) ** 2 + (g[None, None, :] - cy) ** 2) / 2.0)
        img = e * img / img.sum((1, 2), keepdims=True) * rng.uniform(0.8, 1.2, (n, 10, 10))
        return np.where(img < 0.1, 0.0, img)

    truth = showers(4000)                      # reference 2000 + pool 2000
    small, large = showers(30), showers(1500)
    eq_s, eq_l = ({k: r["equivalent_size"][10] for k, r in common.ild10_amplification(truth, g, (10,), 100, 0).items()}
                  for g in (small, large))
    assert set(eq_s) == set(vaegan.OBS)
    for k in eq_s:
        assert eq_l[k] is not None and eq_l[k] > (eq_s[k] or 0), (k, eq_s[k], eq_l[k])
    assert np.median(list(eq_l.values())) > 150


def test_toy_ild10_is_reduced_toy_ild(toy):
    """write_toy("ild10") is reduce_ild of write_toy("ild") with the same seed (exactly), and it
    matches another seed's reduction within statistics (two-sample KS, 0.1% level)."""
    with h5py.File(toy("ild", n=160), "r") as f:
        red, en = common.reduce_ild(f["30x30/layers"][:]), f["30x30/energy"][:]
    with h5py.File(toy("ild10", n=160), "r") as f:
        np.testing.assert_array_equal(f["showers"][:], red)
        np.testing.assert_array_equal(f["energy"][:], en)
    a = common.ild10_observables(common.make_toy_ild10(500, seed=11)["showers"])
    b = common.ild10_observables(common.reduce_ild(common.make_toy("ild", 500, seed=12)["30x30/layers"]))
    for k in vaegan.OBS:
        x, y = np.sort(common._values(a[k])), np.sort(common._values(b[k]))
        grid = np.concatenate([x, y])
        d = np.abs(np.searchsorted(x, grid, "right") / len(x) - np.searchsorted(y, grid, "right") / len(y)).max()
        assert d < 1.95 * math.sqrt((len(x) + len(y)) / (len(x) * len(y))), (k, d)


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ild_file(toy):
    return toy("ild", n=160)


@pytest.fixture(scope="module")
def reduced_file(ild_file, tmp_path_factory):
    with h5py.File(ild_file, "r") as f:
        s = common.reduce_ild(f["30x30/layers"][:])
    path = str(tmp_path_factory.mktemp("red") / "ild10.h5")
    with h5py.File(path, "w") as f:
        f["showers"] = s
    return path


@pytest.fixture(scope="module")
def run30(ild_file, tmp_path_factory):
    """Ensemble of 2, two epochs, on the 30x30x30 ILD layout, with the amplification study."""
    d = tmp_path_factory.mktemp("run30")
    r = run_script("vaegan.py", "--data", ild_file, *TINY, "--epochs", "2", "--amplify", "--amp-n", "400",
                   "--quantiles", "2,3,50", "--out", "run", cwd=d)
    assert r.returncode == 0, r.stderr
    return d / "run", r


def test_end_to_end_ild_layout(run30):
    out, r = run30
    assert "epoch 2/2" in r.stdout and "samples/s" in r.stdout and "ETA" in r.stdout
    for name in ("ckpt.pt", "generated.h5", "truth.h5", "metrics.json", "log.txt", "plots/amplification.png"):
        assert (out / name).is_file(), name
    check_generated(out / "generated.h5", 60)              # as many as held out
    with h5py.File(out / "generated.h5", "r") as f:
        assert f["energy"].shape == (60, 1)                 # held-out conditions carried over
    check_generated(out / "truth.h5", 60)
    m = json.loads((out / "metrics.json").read_text())
    assert m["toy"] is True and m["ensemble"] == 2 and len(m["best_epochs"]) == 2
    assert all(1 <= e <= 2 for e in m["best_epochs"])
    assert set(m["heldout_jsd"]) == set(vaegan.OBS)
    assert sorted(m["train_indices"] + m["heldout_indices"]) == list(range(160))
    amp = m["amplification"]
    assert set(amp["equivalent_size"]) == set(vaegan.OBS) and amp["n_train"] == 100
    assert list(amp["equivalent_size"]["e_vis"]) == ["2", "3"]                 # 30 reference showers: <= 3
    assert len(amp["equivalent_size"]["pixel"]) == 3                           # pixels: enough for 50 too
    for v in amp["equivalent_size"]["e_vis"].values():
        assert v is None or v == "inf" or v > 0
    assert amp["curves"]["e_vis"]["sizes"][-1] == 30 and amp["n_generated"] == 400
    assert "worth" in r.stdout.strip().splitlines()[-1]
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["epoch"] == 2 and len(ck["members"]) == 2 and ck["geometry"] == "ild10"
    assert {"python", "numpy", "torch"} <= set(ck["rng"])
    w0, w1 = (ck["members"][k]["model"]["dec.lc1.weight"] for k in (0, 1))
    assert not torch.equal(w0, w1)                           # two different models


def test_generate_from_ckpt(run30, tmp_path, monkeypatch):
    out, _ = run30
    monkeypatch.chdir(tmp_path)                                  # in-process: saves a torch import
    assert vaegan.main(["--generate", "50", "--ckpt", str(out / "ckpt.pt"), "--out", "g.h5"]) == 0
    s = check_generated(tmp_path / "g.h5", 50)
    assert s.sum() > 0


def test_reduced_input_and_resume(run30, reduced_file, tmp_path):
    """The pre-reduced file holds the same showers as the 30x30x30 one, so 1 epoch on it, then
    --resume to 2, must give the very weights of run30's uninterrupted 2 epochs."""
    args = ["--data", reduced_file, *TINY, "--out", "run"]
    r = run_script("vaegan.py", *args, "--epochs", "1", "--n-gen", "30", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    check_generated(tmp_path / "run" / "generated.h5", 30)
    with h5py.File(tmp_path / "run" / "generated.h5", "r") as f:
        assert "energy" not in f                                 # the input had none
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["epoch"] == 1
    r = run_script("vaegan.py", *args, "--epochs", "2", "--resume", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and "epoch 2/2" in r.stdout and "epoch 1/2" not in r.stdout
    check_generated(tmp_path / "run" / "generated.h5", 60)
    a = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    b = torch.load(run30[0] / "ckpt.pt", weights_only=False)
    assert a["epoch"] == 2 and a["step"] == b["step"]
    for ma, mb in zip(a["members"], b["members"]):
        for k in ma["model"]:
            torch.testing.assert_close(ma["model"][k], mb["model"][k], msg=k)
        assert ma["best"]["epoch"] == mb["best"]["epoch"]


def test_torchrun_two_processes_match_single(run30, ild_file, tmp_path):
    """Members are spread over ranks; each has its own generator, so the result equals one process."""
    r = run_torchrun("vaegan.py", "--data", ild_file, *TINY, "--epochs", "2", "--out", "run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 2/2") == 1                    # rank 0 alone logs
    check_generated(tmp_path / "run" / "generated.h5", 60)
    a = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    b = torch.load(run30[0] / "ckpt.pt", weights_only=False)
    for ma, mb in zip(a["members"], b["members"]):
        torch.testing.assert_close(ma["model"]["dec.lc1.weight"], mb["model"]["dec.lc1.weight"])


def test_benchmark_and_help(tmp_path, capsys):
    r = run_script("vaegan.py", "--benchmark", "--ensemble", "2", "--channels", "4,8", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    res = json.loads(lines[-1])
    assert len(lines) == 1 and res["script"] == "vaegan.py"
    assert res["gen_showers_per_s"] > 0 and res["train_samples_per_s"] > 0
    assert list(tmp_path.iterdir()) == []                      # no files written
    with pytest.raises(SystemExit) as e:
        vaegan.get_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--amplify" in out and "--ensemble" in out


# ---------------------------------------------------------------- bad input


def _bad_files(d):
    d.mkdir(exist_ok=True)
    files = {}

    def h5(name, **arrays):
        p = d / name
        with h5py.File(p, "w") as f:
            for k, v in arrays.items():
                f[k] = v
        files[name] = p

    good = np.ones((20, 10, 10), np.float32)
    h5("nokey.h5", other=good)
    h5("shape.h5", showers=np.ones((20, 9, 10), np.float32))
    h5("nan.h5", showers=np.where(np.arange(100).reshape(1, 10, 10) == 5, np.nan, good))
    h5("neg.h5", showers=-good)
    h5("empty.h5", showers=np.zeros((0, 10, 10), np.float32))
    h5("mismatch.h5", **{"30x30/energy": np.ones((3, 1), np.float32),
                         "30x30/layers": np.ones((4, 30, 30, 30), np.float32)})
    h5("nolayers.h5", **{"30x30/energy": np.ones((3, 1), np.float32)})
    h5("few.h5", showers=good)                                     # 20 <= --n-train 100
    (d / "junk.h5").write_text("not hdf5")
    files["junk.h5"] = d / "junk.h5"
    files["missing.h5"] = d / "missing.h5"
    return files


def test_bad_inputs(tmp_path, monkeypatch, capsys):
    """Each bad file: exit 2, one stderr line naming the file, nothing written. In-process through
    main() (a subprocess per file costs a torch import each); one file also as a real subprocess."""
    files = _bad_files(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    for name, path in files.items():
        rc = vaegan.main(["--data", str(path), "--n-train", "100", "--epochs", "1", "--out", "o"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (name, lines)
        assert len(lines) == 1 and lines[0].startswith("vaegan.py: error: ") and name in lines[0], (name, lines)
        assert not (tmp_path / "o").exists(), name
    r = run_script("vaegan.py", "--data", files["nan.h5"], "--out", "o", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "nan.h5" in r.stderr and not (tmp_path / "o").exists()


def test_bad_flags_and_ckpt(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for bad in (["--ensemble", "0"], ["--channels", "4"], ["--label-smooth", "0.7"], ["--generate", "5"]):
        with pytest.raises(SystemExit) as e:
            vaegan.get_args(bad)
        assert e.value.code == 2, bad
    capsys.readouterr()
    (tmp_path / "bad.pt").write_text("nope")
    rc = vaegan.main(["--generate", "5", "--ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "g.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "bad.pt" in err
    assert not (tmp_path / "g.h5").exists()
    rc = vaegan.main(["--data", "x.h5", "--out", "o", "--resume"])     # missing file first
    assert rc == 2 and "x.h5" in capsys.readouterr().err


def test_resume_with_other_ensemble_size(run30, ild_file, tmp_path, monkeypatch, capsys):
    import shutil
    shutil.copytree(run30[0], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    flags = [f if f != "2" or i != TINY.index("--ensemble") + 1 else "3" for i, f in enumerate(TINY)]
    rc = vaegan.main(["--data", ild_file, *flags, "--epochs", "3", "--out", "run", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "ckpt.pt" in err and "ensemble" in err, err
