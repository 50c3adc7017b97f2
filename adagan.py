"""AdaGAN ensemble of 2DGANs for the CLIC/LCD 25x25x25 ECAL (Jaruskova & Vallecorsa, CERN openlab;
AdaGAN: Tolstikhin et al., NIPS 2017).

T 2DGANs are trained in sequence; component 0 is a plain 2DGAN. Before each next one a mixture
discriminator (MIXDISC) tells real showers (1) from mixture samples (0); its output D_i on each real
training shower gives r_i = (1-D_i)/D_i, the AdaGAN weights w_i = (lambda* - (1-beta) r_i)_+ / (N beta)
put the mass where the mixture is thin, and the next 2DGAN draws its minibatches with probabilities w.
The mixture is P = sum_t beta_t P_t. The base learner is `2dgan.py` (imported with importlib); this
file adds only the ensemble logic.

Run commands:

    python adagan.py                                   # TOY LCD showers, T=10 components -> runs/adagan/
    python adagan.py --data 'EleEscan/*.h5' --components 10 --epochs 30 --device cuda
    python adagan.py --components 3 --epochs 1 --width 0.25 --toy-n 512 --out runs/ada_tiny
    python adagan.py --resume --components 5 --out runs/ada_tiny          # continue at the next component
    python adagan.py --generate 10000 --ckpt runs/adagan --energy 2:500 --out gen.h5
    python adagan.py --benchmark --width 0.25
    torchrun --nproc_per_node=4 adagan.py --data 'EleEscan/*.h5'          # DDP inside each 2DGAN's training

Outputs in --out DIR: ensemble.pt (components, betas, mixture and data weights, held-out split,
evaluation features), component_<t>/ckpt.pt (2dgan.py checkpoints), generated.h5 (LCD, held-out real Ep),
metrics.json, plots/{sampling_fraction,shower_shapes,data_weights}.png (curves for the ensembles of
1..T components; refreshed after each component that took over a minute, and at the end), log.txt.
--resume continues at the pending component: its data weights were saved before its training (not
recomputed), and its 2DGAN continues from component_<t>/ckpt.pt with 2dgan.py's --resume.
--resume --components T' > T adds components.

Choices and deviations from the original (reference.md) and why:
- MIXDISC architecture (not in the reference): three stride-2 4^3 3D convs (25^3 -> 12^3 -> 6^3 -> 3^3,
  LeakyReLU 0.2) and a 64-unit dense layer, 97k parameters at width 8, on log10(1 + E/1e-6)/7 (so the
  faint edge cells, 1e-6..1e-3 GeV, are visible) plus log(Ep/100) and log(50 Ecal/Ep) (the sampling
  fraction the paper's ensemble aims to improve). Real and mixture showers are paired at the same Ep,
  so Ep alone tells nothing. --mixdisc-n (default 10000) caps the set sizes; the reference uses all data.
- D is clipped to [1e-6, 1-1e-6] so r = (1-D)/D stays finite; the weights (clipped at 0) are
  renormalised to sum 1; with no lambda* or degenerate weights, uniform weights and a warning.
- Every stage is seeded from --seed and the component index alone, so a resumed run makes the same
  ensemble as an uninterrupted one.
- The held-out split (--val-frac) is taken here: the weights given to 2dgan.py's train() are 0 on it
  (arrays passed whole, not copied); component 0's are uniform over the training part (draws with
  replacement, as all). 2dgan.py holds out its own --val-frac (seed --seed + t) for its best epoch.
- Ensemble sampling draws Ep ~ U(--energy) as in the reference; generated.h5 at the end of training
  uses the held-out real Ep (the convention of all scripts here).
- The data are read into memory once (weighted draws need them; 2dgan.py's file streaming is not used).
- --benchmark measures ensemble generation and MIXDISC training; the base learner's is `2dgan.py --benchmark`.
"""
import argparse
import contextlib
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
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
PROG = "adagan.py"
SF_BINS = np.arange(0.0, 510.0, 10.0)       # 10 GeV bins of Ep for the sampling-fraction ratio
SF_CENTRES = 0.5 * (SF_BINS[1:] + SF_BINS[:-1])
EDGE_RING = 10                               # cells with Chebyshev distance >= 10 from the centre: outer ring
D_CLIP = 1e-6


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
    a("--toy-n", type=int, default=10000, help="number of toy showers when --data is not given")
    a("--out", default=None, help="output folder (training; default runs/adagan) or .h5 file (--generate)")
    a("--components", type=int, default=10, help="number T of 2DGANs in the ensemble (poster: 10)")
    a("--beta", choices=["uniform", "constant"], default="uniform",
      help="beta schedule of new components: uniform 1/(t+1) (uniform mixture) or constant --beta-const")
    a("--beta-const", type=float, default=0.5, help="beta of every new component when --beta constant")
    a("--val-frac", type=float, default=0.1, help="fraction of events held out for evaluation")
    a("--n-eval", type=int, default=2000, help="held-out events used for the plots and metrics")
    # the 2DGAN flags passed through (default: 2dgan.py's own default)
    a("--epochs", type=int, default=None, help="epochs of each 2DGAN (default: 2dgan.py's)")
    a("--batch-size", type=int, default=None, help="minibatch of each 2DGAN (default: 2dgan.py's)")
    a("--width", type=float, default=None, help="width multiplier of the 2DGAN nets (default: 2dgan.py's)")
    a("--gan-args", default="", help="more 2dgan.py flags for every component, e.g. '--lr-g 1e-4'")
    # MIXDISC
    a("--mixdisc-epochs", type=int, default=20, help="MIXDISC epochs; the best test-loss epoch is kept")
    a("--mixdisc-n", type=int, default=10000, help="real showers (and as many mixture samples) for MIXDISC")
    a("--mixdisc-width", type=int, default=8, help="channels of MIXDISC's first conv layer")
    a("--mixdisc-lr", type=float, default=1e-3, help="MIXDISC Adam learning rate")
    a("--mixdisc-batch", type=int, default=128, help="MIXDISC minibatch size")
    a("--mixdisc-test-frac", type=float, default=0.2, help="MIXDISC held-out fraction for the best epoch")
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
    checks = [(a.components >= 1, "--components must be >= 1"), (0 < a.beta_const <= 1, "--beta-const in (0, 1]"),
              (0 < a.val_frac < 1, "--val-frac must be in (0, 1)"), (a.toy_n >= 16, "--toy-n must be >= 16"),
              (0 < a.mixdisc_test_frac < 1, "--mixdisc-test-frac must be in (0, 1)"), (a.n_eval >= 1, "--n-eval >= 1"),
              (a.mixdisc_epochs >= 1 and a.mixdisc_n >= 8 and a.mixdisc_batch >= 1, "MIXDISC sizes must be positive"),
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
    if a.out is None:
        a.out = os.path.join("runs", "adagan")
    return a


def gan_args(args, t, resume=False):
    """2dgan.py's Namespace for component t, built with its own parser from our pass-through flags
    (resume: continue an interrupted component from its OUT/component_<t>/ckpt.pt)."""
    argv = ["--seed", str(args.seed + t), "--device", args.device, "--dtype", args.dtype]
    argv += ["--resume"] if resume else []
    for flag in ("epochs", "batch_size", "width", "ckpt_every", "log_every"):
        v = getattr(args, flag)
        if v is not None:
            argv += ["--" + flag.replace("_", "-"), str(v)]
    if args.compile:
        argv.append("--compile")
    return base().get_args(argv + shlex.split(args.gan_args))


def amp(device, dtype):
    """bf16 autocast on CUDA; nothing on CPU."""
    if dtype == "bf16" and device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name):
    """'cpu', 'cuda' or 'cuda:<LOCAL_RANK>' under torchrun (2dgan.py's rule)."""
    return str(base().resolve_device(name))


