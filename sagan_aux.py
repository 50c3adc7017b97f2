"""SAGAN with an auxiliary regressor for the LHCb ECAL (Rogachev & Ratnikov), in one file.

A conditional self-attention GAN (spectral norm, hinge loss, Adam betas (0, 0.9), lr_g 1e-4,
lr_d 4e-4) generates 30x30 LHCb ECAL responses from the particle's momentum and impact point
(MLHEP 2019 data). An auxiliary regressor R predicts a physics metric of an image (the shower
asymmetry by default); its prediction is fed to the discriminator as an extra condition and R
trains with D. `--baseline` is the same GAN without attention and regressor: the poster's claim
is that the regressor raises the MLHEP score.

Run:
    python sagan_aux.py                                   # no --data: TOY lhcb showers, CPU-sized
    python sagan_aux.py --baseline --out runs/sagan_base  # the same without attention and regressor
    python sagan_aux.py --data data_train.npz --pdg 22    # MLHEP data (.npz or .h5), photons only
    python sagan_aux.py --resume --epochs 80              # continue runs/sagan_aux/ckpt.pt
    python sagan_aux.py --generate 10000 --ckpt runs/sagan_aux/ckpt.pt --conditions data_val.npz --out gen.npz
    python sagan_aux.py --benchmark [--device cuda --dtype bf16]   # aux model vs --baseline
    torchrun --nproc_per_node=4 sagan_aux.py --data data_train.npz

Outputs in --out: ckpt.pt, generated.h5 (and generated.npz for .npz input; MLHEP keys, conditioned
on the held-out events), metrics.json, plots/*.png, log.txt. metrics.json follows the MLHEP 2019
protocol (common.lhcb_prd): prd_auc_physics on the 24 physics features of MLHEP score.py,
prd_auc_images on the raw images, score = their minimum (common.lhcb_prd says what the image
AUC means: score.py as written compared the real images with themselves).

Choices (* = not public, ours) and deviations:
- G is the LHCb baseline generator (airogachev/LHCb_CaloGAN load_example/loading_model.ipynb,
  class Generator): noise 256, Linear(256+5 -> 4 ch) + LeakyReLU -> (ch, 2, 2), three
  ConvT(k3, s2, p1, op1) with BN + ReLU, ConvT to 1 channel + ReLU, 32x32 cropped [1:31]; ch 256
  as there (64 on toy data). Added: spectral norm on every layer (SAGAN), log energy units.
- *Attention: one block in G on its 8x8 map (after the second ConvT), one in D on its 8x8 map
  (after the second conv): 1/4 of the image side, as SAGAN's feat32 on 128x128 images (Zhang et
  al. 2019, Table 1: feat32 and feat64 did best). On the 16x16 maps (feat64's analogue) the aux
  generator took 2.2x the baseline's time at --ch 64; on 8x8 1.04-1.12x (--benchmark, 1 thread;
  training 2.9-3.2x at --ch 64, 1.4-1.8x at 256). The block is the SAGAN authors' (pooled keys
  and values, SelfAttention), run in batch chunks. A one-layer per-cell R trained 2.65x but
  regressed the asymmetry to RMSE/std 0.6 instead of 0.2-0.5: R keeps two layers.
- *How R joins D: R's prediction (standardised) is concatenated with the 5 conditions and D's
  flattened features before D's SN-MLP head, where the LHCb baseline D took its conditions.
  loss_D = hinge + w MSE(R(real), metric(real)) (w = --aux-weight; R is in D's optimiser and the
  hinge term reaches it too); G's loss -D(G(z), c, R(G(z))) reaches G through R as well.
- D: SN convolutions (k4, s2) 32 -> 16 -> 8 -> 4 -> 2 with LeakyReLU(0.1) and an SN-MLP, instead
  of the notebook's unnormalised k3 convolutions (SAGAN's D is spectrally normalised).
- D and R see the image with two maps of each cell's coordinates in the shower frame (along and
  across p_xy from the centre point_xy + 25 p_xy/p_z, in units of 15 cells): the MLHEP metrics
  are defined in that frame. --baseline has them too, so the comparison isolates attention + R.
- R: a per-cell MLP on (fraction of E_total, its log10, frame coordinates, tanh(2 x coordinate in
  cells)) pooled as sum(fraction h) and mean(h), then an MLP with the conditions: the form of all
  three metrics (energy-weighted sums over cells, counts above a fraction). Width 16 hidden units:
  on 500 toy showers, 400 Adam steps, one seed, RMSE/std 0.19/0.50 (asymmetries) against
  0.37/0.47 for 32 units, in 2.3x less time. Widths were learned poorly (RMSE/std ~0.9 at 32): --aux width is weak.
- Targets: asymmetry = (longitudinal, transverse); width = (along, across); sparsity = 20-point
  curve; standardised on the training split. Transverse side 1 is LEFT of p_xy
  (common.lhcb_asymmetry); MLHEP's is above the line, i.e. sign(px) x ours.
- Energies are modelled as t = log1p(E / e0) / s (e0 = 1st percentile of the non-zero training
  cells, s = t of the largest cell): cell energies span 5 decades, which the sparsity metric
  (alpha down to 1e-5) probes; the LHCb baseline generated linear energies.
- Images are [n, iy, ix] (x along the last axis), as in the MLHEP metric code and common.py.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import common

SCRIPT = "sagan_aux.py"
KEYS = ("EnergyDeposit", "ParticleMomentum", "ParticlePoint", "ParticlePDG")
AUX_DIMS = {"asymmetry": 2, "width": 2, "sparsity": 20, "none": 0}
FRAME_SCALE = 15.0  # cell units per unit of the frame maps
TOY_CH, TOY_EPOCHS = 64, 30   # toy defaults: --ch and --epochs sized for 15 min on one CPU thread


# ---------------------------------------------------------------- flags

def get_args(argv=None):
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data", default=None, help="MLHEP LHCb file (.npz or .h5: EnergyDeposit, ParticleMomentum, ParticlePoint, "
      "ParticlePDG); none: toy lhcb showers made once under ./data/")
    a("--toy-n", type=int, default=10000, help="number of toy showers when --data is not given")
    a("--pdg", type=int, default=None, choices=(11, 22), help="train on this particle only (11 e-, 22 photon)")
    a("--val-frac", type=float, default=0.1, help="fraction of events held out (seeded) for validation")
    a("--out", default=None, help="run folder (default runs/sagan_aux); with --generate: output file (.h5/.npz)")
    a("--epochs", type=int, default=None, help="total number of epochs (with --resume: up to this many); "
      f"default {TOY_EPOCHS} on toy data, 20 with --data")
    a("--batch-size", type=int, default=64, help="minibatch size per process")
    a("--lr-g", type=float, default=1e-4, help="generator learning rate (SAGAN TTUR)")
    a("--lr-d", type=float, default=4e-4, help="discriminator (and regressor) learning rate (SAGAN TTUR)")
    a("--nz", type=int, default=256, help="noise dimension (LHCb baseline: 256)")
    a("--ch", type=int, default=None, help="channels of G's first feature map (D mirrors it); default 256 (LHCb "
      f"baseline) with --data, {TOY_CH} on toy data")
    a("--aux", default="asymmetry", choices=tuple(AUX_DIMS), help="physics metric the auxiliary regressor predicts")
    a("--aux-weight", type=float, default=1.0, help="weight w of the regressor's MSE in D's loss")
    a("--baseline", action="store_true", help="plain conditional GAN: no self-attention, no regressor")
    a("--n-eval", type=int, default=5000, help="at most this many held-out events for PRD-AUC and plots")
    a("--seed", type=int, default=0, help="random seed (split, init, minibatches; rank r uses seed + r)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto = cuda if available")
    a("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the networks for training")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt (model, optimisers, epoch, RNG states)")
    a("--ckpt-every", type=int, default=1, help="save OUT/ckpt.pt every this many epochs")
    a("--log-every", type=int, default=50, help="print a progress line every this many steps")
    a("--generate", type=int, default=None, metavar="N", help="sample N showers from --ckpt and write --out")
    a("--ckpt", default=None, help="checkpoint to sample from (with --generate)")
    a("--conditions", default=None, help="MLHEP file whose ParticleMomentum/ParticlePoint/ParticlePDG condition "
      "--generate (cycled if N exceeds it)")
    a("--benchmark", action="store_true", help="print one JSON line: generation and training speed of this model "
      "and of --baseline, alternated, medians and time ratios; writes nothing")
    a("--bench-rounds", type=int, default=9, help="rounds of --benchmark (one generation batch, 5 train steps each)")
    args = p.parse_args(argv)
    toy = args.data is None
    args.epochs = (TOY_EPOCHS if toy else 20) if args.epochs is None else args.epochs
    args.ch = (TOY_CH if toy else 256) if args.ch is None else args.ch
    for name in ("toy_n", "epochs", "batch_size", "nz", "ch", "ckpt_every", "log_every", "n_eval", "bench_rounds"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.ch < 8:
        p.error("--ch must be at least 8")
    if not 0.0 < args.val_frac < 1.0:
        p.error("--val-frac must be in (0, 1)")
    if min(args.lr_g, args.lr_d) <= 0 or args.aux_weight < 0:
        p.error("learning rates must be positive and --aux-weight non-negative")
    if args.generate is not None and (args.generate <= 0 or not args.ckpt or not args.conditions):
        p.error("--generate N needs N > 0, --ckpt PATH and --conditions FILE")
    if args.baseline:
        args.aux = "none"
    return args


# ---------------------------------------------------------------- data

class DataError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


def load_mlhep(path, need_images=True):
    """Read and validate an MLHEP LHCb file (.npz or .h5). Returns (dict of arrays, is_toy)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    d, toy = {}, False
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as f:
                d = {k: f[k] for k in KEYS if k in f.files}
        else:
            import h5py
            with h5py.File(path, "r") as f:
                d = {k: f[k][()] for k in KEYS if k in f and isinstance(f[k], h5py.Dataset)}
                toy = bool(f.attrs.get("toy", False))
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise DataError(f"{path}: cannot read as .npz or .h5 ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    for k in KEYS[1:3] + ((KEYS[0],) if need_images else ()):
        if k not in d:
            raise DataError(f"{path}: missing key {k!r}")
    n = len(d["ParticleMomentum"])
    if n == 0:
        raise DataError(f"{path}: empty file (0 events)")
    shapes = {"EnergyDeposit": (n, 30, 30), "ParticleMomentum": (n, 3), "ParticlePoint": (n, 3), "ParticlePDG": (n,)}
    for k, v in d.items():
        if v.shape != shapes[k]:
            if v.ndim and len(v) != n:
                raise DataError(f"{path}: {k} has {len(v)} events but ParticleMomentum has {n}")
            raise DataError(f"{path}: {k} has shape {v.shape}, expected {shapes[k]}")
        if not np.issubdtype(v.dtype, np.number):
            raise DataError(f"{path}: {k} is not numeric ({v.dtype})")
        if not np.isfinite(v).all():
            raise DataError(f"{path}: {k} has NaN or inf values")
    if "EnergyDeposit" in d and (d["EnergyDeposit"] < 0).any():
        raise DataError(f"{path}: EnergyDeposit has negative energies")
    if (d["ParticleMomentum"][:, 2] <= 0).any():
        raise DataError(f"{path}: ParticleMomentum has pz <= 0 (the shower centre needs pz > 0)")
    d.setdefault("ParticlePDG", np.zeros(n, np.int32))
    return d, toy


def conditions(d):
    """(N, 5) float64 raw condition (px, py, pz, x, y)."""
    return np.concatenate([d["ParticleMomentum"], d["ParticlePoint"][:, :2]], axis=1).astype(np.float64)


def aux_target(kind, images, mom, point):
    """(N, k) physics metric the regressor learns (common.py MLHEP metrics)."""
    if kind in ("asymmetry", "width"):
        fn = common.lhcb_asymmetry if kind == "asymmetry" else common.lhcb_width
        return np.stack([fn(images, mom, point, orthogonal=o) for o in (False, True)], 1)
    if kind == "sparsity":
        return common.lhcb_sparsity(images)
    return np.zeros((len(images), 0))


def frame_maps(raw):
    """(B, 2, 30, 30) coordinates of every cell along and across p_xy (across = left of it),
    from the shower centre point_xy + 25 p_xy / p_z, in units of 15 cells; x, y axes if p_xy = 0.
    raw: (B, 5) (px, py, pz, x, y); images[n, iy, ix]: x along the last axis."""
    g = torch.arange(30, device=raw.device, dtype=raw.dtype) - 14.5
    centre = raw[:, 3:5] + 25.0 * raw[:, :2] / raw[:, 2:3]
    norm = torch.hypot(raw[:, 0], raw[:, 1])[:, None]
    x_axis = torch.tensor([1.0, 0.0], dtype=raw.dtype, device=raw.device)
    u = torch.where(norm > 0, raw[:, :2] / norm.clamp_min(1e-30), x_axis)
    ux, uy = u[:, 0, None, None], u[:, 1, None, None]
    dx, dy = g[None, None, :] - centre[:, 0, None, None], g[None, :, None] - centre[:, 1, None, None]
    return torch.stack([dx * ux + dy * uy, -dx * uy + dy * ux], 1) / FRAME_SCALE


# ---------------------------------------------------------------- model

class SelfAttention(nn.Module):
    """SAGAN self-attention in the form of the authors' code (brain-research/self-attention-gan,
    non_local.py, sn_non_local_block_sim): SN 1x1 maps to query/key (C/8) and value (C/2) channels,
    keys and values max-pooled 2x2, softmax(q k^T) v mapped back to C channels, out = x + gamma o
    with gamma initialised to 0. Showers go through in chunks (default: 2^18 attention weights per
    chunk, 256 showers at 8x8): at batch 1024 on a 16x16 map the whole batch's temporaries were
    ~100 MB of fresh memory every call, and the block ran memory-bound; a chunk's stay cached. 1x1
    maps are linear layers on (HW, C) rows (the 1x1 convolutions were 3x slower on CPU)."""

    def __init__(self, c, sn=True, chunk=None):
        super().__init__()
        f = spectral_norm if sn else (lambda m: m)
        self.ck, self.cv, self.chunk = max(1, c // 8), max(1, c // 2), chunk
        self.query, self.key, self.value = (f(nn.Linear(c, k)) for k in (self.ck, self.ck, self.cv))
        self.out = f(nn.Linear(self.cv, c))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x, chunk=None):
        maps = (self.query, self.key, self.value)   # SN weights computed once per call, not per chunk
        w, b = torch.cat([m.weight for m in maps]), torch.cat([m.bias for m in maps])
        step = chunk or self.chunk or max(1, (1 << 18) // (x.shape[2] * x.shape[3]) ** 2 * 4)
        return torch.cat([self._attend(x[i:i + step], w, b) for i in range(0, len(x), step)])

    def _attend(self, x, w, b):
        n, c, h, wd = x.shape
        t = F.linear(x.flatten(2).transpose(1, 2), w, b).view(n, h // 2, 2, wd // 2, 2, -1)   # (n, HW, k+k+v)
        pooled = torch.maximum(torch.maximum(t[:, :, 0, :, 0], t[:, :, 0, :, 1]),
                               torch.maximum(t[:, :, 1, :, 0], t[:, :, 1, :, 1])).flatten(1, 2)
        k, v = pooled[..., self.ck:].split([self.ck, self.cv], -1)
        q = t.flatten(1, 4)[..., :self.ck]
        o = self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)          # (n, HW, C)
        return torch.addcmul(x, self.gamma, o.transpose(1, 2).reshape(n, c, h, wd))


class Generator(nn.Module):
    """The LHCb baseline generator (airogachev/LHCb_CaloGAN load_example/loading_model.ipynb):
    Linear(nz+5 -> 4 ch) + LeakyReLU -> (ch, 2, 2) -> ConvT(k3, s2, p1, op1) ch -> ch/2 -> ch/4 ->
    ch/8 with BN + ReLU -> ConvT to 1 channel + ReLU, 32x32 cropped to 30x30; with SN (SAGAN) and,
    unless attention=False, one self-attention block on the 8x8 map."""

    def __init__(self, nz=256, cond_dim=5, ch=256, attention=True):
        super().__init__()
        self.ch = ch
        self.fc = spectral_norm(nn.Linear(nz + cond_dim, ch * 4))
        c = [ch, ch // 2, ch // 4, ch // 8]
        layers = []
        for i in range(3):
            layers += [spectral_norm(nn.ConvTranspose2d(c[i], c[i + 1], 3, 2, 1, 1)), nn.BatchNorm2d(c[i + 1]),
                       nn.ReLU()]
            if i == 1 and attention:
                layers.append(SelfAttention(c[2]))
        layers.append(spectral_norm(nn.ConvTranspose2d(c[3], 1, 3, 2, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, z, cond):
        h = F.leaky_relu(self.fc(torch.cat([z, cond], 1))).view(-1, self.ch, 2, 2)
        return F.relu(self.net(h)[:, :, 1:31, 1:31])   # (B, 1, 30, 30) model units, >= 0


class Discriminator(nn.Module):
    """SN conv discriminator on [image, frame maps]; conditions and the regressor's prediction
    join the flattened features before the SN-MLP head."""

    def __init__(self, cond_dim=5, aux_dim=2, ch=256, attention=True):
        super().__init__()
        c = [3, max(1, ch // 8), ch // 4, ch // 2, ch]
        layers = []
        for i in range(4):
            layers += [spectral_norm(nn.Conv2d(c[i], c[i + 1], 4, 2, 1)), nn.LeakyReLU(0.1)]
            if i == 1 and attention:
                layers.append(SelfAttention(c[2]))
        self.net = nn.Sequential(*layers)
        self.head = nn.Sequential(spectral_norm(nn.Linear(ch * 4 + cond_dim + aux_dim, ch)), nn.LeakyReLU(0.1),
                                  spectral_norm(nn.Linear(ch, 1)))

    def forward(self, x, frame, cond, aux=None):
        h = self.net(F.pad(torch.cat([x, frame], 1), (1, 1, 1, 1))).flatten(1)
        extra = [cond] if aux is None else [cond, aux]
        return self.head(torch.cat([h] + extra, 1)).squeeze(1)


class Regressor(nn.Module):
    """Auxiliary regressor: image (linear energies) + frame maps + conditions -> standardised
    metric. A per-cell MLP on (fraction of E_total, its log10, along, across, tanh(2 along),
    tanh(2 across) in cells), pooled as sum(fraction * h) and mean(h), then an MLP (see top)."""

    def __init__(self, out_dim=2, cond_dim=5, width=16):
        super().__init__()   # per-cell layers as Linear on (B, 900, features) rows: 3x faster than 1x1 convs on CPU
        self.net = nn.Sequential(nn.Linear(6, width), nn.ReLU(inplace=True), nn.Linear(width, width),
                                 nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(2 * width + cond_dim, 64), nn.ReLU(), nn.Linear(64, out_dim))

    def forward(self, energy, frame, cond):
        frac = (energy / energy.sum((2, 3), keepdim=True).clamp_min(1e-12)).flatten(1)[..., None]   # (B, 900, 1)
        fr = frame.flatten(2).transpose(1, 2)                                                       # (B, 900, 2)
        h = self.net(torch.cat([frac, torch.log10(frac + 1e-7) / 7.0 + 1.0, fr, torch.tanh(2.0 * FRAME_SCALE * fr)], 2))
        return self.head(torch.cat([(frac * h).sum(1), h.mean(1), cond], 1))


def build(args):
    """Networks from the run's args: (G, D, R or None)."""
    k = AUX_DIMS[args.aux]
    return (Generator(args.nz, 5, args.ch, attention=not args.baseline),
            Discriminator(5, k, args.ch, attention=not args.baseline), Regressor(k, 5) if k else None)


def to_energy(t, norm):
    """Model units -> energy in the file's unit. t is capped at 1.5 (cells up to (max/e0)^1.5 e0):
    an untrained G's t ~ 2 would otherwise mean 1e5 GeV cells."""
    return norm["e0"] * torch.expm1(t.clamp(max=1.5) * norm["s"])


# ---------------------------------------------------------------- train

class Run:
    """Process-group facts."""

    def __init__(self, args):
        self.ddp = "RANK" in os.environ
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise DataError("--device: cuda requested but not available")
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(f"cuda:{local}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.main = self.rank == 0


def autocast(run, args):
    on = args.dtype == "bf16" and run.device.type == "cuda"
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on)


def train_step(nets, opts, batch, args, run, norm):
    """One D (+R) step and one G step. Returns dict of floats."""
    G, D, R, Dp, Rp = nets
    x, c, raw, y = batch
    b = len(x)
    frame = frame_maps(raw)
    with autocast(run, args):
        fake = G(torch.randn(b, args.nz, device=run.device), c)
        xx = torch.cat([x, fake.detach()])
        ff, cc = torch.cat([frame, frame]), torch.cat([c, c])
        a = R(to_energy(xx, norm), ff, cc) if R is not None else None
        d = D(xx, ff, cc, a).float()
        loss_d = F.relu(1 - d[:b]).mean() + F.relu(1 + d[b:]).mean()
        mse = F.mse_loss(a[:b].float(), y) if R is not None else torch.zeros((), device=run.device)
        loss = loss_d + args.aux_weight * mse
    opts[1].zero_grad(set_to_none=True)
    loss.backward()
    opts[1].step()
    frozen = list(Dp.parameters()) + (list(Rp.parameters()) if Rp is not None else [])
    for p in frozen:
        p.requires_grad_(False)
    with autocast(run, args):
        a = Rp(to_energy(fake, norm), frame, c) if Rp is not None else None
        loss_g = -Dp(fake, frame, c, a).float().mean()
    opts[0].zero_grad(set_to_none=True)
    loss_g.backward()
    opts[0].step()
    for p in frozen:
        p.requires_grad_(True)
    return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "mse": mse.item()}


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


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------- generate

@torch.no_grad()
def sample(G, cond_std, norm, nz, device, batch=1024):
    """Energies (N, 30, 30) float32 for standardised conditions (N, 5) (numpy)."""
    G.eval()
    out = []
    for s in range(0, len(cond_std), batch):
        c = torch.as_tensor(cond_std[s:s + batch], dtype=torch.float32, device=device)
        out.append(to_energy(G(torch.randn(len(c), nz, device=device), c), norm)[:, 0].float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def write_mlhep(path, images, mom, point, pdg, toy=False):
    """MLHEP file (.npz or .h5 by extension), written to a temporary name then renamed."""
    arrays = {"EnergyDeposit": images.astype(np.float32), "ParticleMomentum": mom.astype(np.float32),
              "ParticlePoint": point.astype(np.float32), "ParticlePDG": pdg.astype(np.int32)}
    tmp = path + ".tmp"
    if path.endswith(".npz"):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    else:
        import h5py
        with h5py.File(tmp, "w") as f:
            for k, v in arrays.items():
                f[k] = v
            f.attrs["toy"] = bool(toy)
            f.attrs["generator"] = SCRIPT
    os.replace(tmp, path)


def evaluate(real, gen, mom, point, seed=0):
    """MLHEP protocol (common.lhcb_prd): PRD-AUC on the 24 physics features and on the images,
    score = their minimum. Returns (metrics, (real features, generated features))."""
    if 2 * len(real) < 20:
        return {"prd_auc_images": None, "prd_auc_physics": None, "score": None}, None
    r = common.lhcb_prd(real, gen, mom, point, seed=seed)
    return {k: r[k] for k in ("prd_auc_physics", "prd_auc_images", "score")}, r["features"]


def make_plots(real, gen, feats, folder, label):
    """Real vs generated: mean image, asymmetries, widths, sparsity curve, energy sum."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    fr, fg = feats
    frame = ("along", "across")
    panels = {"mean_image": [(real.mean(0), gen.mean(0), "mean image (x right, y up; colours to the real max)")],
              "asymmetry": [(fr[:, j], fg[:, j], f"asymmetry, line {('across', 'along')[j]} p_xy") for j in (0, 1)],
              "width": [(fr[:, 2 + j], fg[:, 2 + j], f"width {frame[j]} p_xy [cells]") for j in (0, 1)],
              "sparsity": [(fr[:, 4:].mean(0), fg[:, 4:].mean(0), "mean fraction of cells >= alpha E_total")],
              "energy_sum": [(np.log10(real.sum((1, 2)) + 1e-12), np.log10(gen.sum((1, 2)) + 1e-12),
                              "log10 sum of cells")]}
    for name, rows in panels.items():
        fig, ax = plt.subplots(1, len(rows) * (2 if name == "mean_image" else 1), figsize=(9, 3.6), squeeze=False)
        for a, (r, g, title) in zip(ax[0], rows):
            if name == "mean_image":
                for a2, img, who in zip(ax[0], (r, g), ("real", "generated")):
                    a2.imshow(img, origin="lower", extent=(-15, 15, -15, 15), vmin=0, vmax=r.max())
                    a2.set(title=f"{label}{title}, {who}")
            elif name == "sparsity":
                a.plot(np.logspace(-5, -1, 20), r, label="real")
                a.plot(np.logspace(-5, -1, 20), g, label="generated")
                a.set(xscale="log", xlabel="alpha", title=label + title)
            else:
                bins = np.linspace(*np.percentile(np.r_[r, g], [0.5, 99.5]) + [-1e-9, 1e-9], 41)
                a.hist(r, bins, histtype="step", density=True, label="real")
                a.hist(g, bins, histtype="step", density=True, label="generated")
                a.set(title=label + title)
            a.legend() if name != "mean_image" else None
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name + ".tmp.png"), dpi=80)
        plt.close(fig)
        os.replace(os.path.join(folder, name + ".tmp.png"), os.path.join(folder, name + ".png"))


def generate_main(args):
    out = args.out or "generated.h5"
    if not os.path.isfile(args.ckpt):
        raise DataError(f"{args.ckpt}: no such checkpoint")
    d, _ = load_mlhep(args.conditions, need_images=False)
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise DataError(f"{out}: output folder does not exist")
    run = Run(args)
    try:
        ck = torch.load(args.ckpt, map_location=run.device, weights_only=False)
        cargs = argparse.Namespace(**ck["args"])
        G = build(cargs)[0].to(run.device)
        G.load_state_dict(ck["model"]["G"])
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{args.ckpt}: not a {SCRIPT} checkpoint ({type(e).__name__})")
    norm = ck["norm"]
    idx = np.arange(args.generate) % len(d["ParticleMomentum"])
    raw = conditions(d)[idx]
    torch.manual_seed(args.seed)
    t0 = time.time()
    imgs = sample(G, (raw - norm["cond_mean"]) / norm["cond_std"], norm, cargs.nz, run.device)
    write_mlhep(out, imgs, d["ParticleMomentum"][idx], d["ParticlePoint"][idx], d["ParticlePDG"][idx],
                toy=ck.get("toy", False))
    print(f"wrote {len(imgs)} generated showers to {out} ({len(imgs) / (time.time() - t0):.0f} showers/s)")
    return 0


def benchmark_main(args):
    """The aux model (as flagged) and --baseline side by side: generation at batch 1024 (10,000 on
    CUDA) and training steps, alternating A and B for --bench-rounds rounds; medians and ratios."""
    run = Run(args)
    dev, cuda = run.device, run.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gb, tb, norm = (10000 if cuda else 1024), args.batch_size, {"e0": 1e-4, "s": 11.0}
    c = torch.randn(gb, 5, device=dev)
    raw = torch.cat([torch.randn(tb, 2, device=dev), torch.full((tb, 1), 10.0, device=dev),
                     torch.randn(tb, 2, device=dev)], 1)
    models = {}
    for name, a in (("aux", args), ("baseline", argparse.Namespace(**{**vars(args), "baseline": True, "aux": "none"}))):
        torch.manual_seed(args.seed)
        G, D, R = (m.to(dev) if m is not None else None for m in build(a))
        opts = (torch.optim.Adam(G.parameters(), a.lr_g, betas=(0.0, 0.9)),
                torch.optim.Adam(list(D.parameters()) + (list(R.parameters()) if R else []), a.lr_d, betas=(0.0, 0.9)))
        batch = (torch.rand(tb, 1, 30, 30, device=dev), torch.randn(tb, 5, device=dev), raw,
                 torch.randn(tb, AUX_DIMS[a.aux], device=dev))

        @torch.no_grad()
        def gen(G=G, a=a):
            G.eval()
            with autocast(run, a):
                G(torch.randn(gb, a.nz, device=dev), c)
            G.train()
        models[name] = {"gen": gen, "train": lambda G=G, D=D, R=R, o=opts, b=batch, a=a: train_step(
            (G, D, R, D, R), o, b, a, run, norm)}
    times = {(m, k): [] for m in models for k in ("gen", "train")}
    for r in range(args.bench_rounds + 1):          # round 0 warms up
        for k, reps in (("gen", 1), ("train", 5)):
            for m in models:
                sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    models[m][k]()
                sync()
                if r:
                    times[m, k].append((time.perf_counter() - t0) / reps)
    med = {key: float(np.median(v)) for key, v in times.items()}
    print(json.dumps({"script": SCRIPT, "device": str(dev), "threads": torch.get_num_threads(),
                      "dtype": args.dtype if cuda else "fp32", "model": f"sagan+aux({args.aux})", "ch": args.ch,
                      "nz": args.nz, "rounds": args.bench_rounds, "gen_batch": gb, "train_batch": tb,
                      **{f"{k}_{m}_per_s": round((gb if k == "gen" else tb) / med[m, k], 1) for m, k in med},
                      "gen_time_ratio_aux_over_baseline": round(med["aux", "gen"] / med["baseline", "gen"], 3),
                      "train_time_ratio_aux_over_baseline": round(med["aux", "train"] / med["baseline", "train"], 3)}))
    return 0


# ---------------------------------------------------------------- main

def train_main(args):
    run = Run(args)
    if run.ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
    out = args.out or os.path.join("runs", "sagan_aux")
    ckpt_path = os.path.join(out, "ckpt.pt")
    path = common.toy_path("lhcb", args.toy_n, 0) if args.data is None else args.data
    if args.data is None and run.main:
        print(f"no --data: training on TOY lhcb showers ({path})", flush=True)
        if not os.path.isfile(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            common.write_toy("lhcb", path, args.toy_n, 0)
    if args.data is None and run.ddp:
        dist.barrier()
    resume = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise DataError(f"{ckpt_path}: no checkpoint to resume from")
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for k in ("nz", "ch", "aux", "baseline", "pdg", "val_frac", "seed"):
            setattr(args, k, resume["args"][k])
    d, toy = load_mlhep(path)
    toy = toy or args.data is None
    if args.pdg is not None:
        keep = d["ParticlePDG"] == args.pdg
        if not keep.any():
            raise DataError(f"{path}: no events with ParticlePDG == {args.pdg}")
        d = {k: v[keep] for k, v in d.items()}
    n = len(d["EnergyDeposit"])
    n_val = max(1, int(round(args.val_frac * n)))
    if n - n_val < 2:
        raise DataError(f"{path}: only {n} events, too few to hold out a validation split")
    perm = np.random.default_rng(args.seed).permutation(n)
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    images, raw = d["EnergyDeposit"].astype(np.float32), conditions(d)
    y = aux_target(args.aux, images, d["ParticleMomentum"], d["ParticlePoint"])
    if resume is not None:
        norm = resume["norm"]
    else:   # normalisation constants from the training split only
        cells = images[tr_idx][images[tr_idx] > 0]
        e0 = float(np.percentile(cells, 1)) if cells.size else 1.0
        norm = {"cond_mean": raw[tr_idx].mean(0), "cond_std": raw[tr_idx].std(0) + 1e-6, "e0": e0,
                "s": float(np.log1p(images[tr_idx].max() / e0)) or 1.0,
                "aux_mean": y[tr_idx].mean(0), "aux_std": y[tr_idx].std(0) + 1e-6}
    dev = run.device
    t32 = lambda a: torch.as_tensor(a, dtype=torch.float32, device=dev)   # noqa: E731
    X = (torch.log1p(t32(images) / norm["e0"]) / norm["s"]).unsqueeze(1)
    RAW, C = t32(raw), t32((raw - norm["cond_mean"]) / norm["cond_std"])
    Y, tr = t32((y - norm["aux_mean"]) / norm["aux_std"]), torch.as_tensor(tr_idx, device=dev)

    random.seed(args.seed + run.rank)
    np.random.seed(args.seed + run.rank)
    torch.manual_seed(args.seed)                      # same initial weights on every rank
    G, D, R = (m.to(dev) if m is not None else None for m in build(args))
    nets = {k: m for k, m in (("G", G), ("D", D), ("R", R)) if m is not None}
    torch.manual_seed(args.seed + run.rank)
    opts = {"G": torch.optim.Adam(G.parameters(), args.lr_g, betas=(0.0, 0.9)),
            "D": torch.optim.Adam([p for k in "DR" if k in nets for p in nets[k].parameters()], args.lr_d,
                                  betas=(0.0, 0.9))}
    epoch0, step = 0, 0
    if resume is not None:
        for k, m in nets.items():
            m.load_state_dict(resume["model"][k])
        for k, o in opts.items():
            o.load_state_dict(resume["optim"][k])
        epoch0, step, rngs = resume["epoch"], resume["step"], resume["rng"]
        set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0])
    # training views: DDP-wrapped for D's step; D, R (plain) score G's fakes; all compiled with --compile
    views = [DDP(m) if run.ddp and m is not None else m for m in (G, D, R)] + [D, R]
    views = tuple(torch.compile(m) if args.compile and m is not None else m for m in views)
    os.makedirs(out, exist_ok=True) if run.main else None
    log = open(os.path.join(out, "log.txt"), "a") if run.main else None

    def say(msg):
        if run.main:
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()

    if args.dtype == "bf16" and dev.type != "cuda":
        say("--dtype bf16 is ignored on CPU (autocast is used on CUDA only)")
    b = args.batch_size
    spe = max(1, len(tr_idx) // (b * run.world))   # steps per epoch
    say(f"{SCRIPT}: {'baseline GAN' if args.baseline else 'SAGAN + aux regressor (' + args.aux + ')'} | "
        f"{'TOY ' * toy}data {path}: {len(tr_idx)} train, {len(val_idx)} held out | device {dev} | "
        + " ".join(f"{k} {sum(p.numel() for p in m.parameters())}" for k, m in nets.items()) + " parameters")
    t0, done = time.time(), 0
    for epoch in range(epoch0, args.epochs):
        for m in nets.values():
            m.train()
        order = tr[torch.randperm(len(tr), device=dev)]
        for i in range(spe):
            idx = order[(i * b) % len(order):][:b]
            last = train_step(views, (opts["G"], opts["D"]), (X[idx], C[idx], RAW[idx], Y[idx]), args, run, norm)
            step, done = step + 1, done + 1
            if step % args.log_every == 0 or i == spe - 1:
                rate = done * b * run.world / (time.time() - t0)
                left = ((args.epochs - epoch) * spe - i - 1) * b * run.world / rate
                say(f"epoch {epoch + 1}/{args.epochs} | step {step} | loss_d {last['loss_d']:.4f} "
                    f"loss_g {last['loss_g']:.4f} mse {last['mse']:.4f} | {rate:.0f} samples/s | ETA {fmt_time(left)}")
        rngs = [rng_state()]
        if run.ddp:
            rngs = [None] * run.world
            dist.all_gather_object(rngs, rng_state())
        if run.main and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs):
            torch.save({"model": {k: m.state_dict() for k, m in nets.items()},
                        "optim": {k: o.state_dict() for k, o in opts.items()}, "epoch": epoch + 1, "step": step,
                        "args": vars(args), "rng": rngs, "norm": norm, "geometry": "lhcb", "toy": toy},
                       ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    if run.main:
        metrics = final(args, G, R, norm, d, images, raw, val_idx, path, out, toy)
        metrics.update({"epochs": args.epochs, "step": step, "resumed_from_epoch": epoch0, "n_train": len(tr_idx)})
        write_json(metrics, os.path.join(out, "metrics.json"))
        say(f"{'TOY ' * toy}PRD-AUC physics {metrics['prd_auc_physics']} images {metrics['prd_auc_images']} "
            f"score {metrics['score']} -> {out}/metrics.json")
        log.close()
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def write_json(obj, path):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def final(args, G, R, norm, d, images, raw, val_idx, path, out, toy):
    """Generate for the held-out conditions (generated.h5/.npz), plots; returns the metrics."""
    mom, point, pdg = d["ParticleMomentum"][val_idx], d["ParticlePoint"][val_idx], d["ParticlePDG"][val_idx]
    torch.manual_seed(args.seed + 12345)
    dev = next(G.parameters()).device
    gen = sample(G, (raw[val_idx] - norm["cond_mean"]) / norm["cond_std"], norm, args.nz, dev)
    for ext in (".h5", ".npz") if path.endswith(".npz") else (".h5",):
        write_mlhep(os.path.join(out, "generated" + ext), gen, mom, point, pdg, toy)
    m = min(len(val_idx), args.n_eval)
    real, rr = images[val_idx][:m], raw[val_idx][:m]
    metrics, feats = evaluate(real, gen[:m], mom[:m], point[:m], seed=args.seed)
    if R is not None:   # regressor's error on held-out real showers, in target units
        R.eval()
        t = lambda a: torch.as_tensor(a, dtype=torch.float32, device=dev)   # noqa: E731
        with torch.no_grad():
            pred = R(t(real).unsqueeze(1), frame_maps(t(rr)), t((rr - norm["cond_mean"]) / norm["cond_std"]))
        pred = pred.cpu().numpy() * norm["aux_std"] + norm["aux_mean"]
        truth = aux_target(args.aux, real, mom[:m], point[:m])
        metrics["aux_rmse_val"] = np.sqrt(((pred - truth) ** 2).mean(0)).tolist()
        metrics["aux_target_std_val"] = truth.std(0).tolist()
    if feats is not None:
        make_plots(real, gen[:m], feats, os.path.join(out, "plots"), "TOY " * toy)
    return {**metrics, "script": SCRIPT, "toy": toy, "data": path, "model": "baseline" if args.baseline else
            "sagan_aux", "aux": args.aux, "aux_weight": args.aux_weight, "seed": args.seed, "ch": args.ch,
            "n_val": len(val_idx), "n_eval": m, "val_indices": val_idx.tolist()}


def main(argv=None):
    args = get_args(argv)
    try:
        if args.benchmark:
            return benchmark_main(args)
        if args.generate is not None:
            return generate_main(args)
        return train_main(args)
    except DataError as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
