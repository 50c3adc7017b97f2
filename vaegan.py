"""VAE-GAN with locally connected layers, ensembles and amplification for ILD photon showers.

After Bieringer et al., "Calomplification", JINST 17 P09028 (2022): a VAE-GAN trained on only 1,000 ILD
photon showers reduced to 10x10 pixels; how many real showers is a large generated sample worth?

    python vaegan.py        # TOY ild10 (made once under data/): 1,000 train, ensemble of 3, amplification
    python vaegan.py --data ild_photons.h5 --amplify
    python vaegan.py --generate 100000 --ckpt runs/vaegan/ckpt.pt --out gen.h5
    python vaegan.py --benchmark
    torchrun --nproc_per_node=3 vaegan.py --data ild_photons.h5         # member k on rank k % world

In: ILD HDF5 (`30x30/energy` (N,1) GeV, `30x30/layers` (N,30,30,30) MeV), reduced by common.reduce_ild
(0.1 MeV MIP cut per cell, then layers and 3x3 cells summed), or `showers` (N,10,10) MeV already reduced
(`python common.py toy ild10`). Out: generated.h5, truth.h5 (held out), both `showers` (N,10,10) MeV.

The paper's (reference.md; no code is public): reduction and MIP cut; a VAE-GAN (Larsen et al.: discriminator features
replace the pixel-wise reconstruction loss) with locally connected layers, label smoothing, mini-batch discrimination;
1,000 training showers; ensembles of 3 on one set; per member the epoch whose generated distributions agree best with
the training set on five observables; the quantile JSD (>= 10 truth points per quantile) and the amplification
protocol (truth subsets of growing size and the generated sample against a disjoint truth reference, vs the number of
quantiles; 218k truth, 1M generated in the paper). Ours: layer and latent sizes, Adam (betas 0.5/0.999), batch size,
loss weights, the five observables (common.ild10_observables; not in the text we had); the MIP cut in the training
path too (mip_cut: the discriminator must not see generated pixels between 0 and the cut, which the data never have);
log(visible energy) beside the discriminator's features (--disc-energy, for the narrow e_vis peak); the held-out truth
split half reference, half pool (common.ild10_amplification).
"""
import argparse
import copy
import json
import math
import os
import random
import signal
import sys
import time
if __name__ == "__main__" and "RANK" in os.environ:   # torchrun stops all ranks once one exits: each rank, even one
    signal.signal(signal.SIGTERM, signal.SIG_IGN)     # still importing torch, checks its input on and exits 2 itself

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = "vaegan.py"
OBS = ("e_vis", "n_hits", "cog_x", "cog_y", "pixel")
MIP = common.ILD_MIP_CUT_MEV
SHAPE = ("latent", "channels", "mbd_kernels", "disc_energy")      # the flags that set tensor shapes
SAME = SHAPE + ("ensemble", "n_train", "seed")      # --resume needs these as saved: members, the train/held-out split
DataError = common.InputError       # bad input: one line on stderr, exit status 2


# ---------------------------------------------------------------- flags


