"""WGAN-GP for the ATLAS calorimeter cluster (P. Klein's ATLAS fast-simulation study) in PyTorch.

A conditional Wasserstein GAN with gradient penalty: a dense generator turns noise and the
standardised log energy into the fraction of the cluster energy in each cell (softmax, so the
energy is conserved by construction), and a dense critic scores (cells, energy).

    python wgan_gp.py                                  # no --data: TOY atlas89 showers, CPU, a few minutes
    python wgan_gp.py --data atlas.h5 --out runs/atlas # real 89/247-cell clusters, 1000 epochs (the original's)
    python wgan_gp.py --data dataset_1_photons_1.hdf5  # CaloChallenge dataset 1 photons (368 voxels)
    python wgan_gp.py --seeds 5                        # 5 seeds, their samples pooled for the plots
    python wgan_gp.py --resume --epochs 200            # continue runs/wgan_gp/ckpt.pt up to epoch 200
    python wgan_gp.py --generate 10000 --ckpt runs/wgan_gp/ckpt.pt --energy 10:100 --out gen.h5
    python wgan_gp.py --generate 5000 --ckpt runs/wgan_gp/ckpt.pt --energy-file real.h5 --out gen.h5
    python wgan_gp.py --benchmark                      # one JSON line: showers/s and training samples/s
    torchrun --nproc_per_node=4 wgan_gp.py --data atlas.h5

Formats (detected from the keys and the number of cells): ATLAS clusters `cells` (N,89|247) MeV,
`energy` (N,) MeV true photon energy, `cell_layer`/`cell_eta`/`cell_phi`; CaloChallenge ds1
photons `incident_energies` (N,1) MeV, `showers` (N,368) MeV. Noise cuts (common.geometry(...).
noise_cut) are applied to the training data and to the generated showers alike.

Deviations from the original (reference.md) and why:
- Gradient penalty per sample, mean_i (|grad_x D(x_i)|_2 - 1)^2: the original took one norm over the
  whole batch's gradient, a bug that makes the batch, not each sample, 1-Lipschitz.
- Default epochs: 1000 (the original's) with --data; 50 on the 20k toy showers made without --data
  (17.5k for training: 875k critic samples, about 2.7k generator steps), so that the README's
  `python wgan_gp.py` ends in a few minutes on a 2-core CPU. An epoch count, not a time limit, gives
  the same result on any machine; toy fidelity is that of a short run, well short of 1000 epochs.
- L1 penalty (--l1, off by default, 1e-5 in the original when used) acts on the generator's
  pre-softmax logits: on the softmax output it would be constant (the fractions sum to 1).
- LeakyReLU slope 0.2 (tf.nn.leaky_relu's default; the original's value is not recorded).
- CaloChallenge ds1: the condition is the incident energy and the visible total is not known in
  advance, so the generator has a second head for the standardised log(total / incident energy),
  which the critic sees beside the cell fractions: shape and total (their correlation included) are
  learned jointly by the adversarial loss, which a separate regression of the total would miss. For
  ATLAS the condition is the cluster total (as in the original); generated cells sum to it exactly
  before the noise cuts.
- Negative cells of ATLAS files are accepted (signed noise) and removed by the noise cut; negative
  CaloChallenge voxels and non-positive energies are bad input.
- --seeds K: seeds seed..seed+K-1 share the train/validation split (made with --seed), write
  ckpt_seed<s>.pt, and generated.h5 pools their samples (K showers per held-out event). --resume on
  one process continues bit for bit; under torchrun, ranks > 0 are reseeded on resume.
- generated.h5 of an ATLAS model: `energy` is the true energy of the held-out event whose cluster
  total conditioned it; with --generate --energy, the conditioning cluster total (the model does not
  know the true energy; file attribute energy_is says which).
"""
import argparse
import datetime
import json
import math
import os
import random
import sys
import time

import h5py
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import common

SCRIPT = "wgan_gp.py"


