"""VAE-GAN with locally connected layers, ensembles and amplification for ILD photon showers.

After Bieringer et al., "Calomplification - the power of generative calorimeter models",
JINST 17 P09028 (2022): a VAE-GAN trained on only 1,000 ILD photon showers reduced to 10x10
pixels, in ensembles, with epoch selection on physics observables, and the question it answers:
how many real showers is a large generated sample worth ("amplification")?

Run:
    python vaegan.py                                   # TOY ild showers (made once under data/)
    python vaegan.py --data ild_photons.h5 --ensemble 3 --amplify       # real ILD file
    python vaegan.py --generate 100000 --ckpt runs/vaegan/ckpt.pt --out gen.h5
    python vaegan.py --benchmark
    torchrun --nproc_per_node=3 vaegan.py --data ild_photons.h5 --ensemble 3   # one member per rank

Data: the ILD layout (group `30x30`: `energy` (N,1) GeV, `layers` (N,30,30,30) MeV) is reduced
with common.reduce_ild (0.1 MeV MIP cut, 30 layers and 3x3 cells summed) to 10x10 pixels of 15 mm
(geometry "ild10"); a file with `showers` (N,10,10) MeV is taken as already reduced. The first
--n-train showers of a seeded permutation train; the rest are held-out truth (indices in metrics.json).

Output: a 30x30x30 shower cannot be recovered from its 10x10 reduction, so generated.h5 is ALWAYS
reduced: `showers` (N,10,10) MeV (plus the held-out `energy` (N,1) GeV when the input had it).
truth.h5 holds the held-out showers in the same format, for `evaluate.py truth.h5 generated.h5`.

Epoch selection (after each epoch, generated vs training set, common.quantile_jsd over
--select-bins quantiles, mean of the five; each member's best epoch is what sampling uses):
    1. e_vis   total visible energy: sum of the 100 pixels (MeV)
    2. n_hits  number of pixels above the 0.1 MeV MIP cut
    3. cog_x   energy-weighted centre of gravity in x (mm)
    4. cog_y   energy-weighted centre of gravity in y (mm)
    5. pixel   per-pixel energy spectrum: all pixel energies above the cut, pooled (MeV)

Model (Larsen et al. VAE/GAN): encoder and decoder of locally connected layers (convolutions
without weight sharing); discriminator hidden features replace the element-wise reconstruction
loss ("feature-wise similarity"), plus the adversarial loss on reconstructed and prior samples,
KL, one-sided label smoothing and mini-batch discrimination (Salimans et al. 2016); switched off
by --recon pixel, --adv-weight 0, --kl-weight, --label-smooth 0, --mbd-kernels 0. Pixels are
modelled as log(1 + E/MeV) / log(1 + largest training pixel); generated pixels below the MIP
cut are set to 0, as in the data.

Deviations from the paper and why:
- Layer sizes, latent size (16), optimiser (Adam 1e-3, betas 0.5/0.999, batch 32) and loss
  weights are our choice (*unconfirmed* in reference.md); the discriminator uses ordinary
  convolutions (locally connected layers are asked for in the encoder and decoder only).
- The discriminator also sees log(total visible energy) (--disc-energy 1, our addition): it
  helps the narrow visible-energy peak. One member, 12 epochs, 2000 toy showers (1000 train):
  held-out mean JSD 0.098 with it, 0.191 without; single runs, one seed.
- The five selection observables are the natural ones reference.md suggests (unconfirmed).
- Amplification (--amplify): common.amplification per shower-level observable (e_vis, n_hits,
  cog_x, cog_y), the held-out truth split into a reference half and a disjoint pool half. The
  paper used 218k truth and 1M generated; here --amp-n and the file set the sizes.
- torchrun puts member k on rank k % world (1,000 training showers gain nothing from splitting
  a batch); each member has its own random generator, so results do not depend on the world size.
"""
import argparse
import copy
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = "vaegan.py"
OBS = ("e_vis", "n_hits", "cog_x", "cog_y", "pixel")
MIP = common.ILD_MIP_CUT_MEV


class DataError(Exception):
    """Bad input: reported as one line on stderr, exit status 2."""


# ---------------------------------------------------------------- flags


