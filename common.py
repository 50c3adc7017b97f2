"""Geometry, toy showers and physics metrics shared by the calorimeter fast-simulation scripts.

Only three things live here (design.md): detector geometries, the toy shower generator that
fills them, and the observables / distances used to validate generated showers.

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


# CaloChallenge 2022 dataset 1 photons (binning_dataset_1_photons.xml): r edges in mm and
# number of alpha bins of the five non-empty layers; voxels alpha-major, r-minor in each layer.
CC1_LAYERS = {0: ([0, 5, 10, 30, 50, 100, 200, 400, 600], 1),
              1: ([0, 2, 4, 6, 8, 10, 12, 15, 20, 30, 40, 50, 70, 90, 120, 150, 200], 10),
              2: ([0, 2, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100, 130, 160, 200, 250, 300, 350, 400], 10),
              3: ([0, 50, 100, 200, 400, 600], 1),
              12: ([0, 100, 200, 400, 1000, 2000], 1)}
CC1_X0 = np.array([[0.0, 2.0], [2.0, 6.3], [6.3, 22.3], [22.3, 24.3], [24.3, 60.0]])


def _calochallenge1():
    layer, x, y = [], [], []
    for i, (edges, n_alpha) in enumerate(CC1_LAYERS.values()):
        r_mid = 0.5 * (np.array(edges[1:], float) + np.array(edges[:-1], float))
        a_edges = np.linspace(-np.pi, np.pi, n_alpha + 1)
        a_mid = 0.5 * (a_edges[1:] + a_edges[:-1])
        r, a = np.tile(r_mid, n_alpha), np.repeat(a_mid, len(r_mid))
        layer.append(np.full(r.size, i))
        x.append(r * np.cos(a))
        y.append(r * np.sin(a))
    layer, x, y = np.concatenate(layer), np.concatenate(x), np.concatenate(y)
    return Geometry("calochallenge1", (368,), layer, tuple(str(k) for k in CC1_LAYERS), x, y, "mm",
                    CC1_X0, np.zeros(368), "MeV")


def _lhcb():
    # LHCb ECAL window of 30x30 cells of 20 mm; 25 X0 deep, read out as one projection.
    x, y = _grid_xy(30, 30, 20.0, 20.0)
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
             "calochallenge1": _calochallenge1, "lhcb": _lhcb, "ild": _ild, "ild10": _ild10}
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


def _readouts(geom):
    """Per layer: (cell indices, how to integrate the lateral profile over those cells)."""
    out = []
    for lay in range(geom.n_layers):
        idx = np.flatnonzero(geom.layer == lay)
        if geom.name == "calochallenge1":
            edges, n_alpha = list(CC1_LAYERS.values())[lay]
            out.append((idx, ("polar", edges, n_alpha)))
            continue
        xs, ys = np.unique(geom.x[idx]), np.unique(geom.y[idx])
        dx = xs[1] - xs[0] if xs.size > 1 else ATLAS_CELL[geom.layer_names[lay]][0]
        dy = ys[1] - ys[0] if ys.size > 1 else ATLAS_CELL[geom.layer_names[lay]][1]
        ex = np.r_[xs - dx / 2, xs[-1] + dx / 2]
        ey = np.r_[ys - dy / 2, ys[-1] + dy / 2]
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
    for lay, (idx, how) in enumerate(_readouts(geom)):
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


def make_toy(kind, n, seed=0, energy=None, chunk=500):
    """Toy showers of one detector as a dict of the arrays its real files hold (design.md).
    energy: optional (lo, hi) in GeV (momentum for lhcb) to override the detector's default range."""
    if kind not in TOY:
        raise ValueError(f"unknown toy kind {kind!r}; choose from {', '.join(TOY)}")
    if n <= 0:
        raise ValueError(f"number of showers must be positive, got {n}")
    rng = np.random.default_rng(seed)
    geom, det = geometry(kind), TOY[kind]
    lo_hi = energy
    if kind == "lcd":
        E = rng.uniform(*(lo_hi or (2.0, 500.0)), n)
    elif kind.startswith("atlas"):
        lo, hi = lo_hi or (5.0, 300.0)
        E = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    elif kind == "calochallenge1":
        if lo_hi:
            E = np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]), n))
        else:   # the challenge's discrete incident energies 256 MeV .. 4.2 TeV
            E = 2.0 ** rng.integers(8, 23, n) / 1000.0
    elif kind == "lhcb":
        lo, hi = lo_hi or (2.0, 100.0)
        P = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    else:  # ild: fixed 50 GeV photons as in the Calomplification sample
        E = rng.uniform(*lo_hi, n) if lo_hi else np.full(n, 50.0)

    if kind == "lhcb":
        slope = rng.uniform(-0.15, 0.15, (n, 2))
        pz = P / np.sqrt(1 + (slope ** 2).sum(1))
        mom = np.c_[slope * pz[:, None], pz]
        point = np.c_[rng.uniform(-2.0, 2.0, (n, 2)), np.zeros(n)]
        pdg = rng.choice([11, 22], n)
        E = P
        photon = pdg == 22
    else:
        photon = np.full(n, kind != "lcd")

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