def get_args(argv=None):
    p = common._Parser(description="VAE-GAN for ILD showers reduced to 10x10, ensembles, amplification.")
    a = p.add_argument
    a("--data", default=None, help="ILD HDF5 (30x30/energy, layers) or reduced `showers` (N,10,10); default: TOY")
    a("--toy-n", type=int, default=21000, help="toy showers without --data (made once under data/)")
    a("--n-train", type=int, default=1000, help="training showers; the rest are held out as truth")
    a("--out", default=None, help="output folder (default runs/vaegan); with --generate the output .h5 file")
    a("--epochs", type=int, default=60, help="training epochs per ensemble member")
    a("--batch-size", type=int, default=32, help="minibatch size")
    a("--lr", type=float, default=1e-3, help="Adam learning rate of encoder, decoder, discriminator")
    a("--ensemble", type=int, default=3, help="number of models trained on the same training set")
    a("--latent", type=int, default=16, help="latent dimension")
    a("--channels", default="16,32", help="channels of the two locally connected layers (C1,C2)")
    a("--recon", choices=("feature", "pixel"), default="feature", help="reconstruct discriminator features or pixels")
    a("--adv-weight", type=float, default=1.0, help="weight of the adversarial loss (0 = no GAN term)")
    a("--kl-weight", type=float, default=0.05, help="weight of the KL term in the encoder loss")
    a("--label-smooth", type=float, default=0.1, help="one-sided label smoothing: real label 1 - this (0 = off)")
    a("--mbd-kernels", type=int, default=16, help="mini-batch discrimination kernels (0 = off)")
    a("--disc-energy", type=int, choices=(0, 1), default=1, help="1: the discriminator also sees log(visible energy)")
    a("--select-bins", type=int, default=20, help="quantiles of the epoch-selection JSD (>= 10 points each)")
    a("--amplify", action=argparse.BooleanOptionalAction, default=None, help="amplification study (default: toy only)")
    a("--amp-n", type=int, default=100000, help="generated showers for the amplification study")
    a("--quantiles", default=",".join(map(str, common.QUANTILE_COUNTS)), help="numbers of quantiles (amplification)")
    a("--n-gen", type=int, default=None, help="showers in generated.h5 after training (default: held-out count)")
    a("--seed", type=int, default=0, help="random seed (split, init, minibatches)")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda if available")
    a("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the modules for training")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--generate", type=int, default=None, metavar="N", help="sample N showers from --ckpt into --out FILE")
    a("--ckpt", default=None, help="checkpoint to sample from (with --generate)")
    a("--benchmark", action="store_true", help="print one JSON line of generation and training speed")
    args = p.parse_args(argv)
    try:
        args.channels, args.quantiles = (tuple(int(c) for c in v.split(",")) for v in (args.channels, args.quantiles))
        assert len(args.channels) == 2 and min(args.channels + args.quantiles) > 0
    except (ValueError, AssertionError):
        p.error(f"--channels takes two, --quantiles 1+ positive integers; got {args.channels!r}, {args.quantiles!r}")
    for lo, names in ((10, ("n_train",)), (1, ("toy_n", "epochs", "batch_size", "ensemble", "latent", "select_bins",
                           "amp_n", "n_gen")), (0, ("lr", "adv_weight", "kl_weight", "mbd_kernels", "seed"))):
        for name in names:     # at most float32's largest (1e39 is inf in training), numpy's seeds < 2**32
            v, hi = getattr(args, name), 2**32 - 1 if name == "seed" else float(np.finfo(np.float32).max)
            if v is not None and not lo <= v <= hi:
                p.error(f"--{name.replace('_', '-')} must be in [{lo}, {hi:.4g}], got {v}")
    if not 0 <= args.label_smooth < 0.5:
        p.error(f"--label-smooth must be in [0, 0.5), got {args.label_smooth}")
    if args.generate is not None and (args.generate < 1 or not args.ckpt or not args.out):
        p.error("--generate N needs N >= 1, --ckpt PATH and --out FILE")
    return args


# ---------------------------------------------------------------- data


def _read(path, g, key, sel=()):
    """g[key][sel] as float32: a dataset of real numbers, finite in float32 (common.check_real), >= 0."""
    if not hasattr(g[key], "dtype"):
        raise DataError(f"{path}: '{g[key].name[1:]}' is a group, not a dataset")
    if (a := common.check_real(path, g[key].name[1:], g[key][sel])).size and a.min() < 0:
        raise DataError(f"{path}: '{g[key].name[1:]}' holds negative energies")
    return a


@np.errstate(over="ignore")    # an overflow (reduction, sums) is reported below, not warned
def load_showers(path):
    """-> (showers (N,10,10) float32 MeV, energy (N,1) GeV or None, is_toy). Raises DataError."""
    import h5py
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise DataError(f"{path}: not an HDF5 file")
    with f:     # an unreadable dataset (truncated file): OSError, reported by main with its message
        toy, g = bool(f.attrs.get("toy", False)), f
        if isinstance(f.get("30x30"), h5py.Group):
            g = f["30x30"]
            if "energy" not in g or "layers" not in g:
                raise DataError(f"{path}: missing key 30x30/{'layers' if 'energy' in g else 'energy'}")
            lay = g["layers"]
            if getattr(lay, "ndim", 0) != 4 or lay.shape[1:] != (30, 30, 30):
                raise DataError(f"{path}: 30x30/layers has shape {getattr(lay, 'shape', None)}, expected (N,30,30,30)")
            showers = np.zeros((len(lay), 10, 10), np.float32)
            for s in range(0, len(lay), 1000):                 # reduced block by block: bounded memory
                showers[s:s + 1000] = common.reduce_ild(_read(path, g, "layers", slice(s, s + 1000)))
        elif "showers" in f:
            showers = _read(path, f, "showers")
            showers = showers.reshape(-1, 10, 10) if showers.shape[1:] == (100,) else showers
            if showers.shape[1:] != (10, 10):
                raise DataError(f"{path}: showers has shape {showers.shape}, expected (N,10,10)")
        else:
            raise DataError(f"{path}: missing key 30x30/layers (ILD layout) or showers (reduced 10x10)")
        energy = _read(path, g, "energy") if "energy" in g else None
    if energy is not None and energy.shape not in ((len(showers), 1), (len(showers),)):
        raise DataError(f"{path}: energy has shape {energy.shape}, not ({len(showers)},1): mismatched events")
    if len(showers) == 0:
        raise DataError(f"{path}: empty file (0 showers)")
    if not np.isfinite(showers.sum((1, 2))).all():     # the visible energy, an input of the discriminator
        raise DataError(f"{path}: a shower's summed energy overflows float32")
    return showers, None if energy is None else energy.reshape(-1, 1), toy


