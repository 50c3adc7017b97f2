"""AdaGAN ensemble of 2DGANs for the CLIC/LCD 25x25x25 ECAL (Jaruskova & Vallecorsa, CERN openlab;
AdaGAN: Tolstikhin et al., NIPS 2017). Original code: github jaruskri/ECALsim_adaGAN (adagan_v6.py, gan_v6.py).

T 2DGANs are trained in sequence; component 0 is a plain 2DGAN. Before each next one a mixture
discriminator (MIXDISC) tells real showers (1) from mixture samples (0); its output D_i on each real
training shower gives r_i = (1-D_i)/D_i, the AdaGAN weights w_i = (lambda* - (1-beta) r_i)_+ / (N beta)
put the mass where the mixture is thin, and the next 2DGAN draws its minibatches with probabilities w.
The mixture is P = sum_t beta_t P_t. The base learner is `2dgan.py` (imported with importlib).

    python adagan.py                                   # TOY LCD showers, T=3 CPU-sized 2DGANs -> runs/adagan/
    python adagan.py --data 'EleEscan/*.h5' --components 10 --device cuda     # the poster's ensemble
    python adagan.py --components 3 --epochs 1 --width 0.25 --toy-n 512 --out runs/ada_tiny
    python adagan.py --resume --components 5 --out runs/ada_tiny          # continue at the next component
    python adagan.py --generate 10000 --ckpt runs/adagan --energy 2:500 --out gen.h5
    python adagan.py --benchmark --width 0.25
    torchrun --nproc_per_node=4 adagan.py --data 'EleEscan/*.h5'          # DDP inside each 2DGAN's training

Outputs in --out DIR: ensemble.pt (betas, mixture and data weights, the split, evaluation features),
component_<t>/ckpt.pt (2dgan.py checkpoints), generated.h5 (held-out real Ep), metrics.json (per T = 1..T:
sf_max_dev, edge_ratio, ess_frac), plots/{sampling_fraction,shower_shapes,data_weights}.png, log.txt.
--resume continues at the pending component: its data weights were saved before its training (not
recomputed) and its 2DGAN continues with 2dgan.py's --resume (per-rank RNG under torchrun: 2dgan.py's).

MIXDISC follows ECALsim_adaGAN: adagan_v6.py train_mix_discriminator (L272-413) trains gan_v6.py's
Discriminator (L151-234, the 2DGAN discriminator: here 2dgan.py's Discriminator at the 2DGAN's --width)
with its train_step (L84-109: one Adam step on a real batch, one on a mixture batch) and three-head loss
_disc_loss (L124-148: 6 BCE + 0.2 MAPE(Ep/100) + 0.1 MAPE(Ecal); labels real 0.9, fake 0, 5% flips
real->0, fake->1 by bit_flip_tf L51-57); fakes from the mixture at Ep ~ U(2, 500) GeV (adagan_v6.py L416-474,
gan_v6.py _func_for_gen L532-542) with the Ecal target of a 4th-order sampling-fraction fit (gan_v6.py
L545-568 uses fixed coefficients of the real data; here fitted, as 2dgan.py does, so toy data work);
lr 1e-4 constant for 4 epochs then x exp(-0.24) per epoch (l_dec L39-49 at 20 files per epoch), Adam
recreated per file (here per epoch: the data are in memory); the network called without training=True,
i.e. under TF2 BatchNorm on its initial moving statistics and no dropout (here eval mode; --mixdisc-batchnorm
batch trains with batch statistics); 20 epochs over all the data, best test-loss epoch kept (L406-413).
Deviations and why:
- Cross-fitting (--mixdisc-folds K, default 2): the training set is cut in K folds; the MIXDISC of fold k
  trains on the others and gives D on fold k, so every weight comes from a MIXDISC that never saw that event
  (the original predicts on events it trained on, adagan_v6.py L244-269, so a MIXDISC that memorises gives
  D ~ 1 and uniform weights). K=2 costs one MIXDISC on all the data. --mixdisc-folds 1 is the original.
- The test loss that picks the best epoch is computed without label flips (flips only add noise to it),
  on --mixdisc-test-frac of the fitting events (the original redraws its 10% split each epoch).
- Saturation: the share of real training events with D > 0.99 is logged; above --saturation-warn a warning
  (weights then collapse towards uniform: AdaGAN becomes repeated training). ESS = 1/sum(w^2) of each
  component's weights goes to the log and metrics.json (ess_frac = ESS/N; 1 = uniform).
- One split for the whole ensemble (the original redraws train_test_split per file and call): held-out
  events (--val-frac: generated.h5, metrics) and the components' best-epoch validation events
  (--gan-val-frac) are fixed once and passed to every 2DGAN (2dgan.py train(split=...)); every training
  event has a weight.
- D is clipped to [1e-6, 1-1e-6] so r stays finite; weights renormalised to 1; with no lambda*, uniform
  weights and a warning (as the original, which logs it only at debug level).
- Every stage is seeded from --seed and the component index, so a resumed run equals an uninterrupted one.
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
PROG = "adagan.py"
SF_EDGES = np.array([10.0, 50, 100, 150, 200, 250, 300, 350, 400, 450, 500])   # GeV, 50 GeV bins of 10-500
EDGE_RING = 10                               # cells with Chebyshev distance >= 10 from the centre: outer ring
D_CLIP = 1e-6
D_SATURATED = 0.99


def base():
    """The base learner, 2dgan.py, imported once (its folder put on sys.path)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module("2dgan")


