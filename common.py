"""Geometry, toy showers and physics metrics shared by the calorimeter fast-simulation scripts.

Only three things live here (design.md): detector geometries, the toy shower generator that
fills them, and the observables / distances used to validate generated showers; plus the few
safe-file helpers (section "safe files") with which every script refuses bad input in one line.

Make a toy dataset in a detector's real file format:

    python common.py toy lcd -n 10000 -o lcd_toy.h5 --seed 0
    python common.py toy {lcd,atlas89,atlas247,calochallenge1,lhcb,ild} -n N -o FILE [--energy LO:HI]

Toy showers follow the GFlash parametrisation (Grindhammer, Rudowicz, Peters, NIM A290 (1990)
469): a Gamma-distributed longitudinal profile whose depth and shape fluctuate shower by shower
(correlated ln T, ln alpha), a core + tail lateral profile f(r) = 2 r R^2 / (r^2 + R^2)^2 whose
radii grow with depth, and energy deposited as spots, which gives the stochastic term of the
resolution. The spots are not placed one by one: the number of spots per cell is Poisson with the
cell's expected energy over the spot energy (exactly what placing a Poisson number of spots
gives), and each spot's energy is Gamma(2)-distributed, so cell energies are continuous. The
lateral profile is integrated exactly over each cell (closed form below).
Every file it writes carries the HDF5 attribute toy=True; toy data are labelled as toy wherever
they are shown.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

# ---------------------------------------------------------------- geometry


@dataclass(frozen=True, eq=False)
class Geometry:
    """Cells of one detector, in the order of the flattened (C-order) event array of its files."""
    name: str
    shape: tuple            # per-event array shape in the file
    layer: np.ndarray       # (n_cells,) readout layer of each cell, front to back
    layer_names: tuple
    x: np.ndarray           # (n_cells,) cell centre; mm, or eta for ATLAS
    y: np.ndarray           # (n_cells,) cell centre; mm, or phi for ATLAS
    xy_unit: str            # "mm" or "eta/phi"
    layer_x0: np.ndarray    # (n_layers, 2) depth range of each layer in radiation lengths
    noise_cut: np.ndarray   # (n_cells,) cells below this (file units) are set to 0
    unit: str               # energy unit of the cells in the file

    @property
    def n_cells(self):
        return int(np.prod(self.shape))

    @property
    def n_layers(self):
        return len(self.layer_names)


def _grid_xy(nx, ny, dx, dy):
    """Cell centres of an nx x ny grid centred on 0, x along the first axis."""
    x = (np.arange(nx) - (nx - 1) / 2) * dx
    y = (np.arange(ny) - (ny - 1) / 2) * dy
    return np.repeat(x, ny), np.tile(y, nx)


def _lcd():
    # CLIC/LCD W-Si ECAL: 25x25 cells of 5.1 mm, 25 layers (depth is the last axis); we take
    # 1 X0 per layer (the files do not carry the layer thickness).
    x, y = _grid_xy(25, 25, 5.1, 5.1)
    return Geometry("lcd", (25, 25, 25), np.tile(np.arange(25), 625), tuple(f"L{i}" for i in range(25)),
                    np.repeat(x, 25), np.repeat(y, 25), "mm",
                    np.stack([np.arange(25.0), np.arange(1.0, 26.0)], 1), np.full(25 ** 3, 1e-6), "GeV")


# ATLAS EM barrel granularity (deta, dphi) and depth (X0, the PreSampler standing for the
# material in front of the calorimeter, whose loss it estimates), as in reference.md.
ATLAS_LAYERS = ("PreSampler", "Strip", "Middle", "Back")
ATLAS_CELL = {"PreSampler": (0.025, 0.1), "Strip": (0.003125, 0.1),
              "Middle": (0.025, 0.0245), "Back": (0.05, 0.0245)}
ATLAS_X0 = np.array([[0.0, 2.0], [2.0, 6.3], [6.3, 22.3], [22.3, 24.3]])
ATLAS_NOISE_CUT_MEV = {"PreSampler": 120.0, "Strip": 60.0, "Middle": 200.0, "Back": 200.0}
# cluster windows (n_eta, n_phi) in the order of the cell vector: Middle, Strip, PreSampler, Back
ATLAS_WINDOWS = {89: [("Middle", 3, 7), ("Strip", 24, 2), ("PreSampler", 3, 2), ("Back", 2, 7)],
                 247: [("Middle", 7, 11), ("Strip", 56, 2), ("PreSampler", 7, 2), ("Back", 4, 11)]}


def _atlas(n):
    parts = []
    for name, ne, nphi in ATLAS_WINDOWS[n]:
        eta, phi = _grid_xy(ne, nphi, *ATLAS_CELL[name])
        lay = ATLAS_LAYERS.index(name)
        parts.append((np.full(ne * nphi, lay), eta, phi, np.full(ne * nphi, ATLAS_NOISE_CUT_MEV[name])))
    layer, eta, phi, cut = (np.concatenate(a) for a in zip(*parts))
    return Geometry(f"atlas{n}", (n,), layer, ATLAS_LAYERS, eta, phi, "eta/phi", ATLAS_X0, cut, "MeV")


# CaloChallenge 2022 binning files (code/binning_dataset_{1_photons,2,3}.xml): r edges in mm and number
# of alpha bins of each non-empty layer, by layer id; voxels alpha-major, r-minor in each layer.
CC1_LAYERS = {0: ([0, 5, 10, 30, 50, 100, 200, 400, 600], 1),
              1: ([0, 2, 4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 70, 90, 120, 150, 200], 10),
              2: ([0, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 350, 400], 10),
              3: ([0, 50, 100, 200, 400, 600], 1),
              12: ([0, 100, 200, 400, 1000, 2000], 1)}
CC1_X0 = np.array([[0.0, 2.0], [2.0, 6.3], [6.3, 22.3], [22.3, 24.3], [24.3, 60.0]])
_CC2_R = [float(s) for s in "0,4.65,9.3,13.95,18.6,23.25,27.9,32.55,37.2,41.85".split(",")]
_CC3_R = [float(s) for s in ("0,2.325,4.65,6.975,9.3,11.625,13.95,16.275,18.6,20.925,23.25,25.575,27.9,"
                             "30.225,32.55,34.875,37.2,39.525,41.85").split(",")]
CALOCHALLENGE_LAYERS = {"calochallenge1": CC1_LAYERS, "calochallenge2": {i: (_CC2_R, 16) for i in range(45)},
                        "calochallenge3": {i: (_CC3_R, 50) for i in range(45)}}
# evaluate.py's voxel cut (args.min_energy), MeV: ds1 1 MeV; ds2/3 0.5 keV / 0.033 sampling fraction
CALOCHALLENGE_MIN_ENERGY = {"calochallenge1": 1.0, "calochallenge2": 0.5e-3 / 0.033, "calochallenge3": 0.5e-3 / 0.033}


def _mid(edges):
    e = np.asarray(edges, np.float64)
    return e[:-1] + (e[1:] - e[:-1]) / 2   # XMLHandler.get_midpoint, to the last bit


def calochallenge_voxels(edges, n_alpha):
    """(r, x, y) of the voxels of one CaloChallenge layer: radial bin centre and its (eta, phi) =
    r (cos, sin) of the alpha bin centre, as XMLHandler.SetEtaAndPhiFromPolar computes them."""
    r = np.tile(_mid(edges), n_alpha)
    a = np.repeat(_mid(np.linspace(-np.pi, np.pi, n_alpha + 1)), len(edges) - 1)
    return r, r * np.cos(a), r * np.sin(a)


def _calochallenge(name):
    # ds2/ds3 (electrons, 45 layers): 2 x 1.4 mm W per readout layer, ~0.8 X0 (used only for layer_x0)
    layers = CALOCHALLENGE_LAYERS[name]
    vox = [calochallenge_voxels(*v) for v in layers.values()]
    layer = np.concatenate([np.full(len(v[0]), i) for i, v in enumerate(vox)])
    x, y = (np.concatenate([v[k] for v in vox]) for k in (1, 2))
    x0 = CC1_X0 if name == "calochallenge1" else np.stack([np.arange(45) * 0.8, np.arange(1, 46) * 0.8], 1)
    return Geometry(name, (len(layer),), layer, tuple(str(k) for k in layers), x, y, "mm", x0,
                    np.zeros(len(layer)), "MeV")


def _lhcb():
    # LHCb ECAL window of 30x30 cells of 20 mm; 25 X0 deep, read out as one projection.
    # Images are [i_y, i_x] (x along the last axis), as in the MLHEP metric code.
    y, x = _grid_xy(30, 30, 20.0, 20.0)
    return Geometry("lhcb", (30, 30), np.zeros(900, int), ("ECAL",), x, y, "mm",
                    np.array([[0.0, 25.0]]), np.zeros(900), "GeV")


# ILD Si-W ECAL: 20 layers of 2.1 mm W (0.6 X0) then 10 of 4.2 mm W (1.2 X0).
ILD_THICKNESS_X0 = np.r_[np.full(20, 0.6), np.full(10, 1.2)]
ILD_MIP_CUT_MEV = 0.1


def _ild():
    x, y = _grid_xy(30, 30, 5.0, 5.0)
    depth = np.r_[0.0, np.cumsum(ILD_THICKNESS_X0)]
    return Geometry("ild", (30, 30, 30), np.repeat(np.arange(30), 900), tuple(f"L{i}" for i in range(30)),
                    np.tile(x, 30), np.tile(y, 30), "mm", np.stack([depth[:-1], depth[1:]], 1),
                    np.zeros(27000), "MeV")


def _ild10():
    # the Calomplification view: layers summed, 3x3 cells merged, MIP cut applied per cell first
    x, y = _grid_xy(10, 10, 15.0, 15.0)
    return Geometry("ild10", (10, 10), np.zeros(100, int), ("sum",), x, y, "mm",
                    np.array([[0.0, ILD_THICKNESS_X0.sum()]]), np.full(100, ILD_MIP_CUT_MEV), "MeV")


_BUILDERS = {"lcd": _lcd, "atlas89": lambda: _atlas(89), "atlas247": lambda: _atlas(247),
             "calochallenge1": lambda: _calochallenge("calochallenge1"), "lhcb": _lhcb, "ild": _ild, "ild10": _ild10,
             "calochallenge2": lambda: _calochallenge("calochallenge2"),
             "calochallenge3": lambda: _calochallenge("calochallenge3")}
GEOMETRIES = tuple(_BUILDERS)
_CACHE = {}


def geometry(name):
    """The Geometry of a detector by name (one of GEOMETRIES)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown geometry {name!r}; choose from {', '.join(GEOMETRIES)}")
    if name not in _CACHE:
        _CACHE[name] = _BUILDERS[name]()
    return _CACHE[name]