# ---------------------------------------------------------------- AdaGAN weights, betas, mixture


def lambda_star(r, beta):
    """lambda* of AdaGAN for ratios r (N,) and the new component's beta (reference.md): sort r ascending,
    S_k = cumulative sums, lambda_k = (beta N + (1-beta) S_k) / k; the first k with
    (1-beta) r_(k) <= lambda_k <= (1-beta) r_(k+1) (last k: lambda_k >= (1-beta) r_max).
    Returns (lambda*, k) or (None, None) when no k qualifies."""
    r = np.sort(np.asarray(r, np.float64))
    n = len(r)
    if n == 0 or not np.all(np.isfinite(r)):
        return None, None
    k = np.arange(1, n + 1)
    lam = (beta * n + (1 - beta) * np.cumsum(r)) / k
    lo = (1 - beta) * r
    hi = np.append((1 - beta) * r[1:], np.inf)
    tol = 1e-12 * np.maximum(1.0, np.abs(lam))
    ok = np.flatnonzero((lo <= lam + tol) & (lam <= hi + tol))
    if len(ok) == 0:
        return None, None
    return float(lam[ok[0]]), int(ok[0] + 1)


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
        msg = "AdaGAN weights: no valid lambda* (degenerate MIXDISC output); using uniform data weights"
        warnings.warn(msg)
        if log:
            log("warning: " + msg)
        return np.full(n, 1.0 / n), lam, True
    return w / w.sum(), lam, False


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