def _toy_block(args):
    kind, m, seed, energy = args
    return make_toy(kind, m, seed, energy)


def write_toy(kind, path, n, seed=0, energy=None, workers=None, progress=False):
    """Write toy showers in the detector's file format (.h5; .npz also for lhcb), atomically.
    Blocks of showers are made in `workers` processes (default: all cores) and streamed to disk,
    so that 100k LCD showers (6 GB) never sit in memory at once."""
    import h5py
    from concurrent.futures import ProcessPoolExecutor
    if kind not in TOY:
        raise ValueError(f"unknown toy kind {kind!r}; choose from {', '.join(TOY)}")
    if n <= 0:
        raise ValueError(f"number of showers must be positive, got {n}")
    npz = path.endswith(".npz")
    if npz and kind != "lhcb":
        raise ValueError(f"{path}: .npz is the LHCb format only; use .h5 for {kind}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ValueError(f"{path}: cannot write there (folder missing or not writable)")
    step = 2000
    blocks = [(kind, min(step, n - s), seed * 1_000_003 + s, energy) for s in range(0, n, step)]
    workers = min(workers or os.cpu_count() or 1, len(blocks))
    tmp = path + f".tmp{os.getpid()}" + (".npz" if npz else "")
    t0 = time.time()
    try:
        with ProcessPoolExecutor(workers) if workers > 1 else _Serial() as pool:
            parts = _bounded_map(pool, _toy_block, blocks, 2 * workers)
            if npz:
                parts = list(parts)
                np.savez(tmp, **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]})
            else:
                with h5py.File(tmp, "w") as f:
                    f.attrs["toy"] = True
                    f.attrs["detector"] = kind
                    f.attrs["seed"] = seed
                    s = 0
                    for part in parts:
                        m = len(next(iter(v for k, v in part.items() if not k.startswith("cell_"))))
                        for key, arr in part.items():
                            if key.startswith("cell_"):       # per-cell constants, written once
                                if s == 0:
                                    f[key] = arr
                                continue
                            if s == 0:
                                f.create_dataset(key, shape=(n,) + arr.shape[1:], dtype=arr.dtype,
                                                 chunks=(min(n, 256),) + arr.shape[1:])
                            f[key][s:s + m] = arr
                        s += m
                        if progress:
                            rate = s / (time.time() - t0)
                            print(f"toy {kind}: {s}/{n} showers, {rate:.0f}/s, ETA {(n - s) / rate:.0f} s",
                                  file=sys.stderr, flush=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


class _Serial:
    """Stand-in for a process pool with one worker (no fork)."""
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        class Done:
            def __init__(self, value):
                self.value = value

            def result(self):
                return self.value
        return Done(fn(*args))


def _bounded_map(pool, fn, items, window):
    """Ordered map that keeps at most `window` results in flight (memory stays bounded)."""
    pending = []
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.pop(0).result()
    for fut in pending:
        yield fut.result()


# ---------------------------------------------------------------- command line


def main(argv=None):
    p = argparse.ArgumentParser(description="Geometry and toy-shower tools of the calorimeter scripts.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toy", help="write toy GFlash showers in a detector's real file format")
    t.add_argument("kind", help=f"detector: {', '.join(TOY)}")
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
            if not 0 < lo <= hi:
                raise ValueError(f"--energy needs 0 < LO <= HI, got {args.energy!r}")
            energy = (lo, hi)
        write_toy(args.kind, args.out, args.n, args.seed, energy, progress=True)
    except (ValueError, OSError) as e:
        print(f"common.py toy: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.n} toy {args.kind} showers to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