# ---------------------------------------------------------------- flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Conditional WGAN-GP for ATLAS calorimeter clusters "
                                "(and CaloChallenge dataset 1 photons).")
    a = p.add_argument
    a("--data", default=None, help="HDF5 file (ATLAS cells/energy or CaloChallenge showers/incident_energies); "
      "none: toy atlas89 showers made once under ./data/")
    a("--toy-n", type=int, default=20000, help="number of toy showers without --data (the study had ~40k)")
    a("--out", default=None, help="output folder (default runs/wgan_gp); with --generate: the output .h5 file")
    a("--epochs", type=int, default=None, help="training epochs (passes of the critic over the training set); "
      "default 1000 with --data (the original), 50 on toy data")
    a("--batch-size", type=int, default=64, help="minibatch size per process")
    a("--lr", type=float, default=5e-5, help="Adam learning rate of generator and critic")
    a("--betas", default="0.5,0.5", help="Adam betas b1,b2")
    a("--layers", type=int, default=3, help="dense hidden layers in generator and critic")
    a("--width", type=int, default=128, help="units per hidden layer")
    a("--latent", type=int, default=100, help="latent (noise) dimension")
    a("--n-critic", type=int, default=5, help="critic steps per generator step")
    a("--gp", type=float, default=10.0, help="gradient-penalty weight (per-sample penalty)")
    a("--l1", type=float, default=0.0, help="L1 penalty on the generator's logits (the original used 1e-5)")
    a("--val-frac", type=float, default=0.125, help="fraction of events held out for validation (35k of 40k)")
    a("--seed", type=int, default=0, help="random seed (also of the train/validation split)")
    a("--seeds", type=int, default=1, help="train K seeds (seed..seed+K-1) and pool their samples for the plots")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the generator's sampling in the critic steps "
      "(the critic's double backward cannot be compiled)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt (model, optimiser, epoch, RNG states)")
    a("--ckpt-every", type=int, default=10, help="save the checkpoint every N epochs (and at the end)")
    a("--log-every", type=int, default=1, help="print a progress line every N epochs")
    a("--no-plots", action="store_true", help="skip plots/ (faster; metrics.json and generated.h5 still written)")
    a("--generate", type=int, default=None, metavar="N", help="write N showers from --ckpt to --out FILE")
    a("--ckpt", default=None, help="checkpoint to generate from")
    a("--energy", default=None, help="with --generate: LO:HI GeV, log-uniform conditioning energy "
      "(ATLAS: cluster total; CaloChallenge: incident energy)")
    a("--energy-file", default=None, help="with --generate: take the conditions from this file (input format)")
    a("--benchmark", action="store_true", help="print generation showers/s and training samples/s as JSON")
    args = p.parse_args(argv)
    try:
        args.betas = tuple(float(b) for b in args.betas.split(","))
        assert len(args.betas) == 2 and all(0 <= b < 1 for b in args.betas)
    except (ValueError, AssertionError):
        p.error(f"--betas must be b1,b2 in [0,1), got {args.betas!r}")
    for name in ("toy_n", "batch_size", "layers", "width", "latent", "n_critic", "seeds", "ckpt_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.epochs is not None and args.epochs < 1 or args.lr <= 0 or args.gp < 0 or args.l1 < 0:
        p.error("--epochs must be >= 1, --lr > 0, --gp and --l1 >= 0")
    if not 0 < args.val_frac < 1:
        p.error("--val-frac must be in (0, 1)")
    if args.generate is not None:
        if args.generate < 1 or not args.ckpt or not args.out or (args.energy is None) == (args.energy_file is None):
            p.error("--generate N needs N >= 1, --ckpt, --out FILE and one of --energy LO:HI / --energy-file")
        if args.energy is not None:
            try:
                lo, hi = (float(v) for v in args.energy.split(":"))
                assert 0 < lo <= hi
            except (ValueError, AssertionError):
                p.error(f"--energy must be LO:HI GeV with 0 < LO <= HI, got {args.energy!r}")
            args.energy = (lo, hi)
    return args


# ---------------------------------------------------------------- data


class DataError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def _array(f, path, key):
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{path}: missing key '{key}'")
    return f[key][()]


def read_showers(path):
    """Read and validate a file of either format -> dict(fmt, geom, cells (N,C) MeV, energy (N,) MeV, toy)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file")
    with f:
        if "cells" in f or "energy" in f:
            fmt, ck, ek = "atlas", "cells", "energy"
        elif "showers" in f or "incident_energies" in f:
            fmt, ck, ek = "calochallenge", "showers", "incident_energies"
        else:
            raise DataError(f"{path}: missing key 'cells' (ATLAS) or 'showers' (CaloChallenge)")
        cells, energy = _array(f, path, ck), _array(f, path, ek)
        per_cell = {k: f[k][()] for k in ("cell_layer", "cell_eta", "cell_phi") if k in f}
        toy = bool(f.attrs.get("toy", False))
    if cells.ndim != 2 or cells.shape[0] == 0:
        raise DataError(f"{path}: '{ck}' must be (N, n_cells) with N > 0, got shape {cells.shape}")
    n, c = cells.shape
    allowed = {"atlas": (89, 247), "calochallenge": (368,)}[fmt]
    if c not in allowed:
        raise DataError(f"{path}: '{ck}' has {c} cells, expected {' or '.join(map(str, allowed))}")
    if energy.shape not in ((n,), (n, 1)):
        raise DataError(f"{path}: '{ek}' has shape {energy.shape}, expected ({n},) to match {n} events of '{ck}'")
    for key, arr in ((ck, cells), (ek, energy)):
        if not np.all(np.isfinite(arr)):
            raise DataError(f"{path}: '{key}' contains NaN or inf")
    if np.any(energy <= 0):
        raise DataError(f"{path}: '{ek}' has non-positive energies")
    if fmt == "calochallenge" and np.any(cells < 0):
        raise DataError(f"{path}: '{ck}' has negative energies")
    geom = common.geometry({89: "atlas89", 247: "atlas247", 368: "calochallenge1"}[c])
    for key, arr in per_cell.items():
        if arr.shape != (c,):
            raise DataError(f"{path}: '{key}' has shape {arr.shape}, expected ({c},)")
    if "cell_layer" in per_cell and not np.array_equal(per_cell["cell_layer"], geom.layer):
        raise DataError(f"{path}: 'cell_layer' differs from the {geom.name} cell order of common.py")
    return dict(fmt=fmt, geom=geom, cells=cells.astype(np.float32), energy=energy.reshape(n).astype(np.float64),
                toy=toy, path=path)


def noise_cut(cells, geom):
    """Cells below the geometry's noise cut -> 0 (training data and generated showers alike)."""
    return np.where(cells >= geom.noise_cut, cells, 0.0).astype(np.float32)


def prepare(d, seed, val_frac):
    """Noise cuts, fractions of the cluster total, conditions, seeded train/validation split."""
    cells = noise_cut(d["cells"], d["geom"])
    total = cells.sum(1, dtype=np.float64)
    keep = np.flatnonzero(total > 0)
    if len(keep) < 2:
        raise DataError(f"{d['path']}: fewer than 2 showers with energy left after the noise cuts")
    perm = np.random.default_rng(seed).permutation(keep)
    n_val = max(1, int(round(val_frac * len(keep))))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train) == 0:
        raise DataError(f"{d['path']}: no training events left after the validation split")
    atlas = d["fmt"] == "atlas"
    cond_e = total if atlas else d["energy"]            # ATLAS: cluster total; ds1: incident energy
    log_e = np.log(cond_e)
    norm = {"mu_e": float(log_e[train].mean()), "sd_e": float(log_e[train].std() + 1e-6)}
    frac = cells / np.where(total > 0, total, 1.0)[:, None].astype(np.float32)
    x = [frac]
    if not atlas:                                       # second head: log(total / incident)
        log_r = np.log(np.where(total > 0, total, 1.0) / d["energy"])
        norm.update(mu_r=float(log_r[train].mean()), sd_r=float(log_r[train].std() + 1e-6))
        x.append(((log_r - norm["mu_r"]) / norm["sd_r"])[:, None].astype(np.float32))
    x = np.concatenate(x, 1)
    c = ((log_e - norm["mu_e"]) / norm["sd_e"])[:, None].astype(np.float32)
    return dict(x=x, c=c, cells=cells, total=total, cond_e=cond_e, train=train, val=val, norm=norm,
                n_dropped=int(len(total) - len(keep)))