def reduce_ild(layers, mip_cut=ILD_MIP_CUT_MEV):
    """ILD (N,30,30,30) MeV -> (N,10,10): cells below the MIP cut set to 0, then summed over
    layers and 3x3 cells (the reduction of Bieringer et al.)."""
    layers = np.asarray(layers, np.float32)
    cut = np.where(layers < mip_cut, 0.0, layers).sum(1)
    return cut.reshape(-1, 10, 3, 10, 3).sum((2, 4))


def ild10_observables(showers):
    """The Calomplification observables of (N,10,10) MeV showers: e_vis (sum), n_hits (pixels
    above the MIP cut), cog_x, cog_y (energy-weighted centre, mm), 1-d; and pixel: (N,100), the
    pixel energies with NaN below the cut (a subset of showers is a subset of rows)."""
    s = np.asarray(showers, np.float64).reshape(len(showers), 100)
    g, e = geometry("ild10"), s.sum(1)
    safe = np.where(e > 0, e, 1.0)
    return {"e_vis": e, "n_hits": (s > ILD_MIP_CUT_MEV).sum(1).astype(np.float64),
            "cog_x": np.where(e > 0, s @ g.x / safe, 0.0), "cog_y": np.where(e > 0, s @ g.y / safe, 0.0),
            "pixel": np.where(s > ILD_MIP_CUT_MEV, s, np.nan)}


def layer_image(geom, lay, vec):
    """(image, xlabel, ylabel) of one layer's cells: ATLAS eta x phi grid, ds1 alpha x r bins."""
    idx = np.flatnonzero(geom.layer == lay)
    if geom.name == "calochallenge1":
        n_alpha = list(CC1_LAYERS.values())[lay][1]
        return vec[..., idx].reshape(vec.shape[:-1] + (n_alpha, -1)), "r bin", "alpha bin"
    order = np.lexsort((geom.y[idx], geom.x[idx]))                    # eta-major grid
    img = vec[..., idx[order]].reshape(vec.shape[:-1] + (len(np.unique(geom.x[idx])), -1))
    return np.swapaxes(img, -1, -2), "eta cell", "phi cell"


# ---------------------------------------------------------------- toy showers


@dataclass(frozen=True)
class ToyDetector:
    """Material and readout constants of a toy detector (GFlash homogeneous-medium form)."""
    Z: float                # effective atomic number of the absorber
    Ec: float               # critical energy, GeV
    rm: float               # Moliere radius in the geometry's xy units
    a: float                # stochastic term of the resolution, sigma/E = a / sqrt(E/GeV)
    sampling: np.ndarray    # (n_layers,) visible fraction of the deposited energy
    slices: int             # depth slices per layer for the lateral growth with depth
    to_file_unit: float     # GeV -> file unit
    noise_sigma: float = 0.0  # electronic noise, as a fraction of each cell's noise cut


TOY = {
    # Ecal ~ Ep/50 in the LCD files: sampling fraction 0.02
    "lcd": ToyDetector(74, 0.0080, 9.2, 0.17, np.full(25, 0.02), 1, 1.0),
    # ATLAS cells are at the EM scale (calibrated), so the visible fraction is 1
    "atlas89": ToyDetector(82, 0.0074, 0.027, 0.10, np.ones(4), 3, 1000.0, 0.4),
    "atlas247": ToyDetector(82, 0.0074, 0.027, 0.10, np.ones(4), 3, 1000.0, 0.4),
    "calochallenge1": ToyDetector(82, 0.0074, 40.0, 0.10, np.ones(5), 3, 1000.0),
    # LHCb shashlik: Moliere radius 35 mm; deposits in GeV of visible energy (toy choice)
    "lhcb": ToyDetector(82, 0.0100, 35.0, 0.10, np.ones(1) * 0.1, 12, 1.0),
    # ILD Si-W: the Si samples once per layer, so thick-W layers see half the fraction per X0
    "ild": ToyDetector(74, 0.0080, 15.0, 0.166, 0.0175 * 0.6 / ILD_THICKNESS_X0, 1, 1000.0),
}
TOY_KINDS = tuple(TOY) + ("ild10",)   # ild10: toy ild reduced in memory (make_toy_ild10)
SPOT_SHAPE = 2.0            # spot energies ~ Gamma(2): variance per spot 1.5 x that of fixed spots
LHCB_FRONT = 18.0           # cells from ParticlePoint's plane to the ECAL front face
LHCB_X0_MM = 17.5


def gamma_cdf(alpha, x):
    """Regularised lower incomplete gamma P(alpha, x), vectorised (series; alpha (B,1), x (B,K))."""
    x = np.maximum(x, 1e-300)
    lgam = np.vectorize(math.lgamma)(alpha + 1.0)
    term = np.ones_like(x)
    total = np.ones_like(x)
    for n in range(1, int(x.max()) + 60):
        term = term * x / (alpha + n)
        total += term
        if n > x.max() and term.max() < 1e-12 * total.min():
            break
    return np.clip(np.exp(alpha * np.log(x) - x - lgam) * total, 0.0, 1.0)


def longitudinal(E, rng, Z, Ec, photon):
    """Per-shower GFlash depth T (X0) and shape alpha, with correlated log-normal fluctuations."""
    ln_y = np.log(E / Ec)
    mean_ln_t = np.log(ln_y - 0.812 + np.where(photon, 1.0, 0.0))  # photons convert ~1 X0 later
    mean_ln_a = np.log(0.81 + (0.458 + 2.26 / Z) * ln_y)
    s_t = 1.0 / (-1.4 + 1.26 * ln_y)
    s_a = 1.0 / (-0.58 + 0.86 * ln_y)
    rho = np.clip(0.705 + 0.023 * ln_y, -1, 1)
    z1, z2 = rng.standard_normal((2, E.size))
    T = np.exp(mean_ln_t + s_t * z1)
    alpha = np.maximum(np.exp(mean_ln_a + s_a * (rho * z1 + np.sqrt(1 - rho ** 2) * z2)), 1.05)
    return T, alpha


def lateral(E, tau, Z):
    """GFlash core radius, tail radius (Moliere units) and core probability at relative depth tau."""
    lnE = np.log(E)[:, None]
    r_core = 0.0251 + 0.00319 * lnE + (0.1162 - 0.000381 * Z) * tau
    k4 = 0.3585 + 0.0421 * lnE
    r_tail = (0.659 - 0.00309 * Z) * (np.exp(-2.59 * (tau - 0.645)) + np.exp(k4 * (tau - 0.645)))
    u = (0.401 + 0.00187 * Z - tau) / (1.313 - 0.0686 * lnE)
    p = np.clip((2.632 - 0.00094 * Z) * np.exp(u - np.exp(u)), 0.0, 1.0)
    return r_core, np.maximum(r_tail, r_core), p


def _corner(a, b, R):
    # Integral of R^2 / (pi (x^2+y^2+R^2)^2) over [0,a]x[0,b] (signed): the 2D density whose
    # radial law is f(r) = 2 r R^2/(r^2+R^2)^2.
    A, B = a / R, b / R
    ca, cb = np.sqrt(1 + A * A), np.sqrt(1 + B * B)
    return (A / ca * np.arctan(B / ca) + B / cb * np.arctan(A / cb)) / (2 * np.pi)


def rect_fractions(ex, ey, cx, cy, R):
    """Fraction of a radial profile f_R centred at (cx, cy) in each cell of a grid with edges
    ex (nx+1), ey (ny+1). cx, cy, R: (B, S). Returns (B, S, nx, ny)."""
    # float32: this is the hot loop of the toy generator, and 1e-7 precision is plenty
    a = (ex[None, None, :, None] - cx[..., None, None]).astype(np.float32)
    b = (ey[None, None, None, :] - cy[..., None, None]).astype(np.float32)
    g = _corner(a, b, R[..., None, None].astype(np.float32))
    return g[..., 1:, 1:] - g[..., :-1, 1:] - g[..., 1:, :-1] + g[..., :-1, :-1]


def polar_fractions(r_edges, n_alpha, R):
    """Fraction of a radial profile centred at the origin in each (alpha, r) bin; (B, S, n_alpha*n_r)."""
    r = np.asarray(r_edges, float)
    cdf = r ** 2 / (r ** 2 + R[..., None] ** 2)          # integral of f_R from 0 to r
    ring = np.diff(cdf, axis=-1) / n_alpha
    return np.tile(ring, n_alpha)


@functools.lru_cache(maxsize=None)
def _readouts(name):
    """Per layer of a geometry: (cell indices, how to integrate the lateral profile over them)."""
    geom = geometry(name)
    out = []
    for lay in range(geom.n_layers):
        idx = np.flatnonzero(geom.layer == lay)
        if geom.name == "calochallenge1":
            edges, n_alpha = list(CC1_LAYERS.values())[lay]
            out.append((idx, ("polar", edges, n_alpha)))
            continue
        xs, ys = np.unique(geom.x[idx]), np.unique(geom.y[idx])   # every toy layer is >= 2x2
        ex = np.r_[xs - (xs[1] - xs[0]) / 2, xs[-1] + (xs[1] - xs[0]) / 2]
        ey = np.r_[ys - (ys[1] - ys[0]) / 2, ys[-1] + (ys[1] - ys[0]) / 2]
        # cell order inside the layer: x-major grid of (len(xs), len(ys))
        order = np.lexsort((geom.y[idx], geom.x[idx]))
        out.append((idx[order], ("rect", ex, ey)))
    return out


def _deposit(geom, det, E, photon, axis, rng):
    """Visible energy (file units) of B showers of true energy E (GeV) in every cell.
    axis(t) -> (cx, cy) of the shower axis at depth t (X0), each (B, S)."""
    B = E.size
    T, alpha = longitudinal(E, rng, det.Z, det.Ec, photon)
    beta = (alpha - 1.0) / T
    cells = np.zeros((B, geom.n_cells), np.float32)
    e_spot = det.a ** 2 / (1.0 + 1.0 / SPOT_SHAPE)      # GeV per spot, gives sigma/E = a/sqrt(E)
    for lay, (idx, how) in enumerate(_readouts(geom.name)):
        t0, t1 = geom.layer_x0[lay]
        t_edges = np.linspace(t0, t1, det.slices + 1)
        cdf = gamma_cdf(alpha[:, None], beta[:, None] * t_edges[None, :])
        w = np.diff(cdf, axis=1)                                      # (B, S) energy fraction
        t_mid = 0.5 * (t_edges[1:] + t_edges[:-1])
        r_core, r_tail, p = lateral(E, t_mid[None, :] / T[:, None], det.Z)
        if how[0] == "rect":
            cx, cy = axis(np.broadcast_to(t_mid, (B, det.slices)))
            f = (p[..., None, None] * rect_fractions(how[1], how[2], cx, cy, r_core * det.rm)
                 + (1 - p[..., None, None]) * rect_fractions(how[1], how[2], cx, cy, r_tail * det.rm))
            f = f.reshape(B, det.slices, -1)
        else:
            f = (p[..., None] * polar_fractions(how[1], how[2], r_core * det.rm)
                 + (1 - p[..., None]) * polar_fractions(how[1], how[2], r_tail * det.rm))
        mu = E[:, None] * np.einsum("bs,bsc->bc", w, f)               # expected true GeV per cell
        lam = mu / e_spot
        # a cell expecting < 0.01 spots gets 0 or 1 (Poisson to 5e-5): a uniform draw is much
        # cheaper than a Poisson one, and most cells of a shower image are of this kind
        small = lam < 0.01
        n = (rng.random(lam.shape) < lam).astype(np.int64)
        n[~small] = rng.poisson(lam[~small])
        hit = n > 0
        dep = np.zeros(mu.shape, np.float32)
        dep[hit] = rng.gamma(SPOT_SHAPE * n[hit]) / SPOT_SHAPE * e_spot
        cells[:, idx] = dep * det.sampling[lay] * det.to_file_unit
    if det.noise_sigma:
        cells += rng.standard_normal(cells.shape).astype(np.float32) * (det.noise_sigma * geom.noise_cut)
    cells[cells < geom.noise_cut] = 0.0
    return cells