class DataError(Exception):
    """Bad input: main() prints '<file>: <problem>' on one stderr line and exits 2."""


# ---------------------------------------------------------------- flags


def get_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description="AdaGAN ensemble of 2DGANs (LCD 25x25x25 ECAL).")
    a = p.add_argument
    a("--data", default=None, help="LCD HDF5 file or glob (ECAL, target); none: cached TOY showers")
    a("--toy-n", type=int, default=None, help="toy showers when --data is not given (default: 2dgan.py's)")
    a("--out", default=None, help="output folder (training; default runs/adagan) or .h5 file (--generate)")
    a("--components", type=int, default=None, help="number T of 2DGANs (default 3 on toy data, 10 = poster)")
    a("--beta", choices=["uniform", "constant"], default="uniform",
      help="beta schedule of new components: uniform 1/(t+1) (uniform mixture) or constant --beta-const")
    a("--beta-const", type=float, default=0.5, help="beta of every new component when --beta constant")
    a("--val-frac", type=float, default=0.1, help="held-out fraction: generated.h5 conditions and metrics")
    a("--gan-val-frac", type=float, default=0.1, help="fraction for the components' best-epoch validation")
    a("--n-eval", type=int, default=2000, help="held-out events used for the plots and metrics")
    # the 2DGAN flags passed through (default: 2dgan.py's own default)
    a("--epochs", type=int, default=None, help="epochs of each 2DGAN (default: 2dgan.py's)")
    a("--batch-size", type=int, default=None, help="minibatch of each 2DGAN (default: 2dgan.py's)")
    a("--width", type=float, default=None, help="width multiplier of the 2DGAN nets (default: 2dgan.py's)")
    a("--gan-args", default="", help="more 2dgan.py flags for every component, e.g. '--lr-g 1e-4'")
    # MIXDISC
    a("--mixdisc-epochs", type=int, default=20, help="MIXDISC epochs; the best test-loss epoch is kept")
    a("--mixdisc-lr", type=float, default=1e-4, help="MIXDISC Adam learning rate (constant 4 epochs, then decays)")
    a("--mixdisc-batch", type=int, default=128, help="MIXDISC minibatch size (real; as many mixture samples)")
    a("--mixdisc-test-frac", type=float, default=0.1, help="share of MIXDISC's events for its best epoch")
    a("--mixdisc-folds", type=int, default=2, help="cross-fitting folds (1 = the original: D on its own "
                                                   "training events)")
    a("--mixdisc-batchnorm", choices=["frozen", "batch"], default="frozen",
      help="frozen: BatchNorm on initial statistics, no dropout (the original's TF2 calls); batch: textbook")
    a("--saturation-warn", type=float, default=0.5, help="warn when more than this share of real events has D>0.99")
    # common flags
    a("--seed", type=int, default=0, help="random seed (each stage seeds from it and the component index)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    a("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the 2DGANs (passed to 2dgan.py)")
    a("--resume", action="store_true", help="continue from OUT/ensemble.pt at the next component")
    a("--ckpt-every", type=int, default=None, help="2DGAN checkpoint interval in epochs (2dgan.py's flag)")
    a("--log-every", type=int, default=None, help="2DGAN progress-line interval in steps (2dgan.py's flag)")
    a("--generate", type=int, default=None, metavar="N", help="sample N showers from --ckpt, write --out")
    a("--ckpt", default=None, help="ensemble folder (or its ensemble.pt) to sample from")
    a("--energy", default="2:500", help="LO:HI GeV range of Ep for --generate (Ep ~ U(LO, HI))")
    a("--benchmark", action="store_true", help="print one JSON line of speeds, write nothing")
    a = p.parse_args(argv)
    a.components = (3 if a.data is None else 10) if a.components is None else a.components
    checks = [(a.components >= 1, "--components must be >= 1"), (0 < a.beta_const <= 1, "--beta-const in (0, 1]"),
              (0 < a.val_frac < 1 and 0 < a.gan_val_frac < 1 and a.val_frac + a.gan_val_frac < 1,
               "--val-frac and --gan-val-frac must be in (0, 1) with a sum < 1"),
              (a.toy_n is None or a.toy_n >= 16, "--toy-n must be >= 16"), (a.n_eval >= 1, "--n-eval >= 1"),
              (0 < a.mixdisc_test_frac < 1, "--mixdisc-test-frac must be in (0, 1)"),
              (a.mixdisc_epochs >= 1 and a.mixdisc_batch >= 1 and a.mixdisc_folds >= 1, "MIXDISC sizes must be >= 1"),
              (a.generate is None or a.generate >= 1, "--generate N needs N >= 1")]
    for ok, msg in checks:
        if not ok:
            p.error(msg)
    try:
        a.energy_range = tuple(float(v) for v in a.energy.split(":"))
        assert len(a.energy_range) == 2 and 0 < a.energy_range[0] <= a.energy_range[1]
    except (ValueError, AssertionError):
        p.error(f"--energy must be LO:HI with 0 < LO <= HI, got {a.energy!r}")
    if a.generate is not None and (a.ckpt is None or a.out is None):
        p.error("--generate N needs --ckpt DIR and --out FILE.h5")
    a.out = a.out or os.path.join("runs", "adagan")
    return a


def gan_args(args, t, resume=False):
    """2dgan.py's Namespace for component t, built with its own parser from our pass-through flags
    (resume: continue an interrupted component from its OUT/component_<t>/ckpt.pt)."""
    argv = ["--seed", str(args.seed + t), "--device", args.device, "--dtype", args.dtype]
    argv += (["--resume"] if resume else []) + (["--compile"] if args.compile else [])
    argv += [] if args.data is None else ["--data", args.data]   # 2dgan.py: paper config with data, toy without
    for flag in ("toy_n", "epochs", "batch_size", "width", "ckpt_every", "log_every"):
        if getattr(args, flag) is not None:
            argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return base().get_args(argv + shlex.split(args.gan_args))


def resolve_device(name):
    """'cpu', 'cuda' or 'cuda:<LOCAL_RANK>' under torchrun (2dgan.py's rule)."""
    return str(base().resolve_device(name))


# ---------------------------------------------------------------- AdaGAN weights, betas, mixture


def lambda_star(r, beta):
    """lambda* of AdaGAN for ratios r (N,) and the new component's beta (adagan_v6.py L173-203): sort r
    ascending, S_k = cumulative sums, lambda_k = (beta N + (1-beta) S_k) / k; the first k with
    (1-beta) r_(k) <= lambda_k <= (1-beta) r_(k+1) (last k: lambda_k >= (1-beta) r_max).
    Returns (lambda*, k) or (None, None) when no k qualifies."""
    r = np.sort(np.asarray(r, np.float64))
    n = len(r)
    if n == 0 or not np.all(np.isfinite(r)):
        return None, None
    k = np.arange(1, n + 1)
    lam = (beta * n + (1 - beta) * np.cumsum(r)) / k
    lo, hi = (1 - beta) * r, np.append((1 - beta) * r[1:], np.inf)
    tol = 1e-12 * np.maximum(1.0, np.abs(lam))
    ok = np.flatnonzero((lo <= lam + tol) & (lam <= hi + tol))
    return (None, None) if len(ok) == 0 else (float(lam[ok[0]]), int(ok[0] + 1))


def adagan_weights(d, beta, log=None):
    """AdaGAN data weights from MIXDISC outputs d (N,) on the real training points (label 1 = real).
    Returns (w (N,) float64 >= 0 summing to 1, lambda* or None, used_uniform_fallback)."""
    d = np.clip(np.asarray(d, np.float64), D_CLIP, 1 - D_CLIP)
    n = len(d)
    if not 0 < beta <= 1:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    r = (1 - d) / d
    lam, _ = lambda_star(r, beta)
    w = None if lam is None else np.maximum(lam - (1 - beta) * r, 0.0) / (n * beta)
    if w is None or not np.all(np.isfinite(w)) or w.sum() <= 0:
        warn("AdaGAN weights: no valid lambda* (degenerate MIXDISC output); using uniform data weights", log)
        return np.full(n, 1.0 / n), lam, True
    return w / w.sum(), lam, False


def warn(msg, log=None):
    warnings.warn(msg)
    if log:
        log("warning: " + msg)


def ess(w):
    """Effective sample size 1/sum(w^2) of weights w normalised to sum 1 (N for uniform weights, 1 for one point)."""
    w = np.asarray(w, np.float64)
    w = w / w.sum()
    return float(1.0 / np.sum(w * w))


def saturation(d, threshold, log=None):
    """Share of real events with MIXDISC output D > 0.99; warns above `threshold` (weights then near uniform)."""
    s = float(np.mean(np.asarray(d) > D_SATURATED))
    if s > threshold:
        warn(f"MIXDISC saturates: {s:.1%} of real training events have D > {D_SATURATED} (r ~ 0), so the AdaGAN "
             "weights are close to uniform and the next component repeats plain training", log)
    return s


def beta_for(t, schedule, const=0.5):
    """beta of component t (0-based): the first component has beta 1; uniform 1/(t+1); constant `const`."""
    return 1.0 if t == 0 else 1.0 / (t + 1) if schedule == "uniform" else float(const)


def mixture_weights(betas):
    """Mixture weights after adding components with these betas: each new one gets beta_t, the old ones x(1-beta_t)."""
    w = np.zeros(0)
    for b in betas:
        w = np.append(w * (1 - b), b)
    return w


def sample_mixture(generators, mix_w, ep, rng, generate):
    """Showers from the mixture: component i ~ Cat(mix_w) for each event, then generate(G_i, ep of its events).
    Returns (showers (N,25,25,25) float32, component index (N,))."""
    ep = np.asarray(ep, np.float32)
    comp = rng.choice(len(generators), size=len(ep), p=np.asarray(mix_w, np.float64) / np.sum(mix_w))
    out = np.zeros((len(ep), 25, 25, 25), np.float32)
    for i in np.unique(comp):
        sel = np.flatnonzero(comp == i)
        out[sel] = generate(generators[i], ep[sel], int(rng.integers(2**31)))
    return out, comp


def ensemble_split(n, val_frac, gan_val_frac, seed):
    """One split for the whole ensemble: (training, components' validation, held-out) sorted index arrays."""
    perm = np.random.default_rng(seed).permutation(n)
    n_va, n_gv = max(1, round(val_frac * n)), max(1, round(gan_val_frac * n))
    if n - n_va - n_gv < 8:
        raise DataError(f"only {n} events: too few to train and hold out {n_va} + {n_gv}")
    return np.sort(perm[n_va + n_gv:]), np.sort(perm[n_va:n_va + n_gv]), np.sort(perm[:n_va])


# ---------------------------------------------------------------- data


def load_data(args, ga, log, rank=0):
    """(ecal, ep, source label, toy flag); toy LCD showers cached under data/ when --data is not given."""
    import common
    m = base()
    if args.data is not None:
        return (*m.load_lcd(args.data), args.data, False)
    path = common.toy_path("lcd", ga.toy_n, args.seed)
    log(f"no --data: training on TOY lcd showers ({path})")
    if rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        common.write_toy("lcd", path, ga.toy_n, args.seed)
    while not os.path.exists(path):                         # other ranks wait for rank 0's file
        time.sleep(0.5)
    return (*m.load_lcd(path), path, True)


def features(ecal, ep):
    """Per-shower summaries for the plots: sampling fraction, x/y/z profiles, ring profile, edge fraction."""
    e = np.asarray(ecal, np.float64)
    esum = e.sum((1, 2, 3))
    i = np.abs(np.arange(25) - 12)
    ring_of = np.maximum(i[:, None], i[None, :])                   # Chebyshev distance from the centre cell
    exy = e.sum(3)
    ring = np.stack([exy[:, ring_of == k].sum(1) for k in range(13)], 1)
    return {"sf": esum / np.asarray(ep, np.float64), "x": e.sum((2, 3)), "y": e.sum((1, 3)), "z": e.sum((1, 2)),
            "ring": ring, "edge": ring[:, EDGE_RING:].sum(1) / np.maximum(esum, 1e-12)}


# ---------------------------------------------------------------- model: MIXDISC = the 2DGAN discriminator


def mixdisc_lr(lr0, epoch):
    """gan_v6.py l_dec(lr0, 20 epoch + file - 20): constant for epochs 0-3, then exp(-0.012) per file of 20."""
    return lr0 * math.exp(-0.24 * max(0, epoch - 4))


def mixdisc_loss(D, x, e, ecal_t, real, ga, flip_g=None):
    """_disc_loss (gan_v6.py L124-148): w_gan BCE(label 0.9 real / 0 fake; with flip_g, 5% flipped to 0 / 1)
    + w_ep MAPE of Ep/100 + w_ecal MAPE of Ecal. x: images x xscale; e: Ep GeV; ecal_t: Ecal target."""
    with base()._autocast(x.device, ga.dtype):
        logit, ep_p, ecal_p = D(x)
    lab = torch.full_like(logit, 0.9 if real else 0.0, dtype=torch.float32)
    if flip_g is not None:
        flip = torch.rand(lab.shape, device=lab.device, generator=flip_g) < ga.label_flip
        lab = torch.where(flip, torch.full_like(lab, 0.0 if real else 1.0), lab)
    m = base()
    return (ga.w_gan * F.binary_cross_entropy_with_logits(logit.float(), lab)
            + ga.w_ep * m.mape(e / 100.0, ep_p.float()) + ga.w_ecal * m.mape(ecal_t, ecal_p.float()))


def train_mixdisc(gens, mix_w, ecal, ep, fit, args, ga, device, seed, log):
    """Train a MIXDISC on real events `fit` (minus a --mixdisc-test-frac test part) against as many mixture
    samples at Ep ~ U(2, 500) GeV per epoch; keep the best test-loss epoch. Returns (net in eval mode, info)."""
    m = base()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator(device).manual_seed(seed)
    perm = rng.permutation(fit)
    n_te = max(1, int(round(len(fit) * args.mixdisc_test_frac)))
    te, tr = np.sort(perm[:n_te]), np.sort(perm[n_te:])
    xs, B = float(ga.xscale), args.mixdisc_batch
    e_fit = ep[fit].astype(np.float64)         # Ecal target of the fakes: 4th-order sampling-fraction fit
    poly = np.polyfit(e_fit, np.asarray(ecal[fit], np.float64).sum((1, 2, 3)) / e_fit, 4)
    gen = lambda G, e, s: m.generate(G, e, device=device, seed=s)  # noqa: E731

    def batch(idx, fake, r=rng):
        """(images x xscale, Ep, Ecal target) of real events idx or as many mixture samples (drawn with r)."""
        if fake:
            e = r.uniform(2.0, 500.0, len(idx))
            x = sample_mixture(gens, mix_w, e, r, gen)[0]
            ecal_t = xs * e * np.polyval(poly, e)
        else:
            e, x = ep[idx], ecal[idx]
            ecal_t = None
        x = torch.from_numpy(np.ascontiguousarray(x)).to(device).float() * xs
        e = torch.as_tensor(e, dtype=torch.float32, device=device)
        return x, e, (x.sum((1, 2, 3)) if ecal_t is None else torch.as_tensor(ecal_t, dtype=torch.float32,
                                                                                device=device))
    D = m.Discriminator(ga.width).to(device)
    best, best_state, best_epoch, hist = math.inf, None, -1, []
    for epoch in range(args.mixdisc_epochs):
        t0, tot, nb = time.time(), 0.0, 0
        D.train(args.mixdisc_batchnorm == "batch")
        opt = torch.optim.Adam(D.parameters(), lr=mixdisc_lr(args.mixdisc_lr, epoch), eps=1e-7)
        order = rng.permutation(tr)
        for s in range(0, max(len(order) - B, 0) + 1, B):       # full batches (one short one if fewer events)
            for fake in (False, True):                          # train_step: a real step, then a fake step
                loss = mixdisc_loss(D, *batch(np.sort(order[s:s + B]), fake), not fake, ga, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot, nb = tot + loss.item(), nb + 1
        D.eval()
        r_te = np.random.default_rng(seed + 1)                 # the same test fakes every epoch
        with torch.no_grad():
            test = np.mean([mixdisc_loss(D, *batch(te[s:s + B], fake, r_te), not fake, ga).item()
                            for s in range(0, len(te), B) for fake in (False, True)])
        hist.append({"epoch": epoch + 1, "loss": tot / nb, "test_loss": float(test)})
        log(f"mixdisc epoch {epoch + 1}/{args.mixdisc_epochs} | loss {tot / nb:.4f} test {test:.4f} | "
            f"{len(order) * 2 / (time.time() - t0):.0f} samples/s")
        if test < best:
            best, best_epoch = float(test), epoch + 1
            best_state = {k: v.detach().clone() for k, v in D.state_dict().items()}
    D.load_state_dict(best_state)
    return D.eval(), {"best_epoch": best_epoch, "best_test_loss": best, "history": hist}


@torch.no_grad()
def mixdisc_predict(net, ecal, idx, device, xscale, batch=512):
    """D = sigmoid(real/fake logit) of a MIXDISC on the real showers ecal[idx] (x xscale, as it was trained)."""
    out = []
    for s in range(0, len(idx), batch):
        x = torch.from_numpy(np.ascontiguousarray(ecal[idx[s:s + batch]])).to(device).float() * xscale
        out.append(torch.sigmoid(net(x)[0].float()).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def mixdisc_outputs(gens, mix_w, ecal, ep, tr, args, ga, device, seed, log):
    """D on every training event, cross-fitted over --mixdisc-folds (1: fit and predict on all, the original).
    Returns (d (len(tr),), list of the folds' MIXDISC info)."""
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
        return torch.load(path, map_location="cpu", weights_only=False)    # numpy arrays, as 2dgan.py's ckpt
    except Exception as exc:  # noqa: BLE001  (corrupt or foreign file)
        raise DataError(f"{path}: not a readable adagan ensemble state ({type(exc).__name__})")


def train(args, log):
    """The component loop. Saves OUT/ensemble.pt before and after each component; returns the state dict."""
    m = base()
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if ddp else 0
    device = resolve_device(args.device)
    state_path = os.path.join(args.out, "ensemble.pt")
    if args.resume and not os.path.exists(state_path):
        raise DataError(f"{state_path}: no ensemble state to resume from")
    gas = [gan_args(args, t) for t in range(args.components)]   # bad --gan-args fail here, before any output
    ecal, ep, source, toy = load_data(args, gas[0], log, rank)   # validated before anything is written
    old = load_state(state_path) if args.resume else None
    if old is not None and (old["n_events"] != len(ep) or old["source"] != source):
        raise DataError(f"{state_path}: was trained on {old['source']} ({old['n_events']} events), "
                        f"not {source} ({len(ep)} events)")
    tr, gv, va = ensemble_split(len(ep), args.val_frac, args.gan_val_frac, args.seed)
    if rank == 0:
        os.makedirs(os.path.join(args.out, "plots"), exist_ok=True)
        log.start(os.path.join(args.out, "log.txt")) if hasattr(log, "start") else None
    ev = va[np.random.default_rng(args.seed + 7).permutation(len(va))[:args.n_eval]]
    st = old or {"version": 2, "source": source, "toy": toy, "n_events": len(ep), "train_idx": tr, "gan_val_idx": gv,
                 "val_idx": va, "eval_idx": ev, "components": [], "betas": [], "mix_weights": [], "data_weights": [],
                 "lambdas": [], "mixdisc": [], "ess": [], "saturation": [], "best_epochs": [], "eval_comp": [],
                 "eval_real": features(ecal[ev], ep[ev]), "pending": None, "eval_ep": ep[ev].astype(np.float64),
                 "train_ep": ep[tr].astype(np.float64)}
    st["args"] = {k: v for k, v in vars(args).items() if k != "energy_range"}
    gens = [m.load_checkpoint(os.path.join(args.out, c, "ckpt.pt"), device=device)[0] for c in st["components"]]
    if old is not None:
        log(f"resuming {state_path}: {len(gens)} component(s) done, continuing to {args.components}")

    def save():
        if rank == 0:
            torch.save(st, state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)

    for t in range(len(gens), args.components):
        t0, cdir, pend = time.time(), f"component_{t}", st.get("pending")
        resume_gan = pend is not None and int(pend["t"]) == t and os.path.exists(os.path.join(args.out, cdir, "ckpt.pt"))
        if pend is not None and int(pend["t"]) == t:        # interrupted during this component
            beta, w = float(pend["beta"]), np.asarray(pend["weights"])
            log(f"component {t}: reusing the saved data weights of the interrupted run"
                + (f"; resuming its 2DGAN from {cdir}/ckpt.pt" if resume_gan else ""))
        else:
            beta, w, lam, info, sat = 1.0, np.full(len(tr), 1.0 / len(tr)), None, None, None
            if t > 0:
                beta = beta_for(t, args.beta, args.beta_const)
                d, info = mixdisc_outputs(gens, st["mix_weights"][-1], ecal, ep, tr, args, gas[t], device,
                                          args.seed * 1000 + t, log)
                sat = saturation(d, args.saturation_warn, log)
                w, lam, fallback = adagan_weights(d, beta, log)
                if ddp:                                     # every rank uses rank 0's weights
                    wt = torch.from_numpy(w).to(device)
                    torch.distributed.broadcast(wt, 0)
                    w = wt.cpu().numpy()
                log(f"component {t}: beta {beta:.4f} lambda* {lam if lam is None else f'{lam:.4g}'} | MIXDISC best "
                    f"epochs {[i['best_epoch'] for i in info]}, D mean {d.mean():.3f}, {sat:.1%} of real events "
                    f"with D > {D_SATURATED} | N x weight in [{w.min() * len(w):.3g}, {w.max() * len(w):.3g}], "
                    f"{np.mean(w > 0):.1%} kept | ESS/N {ess(w) / len(w):.3f}")
            st["ess"].append(ess(w))
            st["saturation"].append(sat)
            st["lambdas"].append(lam)
            st["mixdisc"].append(info)
            st["pending"] = {"t": t, "beta": beta, "weights": np.asarray(w, np.float64)}
            save()
        log(f"component {t + 1}/{args.components}: training a 2DGAN on {len(tr)} showers "
            f"({'uniform' if t == 0 else 'AdaGAN-weighted'} minibatches), beta {beta:.4f}")
        if rank == 0:
            os.makedirs(os.path.join(args.out, cdir), exist_ok=True)
        res = m.train(gan_args(args, t, resume_gan), ecal, ep, weights=w, out_dir=os.path.join(args.out, cdir),
                      log=log, split=(tr, gv))
        gens.append(res["generator"])
        st["components"].append(cdir)
        st["betas"].append(beta)
        st["mix_weights"].append(mixture_weights(st["betas"]))
        st["data_weights"].append(np.asarray(w, np.float64))
        st["best_epochs"].append(int(res.get("best_epoch", -1)))
        st["eval_comp"].append(features(m.generate(gens[-1], ep[ev], device=device, seed=args.seed + 100 + t),
                                        ep[ev]))
        st["pending"] = None
        save()
        if rank == 0 and time.time() - t0 > 60 and t + 1 < args.components:
            write_plots(st, args.out)                       # long runs: refresh the plots as components finish
        s = summary(st, t)
        log(f"component {t + 1}/{args.components} done in {time.time() - t0:.0f} s | mixture of {t + 1}: "
            + " ".join(f"{k} {fmt(s[k])}" for k in ("sf_max_dev", "edge_ratio", "ess_frac")))
        if ddp:
            torch.distributed.barrier()
    if rank == 0:
        write_plots(st, args.out)
        finish(st, gens, ep, args, device, log)
    return st


# ---------------------------------------------------------------- generate


def load_ensemble(ckpt, device):
    """(generators, mixture weights, state) from an ensemble folder or its ensemble.pt."""
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt)
    path = os.path.join(folder, "ensemble.pt")
    if not os.path.exists(path):
        raise DataError(f"{ckpt}: no ensemble.pt there")
    st = load_state(path)
    if not st.get("components"):
        raise DataError(f"{path}: no finished component")
    paths = [os.path.join(folder, c, "ckpt.pt") for c in st["components"]]
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"{p}: component checkpoint missing")
    return [base().load_checkpoint(p, device=device)[0] for p in paths], np.asarray(st["mix_weights"][-1]), st


def ensemble_sample(gens, mix_w, ep, device, seed, dtype="fp32"):
    """Ensemble showers at the given Ep: component ~ Cat(mix_w) per event (seed: int or numpy Generator)."""
    dtype = dtype if device.startswith("cuda") else "fp32"
    gen = lambda G, e, s: base().generate(G, e, device=device, seed=s, dtype=dtype)  # noqa: E731
    return sample_mixture(gens, mix_w, ep, np.random.default_rng(seed), gen)


def ensemble_features(st, t):
    """Features of the ensemble of the first t+1 components on the eval events: each event takes the sample
    of a component drawn from that ensemble's mixture weights (fixed seed, so curves are comparable)."""
    comp = np.random.default_rng(12345 + t).choice(t + 1, len(st["eval_idx"]), p=st["mix_weights"][t])
    return {k: np.stack([st["eval_comp"][c][k] for c in range(t + 1)])[comp, np.arange(len(comp))]
            for k in st["eval_real"]}


def summary(st, t):
    """The claim's figures for the mixture of the first t+1 components: generated/real mean sampling fraction
    per 50 GeV bin (its largest |ratio - 1|), generated/real mean deposit in the outer ring, ESS/N of the
    weights component t was trained with."""
    import common
    real, gen = st["eval_real"], ensemble_features(st, t)
    mr, mg = (common.binned_stat(st["eval_ep"], f["sf"], SF_EDGES)[0] for f in (real, gen))
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = mg / mr
    ok = np.isfinite(ratio)
    edge_r, edge_g = (f["ring"][:, EDGE_RING:].sum(1).mean() for f in (real, gen))
    return {"sf_ratio_per_50gev": [float(v) if np.isfinite(v) else None for v in ratio],
            "sf_max_dev": float(np.max(np.abs(ratio[ok] - 1))) if ok.any() else None,
            "edge_ratio": float(edge_g / edge_r) if edge_r > 0 else None,
            "ess_frac": float(st["ess"][t] / len(st["train_idx"]))}


def write_plots(st, out):
    """The poster's figures for the ensembles of 1..T components: SF ratio per T, edge/ring shapes, data weights."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tag, T = (" (TOY lcd)" if st["toy"] else ""), len(st["components"])
    col = [plt.get_cmap("viridis")(t / max(T - 1, 1)) for t in range(T)]
    feats, sums, real = [ensemble_features(st, t) for t in range(T)], [summary(st, t) for t in range(T)], st["eval_real"]
    centres = 0.5 * (SF_EDGES[1:] + SF_EDGES[:-1])
    figs = {name: plt.subplots(1, k, figsize=(4.6 * k, 4)) for name, k in
            (("sampling_fraction", 2), ("shower_shapes", 3), ("data_weights", 2))}
    ax = figs["sampling_fraction"][1]
    for t, s in enumerate(sums):
        ax[0].plot(centres, np.array(s["sf_ratio_per_50gev"], float), "o-", ms=3, color=col[t], label=f"T={t + 1}")
    ax[1].plot(range(1, T + 1), [s["sf_max_dev"] for s in sums], "o-", label="SF: max |gen/real - 1|")
    ax[1].plot(range(1, T + 1), [abs(s["edge_ratio"] - 1) for s in sums], "s-", label="outer ring: |gen/real - 1|")
    ax[0].axhline(1, color="k", lw=0.8)
    ax[0].set(xlabel="Ep [GeV]", ylabel="sampling fraction generated / real", title="per 50 GeV bin" + tag)
    ax[1].set(xlabel="components T", ylabel="deviation", title="mixture of the first T" + tag)
    ax = figs["shower_shapes"][1]
    lo = np.floor(min(np.log10(f["edge"] + 1e-9).min() for f in [real] + feats))
    for t, f in [(-1, real)] + list(enumerate(feats)):
        kw = dict(color="k", lw=2, label="real") if t < 0 else dict(color=col[t], label=f"T={t + 1}")
        ax[0].plot(np.log10(f["x"].mean(0) + 1e-12), **kw)
        ax[1].plot(np.log10(f["ring"].mean(0) + 1e-12), **kw)
        ax[2].hist(np.log10(f["edge"] + 1e-9), bins=40, range=(lo, 0), histtype="step", density=True, **kw)
    ax[0].set(xlabel="x cell", ylabel="log10 mean energy [GeV]", title="transverse profile" + tag)
    ax[1].set(xlabel="square ring (cells from centre)", ylabel="log10 mean energy [GeV]", title="energy per ring" + tag)
    ax[1].axvspan(EDGE_RING - 0.5, 12.5, color="0.9")
    ax[2].set(xlabel="log10 fraction of Ecal in the outer ring", ylabel="density", title="edge deposits" + tag)
    ax = figs["data_weights"][1]
    b = np.clip(np.searchsorted(SF_EDGES, st["train_ep"], side="right") - 1, 0, len(centres) - 1)
    for t in range(1, T):
        nw = np.asarray(st["data_weights"][t]) * len(st["train_ep"])
        ax[0].hist(np.log10(nw + 1e-6), bins=50, range=(-6, 2), histtype="step", color=col[t],
                   label=f"component {t} (ESS/N {sums[t]['ess_frac']:.2f})")
        ax[1].plot(centres, [nw[b == i].mean() if (b == i).any() else np.nan for i in range(len(centres))],
                   "o-", ms=3, color=col[t])
    ax[0].set(xlabel="log10 (N x data weight); 0 = uniform", ylabel="training showers", title="AdaGAN data weights" + tag)
    ax[1].axhline(1, color="k", lw=0.8)
    ax[1].set(xlabel="Ep [GeV]", ylabel="mean N x weight", title="where the weight goes" + tag)
    for name, (fig, axes) in figs.items():
        axes[0].legend(fontsize=7)
        path = os.path.join(out, "plots", name)
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=90)
        plt.close(fig)
        os.replace(path + ".tmp.png", path + ".png")


def finish(st, gens, ep, args, device, log):
    """generated.h5 on the held-out Ep, metrics.json (per T = 1..T: sf_max_dev, edge_ratio, ess_frac)."""
    va = st["val_idx"]
    gen, _ = ensemble_sample(gens, st["mix_weights"][-1], ep[va], device, args.seed + 99, args.dtype)
    base().write_lcd(os.path.join(args.out, "generated.h5"), gen, ep[va])
    per_t = [summary(st, t) for t in range(len(gens))]
    info = lambda i: None if i is None else [{k: f[k] for k in ("best_epoch", "best_test_loss")} for f in i]  # noqa
    metrics = {"script": PROG, "data": st["source"], "toy": bool(st["toy"]), "components": len(gens),
               "sf_bin_edges_gev": SF_EDGES.tolist(), **{k: [s[k] for s in per_t] for k in per_t[0]},
               "betas": [float(b) for b in st["betas"]], "mixture_weights": [float(v) for v in st["mix_weights"][-1]],
               "ess": [float(v) for v in st["ess"]], "mixdisc_saturation": st["saturation"],
               "lambdas": [None if v is None else float(v) for v in st["lambdas"]],
               "mixdisc": [info(i) for i in st["mixdisc"]], "val_indices": [int(i) for i in va]}
    tmp = os.path.join(args.out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "metrics.json"))
    log(f"T=1..{len(gens)} | " + " | ".join(f"{k} " + " ".join(fmt(v) for v in metrics[k])
                                            for k in ("sf_max_dev", "edge_ratio", "ess_frac")))


def fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def benchmark(args):
    """One JSON line: ensemble generation (2 untrained components at the 2DGAN's --width) and MIXDISC training
    (a real step and a mixture step per batch, the mixture samples generated on the fly)."""
    m, device = base(), resolve_device(args.device)
    dtype = args.dtype if device.startswith("cuda") else "fp32"
    if args.dtype != dtype:
        print("--dtype bf16 is ignored on CPU: benchmarking fp32", file=sys.stderr)
    ga = gan_args(args, 0)
    gens = [m.Generator(ga.latent, ga.width, ga.xscale).to(device).eval() for _ in range(2)]
    D = m.Discriminator(ga.width).to(device).eval()
    opt = torch.optim.Adam(D.parameters(), lr=args.mixdisc_lr)
    B, b, rng = (4096 if device.startswith("cuda") else 64), args.mixdisc_batch, np.random.default_rng(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def mixdisc_step():
        e = rng.uniform(2, 500, b)
        x = torch.from_numpy(ensemble_sample(gens, [0.5, 0.5], e, device, rng, dtype)[0]).to(device) * ga.xscale
        for real in (True, False):
            loss = mixdisc_loss(D, x, torch.as_tensor(e, dtype=torch.float32, device=device), x.sum((1, 2, 3)) + 1,
                                real, ga)
            opt.zero_grad()
            loss.backward()
            opt.step()
    rates = []
    for fn, n in ((lambda: ensemble_sample(gens, [0.5, 0.5], rng.uniform(2, 500, B), device, rng, dtype), B),
                  (mixdisc_step, 2 * b)):
        fn()                                                           # warm-up, then 3 timed calls
        sync()
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        rates.append(round(3 * n / (time.perf_counter() - t0), 1))
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    print(json.dumps({"script": PROG, "device": name, "dtype": dtype, "width": ga.width, "components": 2,
                      "gen_batch": B, "gen_showers_per_s": rates[0], "train_batch": b,
                      "train_samples_per_s": rates[1], "train_what": "MIXDISC"}))


# ---------------------------------------------------------------- main


class Log:
    """Progress lines on stdout (rank 0), and into log.txt once the output folder exists (start())."""

    def __init__(self, rank=0):
        self.rank, self.path, self.buf = rank, None, []

    def __call__(self, msg):
        if self.rank == 0:
            print(msg, flush=True)
            self.buf.append(msg)
            self.start(self.path)

    def start(self, path):
        """From now on lines also go to `path` (the lines logged so far are written first)."""
        self.path = path if self.rank == 0 else None
        if self.path and self.buf:
            with open(self.path, "a") as f:
                f.write("\n".join(self.buf) + "\n")
            self.buf = []


def main(argv=None):
    args = get_args(argv)
    log = Log(int(os.environ.get("RANK", 0)))
    try:
        m = base()
        errors = (DataError, m.DataError)
    except ModuleNotFoundError as exc:
        print(f"{PROG}: error: 2dgan.py: cannot import the base learner ({exc})", file=sys.stderr)
        return 2
    try:
        if args.benchmark:
            return benchmark(args) or 0
        if args.generate is not None:
            device = resolve_device(args.device)
            if not args.out.endswith((".h5", ".hdf5")):
                raise DataError(f"{args.out}: --generate writes an LCD .h5 file")
            if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
                raise DataError(f"{args.out}: output folder does not exist")
            gens, mix_w, _ = load_ensemble(args.ckpt, device)
            ep = np.random.default_rng(args.seed).uniform(*args.energy_range, args.generate).astype(np.float32)
            t0 = time.time()
            gen, comp = ensemble_sample(gens, mix_w, ep, device, args.seed, args.dtype)
            m.write_lcd(args.out, gen, ep)
            per = np.bincount(comp, minlength=len(gens)).tolist()
            log(f"wrote {args.generate} showers from {len(gens)} components ({per} per component) to {args.out} "
                f"in {time.time() - t0:.1f} s")
            return 0
        ddp = "RANK" in os.environ
        if ddp:      # 2dgan.py's train() wraps its nets in DDP when a process group exists
            device = resolve_device(args.device)
            torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device))
        try:
            train(args, log)
        finally:
            if ddp:
                torch.distributed.destroy_process_group()
        return 0
    except errors as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
