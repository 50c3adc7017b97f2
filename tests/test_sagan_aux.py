"""Tests of sagan_aux.py: attention and regressor units, end-to-end toy runs (.h5 and .npz),
sampling, resume, torchrun, bad input, benchmark."""
import importlib
import json
import os

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import run_script, run_torchrun

S = importlib.import_module("sagan_aux")
TINY = ["--toy-n", "64", "--batch-size", "16", "--ch", "8", "--nz", "8", "--val-frac", "0.25",
        "--log-every", "2", "--n-eval", "16"]
N = 64          # toy events: 48 train (3 steps of 16 per epoch), 16 held out
KEYS = ("EnergyDeposit", "ParticleMomentum", "ParticlePoint", "ParticlePDG")


def check_mlhep(path, n, nonzero=False):
    if path.endswith(".npz"):
        with np.load(path) as f:
            d = {k: f[k] for k in KEYS}
    else:
        with h5py.File(path, "r") as f:
            d = {k: f[k][()] for k in KEYS}
    assert d["EnergyDeposit"].shape == (n, 30, 30)
    assert d["ParticleMomentum"].shape == (n, 3) and d["ParticlePoint"].shape == (n, 3)
    assert d["ParticlePDG"].shape == (n,)
    assert np.isfinite(d["EnergyDeposit"]).all() and (d["EnergyDeposit"] >= 0).all()
    assert d["EnergyDeposit"].sum() > 0 or not nonzero   # a few-step G in eval mode (BN running stats) may be all 0
    return d


# ------------------------------------------------------------------ units

def test_attention_identity_at_init():
    torch.manual_seed(0)
    att = S.SelfAttention(16)
    assert att.gamma.item() == 0.0 and att.query.out_features == 2 and att.key.out_features == 2
    assert att.value.out_features == 8 and att.out.out_features == 16
    x = torch.randn(3, 16, 8, 8)
    assert torch.equal(att(x), x)


def _attention_by_hand(att, x):
    """The SAGAN block written out position by position: query of cell i, keys and values max-pooled
    over each 2x2 block j, out_i = x_i + gamma * W_o sum_j softmax_j(q_i . k_j) v_j."""
    b, c, h, w = x.shape
    out = x.clone()
    lin = lambda m, u: m.weight @ u + m.bias   # noqa: E731
    for n in range(b):
        keys, vals = [], []
        for by in range(0, h, 2):
            for bx in range(0, w, 2):
                cells = [x[n, :, by + dy, bx + dx] for dy in (0, 1) for dx in (0, 1)]
                keys.append(torch.stack([lin(att.key, u) for u in cells]).max(0).values)
                vals.append(torch.stack([lin(att.value, u) for u in cells]).max(0).values)
        keys, vals = torch.stack(keys), torch.stack(vals)
        for iy in range(h):
            for ix in range(w):
                a = torch.softmax(keys @ lin(att.query, x[n, :, iy, ix]), 0)
                out[n, :, iy, ix] += att.gamma * lin(att.out, a @ vals)
    return out


def test_attention_matches_hand_written_block():
    torch.manual_seed(1)
    att = S.SelfAttention(16, sn=False)
    with torch.no_grad():
        att.gamma.fill_(0.7)
        x = torch.randn(2, 16, 4, 6)
        torch.testing.assert_close(att(x), _attention_by_hand(att, x), atol=1e-5, rtol=1e-5)


def test_chunked_attention_equals_unchunked():
    torch.manual_seed(2)
    att = S.SelfAttention(32).eval()       # eval: no power iteration between the calls
    with torch.no_grad():
        att.gamma.fill_(1.3)
        x = torch.randn(50, 32, 16, 16)
        whole = att(x, chunk=50)
        for chunk in (1, 7, 32):
            assert (att(x, chunk=chunk) - whole).abs().max().item() < 1e-5
        assert (whole - x).abs().max().item() > 0.1    # the block does something


def test_shapes_and_parameter_counts():
    args = S.get_args(["--ch", "16", "--nz", "8"])
    G, D, R = S.build(args)
    z, c = torch.randn(4, 8), torch.randn(4, 5)
    raw = torch.tensor([[1.0, -2.0, 30.0, 0.5, -0.5]] * 4)
    x = G(z, c)
    assert x.shape == (4, 1, 30, 30) and (x >= 0).all() and (x > 0).any()
    a = R(x + 1e-3, S.frame_maps(raw), c)
    assert a.shape == (4, 2)
    assert D(x, S.frame_maps(raw), c, a).shape == (4,)
    base = S.build(S.get_args(["--ch", "16", "--nz", "8", "--baseline"]))
    assert base[2] is None
    n = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    assert n(G) > n(base[0]) and n(D) > n(base[1])          # attention blocks only in the SAGAN
    assert not any(isinstance(m, S.SelfAttention) for m in base[0].modules())
    assert S.build(S.get_args(["--aux", "sparsity", "--ch", "16"]))[2].head[-1].out_features == 20