def _centre_jitter(rng, B, cell):
    # impact point uniform within the central cell
    return rng.uniform(-0.5, 0.5, (2, B, 1)) * np.asarray(cell).reshape(2, 1, 1)


TOY_MAX_GEV = 1e5          # 100 TeV: above any calorimeter here; larger values overflow the spot counts


def _check_toy_args(kind, n, seed=0, energy=None):
    if kind not in TOY_KINDS:
        raise ValueError(f"unknown toy kind {kind!r}; choose from {', '.join(TOY_KINDS)}")
    if n <= 0:
        raise ValueError(f"number of showers must be positive, got {n}")
    if seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed}")
    if energy is not None:
        lo, hi = energy
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= TOY_MAX_GEV):
            raise ValueError(f"--energy needs 0 < LO <= HI <= {TOY_MAX_GEV:g} GeV, got {lo:g}:{hi:g}")


def make_toy(kind, n, seed=0, energy=None, chunk=500):
    """Toy showers of one detector as a dict of the arrays its real files hold (design.md).
    energy: optional (lo, hi) in GeV (momentum for lhcb) to override the detector's default range."""
    _check_toy_args(kind, n, seed, energy)
    if kind == "ild10":
        return make_toy_ild10(n, seed, energy)
    rng = np.random.default_rng(seed)
    geom, det = geometry(kind), TOY[kind]
    photon = np.full(n, kind != "lcd")
    if kind == "lcd":
        E = rng.uniform(*(energy or (2.0, 500.0)), n)
    elif kind.startswith("atlas"):
        lo, hi = energy or (5.0, 300.0)
        E = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    elif kind == "calochallenge1":
        if energy:
            E = np.exp(rng.uniform(np.log(energy[0]), np.log(energy[1]), n))
        else:   # the challenge's discrete incident energies 256 MeV .. 4.2 TeV
            E = 2.0 ** rng.integers(8, 23, n) / 1000.0
    elif kind == "lhcb":   # E is the momentum |p|; inclined tracks from an impact point
        lo, hi = energy or (2.0, 100.0)
        E = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
        slope = rng.uniform(-0.15, 0.15, (n, 2))
        pz = E / np.sqrt(1 + (slope ** 2).sum(1))
        mom = np.c_[slope * pz[:, None], pz]
        point = np.c_[rng.uniform(-2.0, 2.0, (n, 2)), np.zeros(n)]
        pdg = rng.choice([11, 22], n)
        photon = pdg == 22
    else:  # ild: fixed 50 GeV photons as in the Calomplification sample
        E = rng.uniform(*energy, n) if energy else np.full(n, 50.0)

    out = np.zeros((n, geom.n_cells), np.float32)
    for s in range(0, n, chunk):
        sl = slice(s, min(n, s + chunk))
        B = sl.stop - sl.start
        if kind == "lhcb":
            def axis(t, sl=sl):   # point (cells) + slope * depth, in mm
                z = LHCB_FRONT * 20.0 + t * LHCB_X0_MM
                return (point[sl, 0:1] * 20.0 + slope[sl, 0:1] * z, point[sl, 1:2] * 20.0 + slope[sl, 1:2] * z)
        elif kind == "calochallenge1":
            def axis(t):
                return np.zeros_like(t), np.zeros_like(t)
        else:
            cell = {"lcd": (5.1, 5.1), "ild": (5.0, 5.0)}.get(kind, ATLAS_CELL["Middle"])
            jx, jy = _centre_jitter(rng, B, cell)

            def axis(t, jx=jx, jy=jy):
                return np.broadcast_to(jx, t.shape), np.broadcast_to(jy, t.shape)
        out[sl] = _deposit(geom, det, E[sl], photon[sl], axis, rng)

    if kind == "lcd":
        return {"ECAL": out.reshape(n, 25, 25, 25), "target": np.c_[np.full(n, 11.0), E].astype(np.float32)}
    if kind.startswith("atlas"):
        return {"cells": out, "energy": (E * 1000.0).astype(np.float32), "cell_layer": geom.layer.astype(np.int32),
                "cell_eta": geom.x.astype(np.float32), "cell_phi": geom.y.astype(np.float32)}
    if kind == "calochallenge1":
        return {"incident_energies": (E * 1000.0).astype(np.float32)[:, None], "showers": out}
    if kind == "lhcb":
        return {"EnergyDeposit": out.reshape(n, 30, 30), "ParticleMomentum": mom.astype(np.float32),
                "ParticlePoint": point.astype(np.float32), "ParticlePDG": pdg.astype(np.int32)}
    return {"30x30/energy": E.astype(np.float32)[:, None], "30x30/layers": out.reshape(n, 30, 30, 30)}


def toy_path(kind, n, seed=0):
    """Default cache path of a toy dataset, relative to the working directory."""
    return os.path.join("data", f"toy_{kind}_{n}_s{seed}.h5")


def cached_toy(kind, n, seed=0, rank=0, wait=False, workers=None):
    """The TOY file for a script run without --data, made once at toy_path(kind, n, seed): its path is checked,
    rank 0 announces it and writes it if missing; with wait (torchrun) the other ranks wait until it exists
    (torchrun stops them if rank 0 fails). Returns the path."""
    path = toy_path(kind, n, seed)
    check_out_path(path, "toy data", folder=False)
    if rank == 0:
        print(f"no --data: training on TOY {kind} showers ({path})", flush=True)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_toy(kind, path, n, seed, workers=workers)
    while wait and not os.path.exists(path):
        time.sleep(0.5)
    return path


def _toy_block(args):
    kind, m, seed, energy = args
    return make_toy(kind, m, seed, energy)


def make_toy_ild10(n, seed=0, energy=None):
    """Toy ILD showers already reduced to 10x10 (`showers` (n,10,10) MeV, `energy` (n,1) GeV):
    each 30x30x30 block lives only in memory, and reduce_ild applies the MIP cut per cell before
    summing, so make_toy/write_toy("ild10") hold exactly reduce_ild of those of "ild" with that seed."""
    d = make_toy("ild", n, seed, energy)
    return {"showers": reduce_ild(d["30x30/layers"]), "energy": d["30x30/energy"]}


