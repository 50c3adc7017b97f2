"""Tests of evaluate.py: format detection, yardsticks on identical / independent / distorted toy
samples, plots and report, bad input. Most runs are in-process (evaluate.main) to spare the
torch import per run; two subprocess runs check the command line as a user sees it."""
import importlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from conftest import run_script

ev = importlib.import_module("evaluate")
ev.torch.set_num_threads(1)  # tiny networks: threads only contend on the shared CI cores
N = 200                     # showers per toy file: small, but enough for the statistics asserted below
FAST = ["--cls-hidden", "32", "--cls-epochs", "8", "--cls-patience", "3", "--prd-runs", "2", "--no-plots"]


def distort(src, dst, key, fn):
    """Copy an HDF5 file and replace dataset `key` by fn(array)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        a = f[key][...]
        del f[key]
        f[key] = fn(a)
    return str(dst)


def evaluate(tmp, *files, extra=()):
    """Run evaluate.main in-process; returns metrics.json as a dict."""
    out = os.path.join(str(tmp), "report")
    assert ev.main([*map(str, files), "--out", out, *FAST, *extra]) == 0
    with open(os.path.join(out, "metrics.json")) as fh:
        return json.load(fh)


# ------------------------------------------------------------------ format detection

@pytest.mark.parametrize("kind,det,cells", [
    ("lcd", "lcd", 15625), ("atlas89", "atlas89", 89), ("atlas247", "atlas247", 247),
    ("calochallenge1", "calochallenge1", 368), ("lhcb", "lhcb", 900), ("ild", "ild", 100)])
def test_detect_and_load(toy, kind, det, cells):
    d = ev.load(toy(kind, 20))
    assert d["detector"] == det and d["cells"].shape == (20, cells) and d["toy"]
    assert np.all(d["e_inc"] > 0) and d["cells"].dtype == np.float32


def test_detect_other_layouts(toy, tmp_path):
    # LHCb .npz; ILD already reduced (vaegan.py's generated format); LCD 51x51x25 cropped to 25x25x25
    assert ev.load(toy("lhcb", 20, suffix=".npz"))["detector"] == "lhcb"
    assert ev.load(toy("atlas89", 20), max_events=7)["cells"].shape == (7, 89)   # --max-events
    with h5py.File(toy("ild", 20), "r") as f:
        layers, energy = f["30x30/layers"][...], f["30x30/energy"][...]
    red = tmp_path / "ild_reduced.h5"
    with h5py.File(red, "w") as f:
        f["showers"], f["energy"] = ev.common.reduce_ild(layers), energy
    d = ev.load(str(red))
    np.testing.assert_allclose(d["cells"], ev.load(toy("ild", 20))["cells"], rtol=1e-6)
    with h5py.File(toy("lcd", 20), "r") as f:
        ecal, ep = f["ECAL"][...], f["target"][:, 1]
    big = np.zeros((20, 51, 51, 25), np.float32)
    big[:, 13:38, 13:38, :] = ecal
    wide = tmp_path / "lcd51.h5"
    with h5py.File(wide, "w") as f:
        f["ECAL"], f["energy"] = big, ep
    d = ev.load(str(wide))
    np.testing.assert_array_equal(d["cells"], ecal.reshape(20, -1))
    np.testing.assert_allclose(d["e_inc"], ep)


# ------------------------------------------------------------------ yardsticks per format

@pytest.mark.parametrize("kind", ["lcd", "atlas89", "atlas247", "calochallenge1", "lhcb", "ild"])
def test_identical_and_independent(toy, tmp_path, kind):
    """real vs itself: separation 0, Frechet 0, AUC 0.5; real vs another seed: small, nothing flagged."""
    real = toy(kind, N)
    m = evaluate(tmp_path, real, real, toy(kind, N, seed=1))
    assert m["detector"] == kind and m["toy"] and m["real"]["n_events"] == N
    same, other = m["generated"]
    assert max(same["separation_power"].values()) < 1e-12
    assert same["frechet_distance"] < 1e-6
    assert abs(same["classifier"]["auc"] - 0.5) < 0.05
    assert same["flagged"] == []
    # the challenge's fixed binning (100 bins for Etot/Einc, centres, widths) has a floor of ~0.05 at N = 200
    assert other["separation_power_mean"] < (0.1 if kind == "calochallenge1" else 0.06)
    assert other["classifier"]["auc"] < 0.7
    assert set(other["separation_power"]) == set(m["features"])
    extra = {"lcd": "lcd", "atlas89": "atlas", "atlas247": "atlas", "lhcb": "lhcb", "ild": "ild"}.get(kind)
    if extra:
        assert extra in other
    if kind == "lhcb":
        assert same["lhcb"]["prd_auc_score"] > 0.99 > other["lhcb"]["prd_auc_score"] > 0.5
    if kind == "ild":
        assert max(same["ild"]["quantile_jsd"].values()) < 1e-12
        assert set(other["ild"]["quantile_jsd"]) == set(ev.ILD_OBS)
    if kind.startswith("atlas"):
        assert same["atlas"]["correlation_mse"] < 1e-12 and same["memorisation"]   # copies are caught
        assert not other["memorisation"]


def test_lcd_distortions_flagged(toy, tmp_path):
    real = toy("lcd", N)
    scaled = distort(real, tmp_path / "x11.h5", "ECAL", lambda a: a * 1.1)
    shifted = distort(real, tmp_path / "shift.h5", "ECAL", lambda a: np.roll(a, 1, axis=1))
    m = evaluate(tmp_path, real, toy("lcd", N, seed=1), scaled, shifted)
    good, x11, shift = m["generated"]
    assert "e_ratio" in x11["flagged"] and x11["separation_power"]["e_ratio"] > 0.5
    assert abs(x11["lcd"]["sampling_fraction_max_abs_ratio_minus_1"] - 0.1) < 0.01
    assert "centre_x" in shift["flagged"] and shift["separation_power"]["centre_x"] > 0.5
    assert "centre_y" not in shift["flagged"]
    for bad in (x11, shift):
        assert bad["classifier"]["auc"] > 0.8 and bad["classifier"]["jsd"] > 0.2
        assert bad["frechet_distance"] > 10 * good["frechet_distance"]
        assert bad["verdict"].startswith("FAIL")
    assert good["flagged"] == [] and not good["verdict"].startswith("FAIL")


def test_calochallenge_energy_scale_flagged(toy, tmp_path):
    real = toy("calochallenge1", N)
    scaled = distort(real, tmp_path / "x11.h5", "showers", lambda a: a * 1.1)
    bad = evaluate(tmp_path, real, scaled)["generated"][0]
    assert "Etot_Einc" in bad["flagged"] and bad["classifier"]["auc"] > 0.75


def test_ild_amplification_and_plots(toy, tmp_path):
    real = toy("ild", N)
    out = tmp_path / "amp"
    assert ev.main([real, toy("ild", N, seed=1), "--amplification", "--out", str(out), "--cls-hidden", "16",
                    "--cls-epochs", "2", "--quantiles", "5"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    amp = m["generated"][0]["ild"]["amplification"]
    assert amp["n_reference"] + amp["n_truth_pool"] == N
    for obs in ("e_vis", "n_hits", "cog_x", "cog_y"):
        a = amp["observables"][obs]
        assert len(a["truth_jsd"]) == len(a["truth_sizes"]) and a["gen_sizes"][-1] == N
    for name in ("amplification", "pixel_spectrum", "hist_energy_and_hits"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 0 and (out / "plots" / f"{name}.pdf").exists()


def test_ild_observable_constant_in_real_is_dropped_not_a_crash(tmp_path):
    """Every real shower hits all 100 cells: n_hits is constant, dropped like any constant observable, and the ILD
    yardsticks (quantile JSD, amplification) carry on with the other four (it was a KeyError traceback)."""
    rng = np.random.default_rng(0)
    files = []
    for name, low in (("r.h5", 0.1), ("g.h5", 0.0)):             # real: no empty cell; generated: some
        with h5py.File(tmp_path / name, "w") as f:
            f["showers"] = np.maximum(rng.gamma(1.0, 1.0, (200, 10, 10)), low).astype(np.float32) * (
                rng.random((200, 10, 10)) > (0.0 if low else 0.2))
            f["energy"] = np.full((200, 1), 50.0)
        files.append(str(tmp_path / name))
    assert ev.main([*files, "--amplification", "--no-classifier", "--no-plots", "--out", str(tmp_path / "o")]) == 0
    m = json.loads((tmp_path / "o" / "metrics.json").read_text())
    ild = m["generated"][0]["ild"]
    assert "n_hits" in m["dropped_features"]
    assert set(ild["quantile_jsd"]) == {"e_vis", "cog_x", "cog_y", "pixel_spectrum"}
    assert set(ild["amplification"]["observables"]) == {"e_vis", "cog_x", "cog_y"}


# ------------------------------------------------------------------ command line, plots, report

def test_cli_atlas_two_generators_plots_and_report(toy, tmp_path):
    real = toy("atlas89", N)
    scaled = distort(real, tmp_path / "x11.h5", "cells", lambda a: a * 1.1)
    r = run_script("evaluate.py", real, toy("atlas89", N, seed=1), scaled, "--labels", "good,scaled",
                   "--out", "rep", "--cls-hidden", "32", "--cls-epochs", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rep = tmp_path / "rep"
    m = json.loads((rep / "metrics.json").read_text())
    assert [g["label"] for g in m["generated"]] == ["good", "scaled"]
    assert "e_ratio" in m["generated"][1]["flagged"]
    md = (rep / "report.md").read_text()
    assert "TOY" in md and "| good (TOY) |" in md and "| scaled (TOY) |" in md
    for name in m["plots"]:
        assert (rep / "plots" / f"{name}.png").exists() and (rep / "plots" / f"{name}.pdf").exists()
    assert {"cell_variance", "hist_energy_and_hits", "width_phi_middle_vs_energy"} <= set(m["plots"])
    assert not [p for p in os.listdir(rep) + os.listdir(rep / "plots") if ".tmp" in p]
    assert "classifier good: epoch 1/2" in r.stdout


def test_cli_bad_input_subprocess(tmp_path):
    r = run_script("evaluate.py", "missing.h5", "gen.h5", "--out", "rep", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == ["evaluate.py: error: missing.h5: no such file"]
    assert not (tmp_path / "rep").exists()


def _bad_files(toy, tmp):
    real = toy("atlas89", 20)
    with h5py.File(tmp / "wrong_keys.h5", "w") as f:
        f["foo"] = np.zeros((3, 4))
    (tmp / "text.h5").write_text("not hdf5")
    nan = distort(real, tmp / "nan.h5", "cells", lambda a: np.where(np.arange(89) == 3, np.nan, a))
    neg = distort(real, tmp / "neg.h5", "cells", lambda a: a - 1e4)
    empty = distort(real, tmp / "empty.h5", "cells", lambda a: a[:0])
    short = distort(real, tmp / "short.h5", "energy", lambda a: a[:5])
    shape = distort(real, tmp / "shape.h5", "cells", lambda a: a[:, :50])
    zero_e = distort(real, tmp / "zero_e.h5", "energy", lambda a: a * 0)
    return real, [
        ([real, str(tmp / "missing.h5")], "missing.h5: no such file"),
        ([real, str(tmp / "wrong_keys.h5")], "wrong_keys.h5: unknown format"),
        ([real, str(tmp / "text.h5")], "text.h5: not a readable HDF5 file"),
        ([real, toy("atlas247", 20)], "detector atlas247 differs"),
        ([real, nan], "nan.h5: 'cells' has NaN or inf"),
        ([real, neg], "neg.h5: 'cells' has negative"),
        ([real, empty], "empty.h5: 'cells' is empty"),
        ([real, short], "short.h5: 'energy' has 5 events but the showers have 20"),
        ([real, shape], "shape.h5: 'cells' has shape (20, 50)"),
        ([real, zero_e], "zero_e.h5: the incident energy has"),
        ([real, real, "--amplification"], "--amplification is the ILD"),
        ([real, real, "--protocol", "calochallenge"], "--protocol calochallenge needs CaloChallenge files"),
    ]


def test_bad_inputs_exit_2_one_line(toy, tmp_path, capsys):
    _, cases = _bad_files(toy, tmp_path)
    for argv, msg in cases:
        out = tmp_path / "rep"
        assert ev.main([*argv, "--out", str(out)]) == 2, msg
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("evaluate.py: error: ") and msg in err[0], (msg, err)
        assert not out.exists(), msg


@pytest.mark.skipif(ev.torch.cuda.is_available(), reason="checks the error when CUDA is missing")
def test_device_cuda_without_cuda(toy, tmp_path, capsys):
    real = toy("atlas89", 20)
    assert ev.main([real, real, "--device", "cuda", "--out", str(tmp_path / "rep")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err and not (tmp_path / "rep").exists()


@pytest.mark.parametrize("argv", [["only_one.h5"], ["a.h5", "b.h5", "--labels", "x,y"],
                                  ["a.h5", "b.h5", "--bins", "-1"], ["a.h5", "b.h5", "--max-events", "0"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0 and "--amplification" in capsys.readouterr().out


# ------------------------------------------------------------------ units

def test_auc_score_known_values():
    y = np.array([1, 1, 0, 0])
    assert ev.common.auc_score(y, np.array([0.9, 0.8, 0.1, 0.2])) == 1.0
    assert ev.common.auc_score(y, np.array([0.1, 0.2, 0.9, 0.8])) == 0.0
    assert ev.common.auc_score(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert ev.common.auc_score(y, np.array([0.9, 0.2, 0.5, 0.1])) == 0.75   # pairs: 1>0 1>0, 0<1 0>1 -> 3/4


def test_classifier_separates_shifted_gaussians():
    rng = np.random.default_rng(0)
    args = ev.get_args(["a", "b", "--cls-hidden", "16", "--cls-epochs", "20"])
    x = rng.standard_normal((600, 5)).astype(np.float32)
    res = ev.two_sample_test(x, x + np.float32(2.0), args, ev.torch.device("cpu"), lambda s: None, "t")
    assert res["auc"] > 0.95 and 0 < res["jsd"] <= 1 and res["calibration"]["a"] > 0
    res = ev.two_sample_test(x[:300], x[300:], args, ev.torch.device("cpu"), lambda s: None, "t")
    assert abs(res["auc"] - 0.5) < 0.12 and res["jsd"] < 0.1


def test_separation_power_clipping_counts_tails():
    real = np.linspace(0, 1, 1000)
    edges, log = ev.common.native_edges(real, [real], 10)
    assert not log and ev.common.binned_separation(real, real, edges)[0] == 0.0
    # a generated sample far outside the real range is not dropped: it lands in the end bin
    assert ev.common.binned_separation(real, real + 100, ev.common.native_edges(real, [], 10)[0])[0] > 0.8


# ------------------------------------------------------------------ CaloChallenge protocol, ds2/ds3, dead and empty

def cc_file(path, n_voxels, n, seed):
    """Hand-made CaloChallenge file: random sparse voxels (MeV) of the right shape, E_inc 1 GeV-1 TeV."""
    rng = np.random.default_rng(seed)
    showers = (rng.exponential(5.0, (n, n_voxels)) * (rng.random((n, n_voxels)) < 0.3)).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["showers"], f["incident_energies"] = showers, 10 ** rng.uniform(3, 6, (n, 1)).astype(np.float32)
    return str(path), showers


@pytest.mark.parametrize("n_voxels,det,layers,alphas", [(6480, "calochallenge2", 45, 16), (40500, "calochallenge3", 45, 50)])
def test_calochallenge_ds2_ds3_end_to_end(tmp_path, monkeypatch, n_voxels, det, layers, alphas):
    monkeypatch.setattr(ev, "BLOCK", 7)   # several blocks with a ragged end
    (real, showers), (gen, _) = (cc_file(tmp_path / f"{s}.h5", n_voxels, 30, s) for s in (0, 1))
    g = ev.common.geometry(det)
    assert g.n_cells == n_voxels and g.n_layers == layers and np.bincount(g.layer).tolist() == [n_voxels // 45] * 45
    assert len(np.unique(np.round(np.arctan2(g.y[:n_voxels // 45], g.x[:n_voxels // 45]), 9))) == alphas
    d = ev.load(real)
    assert d["detector"] == det and d["cells"] is None and d["protocol"] == "calochallenge"   # never read whole
    f, _ = ev.features(d)
    cut = np.where(showers < ev.common.CALOCHALLENGE_MIN_ENERGY[det], 0, showers)
    direct = ev.common.calochallenge_features(cut, g)
    assert all(np.array_equal(f[k], direct[k]) for k in direct if k != "E_tot") and len(f) == 1 + 45 * 8
    rows = np.array([2, 3, 11, 29])
    x = np.empty((4, n_voxels + 1), np.float32)
    ev.classifier_inputs(d, rows, x)
    np.testing.assert_allclose(x[:, :-1], cut[rows] / d["e_inc"][rows, None], rtol=1e-6)
    m = evaluate(tmp_path, real, real, gen)
    same, other = m["generated"]
    assert m["detector"] == det and len(m["features"]) == 1 + 45 * 8 and m["dropped_features"] == []
    assert max(same["separation_power"].values()) == 0 and same["calochallenge"]["voxels"] == 0
    assert other["calochallenge"]["voxels"] > 0 and other["classifier"]["n_train"] == 2 * 18
    assert "| E_layer |" in (tmp_path / "report" / "report.md").read_text().replace(" E_layer ", "| E_layer |")


def test_calochallenge_features_by_hand():
    g = ev.common.geometry("calochallenge1")
    x = np.zeros((2, 368))
    # layer 1 (voxels 8..167; r edges 0,2,4: centres 1, 3): 2 MeV at (alpha bin 0, r bin 0) and (alpha 0, r 1)
    x[0, 8], x[0, 9] = 2.0, 2.0
    f = ev.common.calochallenge_features(x, g)
    a = -np.pi + np.pi / 10                            # centre of the first of 10 alpha bins
    assert f["E_layer_1"][0] == 4 and f["EC_r_1"][0] == pytest.approx(2) and f["width_r_1"][0] == pytest.approx(1)
    assert f["EC_eta_1"][0] == pytest.approx(2 * np.cos(a)) and f["EC_phi_1"][0] == pytest.approx(2 * np.sin(a))
    assert f["width_eta_1"][0] == pytest.approx(abs(np.cos(a)))
    assert f["sparsity_1"][0] == 1 - 2 / 160 and f["sparsity_0"][0] == 1.0   # exact counts
    # empty layers and showers: the challenge's 1e-16 convention gives centres and widths 0
    assert f["EC_r_0"][0] == 0 and f["EC_r_1"][1] == 0 and f["width_eta_2"][1] == 0 and f["E_tot"][1] == 0
    assert "EC_eta_0" not in f and "EC_eta_12" not in f   # one alpha bin: radial features only


def test_calochallenge_binning_and_separation_by_hand():
    e = ev.common.calochallenge_edges
    assert np.allclose(e("EC_eta_12", 0, "calochallenge1")[[0, -1]], [-500, 500])
    assert np.allclose(e("EC_phi_1", 0, "calochallenge1")[[0, -1]], [-100, 100])
    assert np.allclose(e("width_r_7", 0, "calochallenge2")[[0, -1]], [0, 20]) and len(e("EC_r_0", 0, "calochallenge3")) == 101
    assert e("E_layer_3", 0.5, "calochallenge1") is None and len(e("E_layer_3", 10.0, "calochallenge1")) == 40
    assert len(e("sparsity_2", 0, "calochallenge1")) == 21 and e("Etot_Einc", 0, "calochallenge2")[[0, -1]].tolist() == [0.5, 1.5]
    # h1 = (1/2, 1/2, 0), h2 = (0, 1/2, 1/2): 0.5 (1/4 / 1/2 + 0 + 1/4 / 1/2) = 0.5; floor 3 (1/4 + 1/4) / 4
    sep, floor = ev.common.calochallenge_separation(np.array([2, 2, 0]), np.array([0, 2, 2]), np.array([0.0, 1, 3, 4]))
    assert sep == pytest.approx(0.5) and floor == pytest.approx(0.375)
    # the challenge drops entries outside the range (h1 = h2 = (1, 0)); native clips them into the end bins:
    # h1 = (1/2, 1/2), h2 = (1, 0): 0.5 (1/4 / (3/2) + 1/4 / (1/2)) = 1/3
    assert ev.common.binned_separation([0.5, 9.0], [0.5, 0.5], np.array([0.0, 1, 2]), clip=False)[0] == 0.0
    assert ev.common.binned_separation([0.5, 9.0], [0.5, 0.5], np.array([0.0, 1, 2]))[0] == pytest.approx(1 / 3)


def test_isotonic_and_prd_balance():
    xs, ys = ev.common.isotonic_fit(np.array([0.1, 0.2, 0.3, 0.4]), np.array([0, 1, 0, 1]))
    # pool the violators 1, 0 -> 1/2, 1/2; ends clipped to [1e-6, 1 - 1e-6]
    np.testing.assert_allclose(ys, [1e-6, 0.5, 0.5, 1 - 1e-6])
    np.testing.assert_allclose(np.interp([0.05, 0.25, 0.35, 0.9], xs, ys), [1e-6, 0.5, 0.5 + (0.5 - 1e-6) / 2, 1 - 1e-6])
    xs, ys = ev.common.isotonic_fit(np.array([0.1, 0.1, 0.2]), np.array([1, 0, 1]))   # equal x pooled first
    assert xs.tolist() == [0.1, 0.2] and np.allclose(ys, [0.5, 1 - 1e-6])
    a = np.random.default_rng(0).standard_normal((40, 3))
    with pytest.raises(ValueError, match="equal sizes"):
        ev.common.prd(a, a[:30], num_runs=1)
    assert len(ev.common.prd(a, a[:30], num_runs=1, enforce_balance=False)[0]) == 1001


def test_calochallenge_classifier_settings():
    args = ev.get_args(["a", "b", "--cls-calochallenge"])
    assert (args.cls_hidden, args.cls_layers, args.cls_lr, args.cls_batch, args.cls_epochs, args.cls_patience,
            args.calibration) == (2048, 3, 2e-4, 1000, 50, 50, "isotonic")
    args = ev.get_args(["a", "b", "--cls-calochallenge", "--cls-hidden", "16", "--cls-epochs", "6", "--cls-lr", "1e-2"])
    assert (args.cls_hidden, args.cls_epochs, args.cls_patience, args.cls_layers, args.cls_batch) == (16, 6, 6, 3, 1000)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    res = ev.two_sample_test(x, x + np.float32(2.0), args, ev.torch.device("cpu"), lambda s: None, "t")
    assert res["auc"] > 0.9 and res["calibration"]["method"] == "isotonic" and res["epochs_run"] == 6


def test_dead_features_and_empty_showers(toy, tmp_path):
    real = toy("calochallenge1", N)
    # showers 0..9 of the generated file: every voxel 0.5 MeV, below the challenge's 1 MeV cut
    low = distort(real, tmp_path / "low.h5", "showers", lambda a: np.where(np.arange(len(a))[:, None] < 10, 0.5, a))
    m = evaluate(tmp_path, real, low, extra=["--no-classifier"])
    assert m["protocol"] == "calochallenge" and m["voxel_cut"] == 1.0
    assert m["real"]["n_empty"] == 0 and m["generated"][0]["n_empty"] == 10
    native = evaluate(tmp_path, real, low, extra=["--no-classifier", "--protocol", "native"])
    assert native["generated"][0]["n_empty"] == 0   # no cut: 0.5 MeV voxels are energy
    # native on ds1: y centre and width of the one-alpha-bin layers 0, 3, 12 are constant 0: dropped, listed
    dead = {f"{k}_y_{layer}" for k in ("centre", "width") for layer in (0, 3, 12)}
    assert dead <= set(native["dropped_features"]) and not dead & set(native["generated"][0]["separation_power"])
    assert "centre_y_0" in (tmp_path / "report" / "report.md").read_text()
    # an exact sparsity: 8 of layer 1's 160 voxels hit
    d = ev.load(real, protocol="native")
    d["cells"][:] = 0
    d["cells"][:, 8:16] = 5.0
    f, _ = ev.features(d)
    assert (f["sparsity_1"] == 1 - 8 / 160).all() and d["n_empty"] == 0


def test_lhcb_empty_images_undefined(toy):
    d = ev.load(toy("lhcb", 20))
    d["cells"][:3] = 0
    f, _ = ev.features(d)
    assert d["n_empty"] == 3 and np.isnan(f["asym_long"][:3]).all() and np.isfinite(f["asym_long"][3:]).all()
    assert (f["sparsity_1e-03"][:3] == 1).all() and np.isnan(f["width_trans"][:3]).all()   # MLHEP: all cells >= 0


def test_calochallenge_plots_and_report(toy, tmp_path):
    real, out = toy("calochallenge1", N), tmp_path / "cc"
    assert ev.main([real, toy("calochallenge1", N, seed=1), "--out", str(out), "--no-classifier"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert {"hist_e_tot___e_inc", "hist_energy_per_layer", "hist_centre_in_eta", "hist_sparsity"} <= set(m["plots"])
    assert all((out / "plots" / f"{p}.png").exists() for p in m["plots"])
    md = (out / "report.md").read_text()
    assert "| generated | AUC (low-level) | JSD | Etot_Einc | E_layer | EC_eta |" in md and "voxels below 1 MeV" in md
