"""AdaGAN ensemble of 2DGANs for the CLIC/LCD 25x25x25 ECAL (Jaruskova & Vallecorsa, CERN openlab; AdaGAN:
Tolstikhin et al., NIPS 2017). Original: github jaruskri/ECALsim_adaGAN (A = adagan_v6.py, G = gan_v6.py).

T 2DGANs (`2dgan.py`) are trained in sequence. Before each new one a mixture discriminator (MIXDISC) tells real
showers (1) from mixture samples (0); its D_i on each real training shower gives r_i = (1-D_i)/D_i and the
weights w_i = (lambda* - (1-beta) r_i)_+ / (N beta) with which the next 2DGAN draws its minibatches (A:173-241).

    python adagan.py                                   # TOY: T=3 of 2dgan.py's TOY configuration
    python adagan.py --data 'EleEscan/*.h5' --device cuda                 # the poster's T=10, paper 2DGANs
    python adagan.py --components 3 --epochs 1 --toy-n 256 --mixdisc-epochs 1 --out runs/ada_tiny   # a quick try
    python adagan.py --resume --components 5 --out runs/ada_tiny          # continue with 2 more components
    python adagan.py --generate 10000 --ckpt runs/adagan --energy 2:500 --out gen.h5
    python adagan.py --benchmark --width 0.25
    torchrun --nproc_per_node=4 adagan.py --data 'EleEscan/*.h5'          # DDP inside each 2DGAN

Out (--out DIR): ensemble.pt, component_<t>/ckpt.pt, generated.h5 (held-out Ep), log.txt, plots/, metrics.json
(per T = 1..T: sf_max_dev, edge_ratio, ess_frac; see summary()), run.json (script, 2DGAN width/latent/xscale:
--resume with others is refused). --resume continues an interrupted component with its saved weights and
2dgan.py's --resume (per-rank random streams under torchrun).

MIXDISC as the original: A:272-413 trains G:151-234, the 2DGAN discriminator (2dgan.py's, at its --width and
--bn-mode), with G:84-109 (an Adam step on a real batch, one on as many mixture samples), the three-head loss
G:124-148 (6 BCE + 0.2 MAPE(Ep/100) + 0.1 MAPE(Ecal); labels 0.9 / 0, 5% flips real->0, fake->1, G:51-57);
mixture samples at Ep ~ U(2, 500) GeV (A:416-474, G:532-542), their Ecal target a 4th-order Ecal/Ep fit
(G:545-568 hard-codes the LCD one: fitted, as in 2dgan.py, for toy data); lr 1e-4 for 4 epochs, then x0.79
per epoch, Adam recreated per file (G:39-49, A:316-317; 2dgan.py's lr_factor and "files"); 20 epochs over all
the data; the best test-loss epoch kept (A:406-413). Deviations, and why:
- Cross-fitting (--mixdisc-folds 2): fold k's MIXDISC trains on the others and gives D on fold k, so no weight
  comes from an event its MIXDISC saw (A:244-269 predicts on its training events: memorising gives D ~ 1 and
  uniform weights). Same cost as one MIXDISC on all the data; --mixdisc-folds 1 is A's way.
- Test loss without flips (noise), on fixed events and mixture samples (A redraws its 10% split each epoch).
- The share of real events with D > 0.99 is logged, and warned about above --saturation-warn (weights then go
  uniform: AdaGAN becomes repeated training); so is each component's ESS = 1/sum(w^2).
- One split (A redraws train_test_split per file and call): held-out events (--val-frac: generated.h5,
  metrics) and the 2DGANs' validation events (--gan-val-frac) are drawn once and given to every component.
- D clipped to [1e-6, 1-1e-6]; with no lambda*, uniform weights and a warning (A logs it at debug level).
"""
import argparse
import importlib
import json
import math
import os
import shlex
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                     # 2dgan.py (the base learner) and common.py
import common  # noqa: E402

PROG = "adagan.py"
SF_EDGES = common.SF_EDGES_50GEV             # GeV: 10, 60, ..., 510, the bins of the sampling-fraction claim
EDGE_RING = 10                               # cells with Chebyshev distance >= 10 from the centre: outer ring
D_CLIP, D_SATURATED = 1e-6, 0.99
N_EVAL = 5000                                # held-out events (at most) in the plots and metrics


def base():
    return importlib.import_module("2dgan")        # the base learner, 2dgan.py (imported once)


DataError = common.InputError                # bad input: main() prints one line on stderr and exits 2