def test_frame_maps_follow_the_momentum():
    # p along +x from point (0, 0): centre at x = 25 * 0.2 = 5 cells; images[n, iy, ix]
    fr = S.frame_maps(torch.tensor([[2.0, 0.0, 10.0, 0.0, 0.0]]))[0] * 15
    assert fr[0, 7, 20].item() == pytest.approx(20 - 14.5 - 5)     # along = x - 5
    assert fr[1, 7, 20].item() == pytest.approx(7 - 14.5)          # across = y
    fr = S.frame_maps(torch.tensor([[0.0, 3.0, 10.0, 1.0, 0.0]]))[0] * 15   # p along +y
    assert fr[0, 25, 3].item() == pytest.approx(25 - 14.5 - 7.5)
    assert fr[1, 25, 3].item() == pytest.approx(-(3 - 14.5 - 1.0))


def test_frame_maps_agree_with_common_asymmetry():
    d = common.make_toy("lhcb", 50, seed=1)
    fr = S.frame_maps(torch.tensor(S.conditions(d))).numpy()
    e = d["EnergyDeposit"].astype(np.float64)
    for k in (0, 1):
        mine = np.where(fr[:, k] >= 0, e, -e).sum((1, 2)) / e.sum((1, 2))
        np.testing.assert_allclose(mine, S.aux_target("asymmetry", e, d["ParticleMomentum"], d["ParticlePoint"])[:, k],
                                   atol=1e-6)


# ------------------------------------------------------------------ MLHEP protocol (common.py)

def _hand_shower(cells):
    img = np.zeros((1, 30, 30))
    for iy, ix, e in cells:   # [i_y, i_x]; cell centre x = i_x - 14.5, y = i_y - 14.5
        img[0, iy, ix] = e
    return img


def test_transverse_asymmetry_convention_on_a_hand_made_shower():
    """Transverse side 1 = left of p_xy (counter-clockwise). MLHEP (calogan_metrics.get_assymetry,
    orthog=True) takes the side above the line y = y_c + (py/px)(x - x_c): left only when px > 0."""
    # centre (0, 0) (point 0, p_xy / p_z tiny); 3 units at y = +2.5 (above), 1 unit at y = -2.5
    img = _hand_shower([(17, 15, 3.0), (12, 15, 1.0)])
    pt = np.zeros((1, 3))

    def mlhep(p):   # MLHEP's rule, written out for this shower
        xs, ys = np.meshgrid(np.arange(30) - 14.5, np.arange(30) - 14.5)
        above = ys - (p[1] / p[0]) * xs >= 0
        return (img[0][above].sum() - img[0][~above].sum()) / img.sum()
    for p, ours in (((1.0, 0.0), 0.5), ((-1.0, 0.0), -0.5), ((1.0, 0.2), 0.5), ((-1.0, -0.3), -0.5)):
        mom = np.array([[p[0], p[1], 1e4]])
        a = common.lhcb_asymmetry(img, mom, pt, orthogonal=True)[0]
        assert a == pytest.approx(ours)                         # +y is left of +x, right of -x
        assert mlhep(p) == pytest.approx(0.5)                    # MLHEP: above the line, whatever px
        assert a == pytest.approx(np.sign(p[0]) * mlhep(p))     # ours = sign(px) x MLHEP
    # along +y, left is -x: 2 units at x = -4.5, 6 at x = +4.5 -> (2 - 6) / 8
    img2 = _hand_shower([(15, 10, 2.0), (15, 19, 6.0)])
    assert common.lhcb_asymmetry(img2, np.array([[0.0, 1.0, 1e4]]), pt, orthogonal=True)[0] == pytest.approx(-0.5)


