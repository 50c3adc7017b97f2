"""evaluate.py: physics validation of generated calorimeter showers against real ones.

One command tells whether generated showers can stand in for the real (Geant4) ones:

    python common.py toy lcd -n 2000 -o real.h5 --seed 0          # or your real data file
    python common.py toy lcd -n 2000 -o gen.h5 --seed 1           # or a script's generated.h5
    python evaluate.py real.h5 gen.h5 --out report/
    python evaluate.py real.h5 runs/wgan_gp/generated.h5 runs/other/generated.h5 --labels wgan,other --out report/
    python evaluate.py ild_real.h5 runs/vaegan/generated.h5 --amplification --out report/
    python evaluate.py real.h5 gen.h5 --device cuda --cls-hidden 2048 --cls-epochs 50   # CaloChallenge-size classifier

The first file is the reference ("real"); every further file is a generated sample and gets its
own colour in the plots and its own row in report.md. The format is recognised from the keys:
LCD (`ECAL` 25x25x25, or 51x51x25 centre-cropped, Ep = `target[:,1]` or `energy`, GeV), ATLAS
cluster (`cells` 89/247 + `energy`, MeV), CaloChallenge ds1 (`incident_energies`, `showers` 368,
MeV), LHCb (`EnergyDeposit` 30x30 + `ParticleMomentum`/`ParticlePoint`, .h5 or .npz), ILD (group
`30x30` with `energy` GeV and `layers` MeV, reduced to 10x10 with common.reduce_ild; or reduced
`showers` (N,10,10) with optional `energy` GeV, 50 GeV assumed without). All files must be of the
same detector. Outputs in --out: metrics.json, report.md, plots/*.png and *.pdf.

Per detector, the validation of the original authors (reference.md), then for all the field's
common yardsticks (CaloChallenge): separation power of every high-level observable, Frechet
distance of the high-level feature set, and a classifier two-sample test (AUC and JSD).

Choices and deviations (reference.md marks some as unconfirmed or leaves them open):
- Classifier: MLP (default 2 x 256 hidden, LeakyReLU; CaloChallenge used 2 x 2048: --cls-hidden
  2048) on voxels / E_inc plus log10(E_inc/GeV), each input standardised on the training split.
  Balanced classes, 60/20/20 train/validation/test split, Adam, early stopping on the validation
  loss (best epoch kept). Calibration: Platt scaling (p = sigmoid(a*logit + b) fitted on the
  validation split) instead of the challenge's isotonic regression: no sklearn here, and Platt
  never gives p = 0 or 1, so the test BCE stays finite. AUC does not depend on the calibration;
  JSD = (ln2 - BCE)/ln2 on the test split does.
- Separation power: bins over the real range widened to the generated 0.5-99.5% quantiles (log
  spaced when positive and spanning > 100x), entries outside clipped into the end bins so tails
  count. Expected value for two independent samples of sizes n1, n2 filling B bins is about
  B (1/n1 + 1/n2) / 4; an observable is "flagged" when its separation power exceeds
  max(0.01, 3 x that floor).
- Frechet distance: features standardised with the real sample's mean and std first (otherwise
  MeV-valued features dominate the distance); it is ~ D/N for two samples of one distribution.
- ATLAS nearest neighbours: showers normalised to sum 1; real split in two halves A/B, the
  median distance of generated showers to their nearest A shower over that of B showers:
  much below 1 means generated showers are copies of real ones (memorisation).
- LHCb: images are passed to common.lhcb_* as stored in the file; PRD on raw images and on the
  standardised physics-feature vector, score = min of the two (MLHEP).
- ILD: the five observables are visible energy, number of hits, centre of gravity x and y, and
  the per-pixel energy spectrum (reference.md: unconfirmed which five); quantile JSD with
  --quantiles bins (fewer if the real sample has < 10 showers per bin). --amplification splits
  the real sample in two disjoint halves: reference and truth pool (common.amplification).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# ---------------------------------------------------------------- flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Physics validation of generated vs real calorimeter showers.")
    p.add_argument("files", nargs="+", help="real.h5 first, then one or more generated files (same detector)")
    p.add_argument("--out", default="report", help="output folder: metrics.json, report.md, plots/")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per generated file")
    p.add_argument("--amplification", action="store_true",
                   help="ILD only: VAE-GAN amplification study (truth subsets vs generated samples)")
    p.add_argument("--max-events", type=int, default=None, help="read at most the first N showers of each file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="device of the classifier (auto = cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, classifier, k-means and subsampling")
    p.add_argument("--bins", type=int, default=0,
                   help="histogram bins for separation power and plots (0 = auto: sqrt(N) within 10..50)")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier two-sample test")
    p.add_argument("--cls-hidden", type=int, default=256, help="classifier hidden units per layer")
    p.add_argument("--cls-layers", type=int, default=2, help="classifier hidden layers")
    p.add_argument("--cls-epochs", type=int, default=30, help="classifier maximum epochs")
    p.add_argument("--cls-patience", type=int, default=5, help="early stopping: epochs without validation gain")
    p.add_argument("--cls-batch", type=int, default=256, help="classifier batch size")
    p.add_argument("--cls-lr", type=float, default=1e-3, help="classifier Adam learning rate")
    p.add_argument("--cls-max-events", type=int, default=None,
                   help="classifier: at most this many showers per class (default: 50000 on CUDA; on CPU "
                        "min(50000, 2e8 / number of inputs), e.g. 12800 for LCD's 15626 inputs)")
    p.add_argument("--quantiles", type=int, default=50, help="ILD: quantile bins of the JSD (>= 10 real showers each)")
    p.add_argument("--prd-runs", type=int, default=10, help="LHCb: k-means runs averaged in PRD")
    p.add_argument("--prd-max", type=int, default=10000, help="LHCb: at most this many showers per sample in PRD")
    p.add_argument("--nn-queries", type=int, default=500, help="ATLAS: showers queried in the nearest-neighbour check")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json and report.md only")
    args = p.parse_args(argv)
    if len(args.files) < 2:
        p.error("give the real file and at least one generated file")
    for name in ("max_events", "cls_hidden", "cls_layers", "cls_epochs", "cls_batch", "cls_max_events",
                 "quantiles", "prd_runs", "prd_max", "nn_queries"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.bins < 0 or args.cls_patience < 0 or not args.cls_lr > 0:
        p.error("--bins and --cls-patience must be >= 0 and --cls-lr > 0")
    n_gen = len(args.files) - 1
    if args.labels is not None:
        args.labels = [s.strip() for s in args.labels.split(",")]
        if len(args.labels) != n_gen or not all(args.labels):
            p.error(f"--labels needs {n_gen} non-empty comma-separated names, got {len(args.labels)}")
    else:
        args.labels = [os.path.splitext(os.path.basename(f))[0] for f in args.files[1:]]
        if len(set(args.labels)) < n_gen:
            args.labels = [f"gen{i + 1}:{s}" for i, s in enumerate(args.labels)]
    return args

# ---------------------------------------------------------------- data


class DataError(Exception):
    """Bad input file: one line for the user, exit status 2."""


DETECTOR_TITLE = {"lcd": "LCD ECAL 25x25x25", "atlas89": "ATLAS 89-cell cluster", "atlas247": "ATLAS 247-cell cluster",
                  "calochallenge1": "CaloChallenge ds1 photons", "lhcb": "LHCb ECAL 30x30", "ild": "ILD ECAL (10x10)"}
BLOCK = 1000  # showers read, checked and reduced at a time


def _open(path):
    """(dict key -> array-like, toy flag, close function); every dataset of an HDF5 file by full path."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".npz"):
        try:
            z = np.load(path, allow_pickle=False)
            return {k: z[k] for k in z.files}, bool(z["toy"]) if "toy" in z.files else False, z.close
        except Exception as e:
            raise DataError(f"{path}: cannot read as .npz ({type(e).__name__})")
    import h5py
    try:
        f = h5py.File(path, "r")
    except Exception:
        raise DataError(f"{path}: not a readable HDF5 file")
    keys = {}
    f.visititems(lambda name, obj: keys.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return keys, bool(f.attrs.get("toy", False)), f.close


def _detect(path, keys):
    shp = {k: tuple(v.shape) for k, v in keys.items()}
    if "ECAL" in keys:
        return "lcd"
    if "cells" in keys:
        n = shp["cells"][1:]
        if n not in ((89,), (247,)):
            raise DataError(f"{path}: 'cells' has shape {shp['cells']}, expected (N, 89) or (N, 247)")
        return f"atlas{n[0]}"
    if "EnergyDeposit" in keys:
        return "lhcb"
    if "30x30/layers" in keys:
        return "ild"
    if "showers" in keys and shp["showers"][1:] in ((10, 10), (100,)):
        return "ild"
    if "showers" in keys or "incident_energies" in keys:
        return "calochallenge1"
    raise DataError(f"{path}: unknown format (keys {sorted(keys)[:6]}); expected ECAL (LCD), cells (ATLAS), "
                    "incident_energies+showers (CaloChallenge), EnergyDeposit (LHCb) or 30x30/layers (ILD)")


def _need(path, keys, key, tail=None, n=None):
    if key not in keys:
        raise DataError(f"{path}: missing key '{key}'")
    shape = tuple(keys[key].shape)
    if len(shape) == 0 or shape[0] == 0:
        raise DataError(f"{path}: '{key}' is empty")
    if tail is not None and shape[1:] not in tail:
        raise DataError(f"{path}: '{key}' has shape {shape}, expected (N, {' or '.join(map(str, tail))})")
    if n is not None and shape[0] != n:
        raise DataError(f"{path}: '{key}' has {shape[0]} events but the showers have {n}")
    return keys[key]


def _read_checked(path, key, ds, n, positive=False, transform=None):
    """First n rows of ds as float32, read in blocks, checked finite and non-negative (> 0 if positive)."""
    out = None
    for s in range(0, n, BLOCK):
        a = np.asarray(ds[s:min(n, s + BLOCK)], np.float32)
        if not np.isfinite(a).all():
            raise DataError(f"{path}: '{key}' has NaN or inf values")
        if (a <= 0).any() if positive else (a < 0).any():
            raise DataError(f"{path}: '{key}' has {'non-positive' if positive else 'negative'} values")
        a = transform(a) if transform else a
        if out is None:
            out = np.empty((n,) + a.shape[1:], np.float32)
        out[s:s + len(a)] = a
    return out


def load(path, max_events=None):
    """One file as a dict: detector, geom, cells (N, n_cells) float32 in the geometry's unit,
    e_inc (N,) float64 in the same unit, toy flag, extra conditions (LHCb momentum, point)."""
    keys, toy, close = _open(path)
    try:
        det = _detect(path, keys)
        extra, e, ekey, transform = {}, None, None, None
        if det == "lcd":
            ckey = "ECAL"
            ds = _need(path, keys, ckey, [(25, 25, 25), (51, 51, 25)])
            if ds.shape[1] == 51:
                transform = lambda a: a[:, 13:38, 13:38, :]  # noqa: E731
            ekey = "target" if "target" in keys else "energy"
            if ekey not in keys:
                raise DataError(f"{path}: missing key 'target' (or 'energy'): the primary energy Ep")
            e = _need(path, keys, ekey, None, ds.shape[0])
            if ekey == "target" and (len(e.shape) != 2 or e.shape[1] < 2):
                raise DataError(f"{path}: 'target' has shape {e.shape}, expected (N, >=2) with Ep in column 1")
        elif det.startswith("atlas") or det == "calochallenge1":
            ckey, ekey = ("cells", "energy") if det.startswith("atlas") else ("showers", "incident_energies")
            ds = _need(path, keys, ckey, None if det.startswith("atlas") else [(368,)])
            e = _need(path, keys, ekey, [(), (1,)], ds.shape[0])
        elif det == "lhcb":
            ckey = "EnergyDeposit"
            ds = _need(path, keys, ckey, [(30, 30)])
            mom = _need(path, keys, "ParticleMomentum", [(3,)], ds.shape[0])
            pt = _need(path, keys, "ParticlePoint", [(3,), (2,)], ds.shape[0])
        elif "30x30/layers" in keys:  # ild, full 30x30x30 layers reduced to 10x10
            ckey, ekey, transform = "30x30/layers", "30x30/energy", common.reduce_ild
            ds = _need(path, keys, ckey, [(30, 30, 30)])
            e = _need(path, keys, ekey, [(), (1,)], ds.shape[0])
        else:  # ild, already reduced; 50 GeV without an energy key
            ckey = "showers"
            ds = _need(path, keys, ckey, [(10, 10), (100,)])
            ekey = next((k for k in ("energy", "30x30/energy") if k in keys), None)
            e = None if ekey is None else _need(path, keys, ekey, [(), (1,)], ds.shape[0])
        n = min(ds.shape[0], max_events or ds.shape[0])
        cells = _read_checked(path, ckey, ds, n, transform=transform).reshape(n, -1)
        if det == "lhcb":
            extra["momentum"], p = np.asarray(mom[:n], np.float64), np.asarray(pt[:n], np.float64)
            extra["point"] = np.c_[p, np.zeros(n)] if p.shape[1] == 2 else p
            for k, key in (("momentum", "ParticleMomentum"), ("point", "ParticlePoint")):
                if not np.isfinite(extra[k]).all():
                    raise DataError(f"{path}: '{key}' has NaN or inf values")
            if (extra["momentum"][:, 2] <= 0).any():
                raise DataError(f"{path}: 'ParticleMomentum' has p_z <= 0")
            e_inc = np.linalg.norm(extra["momentum"], axis=1)
        else:
            e_inc = np.full(n, 50.0) if e is None else np.asarray(e[:n], np.float64)
            e_inc = e_inc[:, 1] if ekey == "target" else e_inc.reshape(n, -1)[:, 0]
            e_inc = e_inc * 1000.0 if det == "ild" else e_inc
        if not np.isfinite(e_inc).all() or (e_inc <= 0).any():
            raise DataError(f"{path}: the incident energy has NaN, inf or non-positive values")
    finally:
        close()
    return {"path": path, "detector": det, "geom": common.geometry("ild10" if det == "ild" else det), "cells": cells,
            "e_inc": e_inc, "toy": toy, "n": len(cells), **extra}

# ---------------------------------------------------------------- observables


def features(d):
    """High-level observables of one sample: dict name -> (N,) float64, and plot groups."""
    g, cells, n = d["geom"], d["cells"], d["n"]
    e_vis = cells.sum(1, dtype=np.float64)
    f = {"e_vis": e_vis, "e_ratio": e_vis / d["e_inc"], "n_hits": (cells > 0).sum(1).astype(np.float64)}
    groups = [("Energy and hits", ["e_vis", "e_ratio", "n_hits"])]
    if g.name == "lcd":
        mom = common.axis_moments(cells.reshape(n, 25, 25, 25))
        for a, ax in enumerate("xyz"):
            f[f"centre_{ax}"] = mom[(a, 1)]
            f[f"width_{ax}"] = np.sqrt(np.maximum(mom[(a, 2)], 0.0))
        groups.append(("Shower shapes (first two moments, cell units; z = depth)",
                       [f"{k}_{ax}" for k in ("centre", "width") for ax in "xyz"]))
    elif g.name.startswith("atlas") or g.name == "calochallenge1":
        ax = ("eta", "phi") if g.xy_unit == "eta/phi" else ("x", "y")
        cw = common.centre_width_per_layer(cells, g)
        onehot = (g.layer[:, None] == np.arange(g.n_layers)[None, :]).astype(np.float32)
        occ = ((cells > 0).astype(np.float32) @ onehot) / onehot.sum(0)  # fraction of each layer's cells hit
        blocks = {"e": common.energy_per_layer(cells, g), "frac": common.fraction_per_layer(cells, g),
                  f"centre_{ax[0]}": cw["centre_x"], f"centre_{ax[1]}": cw["centre_y"],
                  f"width_{ax[0]}": cw["width_x"], f"width_{ax[1]}": cw["width_y"],
                  "sparsity": 1 - occ}
        for key, arr in blocks.items():
            names = [f"{key}_{ln}" for ln in g.layer_names]
            for i, nm in enumerate(names):
                f[nm] = arr[:, i]
            groups.append((f"{key} per layer", names))
        if g.name.startswith("atlas"):
            f["middle_core_fraction"] = common.middle_core_fraction(cells, g)
            groups[0][1].append("middle_core_fraction")
    elif g.name == "lhcb":
        img = cells.reshape(n, 30, 30)
        mom, pt = d["momentum"], d["point"]
        for kind, fn in (("asym", common.lhcb_asymmetry), ("width", common.lhcb_width)):
            f[f"{kind}_long"], f[f"{kind}_trans"] = fn(img, mom, pt), fn(img, mom, pt, orthogonal=True)
        sp = common.lhcb_sparsity(img, LHCB_ALPHAS)
        for j in (5, 10, 15):
            f[f"sparsity_{LHCB_ALPHAS[j]:.0e}"] = sp[:, j]
        d["sparsity_curve"] = sp.mean(0)
        groups.append(("MLHEP physics metrics", list(f)[3:]))
    else:  # ild10
        cw = common.centre_width_per_layer(cells, g)
        f.update(cog_x=cw["centre_x"][:, 0], cog_y=cw["centre_y"][:, 0],
                 width_x=cw["width_x"][:, 0], width_y=cw["width_y"][:, 0])
        groups.append(("Centre of gravity and width (mm)", ["cog_x", "cog_y", "width_x", "width_y"]))
    return f, groups


LHCB_ALPHAS = np.logspace(-5, -1, 20)
LABEL = {"e_vis": "visible energy E_vis", "e_ratio": "E_vis / E_inc (sampling fraction, response)",
         "n_hits": "number of hit cells"}


def edges_for(real, gens, n_bins):
    """Bin edges over the real range widened to the generated 0.5-99.5% quantiles; (edges, log-spaced)."""
    lo, hi = float(real.min()), float(real.max())
    for g in gens:
        if len(g):
            q = np.quantile(g, [0.005, 0.995])
            lo, hi = min(lo, q[0]), max(hi, q[1])
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    log = lo > 0 and hi / lo > 100
    return (np.geomspace(lo, hi, n_bins + 1) if log else np.linspace(lo, hi, n_bins + 1)), log


def sep_power(real, gen, edges):
    """CaloChallenge separation power with values clipped into the edges (tails count in the end bins)."""
    lo, hi = edges[0], edges[-1]
    return common.separation_power(np.clip(real, lo, hi), np.clip(gen, lo, hi), bins=edges)


def standardised(feat_real, feat):
    """(N, D) feature matrix standardised with the real sample's mean and std (std 0 -> 1)."""
    r = np.stack(list(feat_real.values()), 1)
    mu, sd = r.mean(0), r.std(0)
    sd[sd == 0] = 1.0
    return (np.stack([feat[k] for k in feat_real], 1) - mu) / sd

# ---------------------------------------------------------------- model: classifier two-sample test


class Classifier(nn.Module):
    """MLP real-vs-generated classifier; returns logits."""

    def __init__(self, n_in, hidden, layers, dropout=0.0):
        super().__init__()
        mods, w = [], n_in
        for _ in range(layers):
            mods += [nn.Linear(w, hidden), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
            w = hidden
        mods.append(nn.Linear(w, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x):
        return self.net(x).squeeze(-1)


def classifier_inputs(d, idx):
    """Rows idx of d: a plain (N, D) array as is; of a shower sample (dict of load()), voxels / E_inc
    plus log10(E_inc / GeV) (CaloChallenge low-level input)."""
    if not isinstance(d, dict):
        return np.asarray(d[idx], np.float32)
    e = d["e_inc"][idx]
    e_gev = e / (1000.0 if d["geom"].unit == "MeV" else 1.0)
    return np.concatenate([d["cells"][idx] / e[:, None].astype(np.float32),
                           np.log10(e_gev)[:, None].astype(np.float32)], 1)


def auc_score(y, s):
    """Area under the ROC curve (Mann-Whitney, ties count 1/2)."""
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s))
    _, first, counts = np.unique(s[order], return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1.0, counts)  # average ranks over ties
    n1, n0 = y.sum(), len(y) - y.sum()
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def two_sample_test(real, gen, args, device, log, tag):
    """Train the classifier real (1) vs generated (0); calibrated test AUC, BCE and JSD.
    real, gen: samples of load() (inputs built only for the showers used) or (N, D) arrays."""
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    n_r, n_g = (s["n"] if isinstance(s, dict) else len(s) for s in (real, gen))
    n_in = classifier_inputs(real, np.arange(1)).shape[1]
    cap = args.cls_max_events or (50000 if device.type == "cuda" else int(min(50000, 2e8 / n_in)))
    m = min(n_r, n_g, cap)
    if m < 10:
        return {"skipped": f"too few showers ({m}) per class"}
    # the same shower indices from both files: a generated file conditioned on the real file event by
    # event keeps each (real i, generated i) pair in one split, so conditions cannot leak across splits
    idx = rng.permutation(min(n_r, n_g))[:m]
    a, b = int(0.6 * m), int(0.8 * m)
    data = {name: (np.concatenate([classifier_inputs(real, np.sort(sl)), classifier_inputs(gen, np.sort(sl))]),
                   np.repeat(np.float32([1, 0]), len(sl)))
            for name, sl in (("train", idx[:a]), ("val", idx[a:b]), ("test", idx[b:]))}
    mu, sd = data["train"][0].mean(0), data["train"][0].std(0)
    # standardised inputs; a floor on the std keeps never-hit voxels from blowing up
    mu, sd = mu.astype(np.float32), np.maximum(sd, 1e-3 * sd.max() + 1e-12).astype(np.float32)
    T = {}
    for k, (x, y) in data.items():   # in place: LCD inputs are 15626 wide
        x -= mu
        x /= sd
        T[k] = (torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
    model = Classifier(T["train"][0].shape[1], args.cls_hidden, args.cls_layers).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.cls_lr)
    bce = nn.BCEWithLogitsLoss()

    def evaluate(name):
        model.eval()
        with torch.no_grad():
            x = T[name][0]
            z = torch.cat([model(x[s:s + 4096]) for s in range(0, len(x), 4096)])
        model.train()
        return z, float(bce(z, T[name][1]))

    best, best_state, best_epoch, n_train, t0 = math.inf, None, 0, len(T["train"][0]), time.time()
    for epoch in range(1, args.cls_epochs + 1):
        perm = torch.randperm(n_train, device=device)
        for s in range(0, n_train, args.cls_batch):
            i = perm[s:s + args.cls_batch]
            loss = bce(model(T["train"][0][i]), T["train"][1][i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _, val = evaluate("val")
        if val < best - 1e-4:
            best, best_epoch = val, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        rate = epoch * n_train / (time.time() - t0)
        log(f"classifier {tag}: epoch {epoch}/{args.cls_epochs} | loss {loss.item():.4f} val {val:.4f} | "
            f"{rate:.0f} samples/s | ETA {(args.cls_epochs - epoch) * n_train / rate:.0f} s")
        if epoch - best_epoch >= args.cls_patience:
            break
    model.load_state_dict(best_state)
    # Platt scaling on the validation split: p = sigmoid(a * logit + b)
    zv, yv = evaluate("val")[0].detach(), T["val"][1]
    ab = torch.tensor([1.0, 0.0], device=device, requires_grad=True)
    lbfgs = torch.optim.LBFGS([ab], lr=0.5, max_iter=100)

    def closure():
        lbfgs.zero_grad()
        loss = bce(ab[0] * zv + ab[1], yv)
        loss.backward()
        return loss
    lbfgs.step(closure)
    zt = evaluate("test")[0].detach()
    a, b = (float(v) for v in ab.detach())
    if not a > 0:  # the classifier is useless (or anti-correlated) on validation: constant p = 1/2
        a, b = 0.0, 0.0
    test_bce = float(bce(a * zt + b, T["test"][1]))
    auc = auc_score(data["test"][1], (a * zt + b).cpu().numpy())
    return {"auc": auc, "jsd": (math.log(2) - test_bce) / math.log(2), "bce": test_bce,
            "n_train": n_train, "n_val": len(T["val"][0]), "n_test": len(T["test"][0]),
            "best_epoch": best_epoch, "epochs_run": epoch,
            "calibration": {"method": "platt", "a": a, "b": b}, "device": str(device)}

# ---------------------------------------------------------------- train: detector-specific validation


def lcd_extra(real, gen, plot):
    """Sampling fraction per 10 GeV bin (and its ratio), profiles, moments (2DGAN validation)."""
    edges = np.arange(0.0, 10.0 * math.ceil(real["e_inc"].max() / 10.0) + 10.0, 10.0)
    sf = [common.binned_stat(d["e_inc"], d["cells"].sum(1, dtype=np.float64) / d["e_inc"], edges)
          for d in (real, gen)]
    ok = (sf[0][2] >= 5) & (sf[1][2] >= 5)
    ratio = sf[1][0] / sf[0][0]
    prof = [[p.mean(0) for p in common.axis_profiles(d["cells"].reshape(-1, 25, 25, 25))] for d in (real, gen)]
    prof_err = {ax: float(np.sum(np.abs(prof[1][a] - prof[0][a])) / np.sum(prof[0][a]))
                for a, ax in enumerate("xyz")}
    plot.update(sf_bins=(edges, sf), profiles=prof)
    return {"sampling_fraction_bins_GeV": edges.tolist(),
            "sampling_fraction_real": _list(sf[0][0]), "sampling_fraction_gen": _list(sf[1][0]),
            "sampling_fraction_ratio": _list(np.where(ok, ratio, np.nan)),
            "sampling_fraction_max_abs_ratio_minus_1": _num(np.nanmax(np.abs(ratio[ok] - 1))) if ok.any() else None,
            "profile_rel_l1_error": prof_err}


def atlas_extra(real, gen, args, plot):
    """Correlation MSE, variance per cell, nearest-neighbour memorisation check (Klein's validation)."""
    rng = np.random.default_rng(args.seed)
    n_corr = min(real["n"], gen["n"], 20000)
    cr = real["cells"][rng.permutation(real["n"])[:n_corr]]
    cg = gen["cells"][rng.permutation(gen["n"])[:n_corr]]
    half = real["n"] // 2
    out = {"correlation_mse": common.correlation_mse(cr, cg),
           "correlation_mse_real_halves": common.correlation_mse(real["cells"][:half], real["cells"][half:])}
    vr, vg = common.cell_variance(real["cells"]), common.cell_variance(gen["cells"])
    live = vr > 0
    out["cell_variance_mean_abs_rel_diff"] = _num(np.mean(np.abs(vg[live] - vr[live]) / vr[live]))
    plot["variance"] = (vr, vg)
    # memorisation: generated vs held-out real distances to the nearest real shower of half A
    norm = [d["cells"] / np.maximum(d["cells"].sum(1, keepdims=True), 1e-30) for d in (real, gen)]
    perm = rng.permutation(real["n"])
    pool, qb = norm[0][perm[:half]], norm[0][perm[half:]][:args.nn_queries]
    qg = norm[1][rng.permutation(gen["n"])[:args.nn_queries]]
    if len(pool) >= 5 and len(qb):
        dg, db = (float(np.median(common.nearest_neighbours(q, pool, k=5)[1][:, 0])) for q in (qg, qb))
        out.update(nn_median_dist_gen=dg, nn_median_dist_real=db, nn_ratio=_num(dg / db) if db > 0 else None)
    return out


def lhcb_extra(real, gen, fr, fg, args, plot):
    """PRD-AUC on raw images and on the physics features; score = min (MLHEP)."""
    rng = np.random.default_rng(args.seed)
    ir = rng.permutation(real["n"])[:args.prd_max]
    ig = rng.permutation(gen["n"])[:args.prd_max]
    k = min(20, len(ir) + len(ig))
    p_raw = common.prd(real["cells"][ir], gen["cells"][ig], num_clusters=k, num_runs=args.prd_runs, seed=args.seed)
    phys = {k2: v for k2, v in fr.items() if k2 not in ("e_vis", "e_ratio", "n_hits")}
    p_phys = common.prd(standardised(phys, fr)[ir], standardised(phys, fg)[ig], num_clusters=k,
                        num_runs=args.prd_runs, seed=args.seed)
    a_raw, a_phys = common.prd_auc(*p_raw), common.prd_auc(*p_phys)
    plot.update(prd=(p_raw, p_phys), sparsity=(real["sparsity_curve"], gen["sparsity_curve"]))
    return {"prd_auc_images": a_raw, "prd_auc_physics": a_phys, "prd_auc_score": min(a_raw, a_phys),
            "sparsity_curve_alphas": LHCB_ALPHAS.tolist(), "sparsity_curve_real": _list(real["sparsity_curve"]),
            "sparsity_curve_gen": _list(gen["sparsity_curve"])}


ILD_OBS = ("e_vis", "n_hits", "cog_x", "cog_y", "pixel_spectrum")


def ild_extra(real, gen, fr, fg, args, plot):
    """Quantile JSD of the five observables (Calomplification), amplification if asked."""
    orr, og = ({**{k: f[k] for k in ILD_OBS[:4]}, "pixel_spectrum": d["cells"][d["cells"] > 0].astype(np.float64)}
               for d, f in ((real, fr), (gen, fg)))
    out = {"quantile_jsd": {}}
    for k in ILD_OBS:
        nb = min(args.quantiles, len(orr[k]) // 10)
        out["quantile_jsd"][k] = common.quantile_jsd(orr[k], og[k], nb) if nb >= 1 else None
    out["quantile_jsd_bins"] = min(args.quantiles, real["n"] // 10)
    plot["pixels"] = (orr["pixel_spectrum"], og["pixel_spectrum"])
    if args.amplification:
        rng = np.random.default_rng(args.seed)
        perm = rng.permutation(real["n"])
        ref, pool = perm[: real["n"] // 2], perm[real["n"] // 2:]
        nb = min(args.quantiles, len(ref) // 10)
        amp = {}
        for k in ILD_OBS[:4]:
            r = common.amplification(orr[k][ref], orr[k][pool], og[k], nb, seed=args.seed)
            amp[k] = {kk: (_list(v) if isinstance(v, np.ndarray) else _num(v)) for kk, v in r.items()}
        out["amplification"] = {"n_bins": nb, "n_reference": len(ref), "n_truth_pool": len(pool), "observables": amp}
        plot["amplification"] = amp
    return out

# ---------------------------------------------------------------- generate: plots and report


def _num(v):
    """JSON-safe float (NaN/inf -> None, inf kept as a string)."""
    if v is None:
        return None
    v = float(v)
    return None if math.isnan(v) else ("inf" if math.isinf(v) else v)


def _clean(obj):
    """Valid JSON: numpy scalars to Python, NaN -> null, inf -> "inf", recursively."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    return obj


def _list(a):
    return [_num(v) for v in np.asarray(a, np.float64).ravel()]


class Plotter:
    def __init__(self, folder, title, labels):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        self.plt, self.folder, self.title, self.labels = plt, folder, title, labels
        self.colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(labels))]
        self.written = []

    def _grid(self, n, ratio=True):
        """Figure with n panels, 4 per row; each panel a (histogram, ratio) pair of axes if ratio."""
        ncols = min(4, n)
        nrows = math.ceil(n / ncols)
        fig = self.plt.figure(figsize=(4.4 * ncols, (4.2 if ratio else 3.4) * nrows + 0.6))
        gs = fig.add_gridspec(nrows, ncols, hspace=0.35, wspace=0.35, left=0.07, right=0.98,
                              bottom=0.55 / fig.get_figheight(), top=1 - 0.6 / fig.get_figheight())
        axes = []
        for i in range(n):
            cell = gs[divmod(i, ncols)]
            if ratio:
                inner = cell.subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05)
                top = fig.add_subplot(inner[0])
                axes.append((top, fig.add_subplot(inner[1], sharex=top)))
            else:
                axes.append(fig.add_subplot(cell))
        return fig, axes

    def _finish(self, fig, name, subtitle):
        fig.suptitle(f"{self.title}: {subtitle}")
        for ext in ("png", "pdf"):
            tmp = os.path.join(self.folder, f"{name}.tmp{os.getpid()}.{ext}")
            fig.savefig(tmp, format=ext, dpi=110 if ext == "png" else None)
            os.replace(tmp, os.path.join(self.folder, f"{name}.{ext}"))
        self.plt.close(fig)
        self.written.append(name)

    def _labels_and_ratio(self, top, bot, ylabel, xlabel, logx, x, ref, vals, step):
        """Labels of a (top, bottom) panel; the bottom one shows gen / real (steps for histograms)."""
        top.set_ylabel(ylabel)
        top.legend(fontsize=7)
        top.tick_params(labelbottom=False)
        bot.axhline(1.0, color="k", lw=0.8)
        for v, c in zip(vals, self.colors):
            r = np.divide(v, ref, out=np.full(len(ref), np.nan), where=ref > 0)
            (bot.step(x, np.r_[r, r[-1:]], where="post", color=c) if step else bot.plot(x, r, color=c, marker="."))
        bot.set_ylim(0.5, 1.5)
        bot.set_ylabel("gen / real")
        bot.set_xlabel(xlabel)
        if logx:
            bot.set_xscale("log")

    def hists(self, name, subtitle, keys, fr, fgs, bins, labels=None):
        fig, axes = self._grid(len(keys))
        for k, (top, bot) in zip(keys, axes):
            edges, log = edges_for(fr[k], [fg[k] for fg in fgs], bins)
            h = [np.histogram(np.clip(v[k], edges[0], edges[-1]), edges)[0] / len(v[k]) for v in [fr] + fgs]
            top.stairs(h[0], edges, fill=True, color="0.8", label="real")
            top.stairs(h[0], edges, color="0.4")
            for hg, c, lab in zip(h[1:], self.colors, self.labels):
                top.stairs(hg, edges, color=c, lw=1.4, label=lab)
            pos = np.concatenate([x[x > 0] for x in h])
            if len(pos) and pos.max() / pos.min() > 100:
                top.set_yscale("log")
            self._labels_and_ratio(top, bot, "fraction of showers", (labels or LABEL).get(k, k), log, edges, h[0],
                                   h[1:], step=True)
        self._finish(fig, name, subtitle)

    def curves(self, name, subtitle, xs, real_curves, gen_curves, xlabels, ylabel, logy=True, logx=False):
        """One panel per curve (profiles, per-bin means); gen_curves[i_gen][i_panel]."""
        fig, axes = self._grid(len(real_curves))
        for i, (top, bot) in enumerate(axes):
            top.plot(xs[i], real_curves[i], color="k", lw=2, label="real")
            for gc, c, lab in zip(gen_curves, self.colors, self.labels):
                top.plot(xs[i], gc[i], color=c, marker=".", label=lab)
            if logy and np.nanmin(real_curves[i]) > 0:
                top.set_yscale("log")
            self._labels_and_ratio(top, bot, ylabel, xlabels[i], logx, xs[i], np.asarray(real_curves[i]),
                                   [np.asarray(gc[i]) for gc in gen_curves], step=False)
        self._finish(fig, name, subtitle)


def verdict(row, n_feat):
    auc, nflag = row.get("auc"), len(row["flagged"])
    if (auc is None or auc <= 0.55) and nflag == 0:
        v = "PASS: indistinguishable at this sample size" + (" (observables only)" if auc is None else "")
    elif (auc is None or auc <= 0.75) and nflag <= max(1, n_feat // 5):
        v = "CLOSE: small differences (see flagged observables)"
    else:
        v = "FAIL: distinguishable"
    return v + ("; WARNING: memorisation suspected" if row.get("memorisation") else "")


def write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)

# ---------------------------------------------------------------- main


def run(args, log=print):
    data = [load(p, args.max_events) for p in args.files]
    other = next((d for d in data if d["detector"] != data[0]["detector"]), None)
    if other:
        raise DataError(f"{other['path']}: detector {other['detector']} differs from the real file's "
                        f"{data[0]['detector']}; all files must be of the same detector")
    det = data[0]["detector"]
    if args.amplification and det != "ild":
        raise DataError(f"{args.files[0]}: --amplification is the ILD (VAE-GAN) study; this file is {det}")
    if args.amplification and data[0]["n"] < 40:
        raise DataError(f"{args.files[0]}: --amplification needs >= 40 real showers, got {data[0]['n']}")
    toy = any(d["toy"] for d in data)
    title = DETECTOR_TITLE[det] + (" [TOY]" if toy else "")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: CUDA is not available")
    os.makedirs(args.out if args.no_plots else os.path.join(args.out, "plots"), exist_ok=True)
    log(f"{title}: real {data[0]['n']} showers ({data[0]['path']}), generated "
        + ", ".join(f"{lab} {d['n']}" for lab, d in zip(args.labels, data[1:])))
    real, gens = data[0], data[1:]
    fr, groups = features(real)
    fgs = [features(g)[0] for g in gens]
    bins = args.bins or int(np.clip(round(math.sqrt(min(d["n"] for d in data))), 10, 50))
    rows, plot_extra = [], []
    for g, fg, lab in zip(gens, fgs, args.labels):
        sp, floor = {}, {}
        for k in fr:
            edges, _ = edges_for(fr[k], [fg[k]], bins)
            sp[k] = sep_power(fr[k], fg[k], edges)
            occ = np.count_nonzero(np.histogram(np.clip(np.r_[fr[k], fg[k]], edges[0], edges[-1]), edges)[0])
            floor[k] = occ * (1 / real["n"] + 1 / g["n"]) / 4
        flagged = sorted((k for k in sp if sp[k] > max(0.01, 3 * floor[k])), key=lambda k: -sp[k])
        row = {"label": lab, "path": g["path"], "n_events": g["n"], "toy": g["toy"],
               "separation_power": sp, "separation_power_noise": floor, "flagged": flagged,
               "separation_power_mean": float(np.mean(list(sp.values()))),
               "frechet_distance": max(0.0, common.frechet_distance(standardised(fr, fr), standardised(fr, fg)))}
        if not args.no_classifier:
            row["classifier"] = two_sample_test(real, g, args, device, log, lab)
            row["auc"] = row["classifier"].get("auc")
        pe = {}
        if det == "lcd":
            row["lcd"] = lcd_extra(real, g, pe)
        elif det.startswith("atlas"):
            row["atlas"] = atlas_extra(real, g, args, pe)
            r = row["atlas"].get("nn_ratio")
            row["memorisation"] = r is not None and r < 0.5
        elif det == "lhcb":
            row["lhcb"] = lhcb_extra(real, g, fr, fg, args, pe)
        elif det == "ild":
            row["ild"] = ild_extra(real, g, fr, fg, args, pe)
        row["verdict"] = verdict(row, len(fr))
        rows.append(row)
        plot_extra.append(pe)
        log(f"{lab}: AUC {_fmt(row.get('auc'))} | Frechet {row['frechet_distance']:.4g} | mean separation "
            f"{row['separation_power_mean']:.4f} | flagged {len(flagged)}: {', '.join(flagged[:5]) or 'none'}"
            f"{', ...' if len(flagged) > 5 else ''} | {row['verdict']}")
    plots = [] if args.no_plots else make_plots(args, title, real, gens, fr, groups, fgs, plot_extra, bins)
    metrics = {"script": "evaluate.py", "detector": det, "geometry": real["geom"].name, "toy": toy,
               "real": {"path": real["path"], "n_events": real["n"], "toy": real["toy"]},
               "features": list(fr), "bins": bins, "generated": rows, "plots": plots,
               "settings": vars(args)}
    write_text(os.path.join(args.out, "metrics.json"), json.dumps(_clean(metrics), indent=1) + "\n")
    write_text(os.path.join(args.out, "report.md"), report_md(metrics, title))
    j = lambda *a: os.path.join(args.out, *a)  # noqa: E731
    log(f"wrote {j('metrics.json')}, {j('report.md')} and {len(plots)} plots in {j('plots')}")
    return metrics


def _fmt(v, f="{:.3f}"):
    return "-" if v is None else f.format(v)


def _eq(v):
    """Equivalent truth size as text: a number, 'inf' (beats the pool) or None (worse than any subset)."""
    return f"{v:.0f}" if isinstance(v, float) else str(v)


def report_md(m, title):
    det = m["detector"]
    mse = ("corr. MSE", lambda r: r["atlas"]["correlation_mse"])
    head, col = {"lcd": ("max abs SF ratio - 1", lambda r: r["lcd"]["sampling_fraction_max_abs_ratio_minus_1"]),
                 "atlas89": mse, "atlas247": mse, "lhcb": ("PRD-AUC score", lambda r: r["lhcb"]["prd_auc_score"]),
                 "ild": ("mean quantile JSD", lambda r: np.mean([v for v in r["ild"]["quantile_jsd"].values()
                                                                 if v is not None]))}.get(det, (None, None))
    lines = [f"# Validation report: {title}", "",
             f"Real: `{m['real']['path']}` ({m['real']['n_events']} showers{', TOY' if m['real']['toy'] else ''}). "
             f"{len(m['features'])} high-level observables, {m['bins']} bins.", "",
             "| generated | N | classifier AUC | JSD | Frechet dist. | mean sep. power | worst observable (sep.) | "
             + (f"{head} | " if head else "") + "verdict |",
             "|---|---|---|---|---|---|---|" + ("---|" if head else "") + "---|"]
    for r in m["generated"]:
        c = r.get("classifier", {})
        worst = max(r["separation_power"], key=r["separation_power"].get)
        extra = f"{_fmt(col(r), '{:.4g}')} | " if head else ""
        lines.append(f"| {r['label']}{' (TOY)' if r['toy'] else ''} | {r['n_events']} | {_fmt(c.get('auc'))} | "
                     f"{_fmt(c.get('jsd'))} | {r['frechet_distance']:.4g} | {r['separation_power_mean']:.4f} | "
                     f"{worst} ({r['separation_power'][worst]:.3f}) | {extra}{r['verdict']} |")
    lines += ["", "Flagged observables (separation power > max(0.01, 3x the statistical floor)):", ""]
    for r in m["generated"]:
        lines.append(f"- {r['label']}: " + (", ".join(f"{k} {r['separation_power'][k]:.3f}" for k in r["flagged"])
                                             or "none"))
    amps = [r for r in m["generated"] if r.get("ild", {}).get("amplification")]
    if amps:
        lines += ["", "Amplification: number of real showers the generated sample is worth, per observable "
                  "(inf = better than the whole truth pool, None = worse than the smallest subset):", ""]
    for r in amps:
        amp = r["ild"]["amplification"]
        lines.append(f"- {r['label']}: " + ", ".join(
            f"{k} {_eq(v['equivalent_size'])}" for k, v in amp["observables"].items())
            + f" (truth pool {amp['n_truth_pool']}, generated {r['n_events']})")
    lines += ["", "AUC 0.5 = the classifier cannot tell generated from real; 1 = fully separable "
              "(best published CaloChallenge ds1 photons ~0.63). JSD = (ln2 - BCE)/ln2 of the Platt-calibrated "
              "classifier on its test split. Details: metrics.json; plots: plots/.", ""]
    return "\n".join(lines)


def make_plots(args, title, real, gens, fr, groups, fgs, pe, bins):
    P = Plotter(os.path.join(args.out, "plots"), title, args.labels)
    units = {"e_vis": f"visible energy [{real['geom'].unit}]"}
    for sub, keys in groups:
        slug = "".join(c if c.isalnum() else "_" for c in sub.split("(")[0].strip().lower())
        P.hists(f"hist_{slug}", sub, keys, fr, fgs, bins, {**LABEL, **units})
    det = real["detector"]
    if det == "lcd":
        edges, _ = pe[0]["sf_bins"]
        mid = 0.5 * (edges[1:] + edges[:-1])
        P.curves("sampling_fraction_vs_ep", "mean sampling fraction per 10 GeV bin", [mid],
                 [pe[0]["sf_bins"][1][0][0]], [[p["sf_bins"][1][1][0]] for p in pe], ["Ep [GeV]"],
                 "mean E_vis / Ep", logy=False)
        P.curves("profiles", "mean energy profiles (log)", [np.arange(25)] * 3, pe[0]["profiles"][0],
                 [p["profiles"][1] for p in pe], ["x [cell]", "y [cell]", "z (depth) [layer]"], "mean deposit [GeV]")
        spec = [{"cell_energy": d["cells"][:2000][d["cells"][:2000] > 0]} for d in [real] + gens]
        P.hists("cell_spectrum", "cell energy spectrum (first 2000 showers)", ["cell_energy"], spec[0], spec[1:],
                bins, {"cell_energy": "cell energy [GeV]"})
    elif det.startswith("atlas"):
        vr = pe[0]["variance"][0]
        P.curves("cell_variance", "variance per cell", [np.arange(len(vr))], [vr],
                 [[p["variance"][1]] for p in pe], ["cell index"], "variance [MeV^2]")
        e_edges = np.geomspace(max(real["e_inc"].min(), 1e-3), real["e_inc"].max() * 1.0001, 9)
        w = [common.binned_stat(d["e_inc"], f["width_phi_Middle"], e_edges)[0]
             for d, f in zip([real] + gens, [fr] + fgs)]
        P.curves("width_phi_middle_vs_energy", "mean width in phi of Middle vs energy",
                 [np.sqrt(e_edges[1:] * e_edges[:-1])], w[:1], [[x] for x in w[1:]],
                 ["E_true [MeV]"], "mean width phi", logy=False, logx=True)
    elif det == "lhcb":
        P.curves("sparsity_curve", "mean sparsity vs alpha", [LHCB_ALPHAS], [pe[0]["sparsity"][0]],
                 [[p["sparsity"][1]] for p in pe], ["alpha"], "fraction of cells >= alpha E_tot", logx=True)
        fig, axes = P._grid(2, ratio=False)
        for j, name in enumerate(("raw images", "physics features")):
            for p, c, lab in zip(pe, P.colors, args.labels):
                axes[j].plot(p["prd"][j][1], p["prd"][j][0], color=c, label=lab)
            axes[j].set(xlabel="recall", ylabel="precision", title=f"PRD on {name}", xlim=(0, 1), ylim=(0, 1.02))
            axes[j].legend(fontsize=7)
        P._finish(fig, "prd", "precision-recall for distributions")
    elif det == "ild":
        pix = {"pixel": pe[0]["pixels"][0]}
        P.hists("pixel_spectrum", "per-pixel energy spectrum", ["pixel"], pix, [{"pixel": p["pixels"][1]} for p in pe],
                bins, {"pixel": "pixel energy [MeV]"})
        if "amplification" in pe[0]:
            keys = list(pe[0]["amplification"])
            fig, axes = P._grid(len(keys), ratio=False)
            for ax, k in zip(axes, keys):
                a0 = pe[0]["amplification"][k]
                ax.plot(a0["truth_sizes"], a0["truth_jsd"], "k-o", ms=3, label="truth subsets")
                for p, c, lab in zip(pe, P.colors, args.labels):
                    a = p["amplification"][k]
                    ax.plot(a["gen_sizes"], a["gen_jsd"], "-s", ms=3, color=c, label=lab)
                eq = ", ".join(_eq(p["amplification"][k]["equivalent_size"]) for p in pe)
                ax.set(xscale="log", yscale="log", xlabel="number of showers", ylabel="quantile JSD",
                       title=f"{k} (equivalent truth size: {eq})")
                ax.legend(fontsize=7)
            P._finish(fig, "amplification", "JSD vs sample size (crossing = equivalent truth size)")
    return P.written


def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except DataError as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