def write_h5(path, fmt, geom, cells, energy, attrs):
    """Showers in the input's format, written to a temporary name and renamed into place."""
    tmp = path + f".tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            if fmt == "atlas":
                f["cells"], f["energy"] = cells.astype(np.float32), energy.astype(np.float32)
                f["cell_layer"], f["cell_eta"], f["cell_phi"] = (geom.layer.astype(np.int32),
                                                                 geom.x.astype(np.float32), geom.y.astype(np.float32))
            else:
                f["showers"], f["incident_energies"] = cells.astype(np.float32), energy.astype(np.float32)[:, None]
            for k, v in attrs.items():
                f.attrs[k] = v
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------- model


def mlp(n_in, width, layers, slope):
    mods = []
    for i in range(layers):
        mods += [nn.Linear(n_in if i == 0 else width, width), nn.LeakyReLU(slope)]
    return nn.Sequential(*mods)


class Generator(nn.Module):
    """(noise, condition) -> dense layers -> softmax over cells (+ optional head for log total/E)."""

    def __init__(self, n_cells, latent=100, width=128, layers=3, n_cond=1, ratio_head=False, slope=0.2):
        super().__init__()
        self.body = mlp(latent + n_cond, width, layers, slope)
        self.cells = nn.Linear(width, n_cells)
        self.ratio = nn.Linear(width, 1) if ratio_head else None

    def forward(self, z, c):
        h = self.body(torch.cat([z, c], 1))
        logits = self.cells(h).float()
        x = torch.softmax(logits, 1)
        if self.ratio is not None:
            x = torch.cat([x, self.ratio(h).float()], 1)
        return x, logits


class Critic(nn.Module):
    """(cell fractions [+ log total/E], condition) -> dense layers -> linear score."""

    def __init__(self, n_in, width=128, layers=3, n_cond=1, slope=0.2):
        super().__init__()
        self.net = nn.Sequential(mlp(n_in + n_cond, width, layers, slope), nn.Linear(width, 1))

    def forward(self, x, c):
        return self.net(torch.cat([x, c], 1)).float()


def build(args, n_x, ratio_head):
    return (Generator(n_x - int(ratio_head), args["latent"], args["width"], args["layers"], ratio_head=ratio_head),
            Critic(n_x, args["width"], args["layers"]))


# ---------------------------------------------------------------- train


def rng_state():
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def critic_loss(critic, real, fake, c, gp_weight):
    """Wasserstein critic loss + per-sample gradient penalty, in ONE forward of the critic
    (so that a DDP-wrapped critic sees one forward and one backward per step)."""
    eps = torch.rand(real.shape[0], 1, device=real.device)
    interp = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(torch.cat([real, fake, interp]), c.repeat(3, 1))
    d_real, d_fake, d_int = out.split(real.shape[0])
    grad, = torch.autograd.grad(d_int.sum(), interp, create_graph=True)
    gp = ((grad.norm(2, dim=1) - 1) ** 2).mean()          # per sample, then averaged
    wdist = d_real.mean() - d_fake.mean()
    return -wdist + gp_weight * gp, wdist


