"""common.py: geometries, the GFlash toy showers (they must behave like showers), the toy CLI."""
import subprocess
import sys

import h5py
import numpy as np
import pytest

import common
from conftest import REPO


# ---------------------------------------------------------------- geometry

def test_atlas89_cell_order_and_layers():
    g = common.geometry("atlas89")
    assert g.n_cells == 89 and g.layer.shape == (89,)
    mid, strip, ps, back = (g.layer_names.index(n) for n in ("Middle", "Strip", "PreSampler", "Back"))
    # reference.md: [0:21] Middle, [21:69] Strip, [69:75] PreSampler, [75:89] Back
    assert (g.layer[0:21] == mid).all() and (g.layer[21:69] == strip).all()
    assert (g.layer[69:75] == ps).all() and (g.layer[75:89] == back).all()
    # Middle 3x7, eta-major: cells 0..6 share the first eta, phi steps by 0.0245
    assert np.allclose(np.diff(g.y[0:7]), 0.0245) and np.allclose(g.x[0:7], -0.025)
    assert np.isclose(g.x[21 + 2] - g.x[21], 0.003125)          # Strip eta pitch
    assert g.noise_cut[0] == 200 and g.noise_cut[21] == 60 and g.noise_cut[69] == 120


def test_atlas247_and_calochallenge_counts():
    g = common.geometry("atlas247")
    assert np.bincount(g.layer).tolist() == [14, 112, 77, 44]
    c = common.geometry("calochallenge1")
    assert np.bincount(c.layer).tolist() == [8, 160, 190, 5, 5]
    # layer 1: alpha-major, r-minor: the first 16 voxels share alpha, radii grow
    r = np.hypot(c.x, c.y)[8:24]
    assert (np.diff(r) > 0).all()


def test_reduce_ild_by_hand():
    layers = np.zeros((1, 30, 30, 30), np.float32)
    layers[0, 0, 0, 0] = 1.0       # pixel (0,0)
    layers[0, 5, 2, 2] = 2.0       # pixel (0,0) too (cells 0..2)
    layers[0, 7, 3, 0] = 0.05      # below the 0.1 MeV MIP cut: dropped
    layers[0, 29, 29, 29] = 4.0    # pixel (9,9)
    red = common.reduce_ild(layers)
    assert red.shape == (1, 10, 10)
    assert red[0, 0, 0] == 3.0 and red[0, 9, 9] == 4.0 and red.sum() == 7.0


def test_unknown_geometry():
    with pytest.raises(ValueError, match="unknown geometry"):
        common.geometry("cms")


# ---------------------------------------------------------------- toy-shower building blocks

def test_gamma_cdf_closed_forms():
    x = np.array([[0.1, 1.0, 3.0, 10.0]])
    assert np.allclose(common.gamma_cdf(np.array([[1.0]]), x), 1 - np.exp(-x), atol=1e-9)
    assert np.allclose(common.gamma_cdf(np.array([[2.0]]), x), 1 - (1 + x) * np.exp(-x), atol=1e-9)


def test_lateral_integral_matches_numerical_and_sums_to_one():
    R = np.array([[1.3]])
    ex, ey = np.array([0.0, 0.7]), np.array([0.0, 2.1])
    frac = common.rect_fractions(ex, ey, np.zeros((1, 1)), np.zeros((1, 1)), R)[0, 0, 0, 0]
    xs, ys = np.linspace(0, 0.7, 1501), np.linspace(0, 2.1, 1501)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    dens = 1.3 ** 2 / (np.pi * (X ** 2 + Y ** 2 + 1.3 ** 2) ** 2)
    assert frac == pytest.approx(np.trapezoid(np.trapezoid(dens, ys, axis=1), xs), rel=1e-4)
    # a wide grid catches almost everything (1 - R/half-width tail), an off-centre axis too
    edges = np.linspace(-500, 500, 41)
    full = common.rect_fractions(edges, edges, np.full((1, 1), 3.0), np.zeros((1, 1)), R)
    assert full.sum() == pytest.approx(1.0, abs=5e-3)


# ---------------------------------------------------------------- toy showers behave like showers

def _lcd_at(E, n=150, seed=0):
    d = common.make_toy("lcd", n, seed=seed, energy=(E, E))
    return d["ECAL"], d["target"][:, 1]