def selection_score(ref_obs, showers, n_bins):
    """Mean quantile JSD over the five observables (and each one) of showers vs the reference."""
    per = common.ild10_quantile_jsd(ref_obs, common.ild10_observables(showers), n_bins)
    return float(np.mean(list(per.values()))), per


# ---------------------------------------------------------------- model


class LocallyConnected2d(nn.Module):
    """Like Conv2d, but every output position has its own weights (no weight sharing, hence no
    translation invariance). Weight (L, in*k*k, out) for the L output positions, bias (out, H', W');
    the in*k*k inputs of a position are ordered channel-major, then kernel row, then column."""

    def __init__(self, in_ch, out_ch, in_size, kernel=3, stride=1, padding=1):
        super().__init__()
        self.in_ch, self.out_ch, self.k, self.pad = in_ch, out_ch, kernel, padding
        self.out_size = tuple((n + 2 * padding - kernel) // stride + 1 for n in in_size)
        fan_in, bound = in_ch * kernel * kernel, 1.0 / math.sqrt(in_ch * kernel * kernel)
        self.weight = nn.Parameter(torch.empty(math.prod(self.out_size), fan_in, out_ch).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_ch, *self.out_size).uniform_(-bound, bound))
        # flat index into the padded input per (output position, kernel offset): a gather (F.unfold: slow CPU backward)
        rows, cols = (torch.arange(n)[:, None] * stride + torch.arange(kernel) for n in self.out_size)  # (H'|W', k)
        idx = rows[:, None, :, None] * (in_size[1] + 2 * padding) + cols[None, :, None, :]         # (H', W', k, k)
        self.register_buffer("idx", idx.reshape(-1), persistent=False)

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
        self.lc1 = LocallyConnected2d(1, channels[0], (size, size), 3, 1, 1)
        self.lc2 = LocallyConnected2d(channels[0], channels[1], self.lc1.out_size, 3, 2, 1)
        self.fc = nn.Linear(channels[1] * self.lc2.out_size[0] * self.lc2.out_size[1], 2 * latent)

    def forward(self, x):
        mu, logvar = self.fc(F.leaky_relu(self.lc2(F.leaky_relu(self.lc1(x), 0.2)), 0.2).flatten(1)).chunk(2, 1)
        return mu, logvar.clamp(-10, 10)


class Decoder(nn.Module):
    def __init__(self, latent, channels=(16, 32), size=10):
        super().__init__()
        self.c2, self.half = channels[1], size // 2
        self.fc = nn.Linear(latent, self.c2 * self.half * self.half)
        self.lc1 = LocallyConnected2d(self.c2, channels[0], (size, size), 3, 1, 1)
        self.lc2 = LocallyConnected2d(channels[0], 1, (size, size), 3, 1, 1)

    def forward(self, z):
        h = F.interpolate(F.leaky_relu(self.fc(z), 0.2).view(-1, self.c2, self.half, self.half), scale_factor=2)
        return F.softplus(self.lc2(F.leaky_relu(self.lc1(h), 0.2)))