def test_mlhep_physics_features_columns():
    # one hot cell 3 cells ahead of the centre along +x: asymmetry along 1, across 1 (on the line
    # counts as side 1), widths 0, sparsity 1/900 at every alpha
    img = _hand_shower([(14, 18, 5.0)])
    f = common.lhcb_physics_features(img, np.array([[1.0, 0.0, 1e4]]), np.array([[-0.5, -0.5, 0.0]]))
    assert f.shape == (1, 24)
    np.testing.assert_allclose(f[0, :4], [1.0, 1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(f[0, 4:], 1 / 900)
    assert common.LHCB_PRD_CLUSTERS == 100 and common.LHCB_PRD_RUNS == 100   # score.py


def _blob_showers(n, ahead, seed):
    """n showers, each a 3x3 blob 4 cells ahead of (or behind) the centre along a random p_xy."""
    rng = np.random.default_rng(seed)
    phi = rng.uniform(0, 2 * np.pi, n)
    mom = np.stack([np.cos(phi), np.sin(phi), np.full(n, 1e4)], 1)
    pt = np.c_[rng.uniform(-3, 3, (n, 2)), np.zeros(n)]
    img = np.zeros((n, 30, 30))
    s = 4.0 if ahead else -4.0
    for i in range(n):
        cx, cy = pt[i, :2] + s * mom[i, :2] + 14.5
        ix, iy = int(round(cx)), int(round(cy))
        img[i, iy - 1:iy + 2, ix - 1:ix + 2] = rng.uniform(0.5, 1.5, (3, 3))
    return img, mom, pt


def test_mlhep_prd_auc_identical_and_disjoint():
    img, mom, pt = _blob_showers(300, True, 0)
    r = common.lhcb_prd(img, img, mom, pt, num_runs=3)
    assert r["prd_auc_physics"] == pytest.approx(1.0, abs=1e-6) and r["score"] == pytest.approx(1.0, abs=1e-6)
    assert r["features"][0].shape == (300, 24)
    img2, mom2, pt2 = _blob_showers(300, True, 1)      # same distribution, other showers
    assert common.lhcb_prd(img, img2, mom, pt, mom2, pt2, num_clusters=20, num_runs=3)["prd_auc_physics"] > 0.85
    behind = _blob_showers(300, False, 1)              # longitudinal asymmetry -1 instead of +1
    r = common.lhcb_prd(img, *behind[:1], mom, pt, *behind[1:], num_runs=3)
    assert r["prd_auc_physics"] < 0.01 and r["score"] < 0.01


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)      # small tensors: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(n)


def test_regressor_learns_toy_asymmetry(one_thread):
    torch.manual_seed(0)
    d = common.make_toy("lhcb", 400, seed=3)
    y = S.aux_target("asymmetry", d["EnergyDeposit"], d["ParticleMomentum"], d["ParticlePoint"])
    raw = torch.tensor(S.conditions(d), dtype=torch.float32)
    c = (raw - raw.mean(0)) / raw.std(0)
    e, fr = torch.tensor(d["EnergyDeposit"]).unsqueeze(1), S.frame_maps(raw)
    mu, sd = y.mean(0), y.std(0)
    t = torch.tensor((y - mu) / sd, dtype=torch.float32)
    R = S.Regressor(2, width=32)
    opt = torch.optim.Adam(R.parameters(), 1e-2)
    va = slice(300, 400)

    def rel_err():
        with torch.no_grad():
            return ((R(e[va], fr[va], c[va]) - t[va]) ** 2).mean(0).sqrt().numpy()   # RMSE / std
    start = rel_err()
    for step in range(1, 601):
        i = torch.randint(0, 300, (32,))
        loss = ((R(e[i], fr[i], c[i]) - t[i]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 and (rel_err() < 0.4).all():
            break
    assert start.min() > 0.8
    assert (rel_err() < 0.5).all(), rel_err()


def test_flags(capsys):
    assert S.get_args(["--baseline"]).aux == "none"
    for bad in (["--epochs", "0"], ["--aux", "energy"], ["--ch", "4"]):
        with pytest.raises(SystemExit) as e:
            S.get_args(bad)
        assert e.value.code == 2 and "sagan_aux.py: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        S.get_args(["--val-frac", "1.5"])
    with pytest.raises(SystemExit):
        S.get_args(["--generate", "5"])        # needs --ckpt and --conditions


# ------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def work(tmp_path_factory, toy):
    """The runs shared by the tests below: full = 2 epochs without --data (toy .h5 cached under
    data/); half = 1 epoch on the same toy events as .npz, then resumed to 2 epochs."""
    w = tmp_path_factory.mktemp("sagan")
    h5, npz = toy("lhcb", N, 0, ".h5"), toy("lhcb", N, 0, ".npz")
    runs = {}
    for name, extra in (("full", ["--epochs", "2"]), ("half", ["--data", npz, "--epochs", "1"]),
                        ("resumed", ["--data", npz, "--epochs", "2", "--resume"])):
        p = run_script("sagan_aux.py", *TINY, *extra, "--out", w / name.replace("resumed", "half"), cwd=w)
        assert p.returncode == 0, p.stderr[-2000:]
        runs[name] = p
    return w, h5, npz, runs


def test_train_outputs(work):
    w, h5, npz, runs = work
    out = runs["full"].stdout
    assert "no --data: training on TOY lhcb showers (data/toy_lhcb_64_s0.h5)" in out
    assert "epoch 2/2 | step" in out and "samples/s | ETA" in out
    d = check_mlhep(str(w / "full" / "generated.h5"), 16)
    m = json.load(open(w / "full" / "metrics.json"))
    with np.load(npz) as f:   # generated for the held-out conditions (the cached toy = the same events)
        val = np.array(m["val_indices"])
        for k in ("ParticleMomentum", "ParticlePoint", "ParticlePDG"):
            np.testing.assert_array_equal(d[k], f[k][val])
    assert m["toy"] is True and m["n_val"] == 16 and m["n_train"] == 48 and m["step"] == 6
    for k in ("prd_auc_images", "prd_auc_physics"):
        assert 0.0 <= m[k] <= 1.0
    assert m["score"] == min(m["prd_auc_images"], m["prd_auc_physics"])
    assert len(m["aux_rmse_val"]) == 2 and m["aux"] == "asymmetry"
    for name in ("mean_image", "asymmetry", "width", "sparsity", "energy_sum"):
        assert (w / "full" / "plots" / f"{name}.png").stat().st_size > 1000
    log = (w / "full" / "log.txt").read_text()
    assert "epoch 2/2" in log and "PRD-AUC" in log
    ck = torch.load(w / "full" / "ckpt.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["step"] == 6 and set(ck["model"]) == {"G", "D", "R"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"]["G"])
    assert not [f for f in os.listdir(w / "full") if "tmp" in f]
    assert not (w / "full" / "generated.npz").exists()      # .h5 input: .h5 output only
    d = check_mlhep(str(w / "half" / "generated.npz"), 16)  # .npz input: both
    np.testing.assert_array_equal(d["EnergyDeposit"], check_mlhep(str(w / "half" / "generated.h5"), 16)["EnergyDeposit"])
    assert json.load(open(w / "half" / "metrics.json"))["toy"] is False   # a .npz carries no toy flag


def test_baseline_in_process(toy, tmp_path, capsys):
    out = tmp_path / "base"
    assert S.main([*TINY, "--data", toy("lhcb", N, 0, ".h5"), "--epochs", "1", "--baseline", "--out", str(out)]) == 0
    assert "baseline GAN" in capsys.readouterr().out
    m = json.load(open(out / "metrics.json"))
    assert m["model"] == "baseline" and m["aux"] == "none" and "aux_rmse_val" not in m
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert "R" not in ck["model"] and not any("gamma" in k for k in ck["model"]["G"])
    check_mlhep(str(out / "generated.h5"), 16, nonzero=False)


def test_resume_matches_uninterrupted(work):
    """1 epoch + resume to 2 on the .npz == 2 epochs straight on the toy .h5 (same events)."""
    w, _, _, runs = work
    assert "epoch 2/2" in runs["resumed"].stdout and "epoch 1/2" not in runs["resumed"].stdout
    a = torch.load(w / "full" / "ckpt.pt", weights_only=False)
    b = torch.load(w / "half" / "ckpt.pt", weights_only=False)
    assert b["epoch"] == 2 and b["step"] == a["step"] == 6
    for net in ("G", "D", "R"):
        for k, v in a["model"][net].items():
            torch.testing.assert_close(b["model"][net][k], v, msg=f"{net}.{k}")


def test_generate_from_checkpoint(work, tmp_path):
    w, h5, npz, _ = work
    p = run_script("sagan_aux.py", "--generate", 100, "--ckpt", w / "full" / "ckpt.pt", "--conditions", npz,
                   "--out", tmp_path / "g.npz", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "wrote 100 generated showers" in p.stdout
    d = check_mlhep(str(tmp_path / "g.npz"), 100)
    assert S.main(["--generate", "100", "--ckpt", str(w / "full" / "ckpt.pt"), "--conditions", h5,
                   "--out", str(tmp_path / "g.h5")]) == 0
    d2 = check_mlhep(str(tmp_path / "g.h5"), 100)
    np.testing.assert_array_equal(d["ParticlePoint"], d2["ParticlePoint"])
    with np.load(npz) as f:   # conditions cycled through the 64 events of the file
        np.testing.assert_array_equal(d["ParticleMomentum"], f["ParticleMomentum"][np.arange(100) % N])
        np.testing.assert_array_equal(d["ParticlePDG"], f["ParticlePDG"][np.arange(100) % N])


def test_torchrun_two_processes(work, tmp_path):
    _, h5, _, _ = work
    p = run_torchrun("sagan_aux.py", *TINY, "--data", h5, "--epochs", "1", "--out", tmp_path / "ddp", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("epoch 1/1 | step 1 ") == 1        # 48 / (16 * 2) steps, rank 0 alone logs
    check_mlhep(str(tmp_path / "ddp" / "generated.h5"), 16, nonzero=False)
    ck = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    assert len(ck["rng"]) == 2 and not any(k.startswith("module.") for k in ck["model"]["D"])


# ------------------------------------------------------------------ bad input

def _bad_files(folder, good):
    with np.load(good) as f:
        d = {k: f[k] for k in f.files}
    cases = {}

    def make(name, **change):
        x = {k: v.copy() for k, v in d.items()}
        for k, v in change.items():
            if v is None:
                del x[k]
            else:
                x[k] = v
        path = str(folder / f"{name}.npz")
        np.savez(path, **x)
        cases[name] = path
    make("missing_key", ParticleMomentum=None)
    make("shape_31x30", EnergyDeposit=np.zeros((N, 31, 30), np.float32))
    mom = d["ParticleMomentum"].copy()
    mom[3, 0] = np.nan
    make("nan_momentum", ParticleMomentum=mom)
    mom = d["ParticleMomentum"].copy()
    mom[5, 2] = -1.0
    make("pz_negative", ParticleMomentum=mom)
    e = d["EnergyDeposit"].copy()
    e[0, 1, 1] = -1.0
    make("negative_energy", EnergyDeposit=e)
    make("mismatched", ParticlePoint=d["ParticlePoint"][:50])
    make("empty", **{k: v[:0] for k, v in d.items()})
    (folder / "garbage.h5").write_bytes(b"not an hdf5 file")
    cases["garbage"] = str(folder / "garbage.h5")
    cases["missing_file"] = str(folder / "nope.npz")
    return cases


EXPECT = {"missing_key": "missing key 'ParticleMomentum'", "shape_31x30": "(64, 31, 30)", "nan_momentum": "NaN",
          "pz_negative": "pz <= 0", "negative_energy": "negative", "mismatched": "50 events",
          "empty": "empty", "garbage": "cannot read", "missing_file": "no such file"}


def test_bad_inputs_in_process(toy, tmp_path, capsys):
    cases = _bad_files(tmp_path, toy("lhcb", N, 0, ".npz"))
    for name, path in cases.items():
        out = tmp_path / f"out_{name}"
        assert S.main(["--data", path, "--out", str(out), *TINY]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"sagan_aux.py: error: {path}: "), (name, err)
        assert EXPECT[name] in err[0], (name, err)
        assert not out.exists()
    # --conditions file for --generate is validated the same way (no EnergyDeposit needed)
    assert S.main(["--generate", "4", "--ckpt", cases["missing_key"], "--conditions", cases["pz_negative"],
                   "--out", str(tmp_path / "g.h5")]) == 2
    assert "no such checkpoint" not in capsys.readouterr().err


def test_bad_input_subprocess(toy, tmp_path):
    path = _bad_files(tmp_path, toy("lhcb", N, 0, ".npz"))["shape_31x30"]
    p = run_script("sagan_aux.py", "--data", path, "--out", tmp_path / "o", *TINY, cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip() == f"sagan_aux.py: error: {path}: EnergyDeposit has shape (64, 31, 30), expected (64, 30, 30)"
    assert not (tmp_path / "o").exists()


def test_benchmark_and_help(tmp_path):
    p = run_script("sagan_aux.py", "--benchmark", "--ch", "8", "--nz", "8", "--batch-size", "8", "--device", "cpu",
                   "--bench-rounds", "1", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line["script"] == "sagan_aux.py" and line["device"] == "cpu" and line["train_batch"] == 8
    for k in ("gen_aux_per_s", "gen_baseline_per_s", "train_aux_per_s", "train_baseline_per_s",
              "gen_time_ratio_aux_over_baseline", "train_time_ratio_aux_over_baseline"):
        assert line[k] > 0, k
    assert os.listdir(tmp_path) == []
    p = run_script("sagan_aux.py", "--help", cwd=tmp_path)
    assert p.returncode == 0 and "--aux-weight" in p.stdout and "--baseline" in p.stdout