@pytest.fixture(scope="module")
def lcd_by_energy():
    return {E: _lcd_at(E, seed=i) for i, E in enumerate((5.0, 50.0, 500.0))}


def test_shower_depth_grows_with_log_energy(lcd_by_energy):
    depth = {}
    for E, (ecal, _) in lcd_by_energy.items():
        long = ecal.sum((1, 2))                       # (N, 25) energy per layer
        depth[E] = (long.argmax(1) + 0.5).mean()      # layer of the longitudinal maximum (X0)
    # GFlash: T = ln(E/Ec) - 0.858, i.e. one X0 more per unit of ln E
    slope = (depth[500.0] - depth[5.0]) / np.log(100.0)
    assert depth[5.0] < depth[50.0] < depth[500.0]
    assert 0.6 < slope < 1.4, slope


def test_sampling_fraction_flat_and_resolution_stochastic(lcd_by_energy):
    sf, res = {}, {}
    for E, (ecal, ep) in lcd_by_energy.items():
        f = ecal.reshape(len(ep), -1).sum(1) / ep
        sf[E], res[E] = f.mean(), f.std() / f.mean()
    assert max(sf.values()) / min(sf.values()) < 1.03                 # flat within 3 %
    assert 0.015 < sf[50.0] < 0.025                                   # Ecal ~ Ep/50
    # sigma/E ~ a/sqrt(E): from 5 to 500 GeV it falls by sqrt(100) = 10 (leakage adds a little)
    assert 6 < res[5.0] / res[500.0] < 14, res


def test_ninety_percent_within_one_moliere_radius(lcd_by_energy):
    ecal, _ = lcd_by_energy[50.0]
    g = common.geometry("lcd")
    img = ecal.sum(3)                                                 # (N, 25, 25)
    x = g.x.reshape(25, 25, 25)[:, :, 0]
    y = g.y.reshape(25, 25, 25)[:, :, 0]
    tot = img.sum((1, 2))
    cx = (img * x).sum((1, 2)) / tot
    cy = (img * y).sum((1, 2)) / tot
    r = np.hypot(x[None] - cx[:, None, None], y[None] - cy[:, None, None])
    inside = (img * (r < common.TOY["lcd"].rm)).sum((1, 2)) / tot
    assert 0.83 < inside.mean() < 0.95, inside.mean()


def test_lhcb_centre_follows_impact_point_and_inclination():
    d = common.make_toy("lhcb", 400, seed=3)
    img, p, pt = d["EnergyDeposit"], d["ParticleMomentum"], d["ParticlePoint"]
    cells = np.arange(30) - 14.5
    tot = img.sum((1, 2))
    cx = (img.sum(1) * cells).sum(1) / tot                            # images are [i_y, i_x]
    cy = (img.sum(2) * cells).sum(1) / tot
    pred_x = pt[:, 0] + 25 * p[:, 0] / p[:, 2]                        # MLHEP shower centre
    pred_y = pt[:, 1] + 25 * p[:, 1] / p[:, 2]
    assert np.corrcoef(cx, pred_x)[0, 1] > 0.97 and np.corrcoef(cy, pred_y)[0, 1] > 0.97
    # the inclination matters on its own: same point, opposite slopes -> opposite shifts
    slope_coef = np.polyfit(p[:, 0] / p[:, 2], cx - pt[:, 0], 1)[0]
    assert 15 < slope_coef < 35, slope_coef


def test_atlas_noise_cuts_applied_and_energy_mostly_in_middle():
    d = common.make_toy("atlas89", 300, seed=1)
    g = common.geometry("atlas89")
    cells = d["cells"]
    assert ((cells == 0) | (cells >= g.noise_cut)).all()
    frac = np.stack([cells[:, g.layer == k].sum(1) for k in range(4)], 1) / cells.sum(1, keepdims=True)
    assert frac[:, g.layer_names.index("Middle")].mean() > 0.5
    assert (cells.sum(1) < d["energy"] * 1.05).all()                  # EM scale: no more than E


# ---------------------------------------------------------------- files and command line