class Discriminator(nn.Module):
    """Two convolutions, a hidden layer (the feature-wise similarity layer), optionally the log of the total visible
    energy beside it, mini-batch discrimination (Salimans et al. 2016: per kernel b, o_b(x_i) = mean_{j != i}
    exp(-|M_ib - M_jb|_1), their sum divided by B - 1 so that it does not grow with the batch size), one logit."""

    def __init__(self, features=64, mbd_kernels=16, size=10, channels=(16, 32), energy_input=True):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, channels[0], 3, 1, 1), nn.Conv2d(channels[0], channels[1], 3, 2, 1)
        self.fc = nn.Linear(channels[1] * ((size + 1) // 2) ** 2, features)
        self.energy_input, n = energy_input, features + int(energy_input)
        self.register_buffer("scale", torch.tensor(1.0))    # pixel transform constant, set by the trainer
        self.mbd = nn.Parameter(torch.randn(n, mbd_kernels * 8) * 0.1) if mbd_kernels else None   # M = f @ mbd
        self.out = nn.Linear(n + mbd_kernels, 1)

    def features(self, x):
        """The hidden layer whose activations define the feature-wise reconstruction loss."""
        return F.leaky_relu(self.fc(F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2).flatten(1)), 0.2)

    def forward(self, x):
        f = self.features(x)
        if self.energy_input:
            e = torch.expm1(x.float() * self.scale).clamp_min(0).sum((1, 2, 3))
            f = torch.cat([f, (torch.log1p(e) / self.scale).unsqueeze(1).to(f.dtype)], 1)
        if self.mbd is not None:
            m = (f @ self.mbd).view(len(f), -1, 8)
            d = (m.unsqueeze(0) - m.unsqueeze(1)).abs().sum(3)                     # (B, B, kernels)
            f = torch.cat([f, (torch.exp(-d).sum(1) - 1.0) / max(len(f) - 1, 1)], 1)
        return self.out(f).squeeze(1)


class VAEGAN(nn.Module):
    def __init__(self, latent=16, channels=(16, 32), mbd_kernels=16, disc_energy=True):
        super().__init__()
        self.latent, self.enc, self.dec = latent, Encoder(latent, channels), Decoder(latent, channels)
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


def mip_cut(y, scale):
    """Model-space pixels below the MIP cut set to exactly 0 in the training path too, so that the
    discriminator sees generated showers as sampling writes them (0 or >= the cut, as the data); the
    gradient passes straight through, so a pixel below the cut can still be pulled over it."""
    return y - (y * (y < math.log1p(MIP) / scale)).detach()


class Member:
    """One ensemble member: model, optimisers, its own random generator, best epoch so far."""

    def __init__(self, k, args, device, scale=1.0):
        torch.manual_seed(args["seed"] * 1000 + k)
        m = self.model = build(args).to(device)
        m.disc.scale.fill_(scale)
        self.opt = {n: torch.optim.Adam(getattr(m, n).parameters(), args["lr"], betas=(0.5, 0.999))
                    for n in ("enc", "dec", "disc")}
        self.k, self.gen = k, torch.Generator(device).manual_seed(args["seed"] * 1000 + k)
        on = args["dtype"] == "bf16" and device.type == "cuda"       # bf16 autocast on CUDA only
        self.autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=on)
        self.best = {"epoch": 0, "score": math.inf, "dec": copy.deepcopy(m.dec.state_dict())}
        self.fns = {n: torch.compile(fn) if args["compile"] else fn      # the unwrapped modules stay in m
                    for n, fn in (("enc", m.enc), ("dec", m.dec), ("disc", m.disc), ("feat", m.disc.features))}

    def state(self):
        """Everything of this member on the CPU (for the checkpoint and the torchrun gather)."""
        return tree_map(lambda t: t.detach().cpu() if torch.is_tensor(t) else t, {
            "model": self.model.state_dict(), "optim": {n: o.state_dict() for n, o in self.opt.items()},
            "gen": self.gen.get_state(), "best": self.best})

    def load(self, st):
        self.model.load_state_dict(st["model"])
        for n, o in self.opt.items():
            o.load_state_dict(st["optim"][n])
        self.gen.set_state(st["gen"])
        self.best = st["best"]