def train_step(nets, opts, real, cond, args, amp, g_step):
    """One critic step, then a generator step if g_step -> (loss_d, wdist, loss_g or None).
    nets: (generator, critic, generator for sampling, unwrapped critic); DDP-wrapped or not."""
    gen, crit, g_fast, d_raw = nets
    opt_g, opt_d = opts
    z = lambda: torch.randn(len(real), args.latent, device=real.device)  # noqa: E731
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
        fake = g_fast(z(), cond)[0].float()
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        loss_d, wdist = critic_loss(crit, real, fake, cond, args.gp)
    opt_d.zero_grad(set_to_none=True)
    loss_d.backward()
    opt_d.step()
    loss_g = None
    if g_step:
        d_raw.requires_grad_(False)     # the unwrapped critic: its DDP wrapper sees one forward per step
        with torch.autocast("cuda", torch.bfloat16, enabled=amp):
            fake, logits = gen(z(), cond)
            loss_g = -d_raw(fake, cond).mean()
            if args.l1:
                loss_g = loss_g + args.l1 * logits.abs().sum(1).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        d_raw.requires_grad_(True)
    return loss_d, wdist, loss_g


def train(args, run_seed, data, device, ckpt_path, log, amp, world=(0, 1)):
    """Train one seed; returns (unwrapped generator, history). Resumes from ckpt_path if asked."""
    rank, size = world
    x = torch.as_tensor(data["x"], device=device)                  # whole dataset on the device
    c = torch.as_tensor(data["c"], device=device)
    train_idx = torch.as_tensor(data["train"], device=device)
    hp = {k: getattr(args, k) for k in ("latent", "width", "layers")}
    seed_all(run_seed)
    gen, crit = (m.to(device) for m in build(hp, x.shape[1], data["ratio_head"]))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=args.betas) for m in (gen, crit))
    start, step, history = 0, 0, []
    if args.resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        try:
            gen.load_state_dict(ck["model"]["generator"])
            crit.load_state_dict(ck["model"]["critic"])
        except RuntimeError:
            raise DataError(f"{ckpt_path}: checkpoint's model shape differs from the flags (--layers/--width/--latent)")
        opt_g.load_state_dict(ck["optim"]["generator"])
        opt_d.load_state_dict(ck["optim"]["critic"])
        start, step, history = ck["epoch"], ck["step"], ck["history"]
        set_rng_state(ck["rng"])
        if rank:
            seed_all(run_seed + 1000 * rank + start)
        log(f"seed {run_seed}: resumed from {ckpt_path} at epoch {start}, step {step}")
    elif rank:
        seed_all(run_seed + 1000 * rank)                           # each rank its own minibatches
    g_raw, d_raw = gen, crit
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        gen, crit = DDP(gen, device_ids=ids), DDP(crit, device_ids=ids)
    g_fast = torch.compile(g_raw) if args.compile else g_raw
    n_batches = max(1, len(train_idx) // (args.batch_size * size))
    bs = min(args.batch_size, len(train_idx))
    t0, seen = time.time(), 0
    for epoch in range(start, args.epochs):
        perm = train_idx[torch.randperm(len(train_idx), device=device)]
        sums = np.zeros(3)
        for b in range(n_batches):
            idx = perm[(b * bs) % len(perm):][:bs]
            if len(idx) < bs:
                idx = perm[:bs]
            loss_d, wdist, loss_g = train_step((gen, crit, g_fast, d_raw), (opt_g, opt_d), x[idx], c[idx], args,
                                               amp, g_step=(b + 1) % args.n_critic == 0)
            seen += bs
            sums[:2] += loss_d.item(), wdist.item()
            if loss_g is not None:
                step += 1
                sums[2] += loss_g.item()
        n_g = max(1, n_batches // args.n_critic)
        history.append({"epoch": epoch + 1, "loss_d": sums[0] / n_batches, "wdist": sums[1] / n_batches,
                        "loss_g": sums[2] / n_g})
        done = epoch + 1
        if rank == 0 and (done % args.log_every == 0 or done == args.epochs):
            el = time.time() - t0
            rate = seen * size / max(el, 1e-9)
            eta = el / (done - start) * (args.epochs - done)
            h = history[-1]
            log(f"epoch {done}/{args.epochs} | step {step} | loss_d {h['loss_d']:.4f} loss_g {h['loss_g']:.4f} "
                f"W {h['wdist']:.4f} | {rate:.0f} samples/s | ETA {datetime.timedelta(seconds=int(eta))}"
                + (f" | seed {run_seed}" if args.seeds > 1 else ""))
        if rank == 0 and (done % args.ckpt_every == 0 or done == args.epochs):
            torch.save({
                "model": {"generator": g_raw.state_dict(), "critic": d_raw.state_dict()},
                "optim": {"generator": opt_g.state_dict(), "critic": opt_d.state_dict()},
                "epoch": done, "step": step, "args": vars(args), "rng": rng_state(), "history": history,
                "seed": run_seed, "norm": data["norm"], "geometry": data["geom"].name, "format": data["fmt"],
                "toy": data["toy"], "hp": hp}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    return g_raw, history


# ---------------------------------------------------------------- generate


@torch.no_grad()
def sample(gen, cond_e, norm, latent, device, batch=10000):
    """Generated fractions (and total / condition ratio) for conditioning energies cond_e (MeV) -> cells MeV."""
    gen.eval()
    out = []
    for s in range(0, len(cond_e), batch):
        e = torch.as_tensor(cond_e[s:s + batch], dtype=torch.float32, device=device)
        c = ((torch.log(e) - norm["mu_e"]) / norm["sd_e"])[:, None]
        x = gen(torch.randn(len(e), latent, device=device), c)[0].double()
        if "mu_r" in norm:                                   # ds1: total = E_inc * exp(log ratio)
            total = e.double() * torch.exp(norm["mu_r"] + norm["sd_r"] * x[:, -1])
            x = x[:, :-1]
        else:                                                # ATLAS: the condition IS the total
            total = e.double()
        out.append((x * total[:, None]).float().cpu().numpy())
    gen.train()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def load_generator(path, device):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such checkpoint")
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        fmt, geom = ck["format"], common.geometry(ck["geometry"])
        gen, _ = build(ck["hp"], geom.n_cells + int(fmt != "atlas"), fmt != "atlas")
        gen.load_state_dict(ck["model"]["generator"])
    except (KeyError, RuntimeError, TypeError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a wgan_gp.py checkpoint ({type(e).__name__})")
    return gen.to(device), ck, fmt, geom


def generate_main(args, device):
    gen, ck, fmt, geom = load_generator(args.ckpt, device)
    if args.energy_file:
        d = read_showers(args.energy_file)
        if d["fmt"] != fmt or d["geom"].name != geom.name:
            raise DataError(f"{args.energy_file}: {d['geom'].name} showers, the checkpoint is {geom.name}")
        total = noise_cut(d["cells"], geom).sum(1, dtype=np.float64)
        ok = np.flatnonzero(total > 0) if fmt == "atlas" else np.arange(len(total))
        if len(ok) == 0:
            raise DataError(f"{args.energy_file}: no shower with energy after the noise cuts")
        pick = np.resize(ok, args.generate)                          # in order, cycled if N > events
        cond_e = total[pick] if fmt == "atlas" else d["energy"][pick]
        true_e = d["energy"][pick]
        energy_is = "true energy (from --energy-file)" if fmt == "atlas" else "incident energy"
    else:
        lo, hi = args.energy
        cond_e = 1000.0 * np.exp(np.random.default_rng(args.seed).uniform(np.log(lo), np.log(hi), args.generate))
        true_e = cond_e
        energy_is = "conditioning cluster total" if fmt == "atlas" else "incident energy"
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise DataError(f"{args.out}: folder does not exist")
    torch.manual_seed(args.seed)
    cells = noise_cut(sample(gen, cond_e, ck["norm"], ck["hp"]["latent"], device), geom)
    write_h5(args.out, fmt, geom, cells, true_e, {"generated": True, "model": "wgan_gp", "ckpt": args.ckpt,
                                                  "toy": bool(ck["toy"]), "energy_is": energy_is})
    print(f"wrote {len(cells)} generated {geom.name} showers to {args.out}")
    return 0


def benchmark(args, device, amp):
    geom = common.geometry("atlas89")
    hp = {"latent": args.latent, "width": args.width, "layers": args.layers}
    gen, crit = (m.to(device) for m in build(hp, geom.n_cells, False))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=args.lr, betas=args.betas) for m in (gen, crit))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    norm = {"mu_e": math.log(5e4), "sd_e": 1.0}
    gb, tb = 10000, args.batch_size
    e = np.full(gb, 5e4)
    real = torch.softmax(torch.randn(4096, geom.n_cells, device=device), 1)
    cond = torch.randn(4096, 1, device=device)

    def gen_run(reps):
        for _ in range(reps):
            sample(gen, e, norm, args.latent, device, batch=gb)

    def train_run(reps):
        for i in range(reps):
            idx = torch.randint(0, 4096, (tb,), device=device)
            train_step((gen, crit, gen, crit), (opt_g, opt_d), real[idx], cond[idx], args, amp,
                       g_step=(i + 1) % args.n_critic == 0)[0].item()
    rates = []
    for fn, chunk, per in ((gen_run, 1, gb), (train_run, 50, tb)):
        fn(chunk)                                                      # warm-up
        sync()
        t, n = time.perf_counter(), 0
        while n < 3 * chunk or time.perf_counter() - t < 2.0:          # at least 2 s of work
            fn(chunk)
            n += chunk
        sync()
        rates.append(n * per / (time.perf_counter() - t))
    print(json.dumps({"script": SCRIPT, "device": str(device), "dtype": args.dtype if amp else "fp32",
                      "gen_batch": gb, "gen_showers_per_s": round(rates[0]), "train_batch": tb,
                      "train_samples_per_s": round(rates[1])}))
    return 0


# ---------------------------------------------------------------- evaluation and plots


def evaluate(real, fake, geom, toy):
    """Metrics of real vs generated cells (MeV) with common.py: correlation MSE, separation powers."""
    sp = lambda a, b: common.separation_power(a, b, bins=50)  # noqa: E731
    names = geom.layer_names
    fr, ff = common.fraction_per_layer(real, geom), common.fraction_per_layer(fake, geom)
    er, ef = common.energy_per_layer(real, geom), common.energy_per_layer(fake, geom)
    cwr, cwf = common.centre_width_per_layer(real, geom), common.centre_width_per_layer(fake, geom)
    m = {"toy": toy, "correlation_mse": common.correlation_mse(real, fake),
         "separation_power": {
             "fraction_per_layer": {n: sp(fr[:, i], ff[:, i]) for i, n in enumerate(names)},
             "energy_per_layer": {n: sp(er[:, i], ef[:, i]) for i, n in enumerate(names)},
             "total_energy": sp(real.sum(1), fake.sum(1))}}
    for k in cwr:
        m["separation_power"][k] = {n: sp(cwr[k][:, i], cwf[k][:, i]) for i, n in enumerate(names)}
    if geom.name.startswith("atlas"):
        m["separation_power"]["middle_core_fraction"] = sp(common.middle_core_fraction(real, geom),
                                                           common.middle_core_fraction(fake, geom))
    m["mean_fraction_per_layer"] = {"real": dict(zip(names, fr.mean(0).tolist())),
                                    "generated": dict(zip(names, ff.mean(0).tolist()))}
    return m


def layer_image(geom, lay, vec):
    """(image, xlabel, ylabel) of one layer's cells: ATLAS eta x phi grid, ds1 alpha x r bins."""
    idx = np.flatnonzero(geom.layer == lay)
    if geom.name == "calochallenge1":
        n_alpha = list(common.CC1_LAYERS.values())[lay][1]
        return vec[..., idx].reshape(vec.shape[:-1] + (n_alpha, -1)), "r bin", "alpha bin"
    order = np.lexsort((geom.y[idx], geom.x[idx]))                    # eta-major grid
    n_eta = len(np.unique(geom.x[idx]))
    img = vec[..., idx[order]].reshape(vec.shape[:-1] + (n_eta, -1))
    return np.swapaxes(img, -1, -2), "eta cell", "phi cell"


def plots(folder, real, fake, geom, toy, metrics, histories):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    tag = "TOY " if toy else ""
    names, L = geom.layer_names, geom.n_layers
    os.makedirs(folder, exist_ok=True)

    def save(fig, name, adjust=True, **kw):
        if adjust:                      # fixed margins: layout engines cost seconds per figure on a CPU
            fig.subplots_adjust(**{"left": 0.07, "right": 0.97, "bottom": 0.16, "top": 0.82, "wspace": 0.3,
                                   "hspace": 0.45, **kw})
        fig.savefig(os.path.join(folder, name + ".tmp.png"), dpi=90)
        plt.close(fig)
        os.replace(os.path.join(folder, name + ".tmp.png"), os.path.join(folder, name + ".png"))

    def finish(ax, name, title, xlabel, ylabel, legend_size, left=0.16):     # the one-axes figures
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.legend(fontsize=legend_size)
        ax.set_title(f"{tag}{geom.name}: {title}", fontsize=10)
        save(ax.figure, name, left=left, bottom=0.15, top=0.88)

    def hists(name, title, a, b, xlabel, logx=False, sps=None):
        fig, axs = plt.subplots(1, a.shape[1], figsize=(3.2 * a.shape[1], 3), squeeze=False)
        for i, ax in enumerate(axs[0]):
            both = np.r_[a[:, i], b[:, i]]
            if logx:
                pos = both[both > 0]
                lo, hi = (pos.min(), pos.max()) if len(pos) else (1, 10)
                edges = np.geomspace(lo, hi * 1.0001, 41)
            else:
                lo, hi = np.percentile(both, [0.1, 99.9])
                edges = np.linspace(lo, hi + 1e-12, 41)
            ax.hist(a[:, i], edges, histtype="stepfilled", alpha=0.4, color="grey", label="real", density=True)
            ax.hist(b[:, i], edges, histtype="step", color="C3", lw=1.5, label="generated", density=True)
            ax.set_xscale("log" if logx else "linear")
            ax.set_title(f"{names[i]}" + (f"  SP {sps[names[i]]:.3f}" if sps else ""), fontsize=9)
            ax.set_xlabel(xlabel, fontsize=8)
        axs[0][0].legend(fontsize=7)
        fig.suptitle(f"{tag}{geom.name}: {title}", fontsize=10)
        save(fig, name)

    spd = metrics["separation_power"]
    for name, title, fn, xlabel, logx in (
            ("energy_per_layer", "energy per layer", common.energy_per_layer, "MeV", True),
            ("fraction_per_layer", "fraction of the cluster energy per layer", common.fraction_per_layer,
             "fraction", False)):
        hists(name, title, fn(real, geom), fn(fake, geom), xlabel, logx, spd[name])
    cwr, cwf = common.centre_width_per_layer(real, geom), common.centre_width_per_layer(fake, geom)
    ax_names = ("eta", "phi") if geom.xy_unit == "eta/phi" else ("x [mm]", "y [mm]")
    for k in cwr:
        what = ("energy-weighted centre in " if k.startswith("centre") else "width in ") + ax_names[k[-1] == "y"]
        hists(k + "_per_layer", what + " per layer", cwr[k], cwf[k], ax_names[k[-1] == "y"], False, spd[k])
    if geom.name.startswith("atlas"):
        hists("middle_core_fraction", "Middle-layer energy in the central 3x3 cells / Middle energy",
              common.middle_core_fraction(real, geom)[:, None], common.middle_core_fraction(fake, geom)[:, None],
              "fraction", False, None)
        mid = names.index("Middle")                                     # width in phi of Middle vs energy
        e_r = real.sum(1) / 1000.0
        e_f = np.tile(e_r, len(fake) // len(real))                       # fakes share the real conditions
        edges = np.geomspace(e_r.min(), e_r.max() * 1.0001, 11)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for e, w, lab, col in ((e_r, cwr["width_y"][:, mid], "real", "grey"),
                               (e_f, cwf["width_y"][:, mid], "generated", "C3")):
            mean, std, cnt = common.binned_stat(e, w, edges)
            ax.errorbar(np.sqrt(edges[1:] * edges[:-1]), mean, std / np.sqrt(np.maximum(cnt, 1)), fmt="o-",
                        color=col, label=lab, ms=3)
        ax.set_xscale("log")
        finish(ax, "middle_width_vs_energy", "Middle-layer width in phi vs energy", "cluster energy [GeV]",
               "Middle width in phi", 8)
    # mean shower per layer
    fig, axs = plt.subplots(2, L, figsize=(3.4 * L, 5.5), squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.1, top=0.88, wspace=0.45, hspace=0.45)
    for lay in range(L):
        ims = [layer_image(geom, lay, v.mean(0))[0] for v in (real, fake)]
        xl, yl = layer_image(geom, lay, real[:1])[1:]
        pos = np.concatenate([i.ravel() for i in ims])
        pos = pos[pos > 0]
        nrm = LogNorm(pos.min(), pos.max()) if len(pos) and pos.max() > pos.min() else None
        for ax, im, who in zip(axs[:, lay], ims, ("real", "generated")):
            h = ax.imshow(np.where(im > 0, im, np.nan), norm=nrm, aspect="auto", origin="lower")
            ax.set_title(f"{who} {names[lay]}", fontsize=9)
            ax.set_xlabel(xl, fontsize=8)
            ax.set_ylabel(yl, fontsize=8)
        fig.colorbar(h, ax=axs[:, lay].tolist(), label="mean MeV")
    fig.suptitle(f"{tag}{geom.name}: mean shower per layer", fontsize=10)
    save(fig, "mean_shower", adjust=False)
    # correlation matrices
    cr, cf = common.correlation_matrix(real), common.correlation_matrix(fake)
    fig, axs = plt.subplots(1, 3, figsize=(14, 4.3))
    for ax, m, t in zip(axs, (cr, cf, cf - cr), ("real", "generated", "generated - real")):
        fig.colorbar(ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r"), ax=ax)
        ax.set_title(t, fontsize=9)
    fig.suptitle(f"{tag}{geom.name}: Pearson correlation of cells, MSE {metrics['correlation_mse']:.4f}", fontsize=10)
    save(fig, "correlation", left=0.03, bottom=0.06, top=0.85, wspace=0.15)
    # variance per cell
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.semilogy(common.cell_variance(real), ".", color="grey", label="real")
    ax.semilogy(common.cell_variance(fake), ".", color="C3", ms=3, label="generated")
    for b in np.flatnonzero(np.diff(geom.layer)) + 0.5:
        ax.axvline(b, color="k", lw=0.5)
    finish(ax, "cell_variance", "variance per cell", "cell index (file order)", "variance [MeV^2]", 8, left=0.08)
    # nearest neighbours (memorisation check) in the space of fractions of the cluster total
    nr, nf = (v / np.maximum(v.sum(1, keepdims=True), 1e-12) for v in (real, fake))
    q = np.argsort(real.sum(1))[np.linspace(0, len(real) - 1, 3).astype(int)]
    k = min(5, len(nf))
    idx, dist = common.nearest_neighbours(nr[q], nf, k=k)
    lay = int(np.argmax(common.fraction_per_layer(real, geom).mean(0)))
    fig, axs = plt.subplots(len(q), k + 1, figsize=(2.2 * (k + 1), 2.2 * len(q)), squeeze=False)
    for r, qi in enumerate(q):
        for j, ax in enumerate(axs[r]):
            ax.imshow(layer_image(geom, lay, nr[qi] if j == 0 else nf[idx[r, j - 1]])[0], aspect="auto", origin="lower")
            ax.set(xticks=[], yticks=[])
            ax.set_title("real" if j == 0 else f"NN{j} d={dist[r, j - 1]:.3f}", fontsize=8)
    fig.suptitle(f"{tag}{geom.name}: 5 nearest generated showers (layer {names[lay]}, fractions)", fontsize=10)
    save(fig, "nearest_neighbours", left=0.02, right=0.98, bottom=0.03, top=0.85)
    # training curves
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for s, h in histories.items():
        ax.plot([e["epoch"] for e in h], [e["wdist"] for e in h], label=f"seed {s}")
    finish(ax, "training", "training", "epoch", "critic's Wasserstein estimate", 7)


# ---------------------------------------------------------------- main


def run(args, device, amp, world, log):
    rank, size = world
    no_data = args.data is None
    if no_data:
        path = common.toy_path("atlas89", args.toy_n, 0)
        if rank == 0:
            log(f"no --data: training on TOY atlas89 showers ({path})")
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                common.write_toy("atlas89", path, args.toy_n, 0)
        if size > 1:
            dist.barrier()
        args.data = path
    d = read_showers(args.data)
    data = prepare(d, args.seed, args.val_frac)
    data.update(geom=d["geom"], fmt=d["fmt"], toy=d["toy"] or no_data,
                ratio_head=d["fmt"] != "atlas")
    if args.epochs is None:
        args.epochs = 50 if no_data else 1000
    ckpts = {s: os.path.join(args.out, "ckpt.pt" if args.seeds == 1 else f"ckpt_seed{s}.pt")
             for s in range(args.seed, args.seed + args.seeds)}
    if args.resume and not any(os.path.exists(p) for p in ckpts.values()):
        raise DataError(f"{next(iter(ckpts.values()))}: no checkpoint to resume from")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        log(f"{d['geom'].name} ({d['fmt']}): {len(data['train'])} train, {len(data['val'])} validation events"
            + (f", {data['n_dropped']} empty after the noise cuts dropped" if data["n_dropped"] else "")
            + f"; {args.epochs} epochs, device {device}")
    histories, fakes = {}, []
    val = data["val"]
    for s, path in ckpts.items():
        gen, histories[s] = train(args, s, data, device, path, log, amp, world)
        if rank == 0:
            torch.manual_seed(10_000 + s)
            fakes.append(noise_cut(sample(gen, data["cond_e"][val], data["norm"], args.latent, device), d["geom"]))
    if rank != 0:
        return 0
    fake = np.concatenate(fakes)
    real = data["cells"][val]
    write_h5(os.path.join(args.out, "generated.h5"), d["fmt"], d["geom"], fake, np.tile(d["energy"][val], args.seeds),
             {"generated": True, "model": "wgan_gp", "toy": data["toy"], "seeds": list(ckpts),
              "energy_is": "held-out real event's " + ("true energy" if d["fmt"] == "atlas" else "incident energy")})
    metrics = evaluate(real, fake, d["geom"], data["toy"])
    metrics.update(data=args.data, geometry=d["geom"].name, seeds=list(ckpts), epochs=args.epochs,
                   n_train=len(data["train"]), n_val=len(val), n_generated=len(fake), val_indices=val.tolist(),
                   final_wdist={s: h[-1]["wdist"] if h else None for s, h in histories.items()})
    mpath = os.path.join(args.out, "metrics.json")
    with open(mpath + ".tmp", "w") as f:
        f.write(json.dumps(metrics, indent=1))
    os.replace(mpath + ".tmp", mpath)
    fsp = metrics["separation_power"]["fraction_per_layer"]
    log(f"validation ({'TOY ' if data['toy'] else ''}{len(val)} real vs {len(fake)} generated): correlation MSE "
        f"{metrics['correlation_mse']:.4f} | fraction-per-layer separation power "
        + " ".join(f"{k} {v:.3f}" for k, v in fsp.items()))
    if not args.no_plots:
        plots(os.path.join(args.out, "plots"), real, fake, d["geom"], data["toy"], metrics, histories)
    log(f"wrote {args.out}/: ckpt, generated.h5, metrics.json" + ("" if args.no_plots else ", plots/"))
    return 0


def main(argv=None):
    args = get_args(argv)
    if args.generate is None and args.out is None:
        args.out = os.path.join("runs", "wgan_gp")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{SCRIPT}: error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    ddp = "RANK" in os.environ and args.generate is None and not args.benchmark
    rank, size, local = 0, 1, 0
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    amp = args.dtype == "bf16" and device.type == "cuda"
    if args.dtype == "bf16" and not amp and rank == 0:
        print(f"{SCRIPT}: --dtype bf16 is ignored on CPU (fp32)", file=sys.stderr)
    lines = []

    def log(msg):                       # rank 0 alone logs
        if rank:
            return
        print(msg, flush=True)
        lines.append(msg)
        if args.generate is None and os.path.isdir(args.out):
            with open(os.path.join(args.out, "log.txt"), "a") as f:
                f.write("\n".join(lines) + "\n")
            lines.clear()
    try:
        if args.benchmark:
            return benchmark(args, device, amp)
        if args.generate is not None:
            return generate_main(args, device)
        return run(args, device, amp, (rank, size), log)
    except DataError as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ddp:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