def get_args(argv=None):
    p = argparse.ArgumentParser(description="VAE-GAN with locally connected layers for ILD showers "
                                "reduced to 10x10, ensembles, epoch selection and amplification.")
    a = p.add_argument
    a("--data", default=None, help="ILD HDF5 (group 30x30 with energy, layers) or reduced file with "
      "`showers` (N,10,10) MeV; default: toy ild showers made once under data/")
    a("--toy-n", type=int, default=21000, help="toy showers (TOY ild10) when --data is not given: "
      "--n-train train, the rest are the reference and truth-pool halves of the amplification study")
    a("--n-train", type=int, default=1000, help="training showers; the rest are held out as truth")
    a("--out", default=None, help="output folder (default runs/vaegan); with --generate the output .h5 file")
    a("--epochs", type=int, default=60, help="training epochs per ensemble member")
    a("--batch-size", type=int, default=32, help="minibatch size")
    a("--lr", type=float, default=1e-3, help="Adam learning rate of encoder, decoder, discriminator")
    a("--ensemble", type=int, default=3, help="number of models trained on the same training set")
    a("--latent", type=int, default=16, help="latent dimension")
    a("--channels", default="16,32", help="channels of the two locally connected layers (C1,C2)")
    a("--recon", choices=("feature", "pixel"), default="feature",
      help="reconstruction loss: feature = discriminator-feature similarity (VAE/GAN), pixel = element-wise MSE")
    a("--feat-weight", type=float, default=1.0, help="weight of the reconstruction loss in the decoder loss")
    a("--adv-weight", type=float, default=1.0, help="weight of the adversarial loss (0 = no GAN term)")
    a("--kl-weight", type=float, default=0.05, help="weight of the KL term in the encoder loss")
    a("--label-smooth", type=float, default=0.1, help="one-sided label smoothing: real label 1 - this (0 = off)")
    a("--mbd-kernels", type=int, default=16, help="mini-batch discrimination kernels (0 = off)")
    a("--disc-energy", type=int, choices=(0, 1), default=1,
      help="1: the discriminator also sees log(total visible energy) (sharpens the energy peak); 0: off")
    a("--select-bins", type=int, default=20, help="quantile bins of the epoch-selection JSD (>= 10 points per bin)")
    a("--amplify", action=argparse.BooleanOptionalAction, default=None,
      help="amplification study after training (default: on without --data, i.e. on the toy)")
    a("--amp-n", type=int, default=100000, help="generated showers for the amplification study")
    a("--quantiles", default=",".join(map(str, common.QUANTILE_COUNTS)), help="numbers of quantiles of the "
      "amplification study (those with >= 10 reference values per quantile are used)")
    a("--n-gen", type=int, default=None, help="showers in generated.h5 after training (default: held-out count)")
    a("--seed", type=int, default=0, help="random seed (split, init, minibatches)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    a("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the modules for training")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--ckpt-every", type=int, default=1, help="save the checkpoint every this many epochs")
    a("--log-every", type=int, default=1, help="print a progress line every this many epochs")
    a("--generate", type=int, default=None, metavar="N", help="sample N showers from --ckpt into --out FILE")
    a("--ckpt", default=None, help="checkpoint to sample from (with --generate)")
    a("--benchmark", action="store_true", help="print one JSON line of generation and training speed")
    args = p.parse_args(argv)
    try:
        args.channels = tuple(int(c) for c in args.channels.split(","))
        assert len(args.channels) == 2 and min(args.channels) > 0
        args.quantiles = tuple(int(c) for c in args.quantiles.split(","))
        assert min(args.quantiles) > 0
    except (ValueError, AssertionError):
        p.error(f"--channels must be two, --quantiles one or more positive integers, got {args.channels!r}, "
                f"{args.quantiles!r}")
    for lo, names in ((1, ("toy_n", "n_train", "epochs", "batch_size", "ensemble", "latent", "select_bins",
                           "amp_n", "ckpt_every", "log_every")),
                      (0, ("lr", "feat_weight", "adv_weight", "kl_weight", "mbd_kernels"))):
        for name in names:
            if not getattr(args, name) >= lo:
                p.error(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}")
    if not 0 <= args.label_smooth < 0.5:
        p.error(f"--label-smooth must be in [0, 0.5), got {args.label_smooth}")
    if args.generate is not None and (args.generate < 1 or not args.ckpt or not args.out):
        p.error("--generate N needs N >= 1, --ckpt PATH and --out FILE")
    if args.n_gen is not None and args.n_gen < 1:
        p.error(f"--n-gen must be >= 1, got {args.n_gen}")
    return args


# ---------------------------------------------------------------- data


def _check(path, what, *arrays):
    """DataError if any of the arrays (None = absent) holds NaN/inf or negative values."""
    arrays = [a for a in arrays if a is not None]
    if not all(np.isfinite(a).all() for a in arrays):
        raise DataError(f"{path}: {what}holds NaN or inf")
    if any((a < 0).any() for a in arrays):
        raise DataError(f"{path}: {what}holds negative energies")


def load_showers(path):
    """-> (showers (N,10,10) float32 MeV, energy (N,1) GeV or None, is_toy). Raises DataError."""
    import h5py
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file")
    with f:
        toy = bool(f.attrs.get("toy", False))
        energy = None
        if "30x30" in f and isinstance(f["30x30"], h5py.Group):
            g = f["30x30"]
            for key in ("energy", "layers"):
                if key not in g:
                    raise DataError(f"{path}: missing key 30x30/{key}")
            lay, en = g["layers"], g["energy"]
            if lay.ndim != 4 or lay.shape[1:] != (30, 30, 30):
                raise DataError(f"{path}: 30x30/layers has shape {lay.shape}, expected (N,30,30,30)")
            if en.shape not in ((lay.shape[0], 1), (lay.shape[0],)):
                raise DataError(f"{path}: 30x30/energy has shape {en.shape}, expected ({lay.shape[0]},1) "
                                f"(mismatched number of events)")
            energy = np.asarray(en[:], np.float32).reshape(-1, 1)
            parts = []
            for s in range(0, lay.shape[0], 1000):
                block = np.asarray(lay[s:s + 1000], np.float32)
                _check(path, "30x30/layers ", block)
                parts.append(common.reduce_ild(block))
            showers = np.concatenate(parts) if parts else np.zeros((0, 10, 10), np.float32)
        elif "showers" in f:
            showers = np.asarray(f["showers"][:], np.float32)
            if showers.ndim == 2 and showers.shape[1] == 100:
                showers = showers.reshape(-1, 10, 10)
            if showers.ndim != 3 or showers.shape[1:] != (10, 10):
                raise DataError(f"{path}: showers has shape {showers.shape}, expected (N,10,10)")
            if "energy" in f:
                energy = np.asarray(f["energy"][:], np.float32).reshape(-1, 1)
                if len(energy) != len(showers):
                    raise DataError(f"{path}: energy has {len(energy)} events, showers {len(showers)} "
                                    f"(mismatched number of events)")
        else:
            raise DataError(f"{path}: missing key 30x30/layers (ILD layout) or showers (reduced 10x10)")
    if len(showers) == 0:
        raise DataError(f"{path}: empty file (0 showers)")
    _check(path, "", showers, energy)
    return showers, energy, toy