def train_step(mb, x, args):
    """One VAE/GAN step (Larsen et al.): D on real vs reconstructed + prior samples; encoder on KL +
    reconstruction; decoder on reconstruction + adversarial. Returns (loss_d, loss_g, kl) on the device."""
    f, m, g, autocast, bce = mb.fns, mb.model, mb.gen, mb.autocast, F.binary_cross_entropy_with_logits
    with autocast():
        mu, logvar = f["enc"](x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g, device=x.device)
        zp = torch.randn(mu.shape, generator=g, device=x.device)
        xr, xp = (mip_cut(f["dec"](v), m.disc.scale) for v in (z, zp))
        d_real = f["disc"](x)
        loss_d = bce(d_real, torch.full_like(d_real, 1.0 - args["label_smooth"])) + sum(
            0.5 * bce(d, torch.zeros_like(d)) for d in (f["disc"](xr.detach()), f["disc"](xp.detach())))
    mb.opt["disc"].zero_grad(set_to_none=True)
    loss_d.float().backward()
    mb.opt["disc"].step()
    with autocast():
        # Gaussian log-likelihood up to a constant: squared error summed over features (pixels)
        a_, b_ = (f["feat"](xr), f["feat"](x).detach()) if args["recon"] == "feature" else (xr, x)
        like = (a_.float() - b_.float()).pow(2).flatten(1).sum(1).mean()
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        loss_e = args["kl_weight"] * kl + like
        loss_g = like + args["adv_weight"] * sum(bce(d, torch.ones_like(d)) for d in (f["disc"](xr), f["disc"](xp)))
    pe, pd = list(m.enc.parameters()), list(m.dec.parameters())   # each loss to its own module
    grads = torch.autograd.grad(loss_e.float(), pe, retain_graph=True) + torch.autograd.grad(loss_g.float(), pd)
    for p_, g_ in zip(pe + pd, grads):
        p_.grad = g_
    mb.opt["enc"].step(), mb.opt["dec"].step()
    return torch.stack([loss_d.detach().float(), loss_g.detach().float(), kl.detach().float()])


@torch.no_grad()
def sample_decoders(decoders, n, latent, scale, gen, device, batch=10000):
    """n showers (numpy (n,10,10) MeV) drawn evenly at random from the ensemble's decoders."""
    who = torch.randint(len(decoders), (n,), generator=gen, device=device)
    out = torch.empty(n, 10, 10, device=device)
    for s in range(0, n, batch):
        z = torch.randn(min(batch, n - s), latent, generator=gen, device=device)
        for k, dec in enumerate(decoders):
            sel = (who[s:s + len(z)] == k).nonzero().squeeze(1)
            if len(sel):   # model space log(1 + E/MeV) / scale (the training set's largest pixel at 1) -> MeV, cut
                e = torch.expm1(dec(z[sel]).squeeze(1).float() * scale)
                out[s + sel] = torch.where(e < MIP, torch.zeros_like(e), e)
    return out.cpu().numpy()


def write_h5(path, showers, energy=None, toy=False):
    import h5py

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.update({k: v.astype(np.float32) for k, v in (("showers", showers), ("energy", energy)) if v is not None})
            f.attrs.update(toy=bool(toy), format="ILD reduced to 10x10 (MIP cut 0.1 MeV, layers, 3x3 cells summed), "
                                                 "MeV")
    common.write_atomic(path, write)