# ---------------------------------------------------------------- data


def load_data(args, log, rank=0):
    """(ecal, ep, source label, toy flag); toy LCD showers cached under data/ when --data is not given."""
    import common
    m = base()
    if args.data is not None:
        return (*m.load_lcd(args.data), args.data, False)
    path = common.toy_path("lcd", args.toy_n, args.seed)
    log(f"no --data: training on TOY lcd showers ({path})")
    if rank == 0 and not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        common.write_toy("lcd", path, args.toy_n, args.seed)
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


# ---------------------------------------------------------------- model: MIXDISC


class MixDisc(nn.Module):
    """Real (1) vs mixture (0) classifier on log-scaled 25^3 showers plus log(Ep/100) and log(50 Ecal/Ep)."""

    def __init__(self, width=8, hidden=64):
        super().__init__()
        c = width
        act = nn.LeakyReLU(0.2)
        self.conv = nn.Sequential(nn.Conv3d(1, c, 4, stride=2, padding=1), act,            # 25 -> 12
                                  nn.Conv3d(c, 2 * c, 4, stride=2, padding=1), act,        # 12 -> 6
                                  nn.Conv3d(2 * c, 4 * c, 4, stride=2, padding=1), act)    # 6 -> 3
        self.head = nn.Sequential(nn.Linear(4 * c * 27 + 2, hidden), act, nn.Dropout(0.2), nn.Linear(hidden, 1))

    def forward(self, ecal, ep):
        ecal = ecal.float().clamp_min(0)
        x = torch.log10(1 + ecal / 1e-6).unsqueeze(1) / 7.0
        sf = torch.log(50 * ecal.sum((1, 2, 3)) / ep + 1e-6)
        h = torch.cat([self.conv(x).flatten(1), torch.log(ep / 100)[:, None], sf[:, None]], 1)
        return self.head(h).squeeze(1)                                  # logit of "real"


# ---------------------------------------------------------------- train


