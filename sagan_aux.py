"""SAGAN with an auxiliary regressor for the LHCb ECAL (Rogachev & Ratnikov), in one file.

A conditional self-attention GAN (spectral norm, hinge loss, Adam betas (0, 0.9), lr_g 1e-4,
lr_d 4e-4) generates 30x30 LHCb ECAL responses from the particle's momentum and impact point
(MLHEP 2019 data). An auxiliary regressor R predicts a physics metric of an image (shower
asymmetry by default); it is trained on real images together with the discriminator, and its
prediction is fed to the discriminator as an extra condition, so that D (and through it G) pays
attention to that metric. `--baseline` trains the plain conditional GAN (no attention, no
regressor) so the gain can be measured.

Run:
    python sagan_aux.py                                   # no --data: TOY lhcb showers (data/...)
    python sagan_aux.py --data data_train.npz --epochs 50 # MLHEP data (.npz or .h5)
    python sagan_aux.py --data data_train.npz --pdg 22    # photons only
    python sagan_aux.py --data data_train.npz --baseline --out runs/sagan_base
    python sagan_aux.py --resume --epochs 80              # continue runs/sagan_aux/ckpt.pt
    python sagan_aux.py --generate 10000 --ckpt runs/sagan_aux/ckpt.pt --conditions data_val.npz --out gen.npz
    python sagan_aux.py --benchmark [--device cuda --dtype bf16]
    torchrun --nproc_per_node=4 sagan_aux.py --data data_train.npz

Outputs in --out: ckpt.pt, generated.h5 (plus generated.npz when the input is .npz; MLHEP keys,
conditioned on the held-out events), metrics.json (PRD-AUC on raw images, on the physics
features, and their minimum = the challenge score), plots/*.png, log.txt.

Choices and deviations (reference.md marks some points unconfirmed):
- Attention: one self-attention block in G at the 16x16 map (before the last upsampling) and one
  in D at its 16x16 map (after the first downsampling), as SAGAN puts attention on the later,
  larger maps. 16x16 is the largest map where the (HW)^2 matrix is cheap; at 2x2..8x8 a shower
  (a few cells wide) is one position, so attention would have nothing to relate.
- How R joins D: R's prediction (standardised units) is concatenated with the 5 conditions and
  D's flattened features before D's final SN-MLP (the LHCb baseline D took its conditions there).
  R is a separate network in D's optimiser: loss_D = hinge + w * MSE(R(real), metric(real)); the
  hinge term also reaches R, and w sets how strongly R stays a regressor (reference: higher w ->
  better regressor). G's loss -D(G(z), c, R(G(z))) reaches G through R as well.
- D and R see the image with two coordinate maps of each cell in the shower's own frame (along
  and across p_xy, relative to the centre point_xy + 25 p_xy/p_z, in units of 15 cells): the
  MLHEP metrics are defined in that frame, and a conditional D learns position more easily from
  maps than from a 5-vector. --baseline uses the same maps, so the comparison isolates
  attention + regressor.
- R sees the image normalised to its total energy (linear and log10): all three metrics are
  energy-weighted sums over cells of a function of the cell's position in the shower frame, or
  counts of cells above a fraction. So R is a per-cell MLP (1x1 convolutions) pooled as
  sum(fraction * h) and mean(h) (a deep set), then an MLP with the conditions: the right form
  for all three, and much cheaper than a CNN. Its per-cell inputs include tanh(2 along),
  tanh(2 across) (cells), the side of the lines through the centre; without them a 2-layer MLP
  found the step slowly and not for every seed. Measured on 500 toy showers, 200 Adam steps:
  RMSE/std 0.2 (asymmetries), 0.25 (sparsity), ~0.9 (widths: spread 0.15 cell on 1.1), so
  --aux width is weak.
- Images are [n, iy, ix] (x along the last axis), as in the MLHEP metric code and common.py.
- Targets: asymmetry = (longitudinal, transverse); width = (along, across); sparsity = the
  20-point sparsity curve; each standardised on the training set.
- Energies are modelled as t = log1p(E / e0) / s (e0 = 1st percentile of the non-zero training
  cells, s = t of the largest cell); G ends with ReLU so empty cells are exactly 0. The LHCb
  baseline generated linear energies; cell energies span 5 decades, which the sparsity metric
  (alpha down to 1e-5) probes.
- G follows the LHCb baseline (Linear(nz+5 -> 4C) -> (C,2,2) -> four ConvT(k3,s2,p1,op1)
  C -> C/2 -> C/4 -> C/8 -> 1 with BN+ReLU, 32x32 cropped to 30x30) plus spectral norm (SAGAN).
  D mirrors it with SN convolutions (k4, s2) 32 -> 16 -> 8 -> 4 -> 2 and LeakyReLU(0.1).
- PRD-AUC on physics features standardises each feature with the held-out real mean/std first
  (k-means would otherwise see only the widths).
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
    a("--epochs", type=int, default=20, help="total number of epochs (with --resume: up to this many)")
    a("--batch-size", type=int, default=64, help="minibatch size per process")
    a("--lr-g", type=float, default=1e-4, help="generator learning rate (SAGAN TTUR)")
    a("--lr-d", type=float, default=4e-4, help="discriminator (and regressor) learning rate (SAGAN TTUR)")
    a("--nz", type=int, default=32, help="noise dimension")
    a("--ch", type=int, default=256, help="channels of G's first feature map (D mirrors it); LHCb baseline 256")
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
    a("--benchmark", action="store_true", help="print one JSON line of generation and training speed, write nothing")
    args = p.parse_args(argv)
    for name in ("toy_n", "epochs", "batch_size", "nz", "ch", "ckpt_every", "log_every", "n_eval"):
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
    """(B, 2, 30, 30) coordinates of every cell along and across p_xy, relative to the shower
    centre point_xy + 25 p_xy / p_z, in units of 15 cells. raw: (B, 5) (px, py, pz, x, y).
    images[n, iy, ix] (MLHEP): x along the last axis, cell centres at -14.5..14.5."""
    g = torch.arange(30, device=raw.device, dtype=raw.dtype) - 14.5
    cx = raw[:, 3] + 25.0 * raw[:, 0] / raw[:, 2]
    cy = raw[:, 4] + 25.0 * raw[:, 1] / raw[:, 2]
    norm = torch.hypot(raw[:, 0], raw[:, 1])
    ok = norm > 0   # p_xy = 0: the frame is the x, y axes
    safe = torch.where(ok, norm, torch.ones_like(norm))
    ux = torch.where(ok, raw[:, 0] / safe, torch.ones_like(norm))[:, None, None]
    uy = torch.where(ok, raw[:, 1] / safe, torch.zeros_like(norm))[:, None, None]
    dx = g[None, None, :] - cx[:, None, None]   # varies along the last axis (x)
    dy = g[None, :, None] - cy[:, None, None]   # varies along axis 1 of the batch (y)
    along, across = dx * ux + dy * uy, -dx * uy + dy * ux
    return torch.stack([along, across], 1) / FRAME_SCALE


# ---------------------------------------------------------------- model

class SelfAttention(nn.Module):
    """SAGAN self-attention: out = x + gamma * softmax(q^T k) v; query/key with C/8 channels,
    gamma initialised to 0 (so the block starts as the identity)."""

    def __init__(self, c, sn=True):
        super().__init__()
        k, sn = max(1, c // 8), spectral_norm if sn else (lambda m: m)
        self.query, self.key, self.value = sn(nn.Conv2d(c, k, 1)), sn(nn.Conv2d(c, k, 1)), sn(nn.Conv2d(c, c, 1))
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.query(x).flatten(2), self.key(x).flatten(2), self.value(x).flatten(2)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)      # (B, HW query, HW key)
        out = (v @ attn.transpose(1, 2)).view(b, c, h, w)         # out_i = sum_j attn_ij v_j
        return x + self.gamma * out


class Generator(nn.Module):
    """LHCb-baseline generator with SN and one self-attention block at 16x16."""

    def __init__(self, nz=32, cond_dim=5, ch=256, attention=True):
        super().__init__()
        self.ch = ch
        self.fc = spectral_norm(nn.Linear(nz + cond_dim, ch * 4))
        self.bn0 = nn.BatchNorm2d(ch)
        c = [ch, ch // 2, ch // 4, ch // 8]
        layers = []
        for i in range(3):
            layers += [spectral_norm(nn.ConvTranspose2d(c[i], c[i + 1], 3, 2, 1, 1)), nn.BatchNorm2d(c[i + 1]),
                       nn.ReLU()]
        if attention:
            layers.append(SelfAttention(c[3]))
        layers.append(spectral_norm(nn.ConvTranspose2d(c[3], 1, 3, 2, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, z, cond):
        h = F.relu(self.bn0(self.fc(torch.cat([z, cond], 1)).view(-1, self.ch, 2, 2)))
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
            if i == 0 and attention:
                layers.append(SelfAttention(c[1]))
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

    def __init__(self, out_dim=2, cond_dim=5, width=32):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(6, width, 1), nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * width + cond_dim, 64), nn.ReLU(), nn.Linear(64, out_dim))

    def forward(self, energy, frame, cond):
        frac = energy / energy.sum((2, 3), keepdim=True).clamp_min(1e-12)
        cells = frame * FRAME_SCALE
        h = self.net(torch.cat([frac, torch.log10(frac + 1e-7) / 7.0 + 1.0, frame, torch.tanh(2.0 * cells)], 1))
        return self.head(torch.cat([(frac * h).sum((2, 3)), h.mean((2, 3)), cond], 1))


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
    """PRD-AUC on raw images and on standardised physics features; score = their minimum."""
    out = {}
    if 2 * len(real) < 20:
        return {"prd_auc_images": None, "prd_auc_physics": None, "score": None}, None
    # (N, 24) MLHEP physics features: asymmetry along/across, width along/across, sparsity curve
    fr, fg = (np.concatenate([aux_target("asymmetry", x, mom, point), aux_target("width", x, mom, point),
                              common.lhcb_sparsity(x)], axis=1) for x in (real, gen))
    mu, sd = fr.mean(0), fr.std(0) + 1e-12
    for name, a, b in (("images", real.reshape(len(real), -1), gen.reshape(len(gen), -1)),
                       ("physics", (fr - mu) / sd, (fg - mu) / sd)):
        out[f"prd_auc_{name}"] = common.prd_auc(*common.prd(a, b, seed=seed))
    out["score"] = min(out["prd_auc_images"], out["prd_auc_physics"])
    return out, (fr, fg)


def make_plots(real, gen, mom, feats, folder, label):
    """Real vs generated: mean image, asymmetries, widths, sparsity curves, energy sums."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    fr, fg = feats

    def save(fig, name, tight=True):
        if tight:   # not with the shared colorbar
            fig.tight_layout()
        fig.savefig(os.path.join(folder, name + ".tmp.png"), dpi=80)
        plt.close(fig)
        os.replace(os.path.join(folder, name + ".tmp.png"), os.path.join(folder, name + ".png"))

    fig, ax = plt.subplots(1, 2, figsize=(9, 4))
    vmax = max(real.mean(0).max(), gen.mean(0).max())
    for a, img, t in ((ax[0], real, "real"), (ax[1], gen, "generated")):
        im = a.imshow(img.mean(0), origin="lower", extent=(-15, 15, -15, 15), vmin=0, vmax=vmax)
        a.set(title=f"{label}mean image, {t}", xlabel="x [cells]", ylabel="y [cells]")
    fig.colorbar(im, ax=list(ax), shrink=0.8)
    save(fig, "mean_image", tight=False)
    for name, cols, titles in (("asymmetry", (0, 1), ("asymmetry along p_xy", "asymmetry across p_xy")),
                               ("width", (2, 3), ("width along p_xy [cells]", "width across p_xy [cells]"))):
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        for a, j, t in zip(ax, cols, titles):
            bins = np.linspace(*np.percentile(np.r_[fr[:, j], fg[:, j]], [0.5, 99.5]), 41)
            a.hist(fr[:, j], bins, histtype="step", label="real", density=True)
            a.hist(fg[:, j], bins, histtype="step", label="generated", density=True)
            a.set(title=label + t)
            a.legend()
        save(fig, name)
    fig, ax = plt.subplots(figsize=(5, 4))
    alphas = np.logspace(-5, -1, 20)
    for f, t in ((fr, "real"), (fg, "generated")):
        m, s = f[:, 4:].mean(0), f[:, 4:].std(0)
        ax.plot(alphas, m, label=t)
        ax.fill_between(alphas, m - s, m + s, alpha=0.3)
    ax.set(xscale="log", xlabel="alpha", ylabel="fraction of cells >= alpha * E_total", title=label + "sparsity")
    ax.legend()
    save(fig, "sparsity")
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    er, eg = real.sum((1, 2)), gen.sum((1, 2))
    p = np.linalg.norm(mom, axis=1)
    bins = np.logspace(np.log10(max(min(er.min(), eg.min()), 1e-6)), np.log10(max(er.max(), eg.max())), 41)
    for e, t in ((er, "real"), (eg, "generated")):
        ax[0].hist(e, bins, histtype="step", label=t)
        ax[1].scatter(p, e, s=2, label=t)
    ax[0].set(xscale="log", title=label + "energy sum", xlabel="sum of cells")
    ax[1].set(xscale="log", yscale="log", xlabel="|p|", ylabel="sum of cells", title=label + "energy sum vs |p|")
    for a in ax:
        a.legend()
    save(fig, "energy_sum")


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
    run = Run(args)
    torch.manual_seed(args.seed)
    G, D, R = (m.to(run.device) if m is not None else None for m in build(args))
    norm = {"e0": 1e-4, "s": 11.0}
    cuda = run.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gb, tb = (10000 if cuda else 512), args.batch_size

    def timed(fn, n_items, budget=2.0 if cuda else 1.0):
        for _ in range(2 if cuda else 1):   # warm-up
            fn()
        sync()
        t0, n = time.time(), 0
        while n == 0 or (time.time() - t0 < budget and n < 200):
            fn()
            n += 1
        sync()
        return n * n_items / (time.time() - t0)

    c = torch.randn(gb, 5, device=run.device)

    def gen():
        with torch.no_grad(), autocast(run, args):
            G.eval()
            G(torch.randn(gb, args.nz, device=run.device), c)
    gen_rate = timed(gen, gb)
    G.train()
    opts = (torch.optim.Adam(G.parameters(), args.lr_g, betas=(0.0, 0.9)),
            torch.optim.Adam(list(D.parameters()) + (list(R.parameters()) if R else []), args.lr_d, betas=(0.0, 0.9)))
    raw = torch.cat([torch.randn(tb, 2, device=run.device), torch.full((tb, 1), 10.0, device=run.device),
                     torch.randn(tb, 2, device=run.device)], 1)
    batch = (torch.rand(tb, 1, 30, 30, device=run.device), torch.randn(tb, 5, device=run.device), raw,
             torch.randn(tb, AUX_DIMS[args.aux], device=run.device))
    train_rate = timed(lambda: train_step((G, D, R, D, R), opts, batch, args, run, norm), tb)
    print(json.dumps({"script": SCRIPT, "device": str(run.device), "dtype": args.dtype if cuda else "fp32",
                      "model": "baseline" if args.baseline else f"sagan+aux({args.aux})", "ch": args.ch,
                      "gen_batch": gb, "gen_showers_per_s": round(gen_rate, 1), "train_batch": tb,
                      "train_samples_per_s": round(train_rate, 1)}))
    return 0