def write_toy(kind, path, n, seed=0, energy=None, workers=None, progress=False):
    """Write toy showers in the detector's file format (.h5; .npz also for lhcb), atomically.
    Blocks of showers are made in `workers` processes (default: all cores) and streamed to disk,
    so that 100k LCD showers (6 GB) never sit in memory at once."""
    import h5py
    from concurrent.futures import ProcessPoolExecutor
    _check_toy_args(kind, n, seed, energy)
    npz = path.endswith(".npz")
    if npz and kind != "lhcb":
        raise ValueError(f"{path}: .npz is the LHCb format only; use .h5 for {kind}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"{path}: cannot write there (folder missing or not writable)")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a folder, not a file name")
    if len(os.fsencode(os.path.basename(path))) > 255:
        raise ValueError(f"{path[:60]}...: file name longer than 255 bytes")
    step = 2000
    blocks = [(kind, min(step, n - s), seed * 1_000_003 + s, energy) for s in range(0, n, step)]
    workers = min(workers or os.cpu_count() or 1, len(blocks))
    tmp = tmp_name(path, ".npz" if npz else "")
    t0 = time.time()
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1:
                pool = stack.enter_context(ProcessPoolExecutor(workers))
                parts = _bounded_map(pool, _toy_block, blocks, 2 * workers)
            else:
                parts = map(_toy_block, blocks)
            if npz:
                parts = list(parts)
                np.savez(tmp, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
            else:
                with h5py.File(tmp, "w") as f:
                    f.attrs["toy"] = True
                    f.attrs["detector"] = kind
                    f.attrs["seed"] = seed
                    for (_, m, _, _), part, s in zip(blocks, parts, range(0, n, step)):
                        for key, arr in part.items():
                            if key.startswith("cell_"):       # per-cell constants, written once
                                if s == 0:
                                    f[key] = arr
                                continue
                            if s == 0:
                                f.create_dataset(key, shape=(n,) + arr.shape[1:], dtype=arr.dtype,
                                                 chunks=(min(n, 256),) + arr.shape[1:])
                            f[key][s:s + m] = arr
                        if progress:
                            done = s + m
                            rate = done / (time.time() - t0)
                            print(f"toy {kind}: {done}/{n} showers, {rate:.0f}/s, ETA {(n - done) / rate:.0f} s",
                                  file=sys.stderr, flush=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _bounded_map(pool, fn, items, window):
    """Ordered map that keeps at most `window` results in flight (memory stays bounded)."""
    pending = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


# ---------------------------------------------------------------- metrics
# Physics observables and distances between distributions. numpy only, float64 internally.
# Inputs of 100k showers x 15625 cells are processed in event chunks so that a float32 file
# is never copied whole into float64.


_CHUNK_ELEMENTS = 1 << 22  # elements per chunk: 32 MiB of float64 temporaries


def _chunks(n, row_size):
    """Slices over n rows, each holding about _CHUNK_ELEMENTS elements of row_size."""
    step = max(1, _CHUNK_ELEMENTS // max(1, int(row_size)))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _flat(cells):
    """(N, ...) -> (N, n_cells) view; works for N = 0 too."""
    cells = np.asarray(cells)
    return cells.reshape(cells.shape[0], int(np.prod(cells.shape[1:], dtype=np.int64)))


def _div0(num, den):
    """num / den with 0 where den == 0 (empty event / layer convention)."""
    num, den = np.broadcast_arrays(np.asarray(num, np.float64), np.asarray(den, np.float64))
    return np.divide(num, den, out=np.zeros(num.shape), where=den != 0)


def _cell_sums(cells, weights):
    """(N, C) cells @ (C, K) weights in float64, chunked over events: every per-layer sum
    (energy, energy-weighted coordinates and their squares) is one such product."""
    cells = _flat(cells)
    weights = np.asarray(weights, np.float64)
    if cells.shape[1] != weights.shape[0]:
        raise ValueError(f"showers have {cells.shape[1]} cells, geometry has {weights.shape[0]}")
    out = np.empty((cells.shape[0], weights.shape[1]))
    for sl in _chunks(cells.shape[0], cells.shape[1]):
        out[sl] = cells[sl].astype(np.float64) @ weights
    return out


def _total(cells):
    """(N,) total energy of each event, float64 accumulation."""
    return _flat(cells).sum(axis=1, dtype=np.float64)


def sampling_fraction(cells, ep):
    """Visible energy / primary energy per event (N,); cells and ep must share a unit."""
    return _total(cells) / np.asarray(ep, np.float64).reshape(-1)


def binned_stat(x, values, edges):
    """Mean, std (ddof=0) and count of `values` in bins of `x` (e.g. response vs Ep).
    Bins are [e_i, e_i+1), the last one closed; x outside the edges is ignored; empty bin -> NaN."""
    x = np.asarray(x, np.float64).ravel()
    values = np.asarray(values, np.float64).ravel()
    edges = np.asarray(edges, np.float64)
    nb = len(edges) - 1
    idx = np.searchsorted(edges, x, side="right") - 1
    idx[x == edges[-1]] = nb - 1
    ok = (idx >= 0) & (idx < nb)
    idx, v = idx[ok], values[ok]
    count = np.bincount(idx, minlength=nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(idx, v, minlength=nb) / count
        # two passes: sum of squared deviations, not <v^2>-<v>^2, to avoid cancellation
        std = np.sqrt(np.bincount(idx, (v - mean[idx]) ** 2, minlength=nb) / count)
    return mean, std, count


SF_EDGES_50GEV = np.arange(10.0, 511.0, 50.0)   # 10, 60, ..., 510 GeV: ten 50 GeV bins of Ep over 10-500 GeV


def sf_ratio_per_bin(gen_cells, gen_ep, real_cells, real_ep, edges=SF_EDGES_50GEV):
    """Generated / real mean sampling fraction (visible energy / Ep per event, then averaged) in bins of Ep:
    (ratios (n_bins,), edges). NaN in a bin where either sample has no event."""
    g = binned_stat(gen_ep, sampling_fraction(gen_cells, gen_ep), edges)[0]
    r = binned_stat(real_ep, sampling_fraction(real_cells, real_ep), edges)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        return g / r, np.asarray(edges, np.float64)


def axis_profiles(images):
    """Energy profile along each image axis: list of (N, dim_k), summed over the other axes
    (for LCD (N,25,25,25): x, y and the longitudinal (depth) profile)."""
    images = np.asarray(images)
    n, dims = images.shape[0], images.shape[1:]
    profiles = [np.empty((n, d)) for d in dims]
    axes = tuple(range(1, images.ndim))
    for sl in _chunks(n, int(np.prod(dims, dtype=np.int64))):
        chunk = images[sl].astype(np.float64)
        for k, prof in enumerate(profiles):
            prof[sl] = chunk.sum(axis=axes[:k] + axes[k + 1:])
    return profiles


def axis_moments(images, coords_list=None, orders=(1, 2)):
    """Energy-weighted moments along each image axis: {(axis, order): (N,)}, axis counted
    without the event axis. order 1 = centre <u>, order n >= 2 = n-th central moment
    <(u - <u>)^n> (2 = variance), in units of coords_list[axis] (default: cell index).
    Empty event -> 0."""
    out = {}
    for axis, prof in enumerate(axis_profiles(images)):
        coords = None if coords_list is None else coords_list[axis]
        u = np.arange(prof.shape[1], dtype=np.float64) if coords is None else np.asarray(coords, np.float64)
        e = prof.sum(axis=1)
        centre = _div0(prof @ u, e)
        for order in orders:
            out[(axis, order)] = centre if order == 1 else _div0(
                (prof * (u[None, :] - centre[:, None]) ** order).sum(axis=1), e)
    return out


# 2dgan.py's LCD metrics: its best-epoch metric (the original's Functions_v1_5_8.py:463-640) and the paper's claim.
LCD_VAL_CENTRES = (50, 100, 200, 250, 300, 400, 500)  # GeV: metric windows, besides all events (the original's "0")


def lcd_val_windows(ep, half, min_count):
    """All held-out events, and the +-half GeV windows around LCD_VAL_CENTRES with at least min_count events."""
    wins = [np.flatnonzero(np.abs(ep - c) <= half) for c in LCD_VAL_CENTRES]
    return [np.arange(len(ep))] + [w for w in wins if len(w) >= min_count]


def lcd_shower_metric(real, fake, ep, half=5.0, min_count=100, n_boot=0, seed=0):
    """(Relative error of mean x/y/z centre and variance over all events and Ep windows, bootstrap sd or 0.0)."""
    mr, mf = (np.stack([m[(a, o)] for o in (1, 2) for a in range(3)], 1)
              for m in (axis_moments(real), axis_moments(fake)))
    rng, errs = np.random.default_rng(seed), []
    for w in lcd_val_windows(np.asarray(ep), half, min_count):
        draws = [w] + [w[rng.integers(0, len(w), len(w))] for _ in range(n_boot)]
        r, f = np.stack([mr[d].mean(0) for d in draws]), np.stack([mf[d].mean(0) for d in draws])
        errs.append((np.abs(f - r) / np.maximum(np.abs(r), 1e-12)).mean(1))
    v = np.mean(errs, 0)
    return float(v[0]), float(v[1:].std()) if n_boot else 0.0


def lcd_claim_metrics(real, fake, ep):
    """Gen/real SF per 50 GeV bin and z profile; the claim: within 10% / 20% (layers 3-20). JSON-ready dict."""
    ratio, edges = sf_ratio_per_bin(fake, ep, real, ep)
    prof = axis_profiles(fake)[2].mean(0) / np.maximum(axis_profiles(real)[2].mean(0), 1e-30)
    ok = np.isfinite(ratio)                # an empty bin (None in the json) fails the claim
    sf_dev, z_dev = float(np.max(np.abs(ratio[ok] - 1), initial=0)), float(np.max(np.abs(prof[3:21] - 1)))
    return {"sf_ratio_per_50gev": {"edges_GeV": edges.tolist(), "ratio": np.where(ok, ratio, None).tolist()},
            "sf_max_abs_dev": sf_dev, "profile_z_ratio": prof.tolist(), "profile_z_max_abs_dev_layers_3_20": z_dev,
            "claim_sf_within_10pct": bool(ok.all() and sf_dev <= 0.10), "claim_profile_z_within_20pct": z_dev <= 0.20}


def _layer_onehot(geom):
    """(n_cells, n_layers) 0/1 matrix: cell -> layer."""
    return (np.asarray(geom.layer)[:, None] == np.arange(geom.n_layers)[None, :]).astype(np.float64)


def energy_per_layer(cells, geom):
    """(N, n_layers) energy deposited in each layer, in the cells' unit."""
    return _cell_sums(cells, _layer_onehot(geom))


def fraction_per_layer(cells, geom):
    """(N, n_layers) fraction of the event's visible energy in each layer; empty event -> 0."""
    e = energy_per_layer(cells, geom)
    return _div0(e, e.sum(axis=1, keepdims=True))


def centre_width_per_layer(cells, geom):
    """Energy-weighted centre <x> and width sqrt(<x^2>-<x>^2) per layer, in geom.xy_unit
    (mm, or eta/phi for ATLAS), for x and y: dict of (N, n_layers). Empty layer -> 0."""
    onehot = _layer_onehot(geom)
    n_per_layer = np.maximum(onehot.sum(axis=0), 1)
    layer = np.asarray(geom.layer)
    cols, shifts = [onehot], []
    for coord in (geom.x, geom.y):
        coord = np.asarray(coord, np.float64)
        # coordinates relative to the layer's mean cell position: <x^2>-<x>^2 would otherwise
        # cancel badly (ATLAS: eta ~ 1, widths ~ 0.02)
        shift = (coord @ onehot) / n_per_layer
        d = (coord - shift[layer])[:, None]
        cols += [onehot * d, onehot * d ** 2]
        shifts.append(shift)
    s = _cell_sums(cells, np.concatenate(cols, axis=1))
    nl = geom.n_layers
    e = s[:, :nl]
    out = {}
    for i, axis in enumerate("xy"):
        m1 = _div0(s[:, (1 + 2 * i) * nl:(2 + 2 * i) * nl], e)
        m2 = _div0(s[:, (2 + 2 * i) * nl:(3 + 2 * i) * nl], e)
        out["centre_" + axis] = np.where(e != 0, m1 + shifts[i][None, :], 0.0)
        out["width_" + axis] = np.sqrt(np.maximum(m2 - m1 ** 2, 0.0))
    return out


# ATLAS Middle window (n_eta, n_phi) by its number of cells: 89-cell and 247-cell clusters
_MIDDLE_GRID = {21: (3, 7), 77: (7, 11)}


def middle_core_fraction(cells, geom):
    """(N,) ATLAS: energy in the central 3x3 (eta x phi) Middle cells / Middle energy
    (the R_eta-like shower-shape variable); no Middle energy -> 0."""
    middle = np.flatnonzero(np.asarray(geom.layer) == geom.layer_names.index("Middle"))
    if len(middle) not in _MIDDLE_GRID:
        raise ValueError(f"{geom.name}: Middle layer has {len(middle)} cells, expected 21 or 77")
    n_eta, n_phi = _MIDDLE_GRID[len(middle)]
    ie, ip = np.divmod(np.arange(len(middle)), n_phi)  # eta-major order
    core = (np.abs(ie - n_eta // 2) <= 1) & (np.abs(ip - n_phi // 2) <= 1)
    weights = np.zeros((len(geom.layer), 2))
    weights[middle, 0] = 1.0
    weights[middle[core], 1] = 1.0
    s = _cell_sums(cells, weights)
    return _div0(s[:, 1], s[:, 0])


def layer_observables(cells, geom):
    """Klein's per-shower variates of ATLAS and CaloChallenge ds1 (evaluate.py's per-layer e, frac, centre, width,
    middle_core_fraction; wgan_gp.py's validation): name -> (N, n_layers), middle_core_fraction (ATLAS) (N, 1)."""
    out = {"energy_per_layer": energy_per_layer(cells, geom), "fraction_per_layer": fraction_per_layer(cells, geom)}
    out.update({k + "_per_layer": v for k, v in centre_width_per_layer(cells, geom).items()})
    if geom.name.startswith("atlas"):
        out["middle_core_fraction"] = middle_core_fraction(cells, geom)[:, None]
    return out


def calochallenge_features(cells, geom):
    """CaloChallenge high-level features of (N, n_voxels) showers (cut already applied) with the very
    expressions of HighLevelFeatures.CalculateFeatures (code/HighLevelFeatures.py), so that they agree
    to the last bit: dict name -> (N,). E_tot and, per layer id l, E_layer_l (sums in the showers'
    dtype, as there); EC_r_l and width_r_l (radial bin centres); EC_eta_l, EC_phi_l, width_eta_l,
    width_phi_l on layers binned in alpha; sparsity_l = 1 - fraction of voxels > 0 (exact counts).
    Centres are sum(u E) / (sum E + 1e-16) and widths sqrt(max(<u^2> - <u>^2, 0)): an empty layer
    gives 0, the challenge's convention. Chunked over showers."""
    x = _flat(cells)
    parts, start = {}, 0
    for l, (edges, n_alpha) in CALOCHALLENGE_LAYERS[geom.name].items():
        _, eta, phi = calochallenge_voxels(edges, n_alpha)
        e_ = np.asarray(edges, np.float64)
        r = np.tile((e_[:-1] + e_[1:]) * 0.5, n_alpha)   # HighLevelFeatures.radial_center_mult
        for sl in _chunks(len(x), x.shape[1]):
            e = x[sl, start:start + len(r)]
            den = e.sum(axis=-1) + 1e-16
            f = {"E_layer": e.sum(axis=-1), "sparsity": 1.0 - (e > 0).mean(axis=-1)}
            axes = (("r", r),) + ((("eta", eta), ("phi", phi)) if n_alpha > 1 else ())
            for k, u in axes:
                f[f"EC_{k}"] = (u * e).sum(axis=-1) / den
                f[f"width_{k}"] = np.sqrt(((u * u * e).sum(axis=-1) / den - f[f"EC_{k}"] ** 2).clip(min=0.0))
            for k, v in f.items():
                parts.setdefault(f"{k}_{l}", []).append(v)
        start += len(r)
    if start != x.shape[1]:
        raise ValueError(f"showers have {x.shape[1]} voxels, {geom.name} has {start}")
    return {"E_tot": x.sum(axis=-1), **{k: np.concatenate(v) for k, v in parts.items()}}


def calochallenge_edges(key, top, name):
    """Bin edges of the challenge's histogram of feature `key` of calochallenge_features (or "Etot_Einc",
    "voxels"), from its plot_* functions in code/evaluate_plotting_helper.py; top: the reference sample's
    maximum of the feature (E_layer and voxel bins are log-spaced from the voxel cut to it; None if
    nothing is above the cut)."""
    kind, _, layer = key.rpartition("_")
    cut = CALOCHALLENGE_MIN_ENERGY[name]
    if key == "Etot_Einc":
        return np.linspace(0.5, 1.5, 101)
    if key == "voxels" or kind == "E_layer":
        return np.logspace(np.log10(cut), np.log10(top), 50 if key == "voxels" else 40) if top > cut else None
    if kind == "sparsity":
        return np.linspace(0.0, 1.0, 21)
    ds23, ds1, ds1_12 = {"EC_eta": (30, 100, 500), "EC_phi": (30, 100, 500), "width_eta": (30, 100, 400),
                         "width_phi": (30, 100, 400), "EC_r": (42, 500, 1500), "width_r": (20, 500, 1500)}[kind]
    hi = ds23 if name != "calochallenge1" else ds1_12 if int(layer) >= 12 else ds1
    return np.linspace(-hi if kind in ("EC_eta", "EC_phi") else 0.0, hi, 101)


def calochallenge_separation(n1, n2, edges):
    """(separation power, statistical floor) of two histograms of counts, as the challenge's
    _separation_power of plt.hist(density=True) histograms: h = n / width / sum(n) * width, then
    0.5 sum (h1 - h2)^2 / (h1 + h2 + 1e-16); NaN if a histogram is empty. The floor, about
    B (1/n1 + 1/n2) / 4 for B occupied bins, is what two samples of one distribution give."""
    if edges is None:
        return math.nan, math.nan
    n1, n2, db = np.asarray(n1), np.asarray(n2), np.diff(edges)
    with np.errstate(invalid="ignore", divide="ignore"):
        h1, h2 = (n / db / n.sum() * db for n in (n1, n2))
        return (float(0.5 * np.sum((h1 - h2) ** 2 / (h1 + h2 + 1e-16))),
                float(np.count_nonzero(n1 + n2) * (1 / n1.sum() + 1 / n2.sum()) / 4))


def _column_mean(x):
    """(C,) mean over events of (N, C), chunked float64 accumulation."""
    total = np.zeros(x.shape[1])
    for sl in _chunks(x.shape[0], x.shape[1]):
        total += x[sl].sum(axis=0, dtype=np.float64)
    return total / x.shape[0]


def cell_variance(cells):
    """(C,) variance (ddof=0) of each cell's energy over events, in unit^2."""
    x = _flat(cells)
    mean = _column_mean(x)
    ss = np.zeros(x.shape[1])
    for sl in _chunks(x.shape[0], x.shape[1]):
        ss += ((x[sl] - mean) ** 2).sum(axis=0)
    return ss / x.shape[0]


def correlation_matrix(cells):
    """(C, C) Pearson correlation between cell energies over events. A cell with no
    variance (never hit) is uncorrelated with everything: 0 off-diagonal, 1 on the diagonal."""
    x = _flat(cells)
    mean = _column_mean(x)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for sl in _chunks(x.shape[0], x.shape[1]):
        xc = x[sl] - mean
        cov += xc.T @ xc
    std = np.sqrt(np.diag(cov))
    # a constant non-zero cell leaves rounding noise, not a variance
    live = std > 1e-12 * np.abs(mean) * math.sqrt(x.shape[0])
    corr = np.zeros_like(cov)
    corr[np.ix_(live, live)] = cov[np.ix_(live, live)] / np.outer(std[live], std[live])
    np.fill_diagonal(corr, 1.0)
    return np.clip(corr, -1.0, 1.0)


def correlation_mse(cells_a, cells_b):
    """Mean over all C^2 entries of the squared difference of the two Pearson matrices."""
    return float(np.mean((correlation_matrix(cells_a) - correlation_matrix(cells_b)) ** 2))


def nearest_neighbours(query, pool, k=5):
    """k nearest pool rows of each query row (memorisation check), Euclidean in the input's
    unit: (indices (M,k), distances (M,k)), nearest first. Chunked over queries and over the
    pool, so a float32 pool of 100k x 15625 cells is never copied whole."""
    query, pool = _flat(query).astype(np.float64), _flat(pool)
    n, dim = pool.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} needs 1 <= k <= len(pool)={n}")
    pool_rows = max(1, _CHUNK_ELEMENTS // max(1, dim))
    idx = np.empty((len(query), k), np.int64)
    dist = np.empty((len(query), k))
    for qs in _chunks(len(query), max(pool_rows + k, k * dim)):
        q = query[qs]
        score, cand = np.empty((len(q), 0)), np.empty((len(q), 0), np.int64)
        for ps in _chunks(n, dim):
            pc = pool[ps].astype(np.float64)
            # |p|^2 - 2 q.p ranks the pool rows for a query (|q|^2 is the same for all)
            score = np.concatenate([score, np.einsum("ij,ij->i", pc, pc)[None, :] - 2.0 * (q @ pc.T)], axis=1)
            rows = np.broadcast_to(np.arange(ps.start, ps.stop), (len(q), ps.stop - ps.start))
            cand = np.concatenate([cand, rows], axis=1)
            if score.shape[1] > k:  # keep the k best so far
                keep = np.argpartition(score, k - 1, axis=1)[:, :k]
                score, cand = np.take_along_axis(score, keep, axis=1), np.take_along_axis(cand, keep, axis=1)
        # exact distances of the k candidates: the expansion loses precision near 0
        dc = np.sqrt(((q[:, None, :] - pool[cand].astype(np.float64)) ** 2).sum(axis=2))
        order = np.argsort(dc, axis=1, kind="stable")
        idx[qs] = np.take_along_axis(cand, order, axis=1)
        dist[qs] = np.take_along_axis(dc, order, axis=1)
    return idx, dist


def memorisation(real, gen, n_queries, rng):
    """Nearest-neighbour memorisation check (evaluate.py, ATLAS) of (N, C) showers taken as fractions of their
    total: median distance to the nearest shower of a random real half A, of n_queries generated showers (dist_gen)
    and of n_queries held-out real ones (dist_real); nn_ratio = dist_gen / dist_real << 1 means copies. {} if half A
    has fewer than 5 showers or no real shower is held out; rng draws half A, then the generated queries."""
    norm = [x / np.maximum(x.sum(1, keepdims=True), 1e-30) for x in (real, gen)]
    perm = rng.permutation(len(real))
    pool, qb = norm[0][perm[:len(real) // 2]], norm[0][perm[len(real) // 2:]][:n_queries]
    qg = norm[1][rng.permutation(len(gen))[:n_queries]]
    if len(pool) < 5 or not len(qb):
        return {}
    dg, db = (float(np.median(nearest_neighbours(q, pool, k=5)[1][:, 0])) for q in (qg, qb))
    return {"nn_median_dist_gen": dg, "nn_median_dist_real": db, "nn_ratio": dg / db if db > 0 else None}


def lhcb_centre(momentum, point, zoff=25.0):
    """(N, 2) LHCb shower centre on the cell grid (cell units, grid centres -14.5..14.5):
    entry point extrapolated along the momentum by zoff (MLHEP metric convention)."""
    momentum = np.asarray(momentum, np.float64)
    point = np.asarray(point, np.float64)
    return point[:, :2] + zoff * momentum[:, :2] / momentum[:, 2:3]


def _lhcb_direction(momentum, orthogonal):
    """(N, 2) unit vector along p_xy (or across it, rotated +90 degrees); x if p_xy = 0."""
    p = np.asarray(momentum, np.float64)[:, :2]
    norm = np.hypot(p[:, 0], p[:, 1])
    u = np.where(norm[:, None] > 0, p / np.where(norm > 0, norm, 1.0)[:, None], [1.0, 0.0])
    return np.stack([-u[:, 1], u[:, 0]], axis=1) if orthogonal else u


def _grid(n):
    """Cell-centre coordinates of an n-cell axis in cell units, centred on 0."""
    return np.arange(n, dtype=np.float64) - (n - 1) / 2.0


def lhcb_asymmetry(images, momentum, point, orthogonal=False):
    """(N,) (E_side1 - E_side2) / E_total, split by the line through the shower centre.
    Images are [.., i_y, i_x] (MLHEP). orthogonal=False ("longitudinal"): line perpendicular
    to p_xy, side1 = ahead along p_xy (as MLHEP calogan_metrics.get_assymetry).
    orthogonal=True ("transverse"): line along p_xy, side1 = LEFT of p_xy (counter-clockwise
    from it), a property of the shower in its own frame. MLHEP's side1 is the side above the line
    (larger y), i.e. left of p_xy only when px > 0: MLHEP transverse = sign(px) x this one (and
    undefined at px = 0, where its line has infinite slope). Cells on the line count in side1.
    Empty image -> 0."""
    images = np.asarray(images)
    n, h, w = images.shape
    centre = lhcb_centre(momentum, point)
    u = _lhcb_direction(momentum, orthogonal)
    x, y = _grid(w), _grid(h)
    diff = np.empty(n)
    for sl in _chunks(n, h * w):
        proj = ((x[None, None, :] - centre[sl, 0, None, None]) * u[sl, 0, None, None]
                + (y[None, :, None] - centre[sl, 1, None, None]) * u[sl, 1, None, None])
        img = images[sl].astype(np.float64)
        diff[sl] = np.where(proj >= 0, img, -img).sum(axis=(1, 2))
    return _div0(diff, _total(images))


def lhcb_width(images, momentum, point, orthogonal=False):
    """(N,) energy-weighted standard deviation of cell positions projected on p_xy (or across
    it), in cell units (x 20 mm). Uses all cells (MLHEP sampled a strip along the line).
    Empty image -> 0."""
    images = np.asarray(images)
    h, w = images.shape[1:]
    yy, xx = np.meshgrid(_grid(h), _grid(w), indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    s = _cell_sums(images, np.stack([np.ones_like(xx), xx, yy, xx * xx, yy * yy, xx * yy], axis=1))
    m = _div0(s[:, 1:], s[:, :1])
    sxx, syy, sxy = m[:, 2] - m[:, 0] ** 2, m[:, 3] - m[:, 1] ** 2, m[:, 4] - m[:, 0] * m[:, 1]
    u = _lhcb_direction(momentum, orthogonal)
    var = u[:, 0] ** 2 * sxx + 2 * u[:, 0] * u[:, 1] * sxy + u[:, 1] ** 2 * syy
    return np.sqrt(np.maximum(var, 0.0))


def lhcb_sparsity(images, alphas=np.logspace(-5, -1, 20)):
    """(N, len(alphas)) fraction of the image cells with E >= alpha * E_total. Empty image -> 0."""
    x = _flat(images)
    total = _total(x)
    out = np.empty((x.shape[0], len(alphas)))
    for sl in _chunks(x.shape[0], x.shape[1]):
        chunk = x[sl].astype(np.float64)
        for j, alpha in enumerate(alphas):  # one vectorised pass per threshold
            out[sl, j] = np.count_nonzero(chunk >= alpha * total[sl, None], axis=1)
    out /= x.shape[1]
    out[total == 0] = 0.0
    return out


LHCB_PRD_CLUSTERS, LHCB_PRD_RUNS = 100, 100   # MLHEP analysis/score.py


def lhcb_physics_features(images, momentum, point):
    """(N, 24) the physics features of MLHEP analysis/score.py (calogan_metrics.get_physical_stats),
    in its column order: longitudinal and transverse asymmetry, width along and across p_xy (cell
    units), the 20-point sparsity curve. Conventions are those of lhcb_asymmetry / lhcb_width; an
    empty image has asymmetries and widths 0 (MLHEP: NaN) and sparsity 1 (as MLHEP: 0 >= alpha 0)."""
    f = np.concatenate([np.stack([fn(images, momentum, point, orthogonal=o) for fn in (lhcb_asymmetry, lhcb_width)
                                  for o in (False, True)], axis=1), lhcb_sparsity(images)], axis=1)
    f[_total(images) == 0, 4:] = 1.0
    return f


def lhcb_prd(real, gen, real_momentum, real_point, gen_momentum=None, gen_point=None,
             num_clusters=LHCB_PRD_CLUSTERS, num_runs=LHCB_PRD_RUNS, seed=0):
    """The MLHEP 2019 LHCb score (analysis/score.py): PRD-AUC of generated vs real showers on the
    24 physics features (lhcb_physics_features, unstandardised as in score.py) and on the images,
    100 k-means clusters (fewer when there are fewer points), averaged over 100 runs;
    score = min of the two AUCs. Generated showers take the real conditions unless given.
    prd_auc_images: score.py meant to compare an embedding of the images but, as written, embeds
    the real sample twice, so its image AUC is 1 by construction and its score is the physics AUC
    alone. Here the image AUC compares the real and generated images themselves (the 900 raw cell
    energies, no embedding network): the comparison the formula intends, and a stricter one.
    Differences from score.py: our k-means (one k-means++ start per run, 10 Lloyd steps) instead
    of sklearn MiniBatchKMeans(n_init=10); widths use all cells (lhcb_width).
    Returns {prd_auc_physics, prd_auc_images, score, prd_physics: (precision, recall), prd_images,
    features: (real, generated) (N, 24) arrays}."""
    gen_momentum = real_momentum if gen_momentum is None else gen_momentum
    gen_point = real_point if gen_point is None else gen_point
    k = min(num_clusters, len(real) + len(gen))
    out = {"features": (lhcb_physics_features(real, real_momentum, real_point),
                        lhcb_physics_features(gen, gen_momentum, gen_point))}
    for name, a, b in (("physics", *out["features"]), ("images", real, gen)):
        out[f"prd_{name}"] = prd(a, b, num_clusters=k, num_runs=num_runs, seed=seed)
        out[f"prd_auc_{name}"] = prd_auc(*out[f"prd_{name}"])
    out["score"] = min(out["prd_auc_physics"], out["prd_auc_images"])
    return out


def _cluster_sums(labels, points, k):
    """(k, D) sum of the points of each cluster, as one BLAS product."""
    onehot = np.zeros((k, len(labels)), points.dtype)
    onehot[labels, np.arange(len(labels))] = 1
    return (onehot @ points).astype(np.float64)


def _kmeans_prepare(x):
    """Centred float32 copy of x, its squared norms and the mean. Distances in float32 halve
    the cost of the N x D x k products that dominate; centring keeps |x|^2 small so that
    |x|^2 - 2 x.c + |c|^2 stays accurate."""
    x = _flat(x)
    mean = _column_mean(x)
    xs = np.empty(x.shape, np.float32)
    for sl in _chunks(len(x), x.shape[1]):
        xs[sl] = x[sl] - mean
    return xs, np.einsum("ij,ij->i", xs, xs), mean


def _sqdist(xs, x2, c):
    """(N, len(c)) squared distances of prepared points to centres; clipped at 0 because the
    expansion |x|^2 - 2 x.c + |c|^2 can dip below it."""
    c = np.asarray(c, np.float32)
    return np.maximum(x2[:, None] - 2.0 * (xs @ c.T) + np.einsum("ij,ij->i", c, c)[None, :], 0.0)


def _lloyd(xs, x2, k, n_iter, rng, tol=1e-3):
    """k-means++ seeding then at most n_iter Lloyd steps on prepared data; stops when at most
    tol * N points change cluster. Returns labels and the centres they were assigned to."""
    n = len(xs)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} needs 1 <= k <= N={n}")
    # seed on a subsample (like MiniBatchKMeans' init_size): k full passes would cost as
    # much as the Lloyd steps themselves
    sub = rng.choice(n, size=min(n, 100 * k), replace=False)
    xsub, x2sub = xs[sub], x2[sub]
    centres = np.empty((k, xs.shape[1]))
    centres[0] = xsub[rng.integers(len(sub))]
    d2 = _sqdist(xsub, x2sub, centres[:1])[:, 0].astype(np.float64)
    for j in range(1, k):
        total = d2.sum()
        centres[j] = xsub[rng.choice(len(sub), p=d2 / total) if total > 0 else rng.integers(len(sub))]
        d2 = np.minimum(d2, _sqdist(xsub, x2sub, centres[j:j + 1])[:, 0])
    d = _sqdist(xs, x2, centres)
    labels = d.argmin(axis=1)
    sums, counts = _cluster_sums(labels, xs, k), np.bincount(labels, minlength=k)
    for _ in range(n_iter):
        centres = _div0(sums, counts[:, None])
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # re-seed empty clusters on the points worst served by their centre
            centres[empty] = xs[np.argsort(d[np.arange(n), labels])[::-1][:len(empty)]]
        d = _sqdist(xs, x2, centres)
        new = d.argmin(axis=1)
        moved = np.flatnonzero(new != labels)
        # only the points that changed cluster move the sums: late iterations cost one product
        sums += _cluster_sums(new[moved], xs[moved], k) - _cluster_sums(labels[moved], xs[moved], k)
        counts = np.bincount(new, minlength=k)
        labels = new
        if len(moved) <= tol * n:
            break
    return labels, centres


def kmeans(x, k, n_iter=20, seed=0):
    """k-means clustering (k-means++ seeding, at most n_iter Lloyd steps, stops when < 0.1% of
    the points move). Returns labels (N,) int and centres (k, D) in x's unit."""
    xs, x2, mean = _kmeans_prepare(x)
    labels, centres = _lloyd(xs, x2, k, n_iter, np.random.default_rng(seed))
    return labels, centres + mean


def prd(ref, ev, num_clusters=20, num_angles=1001, num_runs=10, seed=0, enforce_balance=True):
    """Precision and recall for distributions (Sajjadi et al. 2018), arrays (num_angles,).
    Like the reference prd_score.compute_prd_from_embedding, samples of different sizes are refused
    (ValueError) unless enforce_balance=False: the cluster histograms are then of unequal precision.
    Each run clusters the union of both samples once with k-means and compares the cluster
    histograms; curves are averaged over runs. Precision ~ how much of `ev` lies where `ref`
    is, recall ~ how much of `ref` is covered by `ev`. 10 Lloyd steps per run: by then ~1% of
    the points still hop between neighbouring clusters, which barely moves the histograms."""
    n_ref = len(ref)
    if enforce_balance and n_ref != len(ev):
        raise ValueError(f"prd: samples of {n_ref} and {len(ev)} points; subsample to equal sizes "
                         "or pass enforce_balance=False")
    xs, x2, _ = _kmeans_prepare(np.concatenate([_flat(ref), _flat(ev)]))
    slopes = np.tan(np.linspace(1e-10, np.pi / 2 - 1e-10, num_angles))
    rng = np.random.default_rng(seed)
    precision, recall = np.zeros(num_angles), np.zeros(num_angles)
    for _ in range(num_runs):
        labels, _ = _lloyd(xs, x2, num_clusters, 10, rng)
        h_ref = np.bincount(labels[:n_ref], minlength=num_clusters) / n_ref
        h_ev = np.bincount(labels[n_ref:], minlength=num_clusters) / (len(labels) - n_ref)
        p = np.minimum(h_ref[None, :] * slopes[:, None], h_ev[None, :]).sum(axis=1)
        precision += np.clip(p, 0.0, 1.0)
        recall += np.clip(p / slopes, 0.0, 1.0)
    return precision / num_runs, recall / num_runs


def prd_auc(precision, recall):
    """Area under the PRD curve (1 = identical cluster histograms, 0 = disjoint)."""
    p, r = np.asarray(precision, np.float64), np.asarray(recall, np.float64)
    # walk the curve in angle order: precision / recall = tan(angle) on a PRD curve, so
    # sorting on it is immune to the rounding ties that sorting on recall alone suffers
    order = np.argsort(np.arctan2(p, r), kind="stable")
    p, r = p[order], r[order]
    return float(np.sum(-np.diff(r) * (p[1:] + p[:-1]) / 2.0))


def _quantile_bins(ref, n_bins):
    """Edges of n_bins equal-probability bins under ref (merged where ref has ties) and the
    probability of ref in each bin of _bin_probs."""
    ref = np.asarray(ref, np.float64).ravel()
    if n_bins < 1 or ref.size < 10 * n_bins:
        raise ValueError(f"quantile JSD needs >= 10 reference points per bin: {ref.size} points, {n_bins} bins")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, n_bins + 1)))
    if len(edges) == 1:  # constant reference: keep one bin holding exactly that value
        edges = np.repeat(edges, 2)
    return edges, _bin_probs(ref, edges)


def _bin_probs(x, edges):
    """Fractions of x in: underflow (< edges[0]), the bins [e_i, e_i+1) (last one closed),
    overflow (> edges[-1]). Under/overflow make disjoint supports give JSD = 1."""
    x = np.asarray(x, np.float64).ravel()
    if x.size == 0:
        raise ValueError("empty sample")
    idx = np.searchsorted(edges, x, side="right")
    idx[x == edges[-1]] = len(edges) - 1
    return np.bincount(idx, minlength=len(edges) + 1) / x.size


def _jsd(p, q):
    """Jensen-Shannon divergence of two histograms, log base 2: in [0, 1]."""
    m = 0.5 * (p + q)
    kl = [np.sum(a[a > 0] * np.log2(a[a > 0] / m[a > 0])) for a in (p, q)]
    return float(np.clip(0.5 * (kl[0] + kl[1]), 0.0, 1.0))


def quantile_jsd(ref, sample, n_bins):
    """JSD (log2, in [0, 1]) between ref and sample over n_bins bins of equal probability
    under ref (Calomplification metric); ValueError if ref has < 10 points per bin.
    The sample may be any size >= 1."""
    edges, p_ref = _quantile_bins(ref, n_bins)
    return _jsd(p_ref, _bin_probs(sample, edges))


def _size_grid(sizes, n_max):
    """Sorted subset sizes <= n_max, always ending with n_max (the full sample)."""
    if sizes is None:
        sizes = np.geomspace(min(10, n_max), n_max, 20)
    sizes = np.unique(np.round(np.asarray(sizes, np.float64)).astype(np.int64))
    return np.union1d(sizes[(sizes >= 1) & (sizes <= n_max)], [n_max])


def _crossing_size(sizes, jsd, target):
    """Size at which a JSD-vs-size curve first falls to target, interpolated linearly in
    (log size, log JSD) (statistical JSD falls like a power of the size); math.inf if it never
    does, None if it is already there at the first size."""
    below = np.flatnonzero(np.asarray(jsd) <= target)
    if len(below) == 0:
        return math.inf
    i = below[0]
    if i == 0:
        return None
    ly = np.log(np.maximum([jsd[i - 1], jsd[i], target], 1e-300))  # a JSD can be exactly 0
    lx = np.log(np.asarray(sizes[i - 1:i + 1], np.float64))
    return float(np.exp(lx[0] + (ly[2] - ly[0]) * (lx[1] - lx[0]) / (ly[1] - ly[0])))


def amplification(reference, truth_pool, generated, n_bins, sizes=None, n_rep=5, seed=0):
    """Calomplification study (Bieringer et al. 2022): how many truth showers is the generated
    sample worth? quantile_jsd against `reference` of random truth subsets (from truth_pool,
    which must be disjoint from reference) and of generated subsets of growing size, averaged
    over n_rep draws (the full sample is used once). Sizes default to 20 log-spaced values from
    10; both curves end at the full sample, so gen_jsd[-1] is the JSD of all generated showers.
    equivalent_size: truth size at which the truth curve first falls to gen_jsd[-1]
    (log-log interpolation); math.inf if it never does within the pool (the generated sample
    beats the whole pool), None if the generated sample is worse than the smallest truth subset."""
    edges, p_ref = _quantile_bins(reference, n_bins)
    rng = np.random.default_rng(seed)
    out = {}
    for name, sample in (("truth", truth_pool), ("gen", generated)):
        sample = np.asarray(sample, np.float64).ravel()
        grid = _size_grid(sizes, sample.size)
        jsd = [np.mean([_jsd(p_ref, _bin_probs(rng.choice(sample, m, replace=False), edges))
                        for _ in range(n_rep if m < sample.size else 1)]) for m in grid]
        out[name + "_sizes"], out[name + "_jsd"] = grid, np.asarray(jsd)
    out["equivalent_size"] = _crossing_size(out["truth_sizes"], out["truth_jsd"], out["gen_jsd"][-1])
    return out


QUANTILE_COUNTS = (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


def _rows(x):
    """Per-event values as a 2-d float array (events, values); NaN marks an absent value."""
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1)


def _values(rows):
    v = rows.ravel()
    return v[~np.isnan(v)]


def amplification_scan(reference, truth_pool, generated, n_quantiles=QUANTILE_COUNTS, sizes=None, n_rep=5,
                       seed=0):
    """The Calomplification protocol for one observable, at several numbers of quantiles.
    reference, truth_pool, generated: per-event values, 1-d (one value per event) or 2-d (events,
    values) with NaN for absent values (e.g. the pixels of a shower above a cut); reference and
    truth_pool must be disjoint truth. For each number of quantiles K (those of n_quantiles with
    >= 10 reference values per quantile): quantile_jsd against the reference of random truth
    subsets of growing size (events; n_rep draws, the whole pool once) and of the whole generated
    sample. equivalent_size[K]: the truth size at which the truth curve first falls to the
    generated JSD (_crossing_size: math.inf = better than the whole pool, None = worse than the
    smallest subset). Returns n_quantiles, sizes, truth_jsd (K x sizes), gen_jsd (K,), equivalent_size."""
    ref, pool, gen = _values(_rows(reference)), _rows(truth_pool), _values(_rows(generated))
    ks = [int(k) for k in n_quantiles if 1 <= k and ref.size >= 10 * k]
    if not ks:
        raise ValueError(f"amplification_scan: {ref.size} reference values, fewer than 10 per quantile")
    bins = [_quantile_bins(ref, k) for k in ks]
    grid = _size_grid(sizes, len(pool))
    rng = np.random.default_rng(seed)
    truth = np.zeros((len(ks), len(grid)))
    for j, m in enumerate(grid):
        reps = n_rep if m < len(pool) else 1
        for _ in range(reps):
            v = _values(pool[rng.choice(len(pool), m, replace=False)])
            for i, (edges, p_ref) in enumerate(bins):
                truth[i, j] += (_jsd(p_ref, _bin_probs(v, edges)) if v.size else 1.0) / reps
    gen_jsd = np.array([_jsd(p_ref, _bin_probs(gen, edges)) if gen.size else 1.0 for edges, p_ref in bins])
    return {"n_quantiles": ks, "sizes": grid, "truth_jsd": truth, "gen_jsd": gen_jsd,
            "equivalent_size": {k: _crossing_size(grid, truth[i], gen_jsd[i]) for i, k in enumerate(ks)}}


def ild10_quantile_jsd(ref_obs, obs, n_bins):
    """quantile_jsd per observable of two ild10_observables dicts (NaN dropped; at most n_bins, and
    >= 10 reference values per quantile); 1 for an observable the sample lacks."""
    out = {}
    for k, v in obs.items():
        r, v = _values(_rows(ref_obs[k])), _values(_rows(v))
        out[k] = quantile_jsd(r, v, min(n_bins, r.size // 10)) if v.size else 1.0
    return out


def ild10_amplification(truth, generated, n_quantiles, n_train, seed=0):
    """amplification_scan on each ild10 observable of (N,10,10) showers: the truth split into a
    reference half and a disjoint pool half; truth subset sizes include n_train x (1, 2, 5, 10)."""
    perm = np.random.default_rng(seed).permutation(len(truth))
    half = len(truth) // 2
    ref, pool, gen = (ild10_observables(x) for x in (truth[perm[:half]], truth[perm[half:]], generated))
    sizes = np.r_[np.geomspace(10, len(truth) - half, 20), n_train * np.array([1, 2, 5, 10])]
    return {k: amplification_scan(ref[k], pool[k], gen[k], n_quantiles, sizes, seed=seed) for k in ref}


def separation_power(a, b, bins=50):
    """0.5 * sum (h1 - h2)^2 / (h1 + h2) of the two normalised histograms (CaloChallenge):
    0 = identical, 1 = disjoint. bins: a number (equal bins over the combined range) or edges;
    entries outside given edges are dropped before normalising."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    edges = np.histogram_bin_edges(np.concatenate([a, b]), bins=bins) if np.ndim(bins) == 0 else np.asarray(bins)
    h1, h2 = (np.histogram(v, bins=edges)[0].astype(np.float64) for v in (a, b))
    if h1.sum() == 0 or h2.sum() == 0:
        raise ValueError("separation_power: a histogram is empty")
    h1, h2 = h1 / h1.sum(), h2 / h2.sum()
    return float(0.5 * np.sum(_div0((h1 - h2) ** 2, h1 + h2)))


def _sqrt_psd(s):
    """Symmetric square root of a positive semi-definite matrix (eigendecomposition)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(feat_a, feat_b):
    """Frechet distance between Gaussians fitted to two feature sets (FID/FPD):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^1/2), covariances with ddof=1.
    tr (S_a S_b)^1/2 = sum sqrt(eig(S_a^1/2 S_b S_a^1/2)), a symmetric PSD matrix."""
    a, b = (np.asarray(f, np.float64).reshape(len(f), -1) for f in (feat_a, feat_b))
    sa, sb = (np.atleast_2d(np.cov(f, rowvar=False)) for f in (a, b))
    ra = _sqrt_psd(sa)
    m = ra @ sb @ ra
    tr_sqrt = np.sqrt(np.maximum(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0)).sum()
    diff = a.mean(axis=0) - b.mean(axis=0)
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2.0 * tr_sqrt)


def auc_score(y, s):
    """Area under the ROC curve of scores s for labels y in {0, 1} (Mann-Whitney, ties count 1/2)."""
    y, s = np.asarray(y), np.asarray(s)
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)  # average ranks over ties
    n1 = y.sum()
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def isotonic_fit(x, y, y_min=1e-6, y_max=1 - 1e-6):
    """Increasing isotonic regression of y on x as sklearn's IsotonicRegression(out_of_bounds='clip',
    y_min, y_max) fits it (CaloChallenge's classifier calibration): equal x pooled, adjacent
    violators pooled into weighted means, values clipped. Returns (xs, ys); predict with
    np.interp(x_new, xs, ys): linear between the points, constant outside."""
    xs, inv = np.unique(x, return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    val, wt, size = [], [], []
    for v, wi in zip(np.bincount(inv, np.asarray(y, np.float64)) / w, w):
        val.append(v), wt.append(wi), size.append(1)
        while len(val) > 1 and val[-2] >= val[-1]:
            wsum = wt[-2] + wt[-1]
            val[-2:], wt[-2:], size[-2:] = [(val[-2] * wt[-2] + val[-1] * wt[-1]) / wsum], [wsum], [size[-2] + size[-1]]
    return xs, np.clip(np.repeat(val, size), y_min, y_max)


# ---------------------------------------------------------------- separation power binned as evaluate.py does


def auto_bins(*sizes):
    """evaluate.py's default number of histogram bins: sqrt of the smallest sample, within 10..50."""
    return int(np.clip(round(math.sqrt(min(sizes))), 10, 50))


def native_edges(real, gens, n_bins):
    """evaluate.py's native bin edges: the real range widened to each generated sample's 0.5-99.5%
    quantiles, log-spaced when positive and spanning > 100x; returns (edges, log-spaced)."""
    lo, hi = float(np.min(real)), float(np.max(real))
    for g in (g for g in gens if len(g)):
        q = np.quantile(g, [0.005, 0.995])
        lo, hi = min(lo, q[0]), max(hi, q[1])
    lo, hi = (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)
    log = lo > 0 and hi / lo > 100
    return (np.geomspace(lo, hi, n_bins + 1) if log else np.linspace(lo, hi, n_bins + 1)), log


def separation_power_clipped(real, gen, n_bins):
    """separation_power over native_edges, values outside clipped into the end bins so that tails
    count (evaluate.py's native binning)."""
    real, gen = np.asarray(real, np.float64).ravel(), np.asarray(gen, np.float64).ravel()
    return binned_separation(real, gen, native_edges(real, [gen], n_bins)[0])[0]


def binned_separation(real, gen, edges, clip=True):
    """(separation power, statistical floor) of the finite values of two samples over `edges` (evaluate.py):
    clip=True (native) counts values outside in the end bins, clip=False (the challenge) drops them;
    (NaN, NaN) for edges None (nothing to bin)."""
    if edges is None:
        return math.nan, math.nan
    h = [np.histogram(np.clip(v, edges[0], edges[-1]) if clip else v, edges)[0]
         for v in (np.asarray(x)[np.isfinite(x)] for x in (real, gen))]
    return calochallenge_separation(*h, edges)


def standardised_frechet(real, gen):
    """frechet_distance (at least 0) of (N, D) features standardised with the real mean and std (std 0 -> 1),
    rows with a non-finite value left out (evaluate.py's Frechet distance of the observables)."""
    r, g = (np.asarray(x)[np.isfinite(x).all(1)] for x in (real, gen))
    mean, sd = r.mean(0), np.where(r.std(0) == 0, 1.0, r.std(0))
    return float(np.maximum(0.0, frechet_distance((r - mean) / sd, (g - mean) / sd)))


def bce_score(y, p):
    """Mean binary cross-entropy of probabilities p for labels y in {0, 1}, each log clamped at -100 as torch's
    BCELoss does (p = 0 or 1 stays finite)."""
    with np.errstate(divide="ignore"):
        return float(-np.mean(y * np.maximum(np.log(p), -100) + (1 - y) * np.maximum(np.log(1 - p), -100)))


# ---------------------------------------------------------------- safe files (toy writer, evaluate.py, scripts)
# Bad input is one line on stderr and exit status 2, with nothing written (issue 16). These few helpers are
# what every script needs to keep that promise; they hold no training or model code.


class InputError(ValueError):
    """Bad input (file, flag, checkpoint, run folder): one line for the user, exit status 2."""


def tmp_name(path, suffix=""):
    """A temporary name beside path, unique per process and call, never longer than the file-name
    limit (path + '.tmp<pid>' passes 255 characters for a valid 250-character name)."""
    folder, base = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{base[:150]}.{os.getpid()}.{os.urandom(4).hex()}.tmp{suffix}")


def check_out_path(path, what="--out", folder=True):
    """Refuse, before anything is read or written, an output path that cannot be made: a component over
    255 bytes, a plain file (or, for a file, a folder) in the way, an unwritable parent. Creates nothing."""
    if not path or any(len(os.fsencode(c)) > 255 for c in str(path).split(os.sep)):
        raise InputError(f"{what} {str(path)[:60]}...: a path component is longer than 255 bytes" if path
                         else f"{what}: empty path")
    if os.path.exists(path) and os.path.isdir(path) != folder:
        raise InputError(f"{what} {path}: is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
    top = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(top):
        top = os.path.dirname(top)
    if not os.path.isdir(top):
        raise InputError(f"{what} {path}: {top} is a file, not a folder")
    if not os.access(top, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: {top} is not writable")


def write_atomic(path, write):
    """write(tmp), or the text `write`, to a temporary name unique per process and call in path's folder
    (made if missing), then rename: a reader never sees half a file and nothing stays behind. A folder in
    the way or an OS error: InputError."""
    if os.path.isdir(path):
        raise InputError(f"{path}: is a folder, not a file")
    tmp = tmp_name(path, os.path.splitext(path)[1])     # keep the extension: savefig and np.savez read it
    try:
        os.makedirs(os.path.dirname(tmp), exist_ok=True)
        if callable(write):
            write(tmp)
        else:
            with open(tmp, "w") as fh:
                fh.write(write)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_real(path, key, a, finite=True):
    """The dataset `key` of file `path` as float32, the dtype it is trained in: refuses strings, complex and
    objects (they cast silently or with a warning), and values that are not finite in float32 (1e39 passes a
    float64 check and is inf here)."""
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise InputError(f"{path}: '{key}' has dtype {a.dtype}, expected real numbers")
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        a = a.astype(np.float32, copy=False)
    if finite and not np.isfinite(a).all():
        raise InputError(f"{path}: '{key}' has values that are not finite in float32 (NaN, inf or |x| > 3.4e38)")
    return a


def check_finite(tree, what):
    """Refuse to write `what` (a checkpoint, generated showers, a state dict) if any number in it is not
    finite; tree: arrays, tensors (anything with .detach()), numbers, dicts, lists and tuples."""
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif hasattr(x, "detach"):
            if x.is_floating_point() and not bool(x.detach().isfinite().all()):
                raise InputError(f"{what}: not finite (NaN or inf); not written, the previous file is kept")
        elif isinstance(x, (float, np.floating, np.ndarray)) and np.asarray(x).dtype.kind == "f" \
                and not np.isfinite(x).all():
            raise InputError(f"{what}: not finite (NaN or inf); not written, the previous file is kept")


def parse_range(text, flag="--energy", unit="GeV", hi_max=None):
    """'LO:HI' -> (lo, hi) floats with 0 < LO <= HI (<= hi_max), both finite; else InputError naming the flag."""
    try:
        lo, hi = (float(v) for v in str(text).split(":"))
    except ValueError:
        raise InputError(f"{flag} must be LO:HI in {unit}, got {text!r}")
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi <= (hi_max or float(np.finfo(np.float32).max))):
        top = f" <= {hi_max:g}" if hi_max else ", finite"
        raise InputError(f"{flag} needs 0 < LO <= HI{top} ({unit}), got {text!r}")
    return lo, hi


def input_files(pattern, what="--data"):
    """A file name, or a glob of many: an existing file is taken literally, so names holding '[' work."""
    import glob
    if os.path.isfile(pattern) or not any(c in pattern for c in "*?["):
        return [pattern]
    files = sorted(glob.glob(pattern))
    if not files:
        raise InputError(f"{what} {pattern}: no file matches")
    return files


def check_run_folder(out, script, model=None, resume=False):
    """A run folder records which script and model shape made it (run.json). Refuse another script's folder,
    and, on --resume, changed model flags: training on would overwrite or misread that run."""
    path = os.path.join(out, "run.json")
    if not os.path.isfile(path):
        made_by = None
        if os.path.isfile(os.path.join(out, "metrics.json")):      # folders from before run.json
            try:
                with open(os.path.join(out, "metrics.json")) as f:
                    made_by = json.load(f).get("script")
            except (OSError, ValueError, AttributeError):
                made_by = "an unknown script"
        if made_by not in (None, script):
            raise InputError(f"--out {out}: a run folder of {made_by}; choose another --out")
        return
    try:
        with open(path) as f:
            stamp = json.load(f)
        made_by, shape = stamp["script"], stamp.get("model")
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{path}: unreadable run record; choose another --out")
    if made_by != script:
        raise InputError(f"--out {out}: a run folder of {made_by}; choose another --out")
    if resume and model is not None and shape is not None and shape != _jsonable(model):
        diff = sorted(k for k in set(shape) | set(model) if shape.get(k) != _jsonable(model).get(k))
        raise InputError(f"--resume {out}: model flags differ from the saved run ({', '.join(diff)}); "
                         "resume with the same flags or choose another --out")


def _jsonable(model):
    return json.loads(json.dumps(model, default=str))


def stamp_run_folder(out, script, model=None):
    """Make the run folder and write run.json (which script, which model shape)."""
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "run.json"), json.dumps({"script": script, "model": model}, default=str))


def fail(script, err):
    """Print err as one line on stderr (rank 0 only under torchrun: every rank fails alike) and return 2. Other
    ranks wait 3 s first: torchrun stops every rank once one exits, which must not be before rank 0 has printed."""
    if int(os.environ.get("RANK", "0")):
        time.sleep(3)
    else:
        print(f"{script}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr, flush=True)
    return 2


# ---------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line (argparse prints the whole usage block)
        self.exit(2, f"{self.prog}: error: {message}\n")     # the same prefix as fail()


def main(argv=None):
    p = _Parser(description="Geometry and toy-shower tools of the calorimeter scripts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy", help="write toy GFlash showers in a detector's real file format")
    t.add_argument("kind", help=f"detector: {', '.join(TOY_KINDS)}")
    t.add_argument("-n", type=int, default=10000, help="number of showers")
    t.add_argument("-o", "--out", required=True, help="output file (.h5; .npz also for lhcb)")
    t.add_argument("--seed", type=int, default=0, help="random seed")
    t.add_argument("--energy", default=None,
                   help="LO:HI energy range in GeV (momentum for lhcb) instead of the detector's default")
    args = p.parse_args(argv)
    try:
        energy = None
        if args.energy is not None:
            try:
                lo, hi = (float(v) for v in args.energy.split(":"))
            except ValueError:
                raise ValueError(f"--energy must be LO:HI in GeV, got {args.energy!r}")
            energy = (lo, hi)
        write_toy(args.kind, args.out, args.n, args.seed, energy, progress=True)
    except (ValueError, OSError) as e:
        print(f"common.py toy: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} toy {args.kind} showers to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