def observables(showers):
    """The five observables of (N,10,10) MeV showers: dict of 1-d arrays, except pixel: (N,100)
    with NaN for the pixels below the MIP cut (so that a subset of showers is a subset of rows)."""
    s = np.asarray(showers, np.float64).reshape(len(showers), 100)
    g = common.geometry("ild10")
    e = s.sum(1)
    safe = np.where(e > 0, e, 1.0)
    return {"e_vis": e, "n_hits": (s > MIP).sum(1).astype(np.float64),
            "cog_x": np.where(e > 0, s @ g.x / safe, 0.0), "cog_y": np.where(e > 0, s @ g.y / safe, 0.0),
            "pixel": np.where(s > MIP, s, np.nan)}


def flat(v):
    return v[~np.isnan(v)]


def selection_score(ref_obs, showers, n_bins):
    """Mean quantile JSD over the five observables (and each one) of showers vs the reference."""
    obs = observables(showers)
    per = {}
    for k in OBS:
        r, v = flat(ref_obs[k]), flat(obs[k])
        per[k] = common.quantile_jsd(r, v, min(n_bins, len(r) // 10)) if len(v) else 1.0
    return float(np.mean(list(per.values()))), per


# ---------------------------------------------------------------- model


class LocallyConnected2d(nn.Module):
    """Like Conv2d, but every output position has its own weights (no weight sharing, hence no
    translation invariance). Weight (L, in*k*k, out) for the L output positions, bias (out, H', W');
    the in*k*k inputs of a position are ordered channel-major, then kernel row, then column."""

    def __init__(self, in_ch, out_ch, in_size, kernel=3, stride=1, padding=1):
        super().__init__()
        self.in_ch, self.out_ch, self.k, self.stride, self.pad = in_ch, out_ch, kernel, stride, padding
        h, w = in_size
        self.out_size = ((h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1)
        n_pos, fan_in = self.out_size[0] * self.out_size[1], in_ch * kernel * kernel
        bound = 1.0 / math.sqrt(fan_in)
        self.weight = nn.Parameter(torch.empty(n_pos, fan_in, out_ch).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_ch, *self.out_size).uniform_(-bound, bound))
        # flat index, into the zero-padded input plane, of every (output position, kernel offset):
        # one gather instead of F.unfold, whose CPU backward (col2im) loops over tiny copies
        wp = w + 2 * padding
        oy, ox = torch.meshgrid(torch.arange(self.out_size[0]) * stride, torch.arange(self.out_size[1]) * stride,
                                indexing="ij")
        ky, kx = torch.meshgrid(torch.arange(kernel), torch.arange(kernel), indexing="ij")
        idx = (oy.reshape(-1, 1) + ky.reshape(1, -1)) * wp + ox.reshape(-1, 1) + kx.reshape(1, -1)
        self.register_buffer("idx", idx.reshape(-1), persistent=False)           # (L*k*k,)

    def forward(self, x):
        b, n_pos = x.shape[0], self.weight.shape[0]
        xp = F.pad(x, (self.pad,) * 4).flatten(2)                               # (B, in, Hp*Wp)
        cols = xp[:, :, self.idx].view(b, self.in_ch, n_pos, self.k * self.k)   # (B, in, L, k*k)
        cols = cols.permute(2, 0, 1, 3).reshape(n_pos, b, -1)                   # (L, B, in*k*k)
        out = torch.bmm(cols, self.weight)                                      # (L, B, out)
        return out.permute(1, 2, 0).reshape(b, self.out_ch, *self.out_size) + self.bias


class Encoder(nn.Module):
    def __init__(self, latent, channels=(16, 32), size=10):
        super().__init__()
        c1, c2 = channels
        self.lc1 = LocallyConnected2d(1, c1, (size, size), 3, 1, 1)
        self.lc2 = LocallyConnected2d(c1, c2, self.lc1.out_size, 3, 2, 1)
        self.fc = nn.Linear(c2 * self.lc2.out_size[0] * self.lc2.out_size[1], 2 * latent)

    def forward(self, x):
        h = F.leaky_relu(self.lc2(F.leaky_relu(self.lc1(x), 0.2)), 0.2)
        mu, logvar = self.fc(h.flatten(1)).chunk(2, 1)
        return mu, logvar.clamp(-10, 10)


class Decoder(nn.Module):
    def __init__(self, latent, channels=(16, 32), size=10):
        super().__init__()
        c1, c2 = channels
        self.c2, self.half = c2, size // 2
        self.fc = nn.Linear(latent, c2 * self.half * self.half)
        self.lc1 = LocallyConnected2d(c2, c1, (size, size), 3, 1, 1)
        self.lc2 = LocallyConnected2d(c1, 1, (size, size), 3, 1, 1)

    def forward(self, z):
        h = F.leaky_relu(self.fc(z), 0.2).view(-1, self.c2, self.half, self.half)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return F.softplus(self.lc2(F.leaky_relu(self.lc1(h), 0.2)))


class MinibatchDiscrimination(nn.Module):
    """Salimans et al. 2016: per kernel b, o_b(x_i) = mean_{j != i} exp(-|M_ib - M_jb|_1) (the
    paper's sum divided by B - 1, so that it does not grow with the batch size)."""

    def __init__(self, in_features, kernels, dim=8):
        super().__init__()
        self.kernels, self.dim = kernels, dim
        self.T = nn.Parameter(torch.randn(in_features, kernels * dim) * 0.1)

    def forward(self, f):
        m = (f @ self.T).view(-1, self.kernels, self.dim)
        d = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3)                     # (B, B, kernels)
        return torch.cat([f, (torch.exp(-d).sum(1) - 1.0) / max(len(f) - 1, 1)], 1)


class Discriminator(nn.Module):
    """Two convolutions, a hidden layer (the feature-wise similarity layer), optionally the log of
    the total visible energy beside it, mini-batch discrimination, one logit."""

    def __init__(self, features=64, mbd_kernels=16, size=10, channels=(16, 32), energy_input=True):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels[0], 3, 1, 1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, 2, 1)
        self.fc = nn.Linear(channels[1] * ((size + 1) // 2) ** 2, features)
        self.energy_input = energy_input
        self.register_buffer("scale", torch.tensor(1.0))    # pixel transform constant, set by the trainer
        n = features + int(energy_input)
        self.mbd = MinibatchDiscrimination(n, mbd_kernels) if mbd_kernels else None
        self.out = nn.Linear(n + mbd_kernels, 1)

    def features(self, x):
        """The hidden layer whose activations define the feature-wise reconstruction loss."""
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return F.leaky_relu(self.fc(h.flatten(1)), 0.2)

    def forward(self, x):
        f = self.features(x)
        if self.energy_input:
            e = torch.expm1(x.float() * self.scale).clamp_min(0).sum((1, 2, 3))
            f = torch.cat([f, (torch.log1p(e) / self.scale).unsqueeze(1).to(f.dtype)], 1)
        return self.out(self.mbd(f) if self.mbd is not None else f).squeeze(1)


class VAEGAN(nn.Module):
    def __init__(self, latent=16, channels=(16, 32), mbd_kernels=16, disc_energy=True):
        super().__init__()
        self.latent = latent
        self.enc, self.dec = Encoder(latent, channels), Decoder(latent, channels)
        self.disc = Discriminator(mbd_kernels=mbd_kernels, energy_input=disc_energy)


def build(args):
    return VAEGAN(args["latent"], tuple(args["channels"]), args["mbd_kernels"], bool(args.get("disc_energy", 1)))


def load_decoders(args, bests, device):
    """The decoders of each member's best epoch, in eval mode."""
    decs = [build(args).dec.to(device).eval() for _ in bests]
    for d, b in zip(decs, bests):
        d.load_state_dict(b["dec"])
    return decs


# ---------------------------------------------------------------- train


def to_model(showers, scale):
    return torch.log1p(showers).unsqueeze(1) / scale


def from_model(y, scale):
    e = torch.expm1(y.squeeze(1).float() * scale)
    return torch.where(e < MIP, torch.zeros_like(e), e)


def mip_cut(y, scale):
    """Model-space pixels below the MIP cut set to exactly 0 in the training path too, so that the
    discriminator sees generated showers as sampling writes them (0 or >= the cut, as the data); the
    gradient passes straight through, so a pixel below the cut can still be pulled over it."""
    return y - (y * (y < math.log1p(MIP) / scale)).detach()


def to_cpu(obj):
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj.detach().cpu() if torch.is_tensor(obj) else obj


class Member:
    """One ensemble member: model, optimisers, its own random generator, best epoch so far."""

    def __init__(self, k, args, device):
        torch.manual_seed(args["seed"] * 1000 + k)
        self.k, self.model = k, build(args).to(device)
        m, lr, betas = self.model, args["lr"], (0.5, 0.999)
        self.opt = {n: torch.optim.Adam(getattr(m, n).parameters(), lr, betas=betas) for n in ("enc", "dec", "disc")}
        self.gen = torch.Generator(device).manual_seed(args["seed"] * 1000 + k)
        self.best = {"epoch": 0, "score": math.inf, "dec": copy.deepcopy(m.dec.state_dict())}
        self.fns = {"enc": m.enc, "dec": m.dec, "disc": m.disc, "feat": m.disc.features}

    def state(self):
        """Everything of this member on the CPU (for the checkpoint and the torchrun gather)."""
        return to_cpu({"model": self.model.state_dict(), "optim": {n: o.state_dict() for n, o in self.opt.items()},
                       "gen": self.gen.get_state(), "best": self.best})

    def load(self, st):
        self.model.load_state_dict(st["model"])
        for n, o in self.opt.items():
            o.load_state_dict(st["optim"][n])
        self.gen.set_state(st["gen"])
        self.best = st["best"]


def train_step(mb, x, args, autocast):
    """One VAE/GAN step (Larsen et al.): D on real vs reconstructed + prior samples; encoder on
    KL + reconstruction; decoder on reconstruction + adversarial. Returns (loss_d, loss_g, kl)."""
    f, m, g = mb.fns, mb.model, mb.gen
    bce = F.binary_cross_entropy_with_logits
    with autocast():
        mu, logvar = f["enc"](x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g, device=x.device)
        zp = torch.randn(mu.shape, generator=g, device=x.device)
        xr, xp = (mip_cut(f["dec"](v), m.disc.scale) for v in (z, zp))
        train_d = args["adv_weight"] > 0 or args["recon"] == "feature"
        if train_d:
            d_real = f["disc"](x)
            loss_d = bce(d_real, torch.full_like(d_real, 1.0 - args["label_smooth"]))
            for fake in (xr.detach(), xp.detach()):
                d_fake = f["disc"](fake)
                loss_d = loss_d + 0.5 * bce(d_fake, torch.zeros_like(d_fake))
    if train_d:
        mb.opt["disc"].zero_grad(set_to_none=True)
        loss_d.float().backward()
        mb.opt["disc"].step()
    with autocast():
        # Gaussian log-likelihood up to a constant: squared error summed over features (pixels)
        a_, b_ = (f["feat"](xr), f["feat"](x).detach()) if args["recon"] == "feature" else (xr, x)
        like = (a_.float() - b_.float()).pow(2).flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        adv = torch.zeros((), device=x.device)
        if args["adv_weight"] > 0:
            for fake in (xr, xp):
                d_fake = f["disc"](fake)
                adv = adv + bce(d_fake, torch.ones_like(d_fake))
        loss_e = args["kl_weight"] * kl + like
        loss_g = args["feat_weight"] * like + args["adv_weight"] * adv
    pe, pd = list(m.enc.parameters()), list(m.dec.parameters())
    ge = torch.autograd.grad(loss_e.float(), pe, retain_graph=True)
    gd = torch.autograd.grad(loss_g.float(), pd, allow_unused=True)
    for ps, gs, n in ((pe, ge, "enc"), (pd, gd, "dec")):
        for p_, g_ in zip(ps, gs):
            p_.grad = g_
        mb.opt[n].step()
    return (loss_d.item() if train_d else 0.0), loss_g.item(), kl.item()


@torch.no_grad()
def sample_decoders(decoders, n, latent, scale, gen, device, batch=10000):
    """n showers (numpy (n,10,10) MeV) drawn evenly at random from the ensemble's decoders."""
    who = torch.randint(len(decoders), (n,), generator=gen, device=device)
    out = torch.empty(n, 10, 10, device=device)
    for s in range(0, n, batch):
        z = torch.randn(min(batch, n - s), latent, generator=gen, device=device)
        w = who[s:s + len(z)]
        for k, dec in enumerate(decoders):
            sel = (w == k).nonzero().squeeze(1)
            if len(sel):
                out[s + sel] = from_model(dec(z[sel]), scale)
    return out.cpu().numpy()


def write_h5(path, showers, energy=None, toy=False):
    import h5py
    tmp = path + f".tmp{os.getpid()}"
    with h5py.File(tmp, "w") as f:
        f["showers"] = showers.astype(np.float32)
        if energy is not None:
            f["energy"] = energy.astype(np.float32)
        f.attrs["toy"] = bool(toy)
        f.attrs["format"] = "ILD reduced to 10x10 (MIP cut 0.1 MeV, layers and 3x3 cells summed), MeV"
    os.replace(tmp, path)


def autocast_fn(args, device):
    """bf16 autocast on CUDA with --dtype bf16, otherwise a no-op context."""
    if args.dtype == "bf16" and device.type == "cuda":
        return lambda: torch.autocast("cuda", torch.bfloat16)
    return lambda: torch.autocast("cpu", enabled=False)


def json_num(v):
    """inf (the generated sample beats the whole truth pool) as the string "inf": strict JSON."""
    return "inf" if v is not None and math.isinf(v) else v


def amplification_study(truth, gen_showers, quantiles, n_train, seed):
    """The paper's protocol on each of the five observables (common.amplification_scan): the held-out
    truth split into a reference half and a disjoint pool half; truth subsets of growing size (the
    training size and its multiples among them) and the generated sample against the reference."""
    perm = np.random.default_rng(seed).permutation(len(truth))
    half = len(truth) // 2
    ref, pool, gen = (observables(x) for x in (truth[perm[:half]], truth[perm[half:]], gen_showers))
    sizes = np.r_[np.geomspace(10, len(truth) - half, 20), n_train * np.array([1, 2, 5, 10])]
    return {k: common.amplification_scan(ref[k], pool[k], gen[k], quantiles, sizes, seed=seed) for k in OBS}


def make_plots(out, title, train, truth, gen, amp, history, n_train, len_gen=0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)

    def save(fig, name, suptitle=None):
        if suptitle:
            fig.suptitle(f"{title}: {suptitle}")
            fig.tight_layout()
        p = os.path.join(out, "plots", name)
        fig.savefig(p + ".tmp.png", dpi=90)
        plt.close(fig)
        os.replace(p + ".tmp.png", p)

    o = {n: {k: flat(v) for k, v in observables(s).items()}
         for n, s in (("train", train), ("held-out truth", truth), ("generated", gen))}
    fig, ax = plt.subplots(1, 5, figsize=(20, 3.6))
    for a, k in zip(ax, OBS):
        lo, hi = np.percentile(np.concatenate([v[k] for v in o.values()]), [0.5, 99.5])
        bins = np.geomspace(MIP, max(hi, 1.0) * 3, 60) if k == "pixel" else np.linspace(lo, max(hi, lo + 1e-3), 40)
        for n, v in o.items():
            a.hist(v[k], bins, density=True, histtype="step", label=f"{n} ({len(v['e_vis'])})")
        a.set_xlabel(k + (" (pixels above the MIP cut) [MeV]" if k == "pixel" else ""))
        if k == "pixel":
            a.set(xscale="log", yscale="log")
    ax[0].legend()
    save(fig, "observables.png", "observables")

    if history:
        fig, a = plt.subplots(figsize=(7, 4.5))
        for k in sorted({h["member"] for h in history}):
            hs = [h for h in history if h["member"] == k]
            a.plot([h["epoch"] for h in hs], [h["score"] for h in hs], label=f"member {k}")
        a.set(yscale="log", xlabel="epoch", ylabel="mean quantile JSD (5 observables)",
              title=f"{title}: epoch selection vs training set")
        a.legend()
        save(fig, "selection.png")

    if amp:   # the paper's figure: JSD vs number of quantiles, truth subsets and generated
        fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
        for a, k in zip(ax.flat, OBS):
            r = amp[k]
            for m in sorted({m for m in n_train * np.array([1, 2, 5, 10]) if m in r["sizes"]} | {r["sizes"][-1]}):
                a.plot(r["n_quantiles"], r["truth_jsd"][:, list(r["sizes"]).index(m)], "o-", ms=3,
                       label=f"truth, {m} showers" + (" (= training size)" if m == n_train else ""))
            a.plot(r["n_quantiles"], r["gen_jsd"], "s-", c="r", lw=2, label=f"generated ({len_gen} showers)")
            a.set(xscale="log", yscale="log", xlabel="number of quantiles", ylabel="quantile JSD vs reference",
                  title=k)
            a.legend(fontsize=7)
        a = ax.flat[5]
        for k in OBS:
            eq = amp[k]["equivalent_size"]
            ks = [q for q in eq if eq[q] is not None]
            a.plot(ks, [min(eq[q], amp[k]["sizes"][-1] * 1.5) for q in ks], "o-", ms=3, label=k)
        a.axhline(n_train, ls="--", c="gray", label=f"training size ({n_train})")
        a.axhline(amp["e_vis"]["sizes"][-1], ls=":", c="k", label="whole truth pool (above: better than pool)")
        a.set(xscale="log", yscale="log", xlabel="number of quantiles", ylabel="equivalent truth size",
              title="generated sample worth (truth showers)")
        a.legend(fontsize=7)
        save(fig, "amplification.png", "amplification (Calomplification protocol)")


def train(args, showers, energy, toy, train_idx, held_idx, device, dist_info):
    rank, world = dist_info
    A = vars(args)
    out = args.out
    ckpt_path = os.path.join(out, "ckpt.pt")
    title = ("TOY " if toy else "") + "ILD photons 10x10"
    x_np = showers[train_idx]
    scale = float(np.log1p(x_np.max()))
    ref_obs = observables(x_np)
    autocast = autocast_fn(args, device)
    members = [Member(k, A, device) for k in range(args.ensemble)]
    for mb in members:
        mb.model.disc.scale.fill_(scale)
    mine = [mb for mb in members if mb.k % world == rank]
    history, start, step = [], 0, 0
    if args.resume:
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        if len(ck["members"]) != args.ensemble:
            raise DataError(f"{ckpt_path}: holds {len(ck['members'])} ensemble members, --ensemble is {args.ensemble}")
        for mb, st in zip(members, ck["members"]):
            mb.load(st)
        start, step, history, scale = ck["epoch"], ck["step"], ck["history"], ck["scale"]
        random.setstate(ck["rng"]["python"])
        np.random.set_state(ck["rng"]["numpy"])
        torch.set_rng_state(ck["rng"]["torch"])
        if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        log(f"resumed from {ckpt_path} at epoch {start}", out, rank)
    X = to_model(torch.from_numpy(x_np).to(device), scale)         # training set on the device
    if args.compile:
        for mb in mine:
            mb.fns = {n: torch.compile(fn) for n, fn in mb.fns.items()}
    n, bs = len(X), min(args.batch_size, len(X))
    t0, done = time.time(), 0
    for epoch in range(start + 1, args.epochs + 1):
        losses = []
        for mb in mine:
            mb.model.train()
            perm = torch.randperm(n, generator=mb.gen, device=device)
            for s in range(0, n - bs + 1, bs):
                losses.append(train_step(mb, X[perm[s:s + bs]], A, autocast))
                done += bs
            mb.model.eval()
            g = torch.Generator(device).manual_seed(args.seed * 7919 + 1000 * mb.k + epoch)
            gen = sample_decoders([mb.model.dec], n, args.latent, scale, g, device)
            score, per = selection_score(ref_obs, gen, args.select_bins)
            history.append({"member": mb.k, "epoch": epoch, "score": score, **per})
            if score < mb.best["score"]:
                mb.best = {"epoch": epoch, "score": score, "dec": copy.deepcopy(mb.model.dec.state_dict())}
        step += len(range(0, n - bs + 1, bs))
        if world > 1:
            got = [None] * world
            mine_hist = history[-len(mine):] if mine else []
            dist.all_gather_object(got, ({mb.k: mb.state() for mb in mine}, losses, mine_hist))
            states, losses = {}, []
            history = [h for h in history if h["epoch"] < epoch]
            for st, ls, hs in got:
                states.update(st)
                losses += ls
                history += hs
            for mb in members:
                if mb not in mine:
                    mb.load(states[mb.k])
        if rank == 0 and (epoch % args.log_every == 0 or epoch == args.epochs):
            ld, lg, kl = np.mean(losses, 0) if losses else (0, 0, 0)
            rate = done * world / max(time.time() - t0, 1e-9)
            eta = int(max((time.time() - t0) / (epoch - start) * (args.epochs - epoch), 0))
            best = " ".join(f"m{mb.k}:{mb.best['score']:.4f}@{mb.best['epoch']}" for mb in members)
            log(f"epoch {epoch}/{args.epochs} | step {step} | loss_d {ld:.3f} loss_g {lg:.3f} kl {kl:.2f} | "
                f"{rate:.0f} samples/s | ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d} | "
                f"best JSD {best}", out, rank)
        if rank == 0 and (epoch % args.ckpt_every == 0 or epoch == args.epochs):
            ck = {"members": [mb.state() for mb in members], "epoch": epoch, "step": step, "args": A,
                  "scale": scale, "geometry": "ild10", "history": history, "train_indices": train_idx,
                  "heldout_indices": held_idx, "rng": {
                      "python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
            torch.save(ck, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    if rank != 0:
        return 0
    # ---- after training: sample from the best epochs of all members, write, evaluate
    decs = load_decoders(A, [mb.best for mb in members], device)
    g = torch.Generator(device).manual_seed(args.seed + 12345)
    truth = showers[held_idx]
    n_gen = args.n_gen or len(held_idx)
    gen = sample_decoders(decs, n_gen, args.latent, scale, g, device)
    en = None if energy is None else energy[held_idx][np.arange(n_gen) % len(held_idx)]
    write_h5(os.path.join(out, "generated.h5"), gen, en, toy)
    write_h5(os.path.join(out, "truth.h5"), truth, None if energy is None else energy[held_idx], toy)
    score, per = selection_score(observables(truth), gen, args.select_bins)
    metrics = {"script": SCRIPT, "data": args.data, "toy": toy, "n_train": len(train_idx),
               "n_heldout": len(held_idx), "n_generated": n_gen, "ensemble": args.ensemble,
               "best_epochs": [mb.best["epoch"] for mb in members],
               "best_train_jsd": [mb.best["score"] for mb in members],
               "heldout_jsd_mean": score, "heldout_jsd": per, "select_bins": args.select_bins,
               "output_format": "showers (N,10,10) MeV, reduced ILD",
               "train_indices": train_idx.tolist(), "heldout_indices": held_idx.tolist()}
    amp = None
    if args.amplify:
        amp_gen = sample_decoders(decs, args.amp_n, args.latent, scale, g, device)
        amp = amplification_study(truth, amp_gen, args.quantiles, len(train_idx), args.seed)
        eqs = {k: {q: json_num(v) for q, v in r["equivalent_size"].items()} for k, r in amp.items()}
        top = {k: eqs[k][max(eqs[k])] for k in OBS}
        worth = {k: v is not None and (v == "inf" or v > len(train_idx)) for k, v in top.items()}
        metrics["amplification"] = {
            "n_train": len(train_idx), "n_generated": args.amp_n, "n_reference": len(truth) // 2,
            "n_truth_pool": len(truth) - len(truth) // 2, "equivalent_size": eqs,
            "at_max_quantiles": {k: {"n_quantiles": max(eqs[k]), "equivalent_size": top[k],
                                     "worth_more_than_training": worth[k]} for k in OBS},
            "n_observables_amplified": int(sum(worth.values())),
            "curves": {k: {c: np.asarray(r[c]).tolist() for c in ("n_quantiles", "sizes", "truth_jsd", "gen_jsd")}
                       for k, r in amp.items()}}
    make_plots(out, title, x_np, truth, gen, amp, history, len(train_idx), args.amp_n)
    metrics["history"] = history
    path = os.path.join(out, "metrics.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(metrics, fh, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    os.replace(path + ".tmp", path)
    log(f"held-out JSD mean {score:.4f}; wrote {out}/generated.h5 ({n_gen} showers, reduced 10x10 format), "
        f"truth.h5, metrics.json, plots/", out, rank)
    if amp:
        log(f"{title}: {args.amp_n} generated showers from {len(train_idx)} training showers are worth (truth "
            "showers, at the most quantiles): " + ", ".join(f"{k} {v['equivalent_size']} (K={v['n_quantiles']})"
            for k, v in metrics["amplification"]["at_max_quantiles"].items())
            + f"; more than the training set for {metrics['amplification']['n_observables_amplified']} of 5",
            out, rank)
    return 0


def log(msg, out, rank=0):
    if rank != 0:
        return
    print(msg, flush=True)
    if out and os.path.isdir(out):
        with open(os.path.join(out, "log.txt"), "a") as fh:
            fh.write(msg + "\n")


# ---------------------------------------------------------------- generate


def generate(args, device):
    if not os.path.isfile(args.ckpt):
        raise DataError(f"{args.ckpt}: no such checkpoint")
    try:
        ck = torch.load(args.ckpt, map_location=device, weights_only=False)
        A = ck["args"]
        decs = load_decoders(A, [st["best"] for st in ck["members"]], device)
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is bad input
        raise DataError(f"{args.ckpt}: not a vaegan.py checkpoint ({type(e).__name__})")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise DataError(f"{args.out}: folder does not exist")
    g = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    gen = sample_decoders(decs, args.generate, A["latent"], ck["scale"], g, device)
    write_h5(args.out, gen, None, A.get("toy", False))
    print(f"wrote {args.generate} showers (reduced 10x10 format, MeV) from {len(decs)} ensemble members to "
          f"{args.out} in {time.time() - t0:.1f} s")
    return 0


def benchmark(args, device):
    A = vars(args)
    autocast = autocast_fn(args, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mb = Member(0, A, device)
    if args.compile:
        mb.fns = {n: torch.compile(fn) for n, fn in mb.fns.items()}
    decs = [build(A).dec.to(device).eval() for _ in range(args.ensemble)]
    gb = 10000 if device.type == "cuda" else 2000
    g = torch.Generator(device).manual_seed(0)
    res = {"script": SCRIPT, "device": device.type, "dtype": args.dtype, "ensemble": args.ensemble}

    def per_s(fn, n, warmup, min_reps):
        """n items per call: calls per second (after warmup calls, >= 1.5 s and min_reps calls) times n."""
        for _ in range(warmup):
            fn()
        sync()
        t0, reps = time.time(), 0
        while time.time() - t0 < 1.5 or reps < min_reps:
            fn()
            sync()
            reps += 1
        return round(n * reps / (time.time() - t0), 1)

    with autocast():
        res.update(gen_batch=gb, gen_showers_per_s=per_s(
            lambda: sample_decoders(decs, gb, args.latent, 6.0, g, device), gb, 1, 2))
    x = torch.rand(args.batch_size, 1, 10, 10, generator=g, device=device)
    res.update(train_batch=args.batch_size,
               train_samples_per_s=per_s(lambda: train_step(mb, x, A, autocast), args.batch_size, 3, 3))
    print(json.dumps(res))
    return 0


# ---------------------------------------------------------------- main


def main(argv=None):
    args = get_args(argv)
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"{SCRIPT}: error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.dtype == "bf16" and not cuda and rank == 0:
        print(f"{SCRIPT}: --dtype bf16 is ignored on CPU (fp32)", file=sys.stderr)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    random.seed(args.seed)
    try:
        if args.benchmark:
            return benchmark(args, device)
        if args.generate is not None:
            return generate(args, device)
        args.out = args.out or os.path.join("runs", "vaegan")
        args.amplify = args.data is None if args.amplify is None else args.amplify
        if args.data is None:
            args.data = common.toy_path("ild10", args.toy_n, args.seed)
            if rank == 0:
                print(f"no --data: training on TOY ild showers ({args.data})", flush=True)
                if not os.path.exists(args.data):
                    os.makedirs(os.path.dirname(args.data), exist_ok=True)
                    common.write_toy("ild10", args.data, args.toy_n, args.seed, workers=1)
        if ddp and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        showers, energy, toy = load_showers(args.data)
        if len(showers) <= args.n_train:
            raise DataError(f"{args.data}: {len(showers)} showers, need more than --n-train {args.n_train} "
                            f"(the rest is held-out truth)")
        if args.n_train < 10:
            raise DataError(f"{args.data}: --n-train {args.n_train} is too small for epoch selection (>= 10)")
        if args.amplify and (len(showers) - args.n_train) // 2 < 10 * min(args.quantiles):
            raise DataError(f"{args.data}: {len(showers) - args.n_train} held-out showers are too few for "
                            f"--amplify with {min(args.quantiles)} quantiles (need {20 * min(args.quantiles)})")
        ckpt = os.path.join(args.out, "ckpt.pt")
        if args.resume and not os.path.isfile(ckpt):
            raise DataError(f"{ckpt}: no checkpoint to resume from")
        args.toy = toy
        perm = np.random.default_rng(args.seed).permutation(len(showers))
        train_idx, held_idx = np.sort(perm[:args.n_train]), np.sort(perm[args.n_train:])
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
        if ddp:
            dist.barrier()
        log(f"{len(showers)} showers from {args.data}{' (TOY)' if toy else ''}: {len(train_idx)} train, "
            f"{len(held_idx)} held out; ensemble of {args.ensemble} on {device}", args.out, rank)
        rc = train(args, showers, energy, toy, train_idx, held_idx, device, (rank, world))
    except DataError as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()
    return rc


if __name__ == "__main__":
    sys.exit(main())