# ---------------------------------------------------------------- flags
def get_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="AdaGAN ensemble of 2DGANs (LCD 25x25x25 ECAL).")
    p.error = lambda msg: sys.exit(common.fail(PROG, msg))    # one line (rank 0), not argparse's usage block
    a = p.add_argument
    a("--data", help="LCD HDF5 file or glob (ECAL, target); none: TOY showers and 2dgan.py's TOY configuration")
    a("--toy-n", type=int, help="toy showers when --data is not given (default: 2dgan.py's)")
    a("--out", help="output folder (training; default runs/adagan) or .h5 file (--generate)")
    a("--components", type=int, help="number T of 2DGANs (default 3 on toy data, 10 with --data, the poster's)")
    a("--beta", choices=["uniform", "constant"], default="uniform", help="new components' beta: 1/(t+1), --beta-const")
    a("--beta-const", type=float, default=0.5, help="beta of every new component when --beta constant")
    a("--val-frac", type=float, default=0.1, help="held-out fraction: generated.h5 conditions and metrics")
    a("--gan-val-frac", type=float, help="fraction for the components' best epoch (default: 2dgan.py's --val-frac)")
    a("--epochs", type=int, help="epochs of each 2DGAN (default: 2dgan.py's)")
    a("--batch-size", type=int, help="minibatch of each 2DGAN (default: 2dgan.py's)")
    a("--width", type=float, help="width multiplier of the 2DGAN nets and MIXDISC (default: 2dgan.py's)")
    a("--gan-args", default="", help="more 2dgan.py flags for every component, e.g. '--bn-mode batch --log-every 9'")
    a("--mixdisc-epochs", type=int, help="MIXDISC epochs, the best test-loss one kept (default 20; toy 6)")
    a("--mixdisc-lr", type=float, default=1e-4, help="MIXDISC initial Adam learning rate")
    a("--mixdisc-batch", type=int, default=128, help="MIXDISC minibatch (real; as many mixture samples)")
    a("--mixdisc-test-frac", type=float, default=0.1, help="share of MIXDISC's events for its best epoch")
    a("--mixdisc-folds", type=int, default=2, help="cross-fitting folds (1 = the original: D on its own events)")
    a("--saturation-warn", type=float, default=0.5, help="warn when more than this share of real events has D>0.99")
    a("--seed", type=int, default=0, help="random seed (each stage seeds from it and the component index)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    a("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the 2DGANs (passed to 2dgan.py)")
    a("--resume", action="store_true", help="continue from OUT/ensemble.pt at the pending or next component")
    a("--generate", type=int, metavar="N", help="sample N showers from --ckpt, write --out")
    a("--ckpt", help="ensemble folder (or its ensemble.pt) to sample from")
    a("--energy", default="2:500", help="LO:HI GeV range of Ep for --generate (Ep ~ U(LO, HI))")
    a("--benchmark", action="store_true", help="print one JSON line of speeds, write nothing")
    a = p.parse_args(argv)
    toy = a.data is None                     # the TOY configuration: 2dgan.py's, 3 components, MIXDISC 6 epochs
    a.components = (3 if toy else 10) if a.components is None else a.components
    a.mixdisc_epochs = (6 if toy else 20) if a.mixdisc_epochs is None else a.mixdisc_epochs
    try:
        a.energy_range = common.parse_range(a.energy, "--energy")      # finite: 1:inf overflowed later
    except common.InputError as e:
        p.error(str(e))
    for ok, msg in [(a.components >= 1, "--components must be >= 1"), (0 < a.beta_const <= 1, "--beta-const in (0, 1]"),
                    (a.seed >= 0, "--seed must be >= 0"), (0 < a.mixdisc_lr < math.inf, "--mixdisc-lr must be > 0"),
                    (all(0 < f < 1 for f in (a.val_frac, a.gan_val_frac or 0.5, a.mixdisc_test_frac)),
                     "--val-frac, --gan-val-frac and --mixdisc-test-frac must be in (0, 1)"),
                    (min(a.mixdisc_epochs, a.mixdisc_batch, a.mixdisc_folds) >= 1, "MIXDISC sizes must be >= 1"),
                    (a.generate is None or (a.generate >= 1 and a.ckpt and a.out), "--generate N (>= 1) needs "
                     "--ckpt DIR and --out FILE.h5")]:
        if not ok:
            p.error(msg)
    a.out = a.out or os.path.join("runs", "adagan")
    return a


def gan_args(args, t, resume=False):
    """2dgan.py's Namespace for component t (no --data: its TOY configuration); resume: from its ckpt.pt."""
    argv = ["--seed", str(args.seed + t), "--device", args.device, "--dtype", args.dtype]
    argv += (["--resume"] if resume else []) + (["--compile"] if args.compile else [])
    argv += [] if args.data is None else ["--data", args.data]
    for flag in ("toy_n", "epochs", "batch_size", "width"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    try:
        argv += shlex.split(args.gan_args)
    except ValueError as e:
        raise DataError(f"--gan-args {args.gan_args!r}: {e}")
    return base().get_args(argv, toy_config=True)


# ---------------------------------------------------------------- AdaGAN weights, betas, mixture
def lambda_star(r, beta):
    """(lambda*, k) for ratios r (N,) and beta (A:173-203): r sorted, lambda_k = (beta N + (1-beta) sum_{i<=k} r_i)
    / k for the first k with (1-beta) r_k <= lambda_k <= (1-beta) r_{k+1} (r_{N+1} = inf); (None, None) if none."""
    r = np.sort(np.asarray(r, np.float64))
    if len(r) == 0 or not np.all(np.isfinite(r)):
        return None, None
    lam = (beta * len(r) + (1 - beta) * np.cumsum(r)) / np.arange(1, len(r) + 1)
    tol = 1e-12 * np.maximum(1.0, np.abs(lam))
    ok = np.flatnonzero(((1 - beta) * r <= lam + tol) & (lam <= np.append((1 - beta) * r[1:], np.inf) + tol))
    return (None, None) if len(ok) == 0 else (float(lam[ok[0]]), int(ok[0] + 1))


def adagan_weights(d, beta, log=None):
    """(weights (N,) >= 0 summing to 1, lambda* or None, uniform fallback used) from MIXDISC outputs d (real events)."""
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    d = np.clip(np.asarray(d, np.float64), D_CLIP, 1 - D_CLIP)
    r, n = (1 - d) / d, len(d)
    lam, _ = lambda_star(r, beta)
    w = None if lam is None else np.maximum(lam - (1 - beta) * r, 0.0) / (n * beta)
    if w is None or not np.all(np.isfinite(w)) or w.sum() <= 0:
        warnings.warn(msg := "AdaGAN weights: no valid lambda* (degenerate MIXDISC output); using uniform weights")
        log and log("warning: " + msg)
        return np.full(n, 1.0 / n), lam, True
    return w / w.sum(), lam, False


def ess(w):
    """Effective sample size 1/sum(w^2) of weights w normalised to sum 1 (N for uniform weights, 1 for one point)."""
    w = np.asarray(w, np.float64) / np.sum(w)
    return float(1.0 / np.sum(w * w))


def saturation(d, threshold, log=None, ga=None):
    """Share of real events whose MIXDISC output D is 99% of the way from the fake to the real target: D > 0.99 for
    hard labels; with 2dgan.py's (ga: 0.9 / 0, 5% flipped, the original's) the mean targets are 0.855 and 0.05.
    Above `threshold` a warning: D is flat there, so is r = (1-D)/D, and the weights are near uniform."""
    t_r, t_f = (1.0, 0.0) if ga is None else ((1 - ga.label_flip) * v + ga.label_flip * (v == 0)
                                              for v in (ga.label_real, ga.label_fake))
    lvl = t_f + D_SATURATED * (t_r - t_f)
    s = float(np.mean(np.asarray(d) > lvl))
    if s > threshold:
        warnings.warn(msg := f"MIXDISC saturates: {s:.1%} of real training events have D > {lvl:.4g} (99% of the "
                      "way to the real target): weights close to uniform, the next component repeats plain training")
        log and log("warning: " + msg)
    return s


def beta_for(t, schedule, const=0.5):
    """beta of component t (0-based): the first component has beta 1; uniform 1/(t+1); constant `const`."""
    return 1.0 if t == 0 else 1.0 / (t + 1) if schedule == "uniform" else float(const)


def mixture_weights(betas):
    """Mixture weights after adding components with these betas: each new one gets beta_t, the old ones x(1-beta_t)."""
    return np.array([b * np.prod(1 - np.asarray(betas[i + 1:], np.float64)) for i, b in enumerate(betas)])


def sample_mixture(generators, mix_w, ep, rng, generate, device=None):
    """(showers (N,25,25,25), component (N,)): component i ~ Cat(mix_w) per event, then generate(G_i, its ep, seed);
    the showers stay on device when it is given (generate then returns tensors there), else numpy."""
    ep = np.asarray(ep, np.float32)
    comp = rng.choice(len(generators), size=len(ep), p=np.asarray(mix_w, np.float64) / np.sum(mix_w))
    out = (np.zeros((len(ep), 25, 25, 25), np.float32) if device is None
           else torch.zeros(len(ep), 25, 25, 25, device=device))
    for i in np.unique(comp):
        sel = np.flatnonzero(comp == i)
        out[sel] = generate(generators[i], ep[sel], int(rng.integers(2**31)))
    return out, comp


# ---------------------------------------------------------------- data
def load_data(args, ga, log, rank=0):
    """(ecal, ep, source label, toy flag); toy LCD showers cached under data/ when --data is not given."""
    if args.data is not None:
        return (*base().load_lcd(args.data), args.data, False)     # an existing file is literal, '[' and all (K)
    path = common.toy_path("lcd", ga.toy_n, args.seed)
    log(f"no --data: training on TOY lcd showers ({path})")
    if rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        common.write_toy("lcd", path, ga.toy_n, args.seed)
    while not os.path.exists(path):                         # other ranks wait for rank 0's file
        time.sleep(0.5)
    return (*base().load_lcd(path), path, True)


def features(ecal, ep):
    """Per-shower summaries for the plots and metrics: sampling fraction, square-ring profile, edge fraction."""
    i = np.abs(np.arange(25) - 12)
    ring_of, exy = np.maximum(i[:, None], i[None, :]), np.sum(ecal, 3, dtype=np.float64)   # Chebyshev distance
    ring = np.stack([exy[:, ring_of == k].sum(1) for k in range(13)], 1)
    esum = ring.sum(1)
    return {"sf": esum / np.asarray(ep, np.float64), "ring": ring,
            "edge": ring[:, EDGE_RING:].sum(1) / np.maximum(esum, 1e-12)}


# ---------------------------------------------------------------- model: MIXDISC = the 2DGAN discriminator
def mixdisc_loss(D, x, e, ecal_t, real, ga, flip_g=None):
    """G:124-148 on images x (x xscale), Ep e GeV, Ecal target ecal_t: w_gan BCE (labels 0.9 / 0 = 2dgan.py's
    --label-real/-fake, flipped as G:51-57 with flip_g) + w_ep MAPE(Ep/100) + w_ecal MAPE(Ecal)."""
    m = base()
    with m._autocast(x.device, ga.dtype):
        logit, ep_p, ecal_p = D(x)
    lab = ga.label_real if real else ga.label_fake
    lab = (m.flip_labels(lab, len(x), ga.label_flip, flip_g, x.device) if flip_g is not None
           else torch.full((len(x),), lab, device=x.device))
    return (ga.w_gan * F.binary_cross_entropy_with_logits(logit.float(), lab)
            + ga.w_ep * m.mape(e / 100.0, ep_p.float()) + ga.w_ecal * m.mape(ecal_t, ecal_p.float()))


def train_mixdisc(gens, mix_w, ecal, ep, fit, args, ga, device, seed, log):
    """(MIXDISC, info): trained on the real events fit (less a test part) and mixture samples, best test epoch."""
    m, _ = base(), torch.manual_seed(seed)
    rng, g = np.random.default_rng(seed), torch.Generator(device).manual_seed(seed)
    perm, n_te = rng.permutation(fit), max(1, int(round(len(fit) * args.mixdisc_test_frac)))
    te, tr, xs, B = np.sort(perm[:n_te]), np.sort(perm[n_te:]), float(ga.xscale), args.mixdisc_batch
    e_fit = ep[fit].astype(np.float64)                      # the fakes' Ecal target: 4th-order Ecal/Ep fit
    poly = np.polyfit(e_fit, np.asarray(ecal[fit], np.float64).sum((1, 2, 3)) / e_fit, 4)
    gen = lambda G, e, s: m.generate(G, e, device=device, seed=s, host=False)  # noqa: E731
    as_t = lambda v: torch.as_tensor(np.ascontiguousarray(v), dtype=torch.float32, device=device)  # noqa: E731

    def batch(idx, fake, r=rng):
        """(images x xscale, Ep, Ecal target) of the real events idx, or of as many mixture samples (drawn with r)."""
        e = r.uniform(2.0, 500.0, len(idx)) if fake else ep[idx]
        x = (sample_mixture(gens, mix_w, e, r, gen, device)[0] if fake else as_t(ecal[idx])) * xs     # on device
        return x, as_t(e), as_t(xs * e * np.polyval(poly, e)) if fake else x.sum((1, 2, 3))
    D, best, best_state, best_epoch, hist = m.Discriminator(ga.width).to(device), math.inf, None, -1, []
    starts = range(0, max(len(tr) - B, 0) + 1, B)          # full batches (one short one if fewer events)
    per_file = max(1, len(starts) // max(1, round(len(tr) / ga.file_events)))   # 2dgan.py's "files"
    for epoch in range(args.mixdisc_epochs):
        t0, tot, nb, order = time.time(), torch.zeros((), dtype=torch.float64, device=device), 0, rng.permutation(tr)
        D.train(ga.bn_mode == "batch")
        for i, s in enumerate(starts):
            if i % per_file == 0:                           # a new "file": lr step, new Adam (A:316-317)
                lr = args.mixdisc_lr * m.lr_factor(epoch + i / len(starts), ga.lr_const_epochs, ga.lr_decay)
                opt = torch.optim.Adam(D.parameters(), lr=lr, eps=1e-7)
            for fake in (False, True):                      # G:84-109: a real step, then a mixture step
                loss = mixdisc_loss(D, *batch(np.sort(order[s:s + B]), fake), not fake, ga, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot, nb = tot + loss.detach().double(), nb + 1     # summed on the device: no host sync per step
        D.eval()
        tot = tot.item()
        r_te = np.random.default_rng(seed + 1)             # the same test mixture samples every epoch
        with torch.no_grad():
            test = float(np.mean([mixdisc_loss(D, *batch(te[s:s + B], fake, r_te), not fake, ga).item()
                                  for s in range(0, len(te), B) for fake in (False, True)]))
        hist.append({"epoch": epoch + 1, "loss": tot / nb, "test_loss": test, "lr": lr})
        log(f"mixdisc epoch {epoch + 1}/{args.mixdisc_epochs} | loss {tot / nb:.4f} test {test:.4f} | lr {lr:.3g} | "
            f"{len(order) * 2 / (time.time() - t0):.0f} samples/s")
        if test < best:
            best, best_epoch, best_state = test, epoch + 1, {k: v.detach().clone() for k, v in D.state_dict().items()}
    D.load_state_dict(best_state or D.state_dict())          # every test loss NaN: the last epoch
    return D.eval(), {"best_epoch": best_epoch, "best_test_loss": best, "history": hist}


@torch.no_grad()
def mixdisc_predict(net, ecal, idx, device, xscale, batch=512):
    """D = sigmoid(real/fake logit) of a MIXDISC on the real showers ecal[idx] (x xscale, as it was trained)."""
    return np.concatenate([torch.sigmoid(net(torch.from_numpy(np.ascontiguousarray(ecal[idx[s:s + batch]]))
                                             .to(device).float() * xscale)[0].float()).cpu().numpy()
                           for s in range(0, len(idx), batch)]).astype(np.float64)


def mixdisc_outputs(gens, mix_w, ecal, ep, tr, args, ga, device, seed, log):
    """(D on every training event tr, the folds' MIXDISC info), cross-fitted over --mixdisc-folds (1: A's way)."""
    K = args.mixdisc_folds
    fold = np.random.default_rng(seed).permutation(len(tr)) % K
    d, infos = np.zeros(len(tr)), []
    for k in range(K):
        fit = tr[fold != k] if K > 1 else tr
        log(f"MIXDISC fold {k + 1}/{K}: training on {len(fit)} real events, predicting on {np.sum(fold == k)}")
        net, info = train_mixdisc(gens, mix_w, ecal, ep, fit, args, ga, device, seed + 7 * k, log)
        d[fold == k] = mixdisc_predict(net, ecal, tr[fold == k], device, ga.xscale)
        infos.append(info)
    return d, infos


# ---------------------------------------------------------------- train: the component loop
def load_state(path):
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)    # numpy arrays, as 2dgan.py's ckpt
    except Exception as exc:  # noqa: BLE001  (truncated or foreign file)
        raise DataError(f"{path}: not a readable adagan ensemble state ({type(exc).__name__})")
    if not isinstance(st, dict) or st.get("version") != 2 or st.get("script", PROG) != PROG:
        raise DataError(f"{path}: not an adagan.py ensemble state (version 2)")
    return st


def train(args, log):
    """The component loop (log: a make_log()); OUT/ensemble.pt saved before and after each component. Every input
    is checked first (under torchrun on every rank, before the process group: all ranks exit 2, none hangs)."""
    m, rank, device = base(), int(os.environ.get("RANK", 0)), str(base().resolve_device(args.device))
    state_path = os.path.join(args.out, "ensemble.pt")
    for name in ("ensemble.pt", "generated.h5", "metrics.json", "log.txt", "plots"):      # B: nothing in the way
        common.check_out_path(os.path.join(args.out, name), "--out", folder=name == "plots")
    if args.resume and not os.path.exists(state_path):
        raise DataError(f"{state_path}: no ensemble state to resume from")
    gas = [gan_args(args, t) for t in range(args.components)]   # bad --gan-args fail here, before any output
    shape = {k: getattr(gas[0], k) for k in ("width", "latent", "xscale")}    # L, F: run.json
    common.check_run_folder(args.out, PROG, shape, args.resume)
    ecal, ep, source, toy = load_data(args, gas[0], log, rank)
    old = load_state(state_path) if args.resume else None
    if old is not None and (old["n_events"] != len(ep) or old["source"] != source):
        raise DataError(f"{state_path}: was trained on {old['source']} ({old['n_events']} events), not {source} "
                        f"({len(ep)} events)")
    n, perm = len(ep), np.random.default_rng(args.seed).permutation(len(ep))     # one split for the ensemble:
    n_va, n_gv = max(1, round(args.val_frac * n)), max(1, round((args.gan_val_frac or gas[0].val_frac) * n))
    if n - n_va - n_gv < 8:
        raise DataError(f"only {n} events: too few to train and hold out {n_va} + {n_gv}")
    tr, gv, va = (old["train_idx"], old["gan_val_idx"], old["val_idx"]) if old else (   # train, 2DGANs', held out
        np.sort(perm[n_va + n_gv:]), np.sort(perm[n_va:n_va + n_gv]), np.sort(perm[:n_va]))
    gens = [m.load_checkpoint(os.path.join(args.out, c, "ckpt.pt"), device=device)[0] for c in (old or {}).get(
        "components", [])]
    pend = os.path.join(args.out, f"component_{len(gens)}", "ckpt.pt")
    if old and old.get("pending") is not None and os.path.exists(pend):
        m.load_checkpoint(pend)                             # F: a truncated ckpt.pt is one line, before any write
    ddp = "RANK" in os.environ
    if ddp and not torch.distributed.is_initialized():  # 2dgan.py's train() wraps its nets in DDP in a group
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        torch.cuda.set_device(torch.device(device)) if device.startswith("cuda") else None
    if rank == 0:
        common.stamp_run_folder(args.out, PROG, shape)
        log.path = os.path.join(args.out, "log.txt")
    ev = np.sort(np.random.default_rng(args.seed + 7).permutation(va)[:N_EVAL])     # plots and metrics
    st = old or {"version": 2, "source": source, "toy": toy, "n_events": len(ep), "train_idx": tr, "gan_val_idx": gv,
                 "val_idx": va, "eval_idx": ev, "eval_ep": ep[ev].astype(np.float64), "eval_real": features(ecal[ev],
                 ep[ev]), "train_ep": ep[tr].astype(np.float64), "pending": None, **{k: [] for k in (
                     "components", "betas", "mix_weights", "data_weights", "lambdas", "mixdisc", "ess", "saturation",
                     "best_epochs", "eval_comp")}}
    ev = st["eval_idx"]
    st["args"], st["script"] = {k: v for k, v in vars(args).items() if k != "energy_range"}, PROG
    if old is not None:
        log(f"resuming {state_path}: {len(gens)} component(s) done, continuing to {args.components}")

    def save():                                             # I: never a non-finite state (checked on every rank)
        common.check_finite({k: v for k, v in st.items() if k != "args"}, state_path)
        if rank == 0:
            common.write_atomic(state_path, lambda tmp: torch.save(st, tmp))

    for t in range(len(gens), args.components):
        t0, cdir, pend = time.time(), f"component_{t}", st.get("pending")
        resume_gan = pend is not None and os.path.exists(os.path.join(args.out, cdir, "ckpt.pt"))
        if pend is not None:                                # interrupted during this component
            beta, w = float(pend["beta"]), np.asarray(pend["weights"])
            log(f"component {t}: reusing the saved data weights of the interrupted run (2DGAN resumed: {resume_gan})")
        else:
            beta, w, lam, info, sat = 1.0, np.full(len(tr), 1.0 / len(tr)), None, None, None
            if t > 0:
                beta = beta_for(t, args.beta, args.beta_const)
                d, info = mixdisc_outputs(gens, st["mix_weights"][-1], ecal, ep, tr, args, gas[t], device,
                                          args.seed * 1000 + t, log)
                sat = saturation(d, args.saturation_warn, log, gas[t])
                w, lam, fallback = adagan_weights(d, beta, log)
                if ddp:                                     # every rank uses rank 0's weights
                    wt = torch.from_numpy(w).to(device)
                    torch.distributed.broadcast(wt, 0)
                    w = wt.cpu().numpy()
                log(f"component {t}: beta {beta:.4f} lambda* {lam!s:.6} | D mean {d.mean():.3f}, {sat:.1%} saturated "
                    f"| N x weight {w.min() * len(w):.3g}..{w.max() * len(w):.3g} | ESS/N {ess(w) / len(w):.3f}")
            for k, v in (("ess", ess(w)), ("saturation", sat), ("lambdas", lam), ("mixdisc", info)):
                st[k].append(v)
            st["pending"] = {"t": t, "beta": beta, "weights": np.asarray(w, np.float64)}
            save()
        log(f"component {t + 1}/{args.components}: a 2DGAN on {len(tr)} showers, beta {beta:.4f}")
        if rank == 0:
            os.makedirs(os.path.join(args.out, cdir), exist_ok=True)
        res = m.train(gan_args(args, t, resume_gan), ecal, ep, weights=w, out_dir=os.path.join(args.out, cdir),
                      log=log, split=(tr, gv))
        gens.append(res["generator"])
        st["betas"].append(beta)
        for k, v in (("components", cdir), ("mix_weights", mixture_weights(st["betas"])), ("data_weights", w),
                     ("best_epochs", int(res["best_epoch"])), ("eval_comp", features(m.generate(
                         gens[-1], ep[ev], device=device, seed=args.seed + 100 + t), ep[ev]))):
            st[k].append(v)
        st["pending"] = None
        save()
        log(f"component {t + 1}/{args.components} done in {time.time() - t0:.0f} s | mixture of {t + 1}: "
            + " ".join(f"{k} {v!s:.6}" for k, v in summary(st, t).items() if k != "sf_ratio_per_50gev"))
        if ddp:
            torch.distributed.barrier()
    if rank == 0:
        write_plots(st, args.out)
        finish(st, gens, ep, args, device, log)
    return st


# ---------------------------------------------------------------- generate
def load_ensemble(ckpt, device):
    """(generators, mixture weights) from an ensemble folder or its ensemble.pt."""
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt)
    path = os.path.join(folder, "ensemble.pt")
    if not os.path.exists(path):
        raise DataError(f"{ckpt}: no ensemble.pt there")
    st = load_state(path)
    paths = [os.path.join(folder, c, "ckpt.pt") for c in st.get("components") or []]
    missing = [p + ": component checkpoint missing" for p in paths if not os.path.exists(p)]
    if missing or not paths:
        raise DataError(missing[0] if missing else f"{path}: no finished component")
    return [base().load_checkpoint(p, device=device)[0] for p in paths], np.asarray(st["mix_weights"][-1])


def ensemble_sample(gens, mix_w, ep, device, seed, dtype="fp32", host=True):
    """Ensemble showers at the given Ep: component ~ Cat(mix_w) per event (seed: int or numpy Generator)."""
    gen = lambda G, e, s: base().generate(G, e, device=device, seed=s, dtype=dtype, host=host)  # noqa: E731
    return sample_mixture(gens, mix_w, ep, np.random.default_rng(seed), gen, None if host else device)


def ensemble_features(st, t):
    """Features of the mixture of the first t+1 components on the eval events (component per event ~ its weights)."""
    comp = np.random.default_rng(12345 + t).choice(t + 1, len(st["eval_idx"]), p=st["mix_weights"][t])
    return {k: np.stack([st["eval_comp"][c][k] for c in range(t + 1)])[comp, np.arange(len(comp))]
            for k in st["eval_real"]}


def summary(st, t):
    """The claim's figures for the mixture of the first t+1 components: generated/real mean sampling fraction
    per 50 GeV bin and its largest |ratio - 1|, generated/real mean deposit in the outer ring, ESS/N of the
    weights component t was trained with (None where undefined)."""
    real, gen = st["eval_real"], ensemble_features(st, t)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.divide(*(common.binned_stat(st["eval_ep"], f["sf"], SF_EDGES)[0] for f in (gen, real)))
    edge_r, edge_g = (f["ring"][:, EDGE_RING:].sum(1).mean() for f in (real, gen))
    dev = np.abs(ratio[np.isfinite(ratio)] - 1)
    return {"sf_ratio_per_50gev": [float(v) if np.isfinite(v) else None for v in ratio],
            "sf_max_dev": float(dev.max()) if len(dev) else None,
            "edge_ratio": float(edge_g / edge_r) if edge_r > 0 else None,
            "ess_frac": float(st["ess"][t] / len(st["train_idx"]))}


def write_plots(st, out):
    """The poster's figures for the mixtures of 1..T components: SF ratio per T, ring/edge shapes, data weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tag, T, real = (" (TOY lcd)" if st["toy"] else ""), len(st["components"]), st["eval_real"]
    col = [plt.get_cmap("viridis")(t / max(T - 1, 1)) for t in range(T)]
    feats, sums = [ensemble_features(st, t) for t in range(T)], [summary(st, t) for t in range(T)]
    cen, Ts = 0.5 * (SF_EDGES[1:] + SF_EDGES[:-1]), range(1, T + 1)
    figs = {k: plt.subplots(1, 2, figsize=(10, 4)) for k in ("sampling_fraction", "shower_shapes", "data_weights")}
    ax = figs["sampling_fraction"][1]
    for t, s in enumerate(sums):
        ax[0].plot(cen, np.array(s["sf_ratio_per_50gev"], float), "o-", ms=3, color=col[t], label=f"T={t + 1}")
    ax[1].plot(Ts, np.array([s["sf_max_dev"] for s in sums], float), "o-", label="SF: max |gen/real - 1|")
    ax[1].plot(Ts, abs(np.array([s["edge_ratio"] for s in sums], float) - 1), "s-", label="outer ring: |gen/real - 1|")
    ax[0].set(xlabel="Ep [GeV]", ylabel="sampling fraction gen / real", title="per 50 GeV bin" + tag)
    ax[1].set(xlabel="components T", ylabel="deviation", title="mixture of the first T" + tag)
    ax = figs["shower_shapes"][1]
    lo = np.floor(min(np.log10(f["edge"] + 1e-9).min() for f in [real] + feats))
    for t, f in [(-1, real)] + list(enumerate(feats)):
        kw = dict(color="k", lw=2, label="real") if t < 0 else dict(color=col[t], label=f"T={t + 1}")
        ax[0].plot(np.log10(f["ring"].mean(0) + 1e-12), **kw)
        ax[1].hist(np.log10(f["edge"] + 1e-9), bins=40, range=(lo, 0), histtype="step", density=True, **kw)
    ax[0].axvspan(EDGE_RING - 0.5, 12.5, color="0.9")
    ax[0].set(xlabel="square ring (cells from the centre)", ylabel="log10 mean energy [GeV]", title="rings" + tag)
    ax[1].set(xlabel="log10 fraction of Ecal in the outer ring", ylabel="density", title="edge deposits" + tag)
    ax = figs["data_weights"][1]
    b = np.clip(np.searchsorted(SF_EDGES, st["train_ep"], side="right") - 1, 0, len(cen) - 1)
    for t in range(T):
        nw = np.asarray(st["data_weights"][t]) * len(st["train_ep"])
        ax[0].hist(np.log10(nw + 1e-6), bins=50, range=(-6, 2), histtype="step", color=col[t],
                   label=f"component {t + 1} (ESS/N {sums[t]['ess_frac']:.2f})")
        ax[1].plot(cen, [nw[b == i].mean() if (b == i).any() else np.nan for i in range(len(cen))], "o-", color=col[t])
    ax[0].set(xlabel="log10 (N x data weight); 0 = uniform", ylabel="training showers", title="data weights" + tag)
    ax[1].set(xlabel="Ep [GeV]", ylabel="mean N x weight", title="where the weight goes" + tag)
    for name, (fig, axes) in figs.items():
        [a.legend(fontsize=7) for a in axes if a.get_legend_handles_labels()[0]]
        fig.tight_layout()
        common.write_atomic(os.path.join(out, "plots", name + ".png"), lambda tmp: fig.savefig(tmp, dpi=90))
        plt.close(fig)


def finish(st, gens, ep, args, device, log):
    """generated.h5 on the held-out Ep, metrics.json (per T = 1..T: sf_max_dev, edge_ratio, ess_frac)."""
    va, dtype = st["val_idx"], args.dtype if device.startswith("cuda") else "fp32"
    gen = ensemble_sample(gens, st["mix_weights"][-1], ep[va], device, args.seed + 99, dtype)[0]
    per_t = [summary(st, t) for t in range(len(gens))]
    metrics = {"script": PROG, "data": st["source"], "toy": bool(st["toy"]), "components": len(gens),
               "sf_bin_edges_gev": SF_EDGES.tolist(), **{k: [s[k] for s in per_t] for k in per_t[0]},
               **{k: np.asarray(st[k], np.float64).tolist() for k in ("betas", "ess")}, "lambdas": st["lambdas"],
               "mixture_weights": st["mix_weights"][-1].tolist(), "mixdisc_saturation": st["saturation"],
               "mixdisc_best_epochs": [i and [f["best_epoch"] for f in i] for i in st["mixdisc"]],
               "component_best_epochs": st["best_epochs"], "val_indices": va.tolist()}
    common.check_finite(metrics, os.path.join(args.out, "generated.h5 and metrics.json"))     # I, before any output
    base().write_lcd(os.path.join(args.out, "generated.h5"), gen, ep[va])     # atomic; refuses non-finite showers
    common.write_atomic(os.path.join(args.out, "metrics.json"), json.dumps(metrics, indent=1))
    log(f"T=1..{len(gens)} | " + " | ".join(f"{k} " + " ".join(f"{v!s:.6}" for v in metrics[k])
                                            for k in ("sf_max_dev", "edge_ratio", "ess_frac")))


def benchmark(args):
    """One JSON line: generation by 2 untrained components, MIXDISC training (a real and a mixture step per batch)."""
    m, device = base(), str(base().resolve_device(args.device))
    dtype, sync = ("fp32", lambda: None) if device == "cpu" else (args.dtype, torch.cuda.synchronize)
    ga, rng, b, B = gan_args(args, 0), np.random.default_rng(0), args.mixdisc_batch, 64 if device == "cpu" else 4096
    gens = [m.Generator(ga.latent, ga.width, ga.xscale).to(device).eval() for _ in range(2)]
    D = m.Discriminator(ga.width).to(device).eval()
    opt, rates = torch.optim.Adam(D.parameters(), lr=args.mixdisc_lr), []

    def mixdisc_batch():
        e = torch.full((b,), 250.0, device=device)
        x = ensemble_sample(gens, [0.5, 0.5], e.cpu(), device, rng, dtype, host=False)[0] * ga.xscale
        for real in (True, False):
            opt.zero_grad()
            mixdisc_loss(D, x, e, x.sum((1, 2, 3)) + 1, real, ga).backward()
            opt.step()
    for n, fn in ((B, lambda: ensemble_sample(gens, [0.5, 0.5], rng.uniform(2, 500, B), device, rng, dtype)),
                  (2 * b, mixdisc_batch)):
        fn(), sync()                                      # warm-up, then 3 timed calls
        t0 = time.perf_counter()
        [fn() for _ in range(3)], sync()
        rates.append(round(3 * n / (time.perf_counter() - t0), 1))
    print(json.dumps({"script": PROG, "device": device if device == "cpu" else torch.cuda.get_device_name(device),
                      "dtype": dtype, "width": ga.width, "components": 2, "gen_batch": B, "gen_showers_per_s": rates[0],
                      "train_batch": b, "train_samples_per_s": rates[1], "train_what": "MIXDISC"}))


# ---------------------------------------------------------------- main
def make_log(rank=0):
    """Progress lines on stdout (rank 0), also appended to log.path (OUT/log.txt) once train() sets it."""
    def log(msg):
        if rank == 0:
            print(msg, flush=True)
            with open(log.path or os.devnull, "a") as f:
                f.write(msg + "\n")
    log.path = None
    return log


def main(argv=None):
    args = get_args(argv)
    log = make_log(int(os.environ.get("RANK", 0)))
    try:
        if args.benchmark:
            return benchmark(args) or 0
        device = str(base().resolve_device(args.device))
        common.check_out_path(args.out, "--out", folder=args.generate is None)    # A, B: before anything is read
        if args.generate is not None:
            if not args.out.endswith((".h5", ".hdf5")) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
                raise DataError(f"{args.out}: --generate writes an LCD .h5 file into an existing folder")
            gens, mix_w = load_ensemble(args.ckpt, device)
            ep = np.random.default_rng(args.seed).uniform(*args.energy_range, args.generate).astype(np.float32)
            t0, dtype = time.time(), args.dtype if device.startswith("cuda") else "fp32"
            gen, comp = ensemble_sample(gens, mix_w, ep, device, args.seed, dtype)
            base().write_lcd(args.out, gen, ep)    # atomic (B, C) and refuses non-finite showers (I)
            log(f"wrote {args.generate} showers from {len(gens)} components ({np.bincount(comp, minlength=len(gens))}"
                f" per component) to {args.out} in {time.time() - t0:.1f} s")
            return 0
        train(args, log)                                    # under torchrun: it starts the process group
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return 0
    except (DataError, base().DataError, OSError, MemoryError) as exc:
        return common.fail(PROG, exc)


if __name__ == "__main__":
    sys.exit(main())