def train(args, showers, energy, toy, train_idx, held_idx, device, dist_info, ck=None):
    rank, world = dist_info
    A, out, x_np = vars(args), args.out, showers[train_idx]
    ckpt_path = os.path.join(out, "ckpt.pt")
    scale, ref_obs = float(np.log1p(x_np.max())), common.ild10_observables(x_np)
    members = [Member(k, A, device, scale) for k in range(args.ensemble)]
    mine = [mb for mb in members if mb.k % world == rank]
    history, start, step = [], 0, 0
    if ck is not None:
        for mb, st in zip(members, ck["members"]):
            mb.load(st)
        start, step, history, scale, rng = ck["epoch"], ck["step"], ck["history"], ck["scale"], ck["rng"]
        random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
        torch.cuda.set_rng_state_all(rng["cuda"]) if rng.get("cuda") is not None and torch.cuda.is_available() else None
        log(f"resumed from {ckpt_path} at epoch {start}", out, rank)
    X = torch.log1p(torch.from_numpy(x_np).to(device)).unsqueeze(1) / scale     # model space, on the device
    n, bs = len(X), min(args.batch_size, len(X))
    t0, done = time.time(), 0
    for epoch in range(start + 1, args.epochs + 1):
        losses = []
        for mb in mine:
            mb.model.train()
            perm = torch.randperm(n, generator=mb.gen, device=device)
            for s in range(0, n - bs + 1, bs):
                losses.append(train_step(mb, X[perm[s:s + bs]], A))
                done += bs
            mb.model.eval()   # the paper's epoch selection: generated vs the training set, five observables
            g = torch.Generator(device).manual_seed(args.seed * 7919 + 1000 * mb.k + epoch)
            score, per = selection_score(ref_obs, sample_decoders([mb.model.dec], n, args.latent, scale, g, device),
                                         args.select_bins)
            history.append({"member": mb.k, "epoch": epoch, "score": score, **per})
            if score < mb.best["score"]:
                mb.best = {"epoch": epoch, "score": score, "dec": copy.deepcopy(mb.model.dec.state_dict())}
        losses = torch.stack(losses).tolist() if losses else []       # one host sync per epoch, not per step
        step += n // bs
        if world > 1:   # every rank gets every member's state, so that any rank could save
            got = [None] * world
            dist.all_gather_object(got, ({mb.k: mb.state() for mb in mine}, losses, history[len(history) - len(mine):]))
            history, losses = [h for h in history if h["epoch"] < epoch], []
            for states, ls, hs in got:
                losses, history = losses + ls, history + hs
                for mb in members:
                    if mb not in mine and mb.k in states:
                        mb.load(states[mb.k])
        ck = {"script": SCRIPT, "members": [mb.state() for mb in members], "epoch": epoch, "step": step, "args": A,
              "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
              "scale": scale, "geometry": "ild10", "history": history, "train_indices": train_idx,
              "heldout_indices": held_idx}
        common.check_finite(ck, ckpt_path)   # every rank holds every member: all refuse a NaN model alike, no hang
        if rank == 0:
            ld, lg, kl = np.mean(losses, 0) if losses else (0, 0, 0)
            eta = time.gmtime(max((time.time() - t0) / (epoch - start) * (args.epochs - epoch), 0))
            log(f"epoch {epoch}/{args.epochs} | step {step} | loss_d {ld:.3f} loss_g {lg:.3f} kl {kl:.2f} | "
                f"{done * world / max(time.time() - t0, 1e-9):.0f} samples/s | ETA {time.strftime('%H:%M:%S', eta)} "
                "| best JSD " + " ".join(f"m{mb.k}:{mb.best['score']:.4f}@{mb.best['epoch']}" for mb in members), out)
            common.write_atomic(ckpt_path, lambda t: torch.save(ck, t))
    return finish(args, members, scale, showers, energy, toy, train_idx, held_idx, history, device) if rank == 0 else 0