FORMATS = {
    "lcd": {"ECAL": (25, 25, 25), "target": (2,)},
    "atlas89": {"cells": (89,), "energy": (), "cell_layer": None, "cell_eta": None, "cell_phi": None},
    "atlas247": {"cells": (247,), "energy": ()},
    "calochallenge1": {"incident_energies": (1,), "showers": (368,)},
    "lhcb": {"EnergyDeposit": (30, 30), "ParticleMomentum": (3,), "ParticlePoint": (3,), "ParticlePDG": ()},
    "ild": {"30x30/energy": (1,), "30x30/layers": (30, 30, 30)},
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_toy_file_has_the_real_format(kind, tmp_path):
    path = tmp_path / f"{kind}.h5"
    r = subprocess.run([sys.executable, str(REPO / "common.py"), "toy", kind, "-n", "7", "-o", str(path),
                        "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with h5py.File(path) as f:
        assert f.attrs["toy"]
        for key, shape in FORMATS[kind].items():
            if shape is not None:
                assert f[key].shape == (7,) + shape, key
                assert np.isfinite(f[key][...]).all()
                if key not in ("ParticleMomentum", "ParticlePoint"):    # energies: non-negative
                    assert (f[key][...] >= 0).all(), key
    assert not list(tmp_path.glob("*.tmp*"))


def test_lhcb_npz_and_units(tmp_path):
    common.write_toy("lhcb", str(tmp_path / "l.npz"), 5, workers=1)
    d = np.load(tmp_path / "l.npz")
    assert set(d.files) == set(FORMATS["lhcb"]) and d["EnergyDeposit"].shape == (5, 30, 30)
    assert set(np.unique(d["ParticlePDG"])) <= {11, 22} and (d["ParticleMomentum"][:, 2] > 0).all()
    ild = common.make_toy("ild", 4)
    assert np.allclose(ild["30x30/energy"], 50.0)                      # GeV
    vis = ild["30x30/layers"].sum((1, 2, 3))                            # MeV visible
    assert (300 < vis).all() and (vis < 1500).all()


def test_toy_files_are_reproducible_and_seeded(tmp_path):
    a = common.make_toy("atlas89", 20, seed=5)["cells"]
    b = common.make_toy("atlas89", 20, seed=5)["cells"]
    c = common.make_toy("atlas89", 20, seed=6)["cells"]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("args, msg", [
    (["toy", "cms", "-n", "5"], "unknown toy kind"),
    (["toy", "lcd", "-n", "0"], "must be positive"),
    (["toy", "lcd", "-n", "-3"], "must be positive"),
    (["toy", "lcd", "-n", "5", "--energy", "9"], "--energy"),
])
def test_toy_cli_bad_arguments(args, msg, tmp_path):
    out = tmp_path / "x.h5"
    r = subprocess.run([sys.executable, str(REPO / "common.py"), *args, "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_toy_cli_unwritable_path(tmp_path):
    out = tmp_path / "no_such_folder" / "x.h5"
    r = subprocess.run([sys.executable, str(REPO / "common.py"), "toy", "lcd", "-n", "5", "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists()


def test_cached_toy_made_once_by_rank_0_and_awaited_by_others(tmp_path, monkeypatch, capsys):
    """Rank 0 writes the TOY file once (a second call leaves its bytes alone); another rank writes nothing and,
    with wait, returns only once the file exists."""
    monkeypatch.chdir(tmp_path)
    path = common.toy_path("lcd", 8, 5)
    assert common.cached_toy("lcd", 8, 5, rank=1) == path and not (tmp_path / path).exists()   # rank 1 writes nothing
    assert common.cached_toy("lcd", 8, 5, rank=0, workers=1) == path
    assert "no --data: training on TOY lcd showers" in capsys.readouterr().out
    with h5py.File(path) as f:
        assert f["ECAL"].shape == (8, 25, 25, 25) and f.attrs["toy"]
    before = (tmp_path / path).read_bytes()
    (tmp_path / path).touch()
    mtime = (tmp_path / path).stat().st_mtime_ns
    common.cached_toy("lcd", 8, 5, rank=0)
    assert (tmp_path / path).read_bytes() == before and (tmp_path / path).stat().st_mtime_ns == mtime
    calls = []
    monkeypatch.setattr(common.time, "sleep", lambda s: calls.append(s) or (tmp_path / "data" / "late.h5").touch())
    monkeypatch.setattr(common, "toy_path", lambda kind, n, seed=0: "data/late.h5")
    assert common.cached_toy("lcd", 8, 5, rank=1, wait=True) == "data/late.h5" and calls == [0.5]