# ---------------------------------------------------------------- main

def train_main(args):
    run = Run(args)
    if run.ddp:
        import torch.distributed as dist
        dist.init_process_group("nccl" if run.device.type == "cuda" else "gloo")
    out = args.out or os.path.join("runs", "sagan_aux")
    ckpt_path = os.path.join(out, "ckpt.pt")
    toy = args.data is None
    path = common.toy_path("lhcb", args.toy_n, 0) if toy else args.data
    if toy:
        if run.main:
            print(f"no --data: training on TOY lhcb showers ({path})", flush=True)
            if not os.path.isfile(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                common.write_toy("lhcb", path, args.toy_n, 0)
        if run.ddp:
            dist.barrier()
    resume = None
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise DataError(f"{ckpt_path}: no checkpoint to resume from")
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for k in ("nz", "ch", "aux", "baseline", "pdg", "val_frac", "seed"):
            setattr(args, k, resume["args"][k])
    d, toy_attr = load_mlhep(path)
    toy = toy or toy_attr
    label = "TOY " if toy else ""
    if args.pdg is not None:
        keep = d["ParticlePDG"] == args.pdg
        if not keep.any():
            raise DataError(f"{path}: no events with ParticlePDG == {args.pdg}")
        d = {k: v[keep] for k, v in d.items()}
    n = len(d["EnergyDeposit"])
    perm = np.random.default_rng(args.seed).permutation(n)
    n_val = max(1, int(round(args.val_frac * n)))
    if n - n_val < 2:
        raise DataError(f"{path}: only {n} events, too few to hold out a validation split")
    val_idx, tr_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    images, raw = d["EnergyDeposit"].astype(np.float32), conditions(d)

    if resume is not None:
        norm = resume["norm"]
    else:   # normalisation constants from the training split only
        nz_cells = images[tr_idx][images[tr_idx] > 0]
        e0 = float(np.percentile(nz_cells, 1)) if nz_cells.size else 1.0
        y = aux_target(args.aux, images[tr_idx], d["ParticleMomentum"][tr_idx], d["ParticlePoint"][tr_idx])
        norm = {"cond_mean": raw[tr_idx].mean(0), "cond_std": raw[tr_idx].std(0) + 1e-6, "e0": e0,
                "s": float(np.log1p(images[tr_idx].max() / e0)) or 1.0,
                "aux_mean": y.mean(0), "aux_std": y.std(0) + 1e-6}
    os.makedirs(out, exist_ok=True) if run.main else None

    dev = run.device
    tr = torch.as_tensor(tr_idx, device=dev)
    X = (torch.log1p(torch.as_tensor(images, device=dev) / norm["e0"]) / norm["s"]).unsqueeze(1)
    RAW = torch.as_tensor(raw, dtype=torch.float32, device=dev)
    C = torch.as_tensor((raw - norm["cond_mean"]) / norm["cond_std"], dtype=torch.float32, device=dev)
    Y = torch.as_tensor((aux_target(args.aux, images, d["ParticleMomentum"], d["ParticlePoint"]) - norm["aux_mean"])
                        / norm["aux_std"], dtype=torch.float32, device=dev)

    random.seed(args.seed + run.rank)
    np.random.seed(args.seed + run.rank)
    torch.manual_seed(args.seed)                      # same initial weights on every rank
    G, D, R = (m.to(dev) if m is not None else None for m in build(args))
    torch.manual_seed(args.seed + run.rank)
    opt_g = torch.optim.Adam(G.parameters(), args.lr_g, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(list(D.parameters()) + (list(R.parameters()) if R else []), args.lr_d, betas=(0.0, 0.9))
    epoch0, step = 0, 0
    if resume is not None:
        for k, m in (("G", G), ("D", D), ("R", R)):
            if m is not None:
                m.load_state_dict(resume["model"][k])
        opt_g.load_state_dict(resume["optim"]["G"])
        opt_d.load_state_dict(resume["optim"]["D"])
        epoch0, step = resume["epoch"], resume["step"]
        rngs = resume["rng"]
        set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0])
    if run.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
    # training views: DDP-wrapped for D's step; Dp, Rp (plain) score G's fakes; all compiled with --compile
    Gt, Dt, Rt = (DDP(m) if run.ddp and m is not None else m for m in (G, D, R))
    Gt, Dt, Rt, Dp, Rp = (torch.compile(m) if args.compile and m is not None else m for m in (Gt, Dt, Rt, D, R))
    if args.dtype == "bf16" and dev.type != "cuda" and run.main:
        print("--dtype bf16 is ignored on CPU (autocast is used on CUDA only)", flush=True)

    log = open(os.path.join(out, "log.txt"), "a") if run.main else None
    npar = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731

    def say(msg):
        if run.main:
            print(msg, flush=True)
            log.write(msg + "\n")
            log.flush()

    b = args.batch_size
    steps_per_epoch = max(1, len(tr_idx) // (b * run.world))
    say(f"{SCRIPT}: {'baseline GAN' if args.baseline else 'SAGAN + aux regressor (' + args.aux + ')'} | "
        f"{label}data {path}: {len(tr_idx)} train, {len(val_idx)} held out | device {dev} | "
        f"G {npar(G)} D {npar(D)} R {npar(R)} parameters")
    t0, done, last = time.time(), 0, {}
    for epoch in range(epoch0, args.epochs):
        for m in (G, D, R):
            m.train() if m is not None else None
        order = tr[torch.randperm(len(tr), device=dev)]
        for i in range(steps_per_epoch):
            idx = order[(i * b) % len(order):][:b]
            last = train_step((Gt, Dt, Rt, Dp, Rp), (opt_g, opt_d), (X[idx], C[idx], RAW[idx], Y[idx]), args, run,
                              norm)
            step += 1
            done += 1
            if step % args.log_every == 0 or i == steps_per_epoch - 1:
                el = time.time() - t0
                rate = done * b * run.world / el
                left = ((args.epochs - epoch - 1) * steps_per_epoch + steps_per_epoch - i - 1) * b * run.world / rate
                say(f"epoch {epoch + 1}/{args.epochs} | step {step} | loss_d {last['loss_d']:.4f} "
                    f"loss_g {last['loss_g']:.4f} mse {last['mse']:.4f} | {rate:.0f} samples/s | ETA {fmt_time(left)}")
        rngs = [rng_state()]
        if run.ddp:
            rngs = [None] * run.world
            dist.all_gather_object(rngs, rng_state())
        if run.main and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs):
            models = {k: m.state_dict() for k, m in (("G", G), ("D", D), ("R", R)) if m is not None}
            torch.save({"model": models, "optim": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                        "epoch": epoch + 1, "step": step, "args": vars(args), "rng": rngs, "norm": norm,
                        "geometry": "lhcb", "toy": toy}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)

    if run.main:
        final(args, G, R, norm, d, images, raw, val_idx, tr_idx, path, out, toy, label, epoch0, step, dev, say)
        log.close()
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def final(args, G, R, norm, d, images, raw, val_idx, tr_idx, path, out, toy, label, epoch0, step, dev, say):
    """Generate for the held-out conditions; metrics.json and plots."""
    mom, point, pdg = d["ParticleMomentum"][val_idx], d["ParticlePoint"][val_idx], d["ParticlePDG"][val_idx]
    torch.manual_seed(args.seed + 12345)
    gen = sample(G, (raw[val_idx] - norm["cond_mean"]) / norm["cond_std"], norm, args.nz, dev)
    write_mlhep(os.path.join(out, "generated.h5"), gen, mom, point, pdg, toy)
    if path.endswith(".npz"):
        write_mlhep(os.path.join(out, "generated.npz"), gen, mom, point, pdg, toy)
    m = min(len(val_idx), args.n_eval)
    real = images[val_idx][:m]
    metrics, feats = evaluate(real, gen[:m], mom[:m], point[:m], seed=args.seed)
    if R is not None:   # regressor's error on held-out real showers, in target units
        R.eval()
        rr, t = raw[val_idx][:m], (lambda a: torch.as_tensor(a, dtype=torch.float32, device=dev))
        with torch.no_grad():
            pred = R(t(real).unsqueeze(1), frame_maps(t(rr)), t((rr - norm["cond_mean"]) / norm["cond_std"]))
        pred = pred.cpu().numpy() * norm["aux_std"] + norm["aux_mean"]
        truth = aux_target(args.aux, real, mom[:m], point[:m])
        metrics["aux_rmse_val"] = np.sqrt(((pred - truth) ** 2).mean(0)).tolist()
        metrics["aux_target_std_val"] = truth.std(0).tolist()
    metrics.update({"script": SCRIPT, "toy": toy, "data": path, "model": "baseline" if args.baseline else "sagan_aux",
                    "aux": args.aux, "aux_weight": args.aux_weight, "epochs": args.epochs, "step": step,
                    "resumed_from_epoch": epoch0, "n_train": len(tr_idx), "n_val": len(val_idx), "n_eval": m,
                    "val_indices": val_idx.tolist()})
    tmp = os.path.join(out, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    if feats is not None:
        make_plots(real, gen[:m], mom[:m], feats, os.path.join(out, "plots"), label)
    say(f"{label}PRD-AUC images {metrics['prd_auc_images']} physics {metrics['prd_auc_physics']} "
        f"score {metrics['score']} -> {out}/metrics.json")


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