def finish(args, members, scale, showers, energy, toy, train_idx, held_idx, history, device):
    """After training: sample the ensemble's best epochs, write, evaluate, amplification study, plots."""
    out, n_train, title = args.out, len(train_idx), ("TOY " if toy else "") + "ILD photons 10x10"
    decs = load_decoders(vars(args), [mb.best for mb in members], device)
    g = torch.Generator(device).manual_seed(args.seed + 12345)
    truth, n_gen = showers[held_idx], args.n_gen or len(held_idx)
    common.check_finite(gen := sample_decoders(decs, n_gen, args.latent, scale, g, device), f"{out}/generated.h5")
    score, per = selection_score(common.ild10_observables(truth), gen, args.select_bins)
    metrics = {"script": SCRIPT, "data": args.data, "toy": toy, "n_train": n_train, "n_heldout": len(held_idx),
               "n_generated": n_gen, "ensemble": args.ensemble, "best_epochs": [mb.best["epoch"] for mb in members],
               "best_train_jsd": [mb.best["score"] for mb in members], "heldout_jsd_mean": score,
               "heldout_jsd": per, "select_bins": args.select_bins, "output_format": "showers (N,10,10) MeV",
               "train_indices": train_idx.tolist(), "heldout_indices": held_idx.tolist(), "history": history}
    amp, last = None, f"held-out JSD mean {score:.4f}"
    if args.amplify:
        amp = common.ild10_amplification(truth, sample_decoders(decs, args.amp_n, args.latent, scale, g, device),
                                  args.quantiles, n_train, args.seed)
        eqs = {k: {q: "inf" if v == math.inf else v for q, v in r["equivalent_size"].items()} for k, r in amp.items()}
        top = {k: (max(eqs[k]), eqs[k][max(eqs[k])]) for k in OBS}
        worth = {k: v is not None and (v == "inf" or v > n_train) for k, (_, v) in top.items()}
        metrics["amplification"] = {
            "n_train": n_train, "n_generated": args.amp_n, "n_reference": len(truth) // 2,
            "n_truth_pool": len(truth) - len(truth) // 2, "equivalent_size": eqs,
            "at_max_quantiles": {k: {"n_quantiles": q, "equivalent_size": v, "worth_more_than_training": worth[k]}
                                 for k, (q, v) in top.items()}, "n_observables_amplified": int(sum(worth.values())),
            "curves": {k: {c: np.asarray(r[c]).tolist() for c in ("n_quantiles", "sizes", "truth_jsd", "gen_jsd")}
                       for k, r in amp.items()}}
        worth_k = ", ".join(f"{k} {v if v in (None, 'inf') else round(v)} (K={q})" for k, (q, v) in top.items())
        last = (f"{title}: {args.amp_n} generated showers from {n_train} training showers are worth (truth showers, at "
                f"the most quantiles K): {worth_k}; more than the training set for {sum(worth.values())} of 5")
    common.check_finite(metrics, f"{out}/metrics.json")          # before anything of this run's end is written
    en = None if energy is None else energy[held_idx]
    write_h5(os.path.join(out, "generated.h5"), gen, None if en is None else en[np.arange(n_gen) % len(en)], toy)
    write_h5(os.path.join(out, "truth.h5"), truth, en, toy)
    if amp:   # the paper's figure, per observable: quantile JSD vs number of quantiles, truth subsets and generated
        import matplotlib.pyplot as plt             # without a display it falls back to Agg
        fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
        for a, k in zip(ax.flat, OBS):
            r = amp[k]
            for m in sorted({m for m in n_train * np.array([1, 2, 5, 10]) if m in r["sizes"]} | {r["sizes"][-1]}):
                a.plot(r["n_quantiles"], r["truth_jsd"][:, list(r["sizes"]).index(m)], "o-", ms=3,
                       label=f"truth, {m} showers" + (" (= training size)" if m == n_train else ""))
            a.plot(r["n_quantiles"], r["gen_jsd"], "s-", c="r", lw=2, label=f"generated ({args.amp_n} showers)")
            a.set(xscale="log", yscale="log", xlabel="number of quantiles", ylabel="quantile JSD vs reference", title=k)
            a.legend(fontsize=7)
        ax.flat[5].axis("off")
        fig.suptitle(f"{title}: amplification (Calomplification protocol), {n_train} training showers")
        fig.tight_layout()
        common.write_atomic(os.path.join(out, "plots", "amplification.png"), lambda t: fig.savefig(t, dpi=90))
        plt.close(fig)
    common.write_atomic(os.path.join(out, "metrics.json"), json.dumps(
        metrics, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
    log(f"wrote {out}/: generated.h5 ({n_gen} showers), truth.h5, metrics.json{', plots/' if amp else ''}\n{last}", out)
    return 0


def log(msg, out, rank=0):
    if rank == 0:
        print(msg, flush=True)
        with open(os.path.join(out, "log.txt"), "a") as fh:
            fh.write(msg + "\n")


# ---------------------------------------------------------------- generate


def load_ckpt(path, device, A=None, what="--ckpt"):
    """A vaegan.py checkpoint and its best decoders; with A (--resume), saved with A's values of SAME. A missing,
    truncated or text file, another script's checkpoint or other flags: DataError."""
    if not os.path.isfile(path):
        raise DataError(f"{what} {path}: no checkpoint{' to resume from' if A else ''}")
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        made_by = ck.get("script", SCRIPT if ck.get("geometry") == "ild10" else None)   # saved before "script"
        diff = [k for k in SAME if A and ck["args"].get(k, 1) != A[k]] if made_by == SCRIPT else []
        decs = load_decoders(ck["args"], [st["best"] for st in ck["members"]], device) if made_by == SCRIPT else []
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is bad input
        raise DataError(f"{what} {path}: not a readable {SCRIPT} checkpoint ({type(e).__name__})")
    if made_by != SCRIPT or diff:
        raise DataError(f"{what} {path}: " + (f"saved with other flags ({', '.join(diff)})" if diff else
                                              f"a checkpoint of {made_by or 'an unknown script'}, not of {SCRIPT}"))
    return ck, decs


def generate(args, device):
    common.check_out_path(args.out, "--out", folder=False)
    ck, decs = load_ckpt(args.ckpt, device)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise DataError(f"--out {args.out}: folder does not exist")
    g = torch.Generator(device).manual_seed(args.seed)
    common.check_finite(gen := sample_decoders(decs, args.generate, ck["args"]["latent"], ck["scale"], g, device),
                        args.out)
    write_h5(args.out, gen, None, ck["args"].get("toy"))
    print(f"wrote {args.generate} showers (reduced 10x10, MeV) from {len(decs)} ensemble members to {args.out}")
    return 0


def benchmark(args, device):
    A = vars(args)
    mb, decs = Member(0, A, device), [build(A).dec.to(device).eval() for _ in range(args.ensemble)]
    gb, g = 10000 if device.type == "cuda" else 2000, torch.Generator(device).manual_seed(0)
    x = torch.rand(args.batch_size, 1, 10, 10, generator=g, device=device)
    res = {"script": SCRIPT, "device": device.type, "dtype": args.dtype, "ensemble": args.ensemble}
    for key, fn, n, reps in (("gen_showers_per_s", lambda: sample_decoders(decs, gb, args.latent, 6, g, device), gb, 3),
                             ("train_samples_per_s", lambda: train_step(mb, x, A), args.batch_size, 20)):
        for r in range(reps + 1):
            t0 = time.time() if r <= 1 else t0      # call 0 warms up
            with mb.autocast():
                fn()
            torch.cuda.synchronize() if device.type == "cuda" else None
        res[key] = round(n * reps / (time.time() - t0), 1)
    print(json.dumps({**res, "gen_batch": gb, "train_batch": args.batch_size}))
    return 0


# ---------------------------------------------------------------- main


def main(argv=None):
    """Every input is checked, on every rank, before anything is written or a process group is made."""
    args = get_args(argv)
    ddp = "RANK" in os.environ
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    try:
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise DataError("--device cuda: CUDA is not available")
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        torch.cuda.set_device(device) if cuda else None
        if args.dtype == "bf16" and not cuda and rank == 0:
            print(f"{SCRIPT}: --dtype bf16 is ignored on CPU (fp32)", file=sys.stderr)
        torch.manual_seed(args.seed), np.random.seed(args.seed), random.seed(args.seed)
        if args.benchmark or args.generate is not None:
            return benchmark(args, device) if args.benchmark else generate(args, device)
        args.out = args.out or os.path.join("runs", "vaegan")
        args.amplify = args.data is None if args.amplify is None else args.amplify
        for name in ("ckpt.pt", "generated.h5", "truth.h5", "metrics.json", "log.txt", "run.json", "plots",
                     "plots/amplification.png"):        # no folder where a file goes, nor a file for a folder
            common.check_out_path(os.path.join(args.out, name), folder=name == "plots")
        common.check_run_folder(args.out, SCRIPT, {k: vars(args)[k] for k in SHAPE}, args.resume)
        if args.data is None:     # every rank makes the same toy file (atomic): no process group needed yet
            args.data = common.toy_path("ild10", args.toy_n, args.seed)
            print(f"no --data: training on TOY ild10 showers ({args.data})", flush=True) if rank == 0 else None
            if not os.path.exists(args.data):
                common.check_out_path(args.data, "toy data", folder=False)
                os.makedirs(os.path.dirname(args.data), exist_ok=True)
                common.write_toy("ild10", args.data, args.toy_n, args.seed, workers=1)
        showers, energy, toy = load_showers(args.data)
        n_held = len(showers) - args.n_train
        if n_held < 1:
            raise DataError(f"{args.data}: {len(showers)} showers, need more than --n-train {args.n_train}")
        if args.amplify and n_held // 2 < 10 * min(args.quantiles):
            raise DataError(f"{args.data}: {n_held} held-out showers, --amplify needs {20 * min(args.quantiles)}")
        ck = load_ckpt(os.path.join(args.out, "ckpt.pt"), device, vars(args), "--resume")[0] if args.resume else None
        args.toy = toy
        perm = np.random.default_rng(args.seed).permutation(len(showers))
        train_idx, held_idx = np.sort(perm[:args.n_train]), np.sort(perm[args.n_train:])
        if ddp and not dist.is_initialized():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)     # input checked: stoppable again
            dist.init_process_group("nccl" if cuda else "gloo")
        if rank == 0:          # only now, with every input checked, is anything written
            common.stamp_run_folder(args.out, SCRIPT, {k: vars(args)[k] for k in SHAPE})
        log(f"{len(showers)} showers from {args.data}{' (TOY)' if toy else ''}: {len(train_idx)} train, "
            f"{len(held_idx)} held out; ensemble of {args.ensemble} on {device}", args.out, rank)
        return train(args, showers, energy, toy, train_idx, held_idx, device, (rank, world), ck)
    except (DataError, OSError) as e:
        return common.fail(SCRIPT, e)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
