"""evaluate.py: physics validation of generated calorimeter showers against real ones.

    python common.py toy calochallenge1 -n 2000 -o real.h5 --seed 0    # TOY; or your real data file
    python common.py toy calochallenge1 -n 2000 -o gen.h5 --seed 1     # or a script's generated.h5
    python evaluate.py real.h5 gen.h5 --out report/                    # CaloChallenge protocol (auto here)
    python evaluate.py real.h5 runs/a/generated.h5 runs/b/generated.h5 --labels a,b --out report/
    python evaluate.py ild_real.h5 runs/vaegan/generated.h5 --amplification --out report/
    python evaluate.py ds3_real.h5 ds3_gen.h5 --device cuda --cls-calochallenge   # the challenge's classifier

The first file is the reference ("real"), the others generated samples. Formats, from keys and shapes: LCD (`ECAL`
25x25x25 or 51x51x25 centre-cropped, Ep = `target[:,1]` or `energy`, GeV), ATLAS (`cells` 89/247 + `energy`, MeV),
CaloChallenge (`incident_energies`, `showers` of 368/6480/40500 voxels = dataset 1/2/3, MeV), LHCb (`EnergyDeposit`
30x30 + `ParticleMomentum`/`ParticlePoint`, .h5/.npz), ILD (`30x30/energy` GeV + `30x30/layers` MeV reduced to 10x10, or
reduced `showers` (N,10,10), optional `energy`, else 50 GeV). Bad input (file, flag, --out; strings, complex, values or
overflow beyond float32): one line on stderr, exit status 2, nothing written. Datasets 2 and 3 (16 GB a file) are read
block by block, the classifier only its subsample (<= 5e8 inputs per class on CUDA, 2e8 on CPU, unless
--cls-max-events): two 20000-shower ds3 files (6.5 GB) take 2.4 GB peak RSS and 97 s on one CPU thread, --cls-epochs 1.

Out (--out): report.md (a row and verdict per generated file), plots/*.png and *.pdf, metrics.json: script, detector,
protocol, voxel_cut (MeV), geometry, toy, features (observables compared), dropped_features (constant in the real
sample), real {path, n_events, toy, n_empty}, bins (native), plots, settings (the flags); per generated file
(`generated`): label, path, n_events, toy, n_empty (showers empty after the cut), separation_power per observable,
separation_power_noise (its statistical floor), flagged, separation_power_mean, frechet_distance, classifier {auc, jsd,
bce, split sizes, best_epoch, epochs_run, calibration, device} or {skipped}, auc, calochallenge (mean separation power
per feature group and of the voxels), lcd / atlas / lhcb / ild (the detector's yardsticks below), memorisation (ATLAS),
verdict: PASS = AUC <= 0.55 and nothing flagged; CLOSE = AUC <= 0.75 and at most a fifth flagged; FAIL otherwise.

--protocol calochallenge (auto for its files) follows CaloChallenge/homepage code/evaluate.py: voxels below its
args.min_energy (ds1 1 MeV, ds2/3 0.5 keV / 0.033) zeroed in every file; HighLevelFeatures.CalculateFeatures' features,
expressions and dtypes; separation power = _separation_power of plt.hist(density=True) histograms in its plot_* binning
(entries outside dropped). Not reproduced: Etot/Einc per discrete energy, its high-level and ResNet classifiers,
FPD/KPD, PRDC. Checked against its `-m hist-chi` (ds1, ds2, ds3): equal separation powers, bit-identical features.
--protocol native: per detector the authors' validation (reference.md) and the field's yardsticks in our binning (real
range widened to the generated 0.5-99.5% quantiles, log-spaced when positive over > 100x, tails clipped into the end
bins). LCD: sampling fraction per 10 GeV bin, profiles; ATLAS: correlation MSE, cell variance, nearest-neighbour
memorisation (generated vs held-out real distance to real half A; << 1 = copies); LHCb: MLHEP (PRD on score.py's 24
physics features and on raw images, equal sizes, 100 clusters), score = min; ILD: quantile JSD of E_vis, hits, centre of
gravity x/y, pixel spectrum (reference.md: unconfirmed which five), --amplification on disjoint real halves. Empty
showers: centres and widths 0 (the challenge); native: centres, widths, fractions, LHCb asymmetries undefined (NaN, as
MLHEP; sparsity 1), left out of histograms and the Frechet distance (of the observables standardised with the real mean
and std; ~ D/N for one distribution). Flagged: separation power > max(0.01, 3 x its statistical floor).
Classifier: voxels / E_inc and log10(E_inc / MeV), balanced classes, 60/20/20 split of the same shower indices in both
files; AUC and JSD = (ln2 - BCE)/ln2 on the test split, calibrated on the validation split. Default (CPU-sized): 2 x 256
hidden, LeakyReLU 0.2, Adam, standardised inputs, early stopping on the validation loss, Platt scaling.
--cls-calochallenge: its DNN (num_layer=2 = 3 hidden layers of 2048), LeakyReLU 0.01, raw inputs, Adam 2e-4, batch 1000,
50 epochs, the epoch of best validation accuracy, isotonic calibration (sklearn's IsotonicRegression, clip, y in [1e-6,
1-1e-6], here without sklearn), AUC of the calibrated output; different: float32, our split.
"""
import argparse, json, math, os, sys, time  # noqa: E401

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# ---------------------------------------------------------------- flags
def get_args(argv=None):
    p = argparse.ArgumentParser(description="Physics validation of generated vs real calorimeter showers.")
    p.error = lambda msg: p.exit(2, f"evaluate.py: error: {msg}\n")   # one line, not argparse's usage block
    p.add_argument("files", nargs="+", help="real.h5 first, then one or more generated files (same detector)")
    p.add_argument("--out", default="report", help="output folder: metrics.json, report.md, plots/")
    p.add_argument("--labels", default=None, help="comma-separated legend labels, one per generated file")
    p.add_argument("--protocol", default="auto", choices=["auto", "calochallenge", "native"],
                   help="calochallenge: the challenge's cut, features, binning; native: ours; auto: by the file")
    p.add_argument("--amplification", action="store_true", help="ILD only: VAE-GAN amplification study")
    p.add_argument("--max-events", type=int, default=None, help="read at most the first N showers of each file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="device of the classifier")
    p.add_argument("--seed", type=int, default=0, help="seed of splits, classifier, k-means and subsampling")
    p.add_argument("--bins", type=int, default=0, help="native: histogram bins (0 = sqrt(N) within 10..50)")
    p.add_argument("--no-classifier", action="store_true", help="skip the classifier two-sample test")
    p.add_argument("--cls-calochallenge", action="store_true", help="the challenge's classifier for each --cls flag "
                   "left at its default (3 x 2048, LeakyReLU 0.01, raw, lr 2e-4, batch 1000, 50 epochs, isotonic)")
    p.add_argument("--cls-hidden", type=int, default=256, help="classifier hidden units per layer")
    p.add_argument("--cls-layers", type=int, default=2, help="classifier hidden layers")
    p.add_argument("--cls-epochs", type=int, default=30, help="classifier maximum epochs")
    p.add_argument("--cls-patience", type=int, default=5, help="early stopping: epochs without validation gain")
    p.add_argument("--cls-batch", type=int, default=256, help="classifier batch size")
    p.add_argument("--cls-lr", type=float, default=1e-3, help="classifier Adam learning rate")
    p.add_argument("--calibration", default="platt", choices=["platt", "isotonic"], help="classifier calibration")
    p.add_argument("--cls-max-events", type=int, default=None, help="classifier: at most this many showers per class")
    p.add_argument("--quantiles", type=int, default=50, help="ILD: quantile bins of the JSD (>= 10 real showers each)")
    p.add_argument("--prd-runs", type=int, default=10, help="LHCb: k-means runs averaged in PRD")
    p.add_argument("--prd-max", type=int, default=10000, help="LHCb: at most this many showers per sample in PRD")
    p.add_argument("--nn-queries", type=int, default=500, help="ATLAS: showers queried in the nearest-neighbour check")
    p.add_argument("--no-plots", action="store_true", help="write metrics.json and report.md only")
    args = p.parse_args(argv)
    if len(args.files) < 2:
        p.error("give the real file and at least one generated file")
    if args.cls_calochallenge:  # CaloChallenge code/evaluate.py defaults; flags given explicitly win
        for k, v in dict(cls_hidden=2048, cls_layers=3, cls_lr=2e-4, cls_batch=1000, cls_epochs=50,
                         calibration="isotonic", cls_patience=None).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, args.cls_epochs if k == "cls_patience" else v)
    for k in ("max_events", "cls_hidden", "cls_layers", "cls_epochs", "cls_batch", "cls_max_events", "quantiles",
              "prd_runs", "prd_max", "nn_queries"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    if args.bins < 0 or args.cls_patience < 0 or not args.cls_lr > 0:
        p.error("--bins and --cls-patience must be >= 0 and --cls-lr > 0")
    n_gen, stems = len(args.files) - 1, [os.path.splitext(os.path.basename(f))[0] for f in args.files[1:]]
    given = None if args.labels is None else [s.strip() for s in args.labels.split(",")]
    if given is not None and (len(given) != n_gen or not all(given)):
        p.error(f"--labels needs {n_gen} non-empty comma-separated names, got {len(given)}")
    args.labels = given or (stems if len(set(stems)) == n_gen else [f"gen{i + 1}:{s}" for i, s in enumerate(stems)])
    return args

# ---------------------------------------------------------------- data
DataError = common.InputError   # bad input: one line on stderr, exit status 2 (main)
DETECTOR_TITLE = {"lcd": "LCD ECAL 25x25x25", "atlas89": "ATLAS 89-cell cluster", "atlas247": "ATLAS 247-cell cluster",
                  "calochallenge1": "CaloChallenge ds1 photons", "calochallenge2": "CaloChallenge ds2 electrons",
                  "calochallenge3": "CaloChallenge ds3 electrons", "lhcb": "LHCb ECAL 30x30", "ild": "ILD ECAL (10x10)"}
CC_VOXELS = {368: "calochallenge1", 6480: "calochallenge2", 40500: "calochallenge3"}
LAZY = ("calochallenge2", "calochallenge3")  # read from the file block by block whenever needed, never whole
BLOCK = 1000  # showers read, checked and reduced at a time

def _open(path):   # (dict key -> array-like, toy flag, close function); every dataset of an HDF5 file by full path
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    import h5py
    try:
        if path.endswith(".npz"):
            z = np.load(path, allow_pickle=False)
            return {k: z[k] for k in z.files}, bool(z["toy"]) if "toy" in z.files else False, z.close
        f = h5py.File(path, "r")
    except Exception as e:
        raise DataError(f"{path}: " + (f"cannot read as .npz ({type(e).__name__})" if path.endswith(".npz") else
                                       "not a readable HDF5 file"))
    keys = {}
    f.visititems(lambda name, obj: keys.__setitem__(name, obj) if isinstance(obj, h5py.Dataset) else None)
    return keys, bool(f.attrs.get("toy", False)), f.close

def _detect(path, keys):   # (detector, showers' key, their shapes after N, incident energy's key) by keys, shapes
    shp = {k: tuple(v.shape) for k, v in keys.items()}
    if "ECAL" in keys:
        return "lcd", "ECAL", [(25, 25, 25), (51, 51, 25)], "target" if "target" in keys else "energy"
    if "cells" in keys:
        if shp["cells"][1:] not in ((89,), (247,)):
            raise DataError(f"{path}: 'cells' has shape {shp['cells']}, expected (N, 89) or (N, 247)")
        return f"atlas{shp['cells'][1]}", "cells", None, "energy"
    if "EnergyDeposit" in keys:
        return "lhcb", "EnergyDeposit", [(30, 30)], None
    if "30x30/layers" in keys:   # full 30x30x30 layers, reduced to 10x10
        return "ild", "30x30/layers", [(30, 30, 30)], "30x30/energy"
    if "showers" in keys and shp["showers"][1:] in ((10, 10), (100,)):   # reduced; 50 GeV without an energy key
        return "ild", "showers", [(10, 10), (100,)], next((k for k in ("energy", "30x30/energy") if k in keys), None)
    if "showers" in keys or "incident_energies" in keys:
        nv = shp.get("showers", (0, 368))[1:]
        if len(nv) != 1 or nv[0] not in CC_VOXELS:
            raise DataError(f"{path}: 'showers' has shape {shp['showers']}, expected (N, 368), (N, 6480) or (N, 40500)")
        return CC_VOXELS[nv[0]], "showers", None, "incident_energies"
    raise DataError(f"{path}: unknown format (keys {sorted(keys)[:6]}); expected ECAL (LCD), cells (ATLAS), "
                    "incident_energies+showers (CaloChallenge), EnergyDeposit (LHCb) or 30x30/layers (ILD)")

def _need(path, keys, key, tail=None, n=None):
    """keys[key] once its dtype (real numbers: strings and complex cast silently), size and shape are checked."""
    if key not in keys:
        raise DataError(f"{path}: missing key '{key}'")
    shape, dt = tuple(keys[key].shape), keys[key].dtype
    if dt.kind not in "biuf":
        raise DataError(f"{path}: '{key}' has dtype {dt}, expected real numbers")
    if len(shape) == 0 or shape[0] == 0:
        raise DataError(f"{path}: '{key}' is empty")
    if tail is not None and shape[1:] not in tail:
        raise DataError(f"{path}: '{key}' has shape {shape}, expected (N, {' or '.join(map(str, tail))})")
    if n is not None and shape[0] != n:
        raise DataError(f"{path}: '{key}' has {shape[0]} events but the showers have {n}")
    return keys[key]

def load(path, max_events=None, protocol="auto"):
    """One file as a dict: detector, protocol, geom, cells (N, n_cells) in the geometry's unit, cut applied
    (None for ds2/ds3: see blocks), e_inc (N,) float64 in that unit, toy flag, LHCb momentum and point."""
    keys, toy, close = _open(path)
    try:
        det, ckey, tail, ekey = _detect(path, keys)
        proto = protocol if protocol != "auto" else ("calochallenge" if det in CC_VOXELS.values() else "native")
        if proto == "calochallenge" and det not in CC_VOXELS.values():
            raise DataError(f"{path}: --protocol calochallenge needs CaloChallenge files; this file is {det}")
        ds = _need(path, keys, ckey, tail)
        if det == "lcd" and ekey not in keys:
            raise DataError(f"{path}: missing key 'target' (or 'energy'): the primary energy Ep")
        e = None if ekey is None else _need(path, keys, ekey, None if det == "lcd" else [(), (1,)], ds.shape[0])
        if ekey == "target" and (len(e.shape) != 2 or e.shape[1] < 2):
            raise DataError(f"{path}: 'target' has shape {e.shape}, expected (N, >=2) with Ep in column 1")
        n = min(ds.shape[0], max_events or ds.shape[0])
        transform = common.reduce_ild if ckey == "30x30/layers" else (lambda a: a[:, 13:38, 13:38, :]) \
            if ds.shape[1:] == (51, 51, 25) else None
        # the challenge computes in the file's dtype: float64 files stay float64 under its protocol
        dtype = np.float64 if proto == "calochallenge" and ds.dtype == np.float64 else np.float32
        if det == "lhcb":
            mom, pt = (np.asarray(_need(path, keys, k, t, ds.shape[0])[:n], np.float64) for k, t in
                       (("ParticleMomentum", [(3,)]), ("ParticlePoint", [(3,), (2,)])))
            for k, a in (("ParticleMomentum", mom), ("ParticlePoint", pt)):
                common.check_real(path, k, a)   # finite in float32
            if (mom[:, 2] <= 0).any():
                raise DataError(f"{path}: 'ParticleMomentum' has p_z <= 0")
            extra = {"momentum": mom, "point": np.c_[pt, np.zeros(n)] if pt.shape[1] == 2 else pt}
            e_inc = np.linalg.norm(mom, axis=1)
        else:
            e_inc = np.full(n, 50.0) if e is None else np.asarray(e[:n], np.float64)
            e_inc = e_inc[:, 1] if ekey == "target" else e_inc.reshape(n, -1)[:, 0] * (1000.0 if det == "ild" else 1.0)
            extra = {"e_file": None if e is None else np.asarray(e[:n]).reshape(n, -1)[:, -1]}  # in the file's dtype
        with np.errstate(over="ignore"):   # in float32, the dtype it is used in: 1e39 passes a float64 check
            e32 = e_inc.astype(np.float32)
        if not (np.isfinite(e32) & (e32 > 0)).all():
            raise DataError(f"{path}: the incident energy has NaN, inf or non-positive values in float32")
    finally:
        close()
    d = {"path": path, "detector": det, "protocol": proto, "geom": common.geometry("ild10" if det == "ild" else det),
         "key": ckey, "transform": transform, "cut": common.CALOCHALLENGE_MIN_ENERGY[det] if proto != "native" else 0.0,
         "dtype": dtype, "cells": None, "e_inc": e_inc, "toy": toy, "n": n, **extra}
    if det not in LAZY:
        cells = np.empty((n, d["geom"].n_cells), dtype)
        for sl, a in blocks(d):   # d["cells"] still None: read from the file
            cells[sl] = a
        d["cells"] = cells
    return d

def blocks(d, rows=None):
    """(positions, cells) of a sample block by block, cut applied: all showers in order, or the sorted `rows`.
    A sample not held in memory is read from its file again, and checked as it is read."""
    if d["cells"] is not None:
        for s in range(0, d["n"] if rows is None else len(rows), BLOCK):
            yield slice(s, s + BLOCK), d["cells"][slice(s, s + BLOCK) if rows is None else rows[s:s + BLOCK]]
        return
    keys, _, close = _open(d["path"])
    try:
        for s in range(0, d["n"], BLOCK):
            e = min(d["n"], s + BLOCK)
            lo, hi = (s, e) if rows is None else np.searchsorted(rows, [s, e])
            if hi > lo:
                with np.errstate(over="ignore"):
                    a = np.asarray(keys[d["key"]][s:e], d["dtype"])
                if not np.isfinite(a).all() or (a < 0).any():
                    raise DataError(f"{d['path']}: '{d['key']}' has " + (
                        f"NaN or inf values in {a.dtype}" if (a < 0).sum() == 0 else "negative values"))
                a = (d["transform"](a) if d["transform"] else a).reshape(len(a), -1)
                a[a < d["cut"]] = 0.0
                yield slice(lo, hi), a if rows is None else a[rows[lo:hi] - s]
    finally:
        close()

# ---------------------------------------------------------------- observables
CC_GROUPS = {"Etot_Einc": "E_tot / E_inc", "E_layer": "energy per layer [MeV]", "EC_eta": "centre in eta [mm]",
             "EC_phi": "centre in phi [mm]", "width_eta": "width in eta [mm]", "width_phi": "width in phi [mm]",
             "EC_r": "centre in r [mm]", "width_r": "width in r [mm]", "sparsity": "sparsity (empty voxel fraction)"}
CC_PREFIX = {t: p for p, t in CC_GROUPS.items()}
UNDEFINED_WHEN_EMPTY = ("centre_", "width_", "frac_", "cog_", "asym_", "middle_core")   # native protocol
LHCB_ALPHAS = np.logspace(-5, -1, 20)
ILD_OBS = ("e_vis", "n_hits", "cog_x", "cog_y", "pixel_spectrum")

def features(d):
    """Observables of one sample, block by block: dict name -> (N,), plot groups; sets d["n_empty"], d["max_cell"]."""
    with np.errstate(over="ignore", invalid="ignore"):   # an overflow is refused below, in one line
        parts = [block_features(d, cells, sl) for sl, cells in blocks(d)]
    f = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    d["n_empty"], d["max_cell"] = int(f.pop("_empty").sum()), f.pop("_max").max()
    if "_spcurve" in f:
        d["sparsity_curve"] = f.pop("_spcurve").mean(0)
    bad = [k for k, v in f.items() if np.isinf(v).any()]   # NaN = undefined (empty shower); inf = overflow
    if bad:
        raise DataError(f"{d['path']}: observable {bad[0]} overflows {d['dtype'].__name__} (values too large)")
    return f, parts[0][1]

def block_features(d, cells, sl):
    g, n, e_vis = d["geom"], len(cells), cells.sum(1, dtype=np.float64)
    f = {"_empty": e_vis == 0, "_max": cells.max(1)}
    if d["protocol"] == "calochallenge":
        hlf = common.calochallenge_features(cells, g)
        f.update(Etot_Einc=hlf.pop("E_tot") / d["e_file"][sl], **hlf)   # in the files' dtypes, as the challenge
        return f, [(t, [k for k in f if k == p or k.startswith(p + "_") and k[len(p) + 1:].isdigit()])
                   for p, t in CC_GROUPS.items()]
    f.update(e_vis=e_vis, e_ratio=e_vis / d["e_inc"][sl], n_hits=(cells > 0).sum(1).astype(np.float64))
    groups = [("Energy and hits", ["e_vis", "e_ratio", "n_hits"])]
    if g.name == "lcd":
        mom = common.axis_moments(cells.reshape(n, 25, 25, 25))
        for a, ax in enumerate("xyz"):
            f[f"centre_{ax}"], f[f"width_{ax}"] = mom[(a, 1)], np.sqrt(np.maximum(mom[(a, 2)], 0.0))
        groups.append(("Shower shapes (first two moments, cell units; z = depth)",
                       [f"{k}_{ax}" for k in ("centre", "width") for ax in "xyz"]))
    elif g.name.startswith("atlas") or g.name.startswith("calochallenge"):
        lo, ax = common.layer_observables(cells, g), ("eta", "phi") if g.xy_unit == "eta/phi" else ("x", "y")
        hit = common.energy_per_layer(cells > 0, g) / np.bincount(g.layer, minlength=g.n_layers)  # exact counts
        per = {"e": lo["energy_per_layer"], "frac": lo["fraction_per_layer"]}
        per.update({f"{k}_{u}": lo[f"{k}_{a}_per_layer"] for k in ("centre", "width") for a, u in zip("xy", ax)})
        for key, arr in {**per, "sparsity": 1.0 - hit}.items():
            f.update({f"{key}_{ln}": arr[:, i] for i, ln in enumerate(g.layer_names)})
            groups.append((f"{key} per layer", [f"{key}_{ln}" for ln in g.layer_names]))
        if "middle_core_fraction" in lo:   # ATLAS
            f["middle_core_fraction"] = lo["middle_core_fraction"][:, 0]
            groups[0][1].append("middle_core_fraction")
    elif g.name == "lhcb":   # MLHEP's physics features (score.py); an empty image: sparsity 1 (every cell >= alpha 0)
        pf = common.lhcb_physics_features(cells.reshape(n, 30, 30), d["momentum"][sl], d["point"][sl])
        f.update({k: pf[:, j] for j, k in enumerate(("asym_long", "asym_trans", "width_long", "width_trans"))})
        f.update({f"sparsity_{LHCB_ALPHAS[j]:.0e}": pf[:, 4 + j] for j in (5, 10, 15)}, _spcurve=pf[:, 4:])
        groups.append(("MLHEP physics metrics", [k for k in f if k[0] != "_" and k not in groups[0][1]]))
    else:  # ild10: centre of gravity and width of the single layer
        cw = common.centre_width_per_layer(cells, g)
        f.update({f"{k}_{a}": cw[f"{'centre' if k == 'cog' else k}_{a}"][:, 0] for k in ("cog", "width") for a in "xy"})
        groups.append(("Centre of gravity and width (mm)", ["cog_x", "cog_y", "width_x", "width_y"]))
    for k in (k for k in f if k.startswith(UNDEFINED_WHEN_EMPTY)):
        f[k][f["_empty"]] = np.nan
    return f, groups

def _fin(v):
    return np.asarray(v)[np.isfinite(v)]

# ---------------------------------------------------------------- model: classifier two-sample test
def classifier_inputs(d, idx, out):
    """Rows idx (sorted) of a sample into out: a plain (N, D) array as is, showers as the challenge's input."""
    if not isinstance(d, dict):
        out[:] = d[idx]
        return
    with np.errstate(over="ignore"):
        for sl, cells in blocks(d, idx):
            e = d["e_inc"][idx[sl]]
            out[sl, :-1], out[sl, -1] = cells / e[:, None], np.log10(e * (1000.0 if d["geom"].unit == "GeV" else 1.0))
    if not np.isfinite(out).all():
        raise DataError(f"{d['path']}: voxels / incident energy overflow float32 (incident energies too small)")

def two_sample_test(real, gen, args, device, log, tag):
    """Train an MLP real (1) vs generated (0); calibrated test AUC, BCE and JSD.
    real, gen: samples of load() (only the subsampled showers are read) or (N, D) arrays."""
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    n_r, n_g = (s["n"] if isinstance(s, dict) else len(s) for s in (real, gen))
    n_in = real["geom"].n_cells + 1 if isinstance(real, dict) else real.shape[1]
    m = min(n_r, n_g, args.cls_max_events or int(min(50000, (5e8 if device.type == "cuda" else 2e8) / n_in)))
    if m < 10:
        return {"skipped": f"too few showers ({m}) per class"}
    # the same indices in both files: a shower generated from real shower i stays in i's split (no condition leaks)
    idx, pos, (a, b) = np.sort(rng.permutation(min(n_r, n_g))[:m]), rng.permutation(m), (int(0.6 * m), int(0.8 * m))
    x = np.empty((2 * m, n_in), np.float32)   # the only copy: splits are row indices into it
    step = int(np.clip(2 ** 23 // n_in, 64, 4096))   # rows per chunk: temporaries of at most ~64 MB
    for d, part in ((real, x[:m]), (gen, x[m:])):
        classifier_inputs(d, idx, part)
    rows = {k: np.r_[p, p + m] for k, p in (("train", pos[:a]), ("val", pos[a:b]), ("test", pos[b:]))}
    raw, tr = args.cls_calochallenge, rows["train"]   # the challenge feeds the inputs as they are
    if not raw:  # standardised on the training rows; a floor on the std keeps never-hit voxels from blowing up
        mean, sq = sum(np.stack([(xc := x[tr[c:c + step]].astype(np.float64)).sum(0), (xc * xc).sum(0)])
                       for c in range(0, len(tr), step)) / len(tr)
        sd = np.sqrt(np.maximum(sq - mean ** 2, 0.0))
        x -= mean.astype(np.float32)
        x /= np.maximum(sd, 1e-3 * sd.max() + 1e-12).astype(np.float32)
    X, Y = torch.from_numpy(x).to(device), torch.cat([torch.ones(m), torch.zeros(m)]).to(device)
    rows = {k: torch.from_numpy(v).to(device) for k, v in rows.items()}
    sizes, slope = [n_in] + [args.cls_hidden] * args.cls_layers, 0.01 if raw else 0.2
    model = nn.Sequential(*[f for i, o in zip(sizes, sizes[1:]) for f in (nn.Linear(i, o), nn.LeakyReLU(slope))],
                          nn.Linear(sizes[-1], 1), nn.Flatten(0)).to(device)   # logits (N,)
    opt, bce = torch.optim.Adam(model.parameters(), lr=args.cls_lr), nn.BCEWithLogitsLoss()
    def logits(name):   # no dropout or batch norm: training and evaluation modes are the same
        with torch.no_grad():
            z = torch.cat([model(X[r]) for r in rows[name].split(step)])
        return z, Y[rows[name]]
    best, best_state, best_epoch, n_train, t0 = math.inf, None, 0, len(tr), time.time()
    for epoch in range(1, args.cls_epochs + 1):
        for i in rows["train"][torch.randperm(n_train, device=device)].split(args.cls_batch):
            opt.zero_grad(set_to_none=True)
            (loss := bce(model(X[i]), Y[i])).backward()
            opt.step()
        z, y = logits("val")
        if not torch.isfinite(z).all():   # raw inputs near the float32 limit overflow the network
            raise DataError(f"{tag}: the classifier's outputs are not finite (input values too large for float32)")
        val, acc = float(bce(z, y)), float(((z > 0).float() == y).float().mean())
        if (-acc if raw else val) < best - (0.0 if raw else 1e-4):  # the challenge keeps the best accuracy
            best, best_epoch = -acc if raw else val, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        rate = epoch * n_train / (time.time() - t0)
        log(f"classifier {tag}: epoch {epoch}/{args.cls_epochs} | loss {loss.item():.4f} val {val:.4f} acc {acc:.3f} "
            f"| {rate:.0f} samples/s | ETA {(args.cls_epochs - epoch) * n_train / rate:.0f} s")
        if epoch - best_epoch >= args.cls_patience or raw and acc == 1.0:   # the challenge stops at accuracy 1
            break
    model.load_state_dict(best_state)
    (zv, yv), (zt, yt) = logits("val"), logits("test")
    if args.calibration == "isotonic":
        xs, ys = common.isotonic_fit(torch.sigmoid(zv).double().cpu().numpy(), yv.double().cpu().numpy())
        p, cal = np.interp(torch.sigmoid(zt).double().cpu().numpy(), xs, ys), {"method": "isotonic", "points": len(xs)}
    else:  # Platt scaling on the validation split: p = sigmoid(a * logit + b)
        ab = torch.tensor([1.0, 0.0], device=device, requires_grad=True)
        lbfgs = torch.optim.LBFGS([ab], lr=0.5, max_iter=100)
        def closure():
            lbfgs.zero_grad()
            (loss := bce(ab[0] * zv + ab[1], yv)).backward()
            return loss
        lbfgs.step(closure)
        a, b = (float(v) for v in ab.detach()) if ab[0] > 0 else (0.0, 0.0)  # useless classifier: p = 1/2
        p, cal = torch.sigmoid(a * zt.double() + b).cpu().numpy(), {"method": "platt", "a": a, "b": b}
    y = yt.double().cpu().numpy()
    test_bce = common.bce_score(y, p)
    return {"auc": common.auc_score(y, p), "jsd": (math.log(2) - test_bce) / math.log(2), "bce": test_bce,
            "n_train": n_train, "n_val": len(rows["val"]), "n_test": len(rows["test"]), "best_epoch": best_epoch,
            "epochs_run": epoch, "calibration": cal, "device": str(device)}

# ---------------------------------------------------------------- train: detector-specific validation (native)
def yardsticks(name, real, gen, fr, fg, args, plot):
    """The detector's own validation of one generated sample (native protocol); the data of its plots into `plot`."""
    if name == "lcd":   # 2DGAN: sampling fraction per 10 GeV bin (and its ratio), profiles
        edges = np.arange(0.0, 10.0 * math.ceil(real["e_inc"].max() / 10.0) + 10.0, 10.0)
        sf = [common.binned_stat(d["e_inc"], common.sampling_fraction(d["cells"], d["e_inc"]), edges)
              for d in (real, gen)]
        ok, ratio = (sf[0][2] >= 5) & (sf[1][2] >= 5), sf[1][0] / sf[0][0]
        prof = [[p.mean(0) for p in common.axis_profiles(d["cells"].reshape(-1, 25, 25, 25))] for d in (real, gen)]
        plot.update(sf_bins=(edges, sf), profiles=prof)
        return {"sampling_fraction_bins_GeV": edges.tolist(), "sampling_fraction_real": sf[0][0],
                "sampling_fraction_gen": sf[1][0], "sampling_fraction_ratio": np.where(ok, ratio, np.nan),
                "sampling_fraction_max_abs_ratio_minus_1": np.nanmax(np.abs(ratio[ok] - 1)) if ok.any() else None,
                "profile_rel_l1_error": {ax: float(np.sum(np.abs(prof[1][a] - prof[0][a])) / np.sum(prof[0][a]))
                                         for a, ax in enumerate("xyz")}}
    if name == "atlas":   # Klein's validation: correlation MSE, variance per cell, nearest-neighbour memorisation
        rng, half = np.random.default_rng(args.seed), real["n"] // 2
        cr, cg = (d["cells"][rng.permutation(d["n"])[:min(real["n"], gen["n"], 20000)]] for d in (real, gen))
        vr, vg = plot["variance"] = common.cell_variance(real["cells"]), common.cell_variance(gen["cells"])
        out = {"correlation_mse": common.correlation_mse(cr, cg),
               "correlation_mse_real_halves": common.correlation_mse(real["cells"][:half], real["cells"][half:]),
               "cell_variance_mean_abs_rel_diff": np.mean(np.abs(vg[vr > 0] - vr[vr > 0]) / vr[vr > 0])}
        return {**out, **common.memorisation(real["cells"], gen["cells"], args.nn_queries, rng)}
    if name == "lhcb":   # MLHEP (common.lhcb_prd): PRD-AUC on the 24 physics features and the raw images, equal sizes
        m = min(real["n"], gen["n"], args.prd_max)
        ir, ig = (np.sort(np.random.default_rng(args.seed).permutation(x["n"])[:m]) for x in (real, gen))
        r = common.lhcb_prd(real["cells"][ir].reshape(-1, 30, 30), gen["cells"][ig].reshape(-1, 30, 30),
                            real["momentum"][ir], real["point"][ir], gen["momentum"][ig], gen["point"][ig],
                            num_runs=args.prd_runs, seed=args.seed)
        plot.update(prd=[r["prd_images"], r["prd_physics"]], sparsity=(real["sparsity_curve"], gen["sparsity_curve"]))
        return {"prd_auc_images": r["prd_auc_images"], "prd_auc_physics": r["prd_auc_physics"], "prd_n_per_sample": m,
                "prd_auc_score": r["score"], "sparsity_curve_alphas": LHCB_ALPHAS.tolist(),
                "sparsity_curve_real": real["sparsity_curve"], "sparsity_curve_gen": gen["sparsity_curve"]}
    # ild (Calomplification): quantile JSD of the five observables (less those constant in real), amplification
    orr, og = ({**{k: _fin(f[k]) for k in ILD_OBS[:4] if k in fr},
                "pixel_spectrum": d["cells"][d["cells"] > 0].astype(np.float64)} for d, f in ((real, fr), (gen, fg)))
    plot["pixels"] = (orr["pixel_spectrum"], og["pixel_spectrum"])
    out = {"quantile_jsd": {k: common.quantile_jsd(orr[k], og[k], nb) if nb >= 1 and len(og[k]) else None
                            for k in orr for nb in [min(args.quantiles, len(orr[k]) // 10)]},
           "quantile_jsd_bins": min(args.quantiles, real["n"] // 10)}
    if args.amplification:
        ref, pool = np.split(np.random.default_rng(args.seed).permutation(real["n"]), [real["n"] // 2])   # disjoint
        nb = min(args.quantiles, len(ref) // 10)
        amp = plot["amplification"] = {k: {kk: x.astype(float) if isinstance(x, np.ndarray) else x for kk, x in
                                           common.amplification(_fin(fr[k][ref]), _fin(fr[k][pool]), og[k], nb,
                                                                seed=args.seed).items()} for k in orr if k in fr}
        out["amplification"] = {"n_bins": nb, "n_reference": len(ref), "n_truth_pool": len(pool), "observables": amp}
    return out

# ---------------------------------------------------------------- generate: plots and report
def _clean(obj):   # valid JSON: numpy scalars to Python, NaN -> null, inf -> "inf", recursively
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if math.isnan(obj) else "inf" if math.isinf(obj) else float(obj)
    return obj.item() if isinstance(obj, (np.bool_, np.integer)) else obj

def _fmt(v, f="{:.3f}"):
    return "-" if v is None or v != v else f.format(v)

def _eq(v):   # equivalent truth size as text: a number, 'inf' (beats the pool) or None (worse than any subset)
    return f"{v:.0f}" if isinstance(v, float) else str(v)

class Plotter:   # figures in plots/ (.png and .pdf): real in black or grey, each generated sample in its own colour
    def __init__(self, folder, title, labels):
        import matplotlib.pyplot as plt
        plt.switch_backend("Agg")
        self.plt, self.folder, self.title, self.labels, self.written = plt, folder, title, labels, []
        self.colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(labels))]
    def grid(self, n, ratio=True):   # n panels, 4 per row; each a (main, gen / real) pair of axes if ratio
        ncols, nrows = min(4, n), math.ceil(n / min(4, n))
        fig = self.plt.figure(figsize=(4.4 * ncols, (4.2 if ratio else 3.4) * nrows + 0.6))
        h = fig.get_figheight()
        gs = fig.add_gridspec(nrows, ncols, hspace=0.35, wspace=0.35, left=0.07, right=0.98, bottom=0.55 / h,
                              top=1 - 0.6 / h)
        if not ratio:
            return fig, [fig.add_subplot(gs[divmod(i, ncols)]) for i in range(n)]
        pairs = [gs[divmod(i, ncols)].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.05) for i in range(n)]
        return fig, [(top := fig.add_subplot(p[0]), fig.add_subplot(p[1], sharex=top)) for p in pairs]
    def save(self, fig, name, subtitle):
        fig.suptitle(f"{self.title}: {subtitle}")
        for ext in ("png", "pdf"):
            common.write_atomic(os.path.join(self.folder, f"{name}.{ext}"),
                                lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=110 if ext == "png" else None))
        self.plt.close(fig)
        self.written.append(name)
    def compare(self, name, subtitle, panels, ylabel=None, logx=False, logy=True, clip=True):
        """A (main, gen / real) pair of axes per panel (x, real, [generated], xlabel): normalised histograms of the
        values (ylabel None; x = edges; clip: tails in the end bins; log axes over > 100x), or curves (x = points)."""
        fig, axes = self.grid(len(panels))
        for (x, ref, gens, xlabel), (top, bot) in zip(panels, axes):
            if ylabel is None:
                ref, *gens = [np.histogram(np.clip(v, x[0], x[-1]) if clip else v, x)[0] / max(1, len(v))
                              for v in map(_fin, [ref, *gens])]
                top.stairs(ref, x, fill=True, color="0.8", label="real")
                top.stairs(ref, x, color="0.4")
                pos = np.concatenate([v[v > 0] for v in [ref, *gens]])
                ylog, xlog = len(pos) and pos.max() / pos.min() > 100, x[0] > 0 and x[-1] / x[0] > 100
            else:
                top.plot(x, ref, color="k", lw=2, label="real")
                ylog, xlog = logy and np.nanmin(ref) > 0, logx
            bot.axhline(1.0, color="k", lw=0.8)
            for g, c, lb in zip(gens, self.colors, self.labels):
                r = np.divide(g, ref, out=np.full(len(ref), np.nan), where=ref > 0)
                top.plot(x, g, color=c, marker=".", label=lb) if ylabel else top.stairs(g, x, color=c, lw=1.4, label=lb)
                bot.plot(x, r, color=c, marker=".") if ylabel else bot.step(x, np.r_[r, r[-1:]], where="post", color=c)
            top.set(yscale="log" if ylog else "linear", ylabel=ylabel or "fraction of showers")
            top.legend(fontsize=7)
            top.tick_params(labelbottom=False)
            bot.set(ylim=(0.5, 1.5), ylabel="gen / real", xlabel=xlabel, xscale="log" if xlog else "linear")
        self.save(fig, name, subtitle)
    def lines(self, name, subtitle, panels, **style):   # panels: (reference (x, y) or None, [(x, y)], axes settings)
        fig, axes = self.grid(len(panels), ratio=False)
        for ax, (ref, gens, settings) in zip(axes, panels):
            if ref is not None:
                ax.plot(*ref, color="k", ls="-", marker="o", ms=3, label="truth subsets")
            for (x, y), c, lab in zip(gens, self.colors, self.labels):
                ax.plot(x, y, color=c, label=lab, **style)
            ax.set(**settings)
            ax.legend(fontsize=7)
        self.save(fig, name, subtitle)

def make_plots(args, title, real, gens, fr, groups, fgs, pe, edges):
    P, det = Plotter(os.path.join(args.out, "plots"), title, args.labels), real["detector"]
    cc = real["protocol"] == "calochallenge"
    xlabels = {"e_vis": f"visible energy [{real['geom'].unit}]", "n_hits": "number of hit cells",
               "e_ratio": "E_vis / E_inc (sampling fraction, response)"}
    def spectrum(name, vals, xlabel):
        P.compare(name, xlabel, [(common.native_edges(vals[0], vals[1:], 50)[0], vals[0], vals[1:], xlabel)])
    few = lambda k: real["geom"].n_layers <= 5 or not k[-1].isdigit() or int(k.rpartition("_")[2]) % 5 == 0  # noqa
    for sub, keys in groups:   # ds2/ds3: every 5th layer
        keys = [k for k in keys if edges[k] is not None and (few(k) or not cc)]
        slug = "".join(c if c.isalnum() else "_" for c in sub.split("(")[0].split("[")[0].strip().lower())
        if keys:
            P.compare(f"hist_{slug}", sub, [(edges[k], fr[k], [f[k] for f in fgs], xlabels.get(k, k)) for k in keys],
                      clip=not cc)
    if det == "lcd":
        e, sf = pe[0]["sf_bins"]
        P.compare("sampling_fraction_vs_ep", "mean sampling fraction per 10 GeV bin", [(0.5 * (e[1:] + e[:-1]),
                  sf[0][0], [p["sf_bins"][1][1][0] for p in pe], "Ep [GeV]")], "mean E_vis / Ep", logy=False)
        P.compare("profiles", "mean energy profiles (log)", [(np.arange(25), pe[0]["profiles"][0][a], [
            p["profiles"][1][a] for p in pe], x) for a, x in enumerate(["x [cell]", "y [cell]", "z (depth) [layer]"])],
            "mean deposit [GeV]")
        spectrum("cell_spectrum", [d["cells"][:2000][d["cells"][:2000] > 0] for d in [real] + gens],
                 "cell energy [GeV] (first 2000 showers)")
    elif det.startswith("atlas"):
        vr = pe[0]["variance"][0]
        P.compare("cell_variance", "variance per cell", [(np.arange(len(vr)), vr, [p["variance"][1] for p in pe],
                                                          "cell index")], "variance [MeV^2]")
        e = np.geomspace(max(real["e_inc"].min(), 1e-3), real["e_inc"].max() * 1.0001, 9)
        w = [common.binned_stat(d["e_inc"][ok], f["width_phi_Middle"][ok], e)[0]
             for d, f in zip([real] + gens, [fr] + fgs) for ok in [np.isfinite(f["width_phi_Middle"])]]
        P.compare("width_phi_middle_vs_energy", "mean width in phi of Middle vs energy",
                  [(np.sqrt(e[1:] * e[:-1]), w[0], w[1:], "E_true [MeV]")], "mean width phi", logx=True, logy=False)
    elif det == "lhcb":
        P.compare("sparsity_curve", "mean sparsity vs alpha", [(LHCB_ALPHAS, pe[0]["sparsity"][0], [p["sparsity"][1]
                  for p in pe], "alpha")], "fraction of cells >= alpha E_tot", logx=True)
        P.lines("prd", "precision-recall for distributions", [(None, [p["prd"][j][::-1] for p in pe], dict(
            xlabel="recall", ylabel="precision", title=f"PRD on {name}", xlim=(0, 1), ylim=(0, 1.02)))
            for j, name in enumerate(("raw images", "physics features"))])
    elif det == "ild":
        spectrum("pixel_spectrum", [pe[0]["pixels"][0]] + [p["pixels"][1] for p in pe], "pixel energy [MeV]")
        amp = [p.get("amplification", {}) for p in pe]
        if amp[0]:
            P.lines("amplification", "JSD vs sample size (crossing = equivalent truth size)", [(
                (amp[0][k]["truth_sizes"], amp[0][k]["truth_jsd"]), [(a[k]["gen_sizes"], a[k]["gen_jsd"]) for a in amp],
                dict(xscale="log", yscale="log", xlabel="number of showers", ylabel="quantile JSD", title=f"{k} "
                     f"(equivalent truth size: {', '.join(_eq(a[k]['equivalent_size']) for a in amp)})"))
                for k in amp[0]], ls="-", marker="s", ms=3)
    return P.written

def report_md(m, title, groups):
    det, cc, gen, rl = m["detector"], m["protocol"] == "calochallenge", m["generated"], m["real"]
    mse = ("corr. MSE", lambda r: r["atlas"]["correlation_mse"])
    head, col = {"lcd": ("max abs SF ratio - 1", lambda r: r["lcd"]["sampling_fraction_max_abs_ratio_minus_1"]),
                 "atlas89": mse, "atlas247": mse, "lhcb": ("PRD-AUC score", lambda r: r["lhcb"]["prd_auc_score"]),
                 "ild": ("mean quantile JSD", lambda r: np.mean([v for v in r["ild"]["quantile_jsd"].values()
                                                                 if v is not None]))}.get(det, (None, None))
    lines = [f"# Validation report: {title}", "", f"Protocol {m['protocol']}" + (
             f" (CaloChallenge code/evaluate.py: voxels below {m['voxel_cut']:.4g} MeV set to 0, its high-level "
             "features and histogram binning)" if cc else "") + f". Real: `{rl['path']}` ({rl['n_events']} showers"
             f"{', TOY' if rl['toy'] else ''}, {rl['n_empty']} empty). {len(m['features'])} observables"
             + (f", {m['bins']} bins" if m["bins"] else "") + ". Dropped as constant in the real sample: "
             + (", ".join(m["dropped_features"]) or "none") + ".", "",
             "| generated | N | empty | classifier AUC | JSD | Frechet dist. | mean sep. power | worst (sep.) | "
             + (f"{head} | " if head else "") + "verdict |", "|---" * (9 + bool(head)) + "|"]
    for r in gen:
        c, sp = r.get("classifier", {}), {k: v for k, v in r["separation_power"].items() if v == v}
        worst = max(sp, key=sp.get) if sp else None
        lines.append(f"| {r['label']}{' (TOY)' if r['toy'] else ''} | {r['n_events']} | {r['n_empty']} | "
                     f"{_fmt(c.get('auc'))} | {_fmt(c.get('jsd'))} | {r['frechet_distance']:.4g} | "
                     f"{_fmt(r['separation_power_mean'], '{:.4f}')} | {worst} ({_fmt(sp.get(worst))}) | "
                     + (f"{_fmt(col(r), '{:.4g}')} | " if head else "") + f"{r['verdict']} |")
    if cc:  # the challenge's results: classifier scores and separation power per feature group
        names = [CC_PREFIX[t] for t, _ in groups] + ["voxels"]
        lines += ["", "Separation power per CaloChallenge feature group (mean over layers; each in metrics.json):", "",
                  "| generated | AUC (low-level) | JSD | " + " | ".join(names) + " |", "|---" * (len(names) + 3) + "|"]
        lines += [f"| {r['label']} | " + " | ".join(_fmt(v, "{:.4f}") for v in [r.get("classifier", {}).get("auc"),
                  r.get("classifier", {}).get("jsd")] + [r["calochallenge"][p] for p in names]) + " |" for r in gen]
    lines += ["", "Flagged observables (separation power > max(0.01, 3x the statistical floor)):", ""]
    lines += [f"- {r['label']}: " + (", ".join(f"{k} {r['separation_power'][k]:.3f}" for k in r["flagged"]) or "none")
              for r in gen]
    amps = [(r, a) for r in gen for a in [r.get("ild", {}).get("amplification")] if a]
    lines += ["", "Amplification: number of real showers the generated sample is worth, per observable (inf = better "
              "than the whole truth pool, None = worse than the smallest subset):", ""] if amps else []
    lines += [f"- {r['label']}: " + ", ".join(f"{k} {_eq(v['equivalent_size'])}" for k, v in a["observables"].items())
              + f" (truth pool {a['n_truth_pool']}, generated {r['n_events']})" for r, a in amps]
    lines += ["", "AUC 0.5 = the classifier cannot tell generated from real; 1 = fully separable (best published "
              "CaloChallenge: ds1 photons ~0.63, ds2 0.53, ds3 0.56). JSD = (ln2 - BCE)/ln2 of the calibrated "
              "classifier on its test split. Empty = showers with no energy left" + (" after the cut; the challenge "
              "gives their centres and widths 0." if cc else "; their shape observables are undefined, left out.")
              + " Details: metrics.json; plots: plots/.", ""]
    return "\n".join(lines)

def verdict(row, n_feat):
    auc, nflag = row.get("auc"), len(row["flagged"])
    v = ("PASS: indistinguishable at this sample size" + " (observables only)" * (auc is None)
         if (auc is None or auc <= 0.55) and nflag == 0 else "CLOSE: small differences (see flagged observables)"
         if (auc is None or auc <= 0.75) and nflag <= max(1, n_feat // 5) else "FAIL: distinguishable")
    return v + "; WARNING: memorisation suspected" * bool(row.get("memorisation"))

# ---------------------------------------------------------------- main
def run(args, log=print):
    # --out refused before anything is read or written; a long name in full (common.check_out_path shortens it)
    if any(len(os.fsencode(c)) > 255 for c in args.out.split(os.sep)):
        raise DataError(f"--out {args.out}: a path component is longer than 255 bytes")
    for name, folder in [("metrics.json", False), ("report.md", False)] + [("plots", True)] * (not args.no_plots):
        common.check_out_path(os.path.join(args.out, name), "--out", folder)
    data = [load(p, args.max_events, args.protocol) for p in args.files]
    (real, *gens), det, cc = data, data[0]["detector"], data[0]["protocol"] == "calochallenge"
    other = next((d for d in gens if d["detector"] != det), None)
    if other:
        raise DataError(f"{other['path']}: detector {other['detector']} differs from the real file's {det}; all files "
                        "must be of the same detector")
    if args.amplification and det != "ild":
        raise DataError(f"{args.files[0]}: --amplification is the ILD (VAE-GAN) study; this file is {det}")
    if args.amplification and real["n"] < 40:
        raise DataError(f"{args.files[0]}: --amplification needs >= 40 real showers, got {real['n']}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: CUDA is not available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    toy = any(d["toy"] for d in data)
    title = DETECTOR_TITLE[det] + " [TOY]" * toy
    (fr, groups), fgs = features(real), [features(g)[0] for g in gens]   # reads (checks) ds2/ds3 before any writing
    dead = [k for k in fr if not (len(_fin(fr[k])) and np.ptp(_fin(fr[k])) > 0)]   # constant in the real sample
    fr, *fgs = [{k: v for k, v in f.items() if k not in dead} for f in [fr] + fgs]
    groups = [(t, [k for k in ks if k in fr]) for t, ks in groups if set(ks) - set(dead)]
    log(f"{title}: real {real['n']} showers ({real['path']}), generated "
        + ", ".join(f"{lab} {d['n']}" for lab, d in zip(args.labels, gens)) + f"; protocol {real['protocol']}"
        + (f", voxels < {real['cut']:.4g} MeV set to 0" if cc else "") + f"; {len(dead)} constant observables dropped")
    bins = args.bins or common.auto_bins(*(d["n"] for d in data))
    native_edges = lambda k, gs: common.native_edges(_fin(fr[k]), [_fin(g[k]) for g in gs], bins)[0]  # noqa: E731
    edges = {k: common.calochallenge_edges(k, _fin(fr[k]).max(), det) if cc else native_edges(k, fgs) for k in fr}
    vox_edges = common.calochallenge_edges("voxels", real["max_cell"], det) if cc else None
    # plot_cell_dist: every voxel; zeros lie below the first edge (the cut), so only the others are binned
    vox = [None if vox_edges is None else sum(np.histogram(c[c > 0], vox_edges)[0] for _, c in blocks(d)) for d in data]
    rows, plot_extra, name = [], [{} for _ in gens], "atlas" if det.startswith("atlas") else det
    for g, fg, lab, vc, pe in zip(gens, fgs, args.labels, vox[1:], plot_extra):
        st = {k: common.binned_separation(fr[k], fg[k], edges[k] if cc else native_edges(k, [fg]), not cc) for k in fr}
        sp = {k: v[0] for k, v in st.items()}
        flagged = sorted((k for k in sp if sp[k] > max(0.01, 3 * st[k][1])), key=lambda k: -sp[k])
        row = {"label": lab, "path": g["path"], "n_events": g["n"], "toy": g["toy"], "n_empty": g["n_empty"],
               "separation_power": sp, "separation_power_noise": {k: v[1] for k, v in st.items()},
               "flagged": flagged, "separation_power_mean": float(np.nanmean(list(sp.values()))),
               "frechet_distance": common.standardised_frechet(*(np.stack([f[k] for k in fr], 1) for f in (fr, fg)))}
        if cc:  # mean separation power per feature group and of all voxels, as the challenge's results show them
            row["calochallenge"] = {"voxels": common.calochallenge_separation(vox[0], vc, vox_edges)[0],
                                    **{CC_PREFIX[t]: float(np.nanmean([sp[k] for k in ks])) for t, ks in groups}}
        if not args.no_classifier:
            row["classifier"] = two_sample_test(real, g, args, device, log, lab)
            row["auc"] = row["classifier"].get("auc")
        if name in ("lcd", "atlas", "lhcb", "ild"):
            row[name] = yardsticks(name, real, g, fr, fg, args, pe)
        if name == "atlas":
            row["memorisation"] = row["atlas"].get("nn_ratio") is not None and row["atlas"]["nn_ratio"] < 0.5
        row["verdict"] = verdict(row, len(fr))
        rows.append(row)
        log(f"{lab}: AUC {_fmt(row.get('auc'))} | Frechet {row['frechet_distance']:.4g} | mean separation "
            f"{row['separation_power_mean']:.4f} | flagged {len(flagged)}: {', '.join(flagged[:5]) or 'none'}"
            f"{', ...' if len(flagged) > 5 else ''} | empty showers {g['n_empty']} | {row['verdict']}")
    bad = [f"{r['label']} {k}" for r in rows for k, v in (("Frechet distance", r["frechet_distance"]), ("AUC", r.get(
        "auc")), ("JSD", r.get("classifier", {}).get("jsd"))) if v is not None and not math.isfinite(v)]
    if bad:   # nothing non-finite is written
        raise DataError(f"non-finite {', '.join(bad)} (input values too large for float32?); nothing written")
    plots = [] if args.no_plots else make_plots(args, title, real, gens, fr, groups, fgs, plot_extra, edges)
    metrics = {"script": "evaluate.py", "detector": det, "protocol": real["protocol"], "voxel_cut": real["cut"],
               "geometry": real["geom"].name, "toy": toy, "features": list(fr), "dropped_features": dead,
               "real": {"path": real["path"], "n_events": real["n"], "toy": real["toy"], "n_empty": real["n_empty"]},
               "bins": None if cc else bins, "generated": rows, "plots": plots, "settings": vars(args)}
    common.write_atomic(os.path.join(args.out, "metrics.json"), json.dumps(_clean(metrics), indent=1) + "\n")
    common.write_atomic(os.path.join(args.out, "report.md"), report_md(metrics, title, groups))
    log(f"wrote {os.path.join(args.out, 'metrics.json')}, report.md and {len(plots)} plots in {args.out}/plots")
    return metrics

def main(argv=None):
    args = get_args(argv)
    try:
        run(args)
    except DataError as e:
        return common.fail("evaluate.py", e)
    return 0

if __name__ == "__main__":
    sys.exit(main())