def train_mixdisc(real, ep, fake, args, device, seed, log):
    """Train MIXDISC on real (label 1) vs fake (label 0) showers at the same Ep (1:1), keep the best test epoch.
    Returns (model in eval mode, info dict)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(real)
    x = torch.from_numpy(np.concatenate([real, fake])).to(device)
    e = torch.from_numpy(np.concatenate([ep, ep]).astype(np.float32)).to(device)
    y = torch.cat([torch.ones(n), torch.zeros(n)]).to(device)
    # split by pair so a real shower and its Ep-partner land on the same side
    pairs = rng.permutation(n)
    n_test = max(1, int(round(n * args.mixdisc_test_frac)))
    te = torch.from_numpy(np.concatenate([pairs[:n_test], pairs[:n_test] + n])).to(device)
    tr = torch.from_numpy(np.concatenate([pairs[n_test:], pairs[n_test:] + n])).to(device)
    net = MixDisc(args.mixdisc_width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.mixdisc_lr)
    g = torch.Generator(device="cpu").manual_seed(seed)
    best, best_state, best_epoch, hist = math.inf, None, -1, []
    for epoch in range(args.mixdisc_epochs):
        net.train()
        t0, seen, tot = time.time(), 0, 0.0
        order = tr[torch.randperm(len(tr), generator=g).to(device)]
        for s in range(0, len(order), args.mixdisc_batch):
            b = order[s:s + args.mixdisc_batch]
            with amp(device, args.dtype):
                loss = F.binary_cross_entropy_with_logits(net(x[b], e[b]).float(), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(b)
            tot += loss.item() * len(b)
        net.eval()
        with torch.no_grad(), amp(device, args.dtype):
            logit = torch.cat([net(x[te[s:s + 512]], e[te[s:s + 512]]).float() for s in range(0, len(te), 512)])
        test = F.binary_cross_entropy_with_logits(logit, y[te]).item()
        acc = ((logit > 0).float() == y[te]).float().mean().item()
        hist.append({"epoch": epoch + 1, "loss": tot / seen, "test_loss": test, "test_acc": acc})
        log(f"mixdisc epoch {epoch + 1}/{args.mixdisc_epochs} | loss {tot / seen:.4f} test {test:.4f} "
            f"acc {acc:.3f} | {seen / (time.time() - t0):.0f} samples/s")
        if test < best:
            best, best_epoch = test, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    net.eval()
    return net, {"best_epoch": best_epoch, "best_test_loss": best, "history": hist}


@torch.no_grad()
def mixdisc_predict(net, ecal, ep, idx, device, batch=512):
    """D = sigmoid(MIXDISC) on the numpy showers ecal[idx], batch by batch."""
    out = []
    for s in range(0, len(idx), batch):
        x = torch.from_numpy(np.ascontiguousarray(ecal[idx[s:s + batch]])).to(device)
        e = torch.from_numpy(np.asarray(ep[idx[s:s + batch]], np.float32)).to(device)
        out.append(torch.sigmoid(net(x, e).float()).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def tree_map(f, x):
    """f on every leaf of nested dicts/lists (tuples become lists): numpy <-> torch for ensemble.pt."""
    if isinstance(x, dict):
        return {k: tree_map(f, v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [tree_map(f, v) for v in x]
    return f(x)


def load_state(path):
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        return tree_map(lambda v: v.numpy() if isinstance(v, torch.Tensor) else v, st)
    except Exception as exc:  # noqa: BLE001  (corrupt or foreign file)
        raise DataError(f"{path}: not a readable adagan ensemble state ({type(exc).__name__})")


def train(args, log):
    """The component loop. Saves OUT/ensemble.pt before and after each component; returns the state dict."""
    m = base()
    ddp = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if ddp else 0
    device = resolve_device(args.device)
    dtype = args.dtype if device.startswith("cuda") else "fp32"
    state_path = os.path.join(args.out, "ensemble.pt")
    if args.resume and not os.path.exists(state_path):
        raise DataError(f"{state_path}: no ensemble state to resume from")
    ecal, ep, source, toy = load_data(args, log, rank)     # validated before anything is written
    old = load_state(state_path) if args.resume else None
    if old is not None and (old["n_events"] != len(ep) or old["source"] != source):
        raise DataError(f"{state_path}: was trained on {old['source']} ({old['n_events']} events), "
                        f"not {source} ({len(ep)} events)")
    n, n_val = len(ep), max(1, int(round(len(ep) * args.val_frac)))
    if n - n_val < 8:
        raise DataError(f"only {n} events: too few to train and hold out {n_val}")
    idx = np.random.default_rng(args.seed).permutation(n)
    tr, va = np.sort(idx[n_val:]), np.sort(idx[:n_val])
    for t in range(args.components):
        gan_args(args, t)                                   # bad --gan-args fail here, before any output
    if rank == 0:
        os.makedirs(os.path.join(args.out, "plots"), exist_ok=True)
        if hasattr(log, "start"):
            log.start(os.path.join(args.out, "log.txt"))
    ep_tr = ep[tr]
    ev = va[np.random.default_rng(args.seed + 7).permutation(len(va))[:args.n_eval]]
    st = old or {"version": 1, "source": source, "toy": toy, "n_events": len(ep), "train_idx": tr, "val_idx": va,
                 "eval_idx": ev, "components": [], "betas": [], "mix_weights": [], "data_weights": [], "lambdas": [],
                 "mixdisc": [], "best_epochs": [], "eval_real": features(ecal[ev], ep[ev]), "eval_comp": [],
                 "pending": None, "eval_ep": ep[ev].astype(np.float64), "train_ep": ep_tr.astype(np.float64)}
    st["args"] = {k: v for k, v in vars(args).items() if k != "energy_range"}
    gens = [m.load_checkpoint(os.path.join(args.out, c, "ckpt.pt"), device=device)[0] for c in st["components"]]
    if old is not None:
        log(f"resuming {state_path}: {len(gens)} component(s) done, continuing to {args.components}")

    def save():
        if rank == 0:
            torch.save(tree_map(lambda v: torch.from_numpy(np.ascontiguousarray(v))
                                if isinstance(v, np.ndarray) else v, st), state_path + ".tmp")
            os.replace(state_path + ".tmp", state_path)

    for t in range(len(gens), args.components):
        t0 = time.time()
        cdir = f"component_{t}"
        pend = st.get("pending")
        resume_gan = False
        if pend is not None and int(pend["t"]) == t:        # interrupted during this component
            beta, w = float(pend["beta"]), pend["weights"]
            resume_gan = os.path.exists(os.path.join(args.out, cdir, "ckpt.pt"))
            log(f"component {t}: reusing the saved data weights of the interrupted run"
                + (f"; resuming its 2DGAN from {cdir}/ckpt.pt" if resume_gan else ""))
        else:
            beta, w, lam, info = 1.0, None, None, None
            if t > 0:
                beta = beta_for(t, args.beta, args.beta_const)
                rng = np.random.default_rng(args.seed * 1000 + t)
                sub = tr[np.sort(rng.choice(len(tr), min(args.mixdisc_n, len(tr)), replace=False))]
                fake, _ = ensemble_sample(gens, st["mix_weights"][-1], ep[sub], device, rng, dtype)
                net, info = train_mixdisc(ecal[sub], ep[sub], fake, args, device, args.seed * 1000 + t, log)
                del fake
                d = mixdisc_predict(net, ecal, ep, tr, device)
                w, lam, fallback = adagan_weights(d, beta, log)
                if ddp:                                     # every rank uses rank 0's weights
                    wt = torch.from_numpy(w).to(device)
                    torch.distributed.broadcast(wt, 0)
                    w = wt.cpu().numpy()
                info.update(d_mean=float(d.mean()), fallback=fallback)
                log(f"component {t}: beta {beta:.4f} lambda* {lam:.4g} | MIXDISC best epoch {info['best_epoch']} "
                    f"test loss {info['best_test_loss']:.4f} | N x weight in [{w.min() * len(w):.3g}, "
                    f"{w.max() * len(w):.3g}], {np.mean(w > 0):.1%} of showers kept" if lam is not None else
                    f"component {t}: beta {beta:.4f} | uniform weights (fallback)")
            st["lambdas"].append(lam)
            st["mixdisc"].append(info)
            st["pending"] = {"t": t, "beta": beta, "weights": None if w is None else np.asarray(w, np.float64)}
            save()
        log(f"component {t + 1}/{args.components}: training a 2DGAN on {len(ep_tr)} showers "
            f"({'uniform' if w is None else 'AdaGAN-weighted'} minibatches), beta {beta:.4f}")
        if rank == 0:
            os.makedirs(os.path.join(args.out, cdir), exist_ok=True)
        w_all = np.zeros(len(ep))                           # the held-out events are never drawn
        w_all[tr] = 1.0 / len(tr) if w is None else w
        res = m.train(gan_args(args, t, resume_gan), ecal, ep, weights=w_all,
                      out_dir=os.path.join(args.out, cdir), log=log)
        G = res["generator"]
        gens.append(G)
        st["components"].append(cdir)
        st["betas"].append(beta)
        st["mix_weights"].append(mixture_weights(st["betas"]))
        st["data_weights"].append(np.full(len(ep_tr), 1.0 / len(ep_tr)) if w is None else np.asarray(w))
        st["best_epochs"].append(int(res.get("best_epoch", -1)))
        st["eval_comp"].append(features(m.generate(G, ep[ev], device=device, seed=args.seed + 100 + t,
                                                   dtype=dtype), ep[ev]))
        st["pending"] = None
        save()
        if rank == 0 and time.time() - t0 > 60 and t + 1 < args.components:
            write_plots(st, args.out)                       # long runs: refresh the plots as components finish
        log(f"component {t + 1}/{args.components} done in {time.time() - t0:.0f} s | mixture weights "
            f"{np.array2string(st['mix_weights'][-1], precision=3)} | sampling-fraction |true/gen - 1| "
            f"{sf_error(st, t) or float('nan'):.4f} | saved {state_path}")
        if ddp:
            torch.distributed.barrier()
    if rank == 0:
        write_plots(st, args.out)
        finish(st, gens, ecal, ep, args, device, log)
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
    gens = []
    for c in st["components"]:
        p = os.path.join(folder, c, "ckpt.pt")
        if not os.path.exists(p):
            raise DataError(f"{p}: component checkpoint missing")
        gens.append(base().load_checkpoint(p, device=device)[0])
    return gens, np.asarray(st["mix_weights"][-1]), st


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


def sf_ratio(st, t):
    """(bin centres, real/generated mean sampling fraction per 10 GeV bin) for the ensemble of t+1 components."""
    ep = st["eval_ep"]
    b = np.minimum(np.digitize(ep, SF_BINS) - 1, len(SF_BINS) - 2)     # Ep = 500 exactly: last bin
    fr, fg = st["eval_real"]["sf"], ensemble_features(st, t)["sf"]
    ratio = np.full(len(SF_BINS) - 1, np.nan)
    for i in range(len(ratio)):
        s = b == i
        if s.any() and fg[s].mean() > 0:
            ratio[i] = fr[s].mean() / fg[s].mean()
    return SF_CENTRES, ratio


def sf_error(st, t):
    """Mean |true/generated - 1| of the sampling fraction over the 10 GeV bins (None if no bin is usable)."""
    r = sf_ratio(st, t)[1]
    return float(np.mean(np.abs(r[np.isfinite(r)] - 1))) if np.isfinite(r).any() else None


def write_plots(st, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tag = " (TOY lcd)" if st["toy"] else ""
    T = len(st["components"])
    cmap = plt.get_cmap("viridis")
    col = [cmap(t / max(T - 1, 1)) for t in range(T)]

    def save(fig, name):
        path = os.path.join(out, "plots", name)
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=90)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for t in range(T):
        c, r = sf_ratio(st, t)
        ax[0].plot(c, r, "o-", ms=3, color=col[t], label=f"{t + 1} component(s)")
        ax[1].plot(t + 1, sf_error(st, t), "o", color=col[t])
    ax[0].axhline(1, color="k", lw=0.8)
    ax[0].set(xlabel="Ep [GeV]", ylabel="sampling fraction true / generated", title="per 10 GeV bin" + tag)
    ax[0].legend(fontsize=7)
    ax[1].set(xlabel="components T", ylabel="mean |ratio - 1| over bins", title="sampling-fraction error vs T" + tag)
    save(fig, "sampling_fraction.png")

    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    real = st["eval_real"]
    lo = min(np.log10(f["edge"] + 1e-9).min() for f in [real] + [ensemble_features(st, t) for t in range(T)])
    for t in [-1] + list(range(T)):
        f = real if t < 0 else ensemble_features(st, t)
        kw = dict(color="k", lw=2, label="real") if t < 0 else dict(color=col[t], label=f"T={t + 1}")
        ax[0].plot(np.log10(f["x"].mean(0) + 1e-12), **kw)
        ax[1].plot(np.log10(f["ring"].mean(0) + 1e-12), **kw)
        ax[2].hist(np.log10(f["edge"] + 1e-9), bins=40, range=(np.floor(lo), 0), histtype="step", density=True, **kw)
    ax[0].set(xlabel="x cell", ylabel="log10 mean energy [GeV]", title="transverse profile" + tag)
    ax[1].set(xlabel="ring (cells from centre; >=10 = outer edge)", ylabel="log10 mean energy [GeV]",
              title="energy per square ring" + tag)
    ax[1].axvspan(EDGE_RING - 0.5, 12.5, color="0.9")
    ax[2].set(xlabel="log10 fraction of Ecal in the outer ring", ylabel="density", title="edge deposits" + tag)
    ax[2].legend(fontsize=7)
    save(fig, "shower_shapes.png")

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ep_tr = st["train_ep"]
    b = np.digitize(ep_tr, SF_BINS) - 1
    for t in range(1, T):
        nw = np.asarray(st["data_weights"][t]) * len(ep_tr)
        ax[0].hist(np.log10(nw + 1e-6), bins=50, range=(-6, 2), histtype="step", color=col[t], label=f"component {t}")
        ax[1].plot(SF_CENTRES, [nw[b == i].mean() if (b == i).any() else np.nan for i in range(len(SF_CENTRES))],
                   "o-", ms=3, color=col[t])
    ax[0].set(xlabel="log10 (N x data weight); 0 = uniform", ylabel="training showers",
              title="AdaGAN data weights" + tag)
    if T > 1:
        ax[0].legend(fontsize=7)
    ax[1].axhline(1, color="k", lw=0.8)
    ax[1].set(xlabel="Ep [GeV]", ylabel="mean N x weight", title="where the weight goes" + tag)
    save(fig, "data_weights.png")


def finish(st, gens, ecal, ep, args, device, log):
    """generated.h5 on the held-out Ep, metrics.json."""
    m = base()
    va = st["val_idx"]
    gen, comp = ensemble_sample(gens, st["mix_weights"][-1], ep[va], device, args.seed + 99, args.dtype)
    m.write_lcd(os.path.join(args.out, "generated.h5"), gen, ep[va])
    metrics = {"script": PROG, "data": st["source"], "toy": bool(st["toy"]), "components": len(gens),
               "betas": [float(b) for b in st["betas"]], "mixture_weights": [float(v) for v in st["mix_weights"][-1]],
               "val_indices": [int(i) for i in va],
               "sf_ratio_mean_abs_dev": [sf_error(st, t) for t in range(len(gens))],
               "edge_fraction_mean": {"real": float(st["eval_real"]["edge"].mean()),
                                      "ensemble": [float(ensemble_features(st, t)["edge"].mean())
                                                   for t in range(len(gens))]},
               "lambdas": [None if v is None else float(v) for v in st["lambdas"]],
               "mixdisc": [None if i is None else {k: i[k] for k in ("best_epoch", "best_test_loss", "d_mean")}
                           for i in st["mixdisc"]]}
    tmp = os.path.join(args.out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(args.out, "metrics.json"))
    log(f"ensemble of {len(gens)}: sampling-fraction |true/gen - 1| per T = "
        + ", ".join("n/a" if v is None else f"{v:.3f}" for v in metrics["sf_ratio_mean_abs_dev"]))


def benchmark(args):
    """One JSON line: ensemble generation (2 untrained components at 2dgan.py's --width) and MIXDISC training."""
    m = base()
    device = resolve_device(args.device)
    dtype = args.dtype if device.startswith("cuda") else "fp32"
    if args.dtype != dtype:
        print("--dtype bf16 is ignored on CPU: benchmarking fp32", file=sys.stderr)
    ga = gan_args(args, 0)
    gens = [m.Generator(ga.latent, ga.width, ga.xscale).to(device).eval() for _ in range(2)]
    B = 4096 if device.startswith("cuda") else 64
    ep = np.random.default_rng(0).uniform(2, 500, B).astype(np.float32)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ensemble_sample(gens, [0.5, 0.5], ep[:8], device, 0, dtype)                  # warm-up
    sync()
    t0 = time.perf_counter()
    ensemble_sample(gens, [0.5, 0.5], ep, device, 1, dtype)
    sync()
    gen_rate = B / (time.perf_counter() - t0)
    b = args.mixdisc_batch
    net = MixDisc(args.mixdisc_width).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=args.mixdisc_lr)
    x = torch.rand(b, 25, 25, 25, device=device) * 1e-2
    e, y = torch.full((b,), 100.0, device=device), torch.ones(b, device=device)
    for i in range(4):                                                             # 1 warm-up + 3 timed steps
        if i == 1:
            sync()
            t0 = time.perf_counter()
        with amp(device, dtype):
            loss = F.binary_cross_entropy_with_logits(net(x, e).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sync()
    train_rate = 3 * b / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    print(json.dumps({"script": PROG, "device": name, "dtype": dtype, "width": ga.width, "components": 2,
                      "gen_batch": B, "gen_showers_per_s": round(gen_rate, 1), "train_batch": b,
                      "train_samples_per_s": round(train_rate, 1), "train_what": "MIXDISC"}))


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
            benchmark(args)
            return 0
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
            log(f"wrote {args.generate} showers from {len(gens)} components "
                f"({np.bincount(comp, minlength=len(gens)).tolist()} per component) to {args.out} "
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
