"""SAGAN with an auxiliary regressor for the LHCb ECAL (Rogachev & Ratnikov), in one file.

Run (metrics.json follows the MLHEP protocol, common.lhcb_prd):
    python sagan_aux.py                                   # no --data: TOY lhcb showers, CPU-sized
    python sagan_aux.py --baseline --out runs/sagan_base  # the same without attention and regressor
    python sagan_aux.py --data data_train.npz --pdg 22    # MLHEP data (.npz or .h5), photons only
    python sagan_aux.py --resume --epochs 80              # continue runs/sagan_aux/ckpt.pt (same model flags)
    python sagan_aux.py --generate 10000 --ckpt runs/sagan_aux/ckpt.pt --conditions data_val.npz --out gen.npz
    python sagan_aux.py --benchmark [--device cuda --dtype bf16]   # aux model vs --baseline
    torchrun --nproc_per_node=4 sagan_aux.py --data data_train.npz

Choices (* = not public, ours) and deviations:
- G: LHCb baseline generator (airogachev/LHCb_CaloGAN loading_model.ipynb), ch 256 (64 on toy); + SN, log units.
- *Attention: one block on G's and D's 8x8 maps (SAGAN feat32, Zhang et al. 2019 Table 1; 16x16 cost 2.2x).
- *R's prediction joins the conditions before D's SN-MLP head; loss_D = hinge + w MSE(R(real), metric).
- D: SN convs (k4, s2) + LeakyReLU(0.1) + SN-MLP, not the notebook's k3 convs (SAGAN's D is SN).
- D and R see shower-frame coordinate maps (MLHEP metrics' frame); --baseline too, to isolate attention + R.
- *R: per-cell MLP, energy-weighted sum + mean pooled, width 16 (toy: RMSE/std 0.19/0.50 vs 0.37/0.47 at 32).
- Targets standardised on the training split; transverse side 1 is LEFT of p_xy (MLHEP: sign(px) x ours).
- Energies as t = log1p(E / e0) / s (e0 = 1st percentile of non-zero cells): 5 decades, probed by sparsity.
- Images are [n, iy, ix] (x along the last axis), as in the MLHEP metric code and common.py.
"""
import argparse
import json
import os
import random
import signal
import sys
import time

import h5py
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import common

SCRIPT = "sagan_aux.py"
KEYS = ("EnergyDeposit", "ParticleMomentum", "ParticlePoint", "ParticlePDG")
MODEL = ("nz", "ch", "aux", "baseline")   # the flags that set tensor shapes: fixed for a run folder (--resume)
AUX_DIMS = {"asymmetry": 2, "width": 2, "sparsity": 20, "none": 0}
FRAME_SCALE = 15.0  # cell units per unit of the frame maps
TOY_CH, TOY_EPOCHS = 64, 30   # toy defaults: --ch and --epochs sized for 15 min on one CPU thread


# ---------------------------------------------------------------- flags

def get_args(argv=None):
    p = argparse.ArgumentParser(prog=SCRIPT, description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda msg: p.exit(2, f"{SCRIPT}: error: {msg}\n")   # one line, not the whole usage block
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
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt (model, optimisers, epoch, RNG "
      "states; --nz, --ch, --aux, --baseline must match it; --pdg, --val-frac, --seed are taken from it)")
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
    args.epochs = (TOY_EPOCHS if args.data is None else 20) if args.epochs is None else args.epochs
    args.ch = (TOY_CH if args.data is None else 256) if args.ch is None else args.ch
    checks = [(getattr(args, n) <= 0, f"--{n.replace('_', '-')} must be positive") for n in (
        "toy_n", "epochs", "batch_size", "nz", "ch", "ckpt_every", "log_every", "n_eval", "bench_rounds")] + [
        (args.ch < 8, "--ch must be at least 8"), (not 0.0 < args.val_frac < 1.0, "--val-frac must be in (0, 1)"),
        (not (0 < args.lr_g < np.inf and 0 < args.lr_d < np.inf and 0 <= args.aux_weight < np.inf),
         "learning rates must be positive and --aux-weight non-negative (finite)"),
        (args.generate is not None and (args.generate <= 0 or not args.ckpt or not args.conditions),
         "--generate N needs N > 0, --ckpt PATH and --conditions FILE")]
    next((p.error(msg) for bad, msg in checks if bad), None)   # the first problem only
    args.aux = "none" if args.baseline else args.aux
    return args


# ---------------------------------------------------------------- data

DataError = common.InputError   # bad input: one line on stderr, exit status 2


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
            with h5py.File(path, "r") as f:
                d = {k: f[k][()] for k in KEYS if k in f and isinstance(f[k], h5py.Dataset)}
                toy = bool(f.attrs.get("toy", False))
    except Exception as e:  # noqa: BLE001 - any unreadable file is bad input
        raise DataError(f"{path}: cannot read as .npz or .h5 ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
    if missing := [k for k in KEYS[1:3] + KEYS[:need_images] if k not in d]:
        raise DataError(f"{path}: missing key {missing[0]!r}")
    if (n := len(d["ParticleMomentum"])) == 0:
        raise DataError(f"{path}: empty file (0 events)")
    shapes = {"EnergyDeposit": (n, 30, 30), "ParticleMomentum": (n, 3), "ParticlePoint": (n, 3), "ParticlePDG": (n,)}
    for k, v in d.items():
        if v.shape != shapes[k]:
            if v.ndim and len(v) != n:
                raise DataError(f"{path}: {k} has {len(v)} events but ParticleMomentum has {n}")
            raise DataError(f"{path}: {k} has shape {v.shape}, expected {shapes[k]}")
        common.check_real(path, k, v)   # strings, complex, NaN, inf, and 1e39 (finite in float64 only)
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
        return np.stack([getattr(common, "lhcb_" + kind)(images, mom, point, orthogonal=o) for o in (False, True)], 1)
    if kind == "sparsity":
        return common.lhcb_sparsity(images)
    return np.zeros((len(images), 0))


def frame_maps(raw):
    """raw (B, 5) (px, py, pz, x, y) -> (B, 2, 30, 30) cell coordinates along/across (left of) p_xy, / 15."""
    g, centre = torch.arange(30).to(raw) - 14.5, raw[:, 3:5] + 25.0 * raw[:, :2] / raw[:, 2:3]
    norm = torch.hypot(raw[:, 0], raw[:, 1])[:, None]
    u = torch.where(norm > 0, raw[:, :2] / norm.clamp_min(1e-30), raw.new_tensor([1.0, 0.0]))
    ux, uy = u[:, 0, None, None], u[:, 1, None, None]
    dx, dy = g[None, None, :] - centre[:, 0, None, None], g[None, :, None] - centre[:, 1, None, None]
    return torch.stack([dx * ux + dy * uy, -dx * uy + dy * ux], 1) / FRAME_SCALE


# ---------------------------------------------------------------- model

class SelfAttention(nn.Module):
    """brain-research/self-attention-gan non_local.py sn_non_local_block_sim: q/k C/8, v C/2, k, v pooled 2x2,
    x + gamma o; chunks of 2^18 attention weights (whole batches were memory-bound), 1x1 maps as Linear (3x)."""

    def __init__(self, c, sn=True, chunk=None):
        super().__init__()
        f = spectral_norm if sn else (lambda m: m)
        self.ck, self.cv, self.chunk = max(1, c // 8), max(1, c // 2), chunk
        self.query, self.key, self.value = (f(nn.Linear(c, k)) for k in (self.ck, self.ck, self.cv))
        self.out, self.gamma = f(nn.Linear(self.cv, c)), nn.Parameter(torch.zeros(()))

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
        (k, v), q = pooled[..., self.ck:].split([self.ck, self.cv], -1), t.flatten(1, 4)[..., :self.ck]
        o = self.out(torch.softmax(q @ k.transpose(1, 2), -1) @ v)          # (n, HW, C)
        return torch.addcmul(x, self.gamma, o.transpose(1, 2).reshape(n, c, h, wd))


def stack(c, attention, block):
    """block(c[i], c[i + 1]) layers, with self-attention after the second (the 8x8 map) if attention."""
    return [m for i in range(len(c) - 1)
            for m in block(c[i], c[i + 1]) + ([SelfAttention(c[2])] if i == 1 and attention else [])]


class Generator(nn.Module):
    """LHCb baseline G: Linear -> (ch, 2, 2) -> 3 ConvT(k3, s2) + BN + ReLU -> ConvT + ReLU, 32 -> 30; + SN."""

    def __init__(self, nz=256, cond_dim=5, ch=256, attention=True):
        super().__init__()
        self.ch, self.fc = ch, spectral_norm(nn.Linear(nz + cond_dim, ch * 4))
        self.net = nn.Sequential(*stack([ch, ch // 2, ch // 4, ch // 8], attention, lambda i, o: [
            spectral_norm(nn.ConvTranspose2d(i, o, 3, 2, 1, 1)), nn.BatchNorm2d(o), nn.ReLU()]),
            spectral_norm(nn.ConvTranspose2d(ch // 8, 1, 3, 2, 1, 1)))

    def forward(self, z, cond):
        h = F.leaky_relu(self.fc(torch.cat([z, cond], 1))).view(-1, self.ch, 2, 2)
        return F.relu(self.net(h)[:, :, 1:31, 1:31])   # (B, 1, 30, 30) model units, >= 0


class Discriminator(nn.Module):
    """SN conv D on [image, frame maps]; conditions and R's prediction join before the SN-MLP head."""

    def __init__(self, cond_dim=5, aux_dim=2, ch=256, attention=True):
        super().__init__()
        self.net = nn.Sequential(*stack([3, max(1, ch // 8), ch // 4, ch // 2, ch], attention, lambda i, o: [
            spectral_norm(nn.Conv2d(i, o, 4, 2, 1)), nn.LeakyReLU(0.1)]))
        self.head = nn.Sequential(spectral_norm(nn.Linear(ch * 4 + cond_dim + aux_dim, ch)), nn.LeakyReLU(0.1),
                                  spectral_norm(nn.Linear(ch, 1)))

    def forward(self, x, frame, cond, aux=None):
        h = self.net(F.pad(torch.cat([x, frame], 1), (1, 1, 1, 1))).flatten(1)
        return self.head(torch.cat([h, cond] + ([] if aux is None else [aux]), 1)).squeeze(1)


class Regressor(nn.Module):
    """Image (linear energies) + frame maps + conditions -> standardised metric (see top)."""

    def __init__(self, out_dim=2, cond_dim=5, width=16):
        super().__init__()   # per-cell layers as Linear on (B, 900, f) rows: 3x faster than 1x1 convs on CPU
        self.net = nn.Sequential(*[m for i in (6, width) for m in (nn.Linear(i, width), nn.ReLU(inplace=True))])
        self.head = nn.Sequential(nn.Linear(2 * width + cond_dim, 64), nn.ReLU(), nn.Linear(64, out_dim))

    def forward(self, energy, frame, cond):
        frac = (energy / energy.sum((2, 3), keepdim=True).clamp_min(1e-12)).flatten(1)[..., None]   # (B, 900, 1)
        fr = frame.flatten(2).transpose(1, 2)                                                       # (B, 900, 2)
        h = self.net(torch.cat([frac, torch.log10(frac + 1e-7) / 7.0 + 1.0, fr, torch.tanh(2.0 * FRAME_SCALE * fr)], 2))
        return self.head(torch.cat([(frac * h).sum(1), h.mean(1), cond], 1))


def build(args, device="cpu"):
    """Networks from the run's args on device: (G, D, R or None)."""
    k, att = AUX_DIMS[args.aux], not args.baseline
    return (Generator(args.nz, 5, args.ch, attention=att).to(device),
            Discriminator(5, k, args.ch, attention=att).to(device), Regressor(k, 5).to(device) if k else None)


def optimisers(a, G, D, R):   # (G's, D's + R's) Adam, SAGAN betas (0, 0.9)
    ps = (list(G.parameters()), list(D.parameters()) + (list(R.parameters()) if R is not None else []))
    return [torch.optim.Adam(p, lr, betas=(0.0, 0.9)) for p, lr in zip(ps, (a.lr_g, a.lr_d))]


def to_energy(t, norm):
    """Model units -> energy; t capped at 1.5 (an untrained G's t ~ 2 would mean 1e5 GeV cells)."""
    return norm["e0"] * torch.expm1(t.clamp(max=1.5) * norm["s"])


# ---------------------------------------------------------------- train

class Run:   # process-group facts
    def __init__(self, args):
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.ddp, self.main = "RANK" in os.environ, self.rank == 0
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if cuda and not torch.cuda.is_available():
            raise DataError("--device: cuda requested but not available")
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
        torch.cuda.set_device(self.device) if cuda else None


def autocast(run, args):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bf16" and run.device.type == "cuda")


def train_step(nets, opts, batch, args, run, norm):
    """One D (+R) step and one G step. Returns dict of floats."""
    (G, D, R, Dp, Rp), (x, c, raw, y) = nets, batch
    b, frame = len(x), frame_maps(raw)
    with autocast(run, args):
        fake = G(torch.randn(b, args.nz, device=run.device), c)
        xx, ff, cc = torch.cat([x, fake.detach()]), torch.cat([frame, frame]), torch.cat([c, c])
        a = R(to_energy(xx, norm), ff, cc) if R is not None else None
        d = D(xx, ff, cc, a).float()
        loss_d = F.relu(1 - d[:b]).mean() + F.relu(1 + d[b:]).mean()
        mse = F.mse_loss(a[:b].float(), y) if R is not None else torch.zeros((), device=run.device)
    opts[1].zero_grad(set_to_none=True)
    (loss_d + args.aux_weight * mse).backward()
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


# ---------------------------------------------------------------- generate

@torch.no_grad()
def sample(G, cond_std, norm, nz, device, batch=1024):
    """Energies (N, 30, 30) float32 for standardised conditions (N, 5) (numpy)."""
    G.eval()
    cs = torch.as_tensor(cond_std, dtype=torch.float32, device=device).split(batch)
    out = [to_energy(G(torch.randn(len(c), nz, device=device), c), norm)[:, 0].float().cpu().numpy() for c in cs]
    return np.concatenate(out).astype(np.float32)


def write_mlhep(path, images, mom, point, pdg, toy=False):
    """MLHEP file (.npz or .h5 by extension), written to a unique temporary name then renamed."""
    arrays = {"EnergyDeposit": images.astype(np.float32), "ParticleMomentum": mom.astype(np.float32),
              "ParticlePoint": point.astype(np.float32), "ParticlePDG": pdg.astype(np.int32)}
    common.check_finite(arrays, f"{path}: generated showers")

    def h5(tmp):
        with h5py.File(tmp, "w") as f:
            f.update(arrays)
            f.attrs.update(toy=bool(toy), generator=SCRIPT)
    common.write_atomic(path, (lambda tmp: np.savez(tmp, **arrays)) if path.endswith(".npz") else h5)


def load_ckpt(path, device, missing="no such checkpoint"):
    """A checkpoint of this script, or DataError (missing, truncated, text, another script's)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {missing}")
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        by = ck.get("script", SCRIPT)      # checkpoints from before the "script" key: known by their keys
        ok = by == SCRIPT and {"model", "optim", "norm", "args", "rng"} <= set(ck) and set(MODEL) <= set(ck["args"])
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is bad input
        raise DataError(f"{path}: cannot read as a {SCRIPT} checkpoint ({type(e).__name__})")
    if not ok:
        raise DataError(f"{path}: not a {SCRIPT} checkpoint" + f" (made by {by})" * (by != SCRIPT))
    return ck


def generate_main(args):
    out = args.out or "generated.h5"
    common.check_out_path(out, "--out", folder=False)
    d, _ = load_mlhep(args.conditions, need_images=False)
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise DataError(f"{out}: output folder does not exist")
    run = Run(args)
    ck = load_ckpt(args.ckpt, run.device)
    try:
        G = build(cargs := argparse.Namespace(**ck["args"]))[0].to(run.device)
        G.load_state_dict(ck["model"]["G"])
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{args.ckpt}: does not fit {SCRIPT}'s generator ({type(e).__name__})")
    norm, idx, t0 = ck["norm"], np.arange(args.generate) % len(d["ParticleMomentum"]), time.time()
    torch.manual_seed(args.seed)
    imgs = sample(G, (conditions(d)[idx] - norm["cond_mean"]) / norm["cond_std"], norm, cargs.nz, run.device)
    write_mlhep(out, imgs, d["ParticleMomentum"][idx], d["ParticlePoint"][idx], d["ParticlePDG"][idx],
                toy=ck.get("toy", False))
    print(f"wrote {len(imgs)} generated showers to {out} ({len(imgs) / (time.time() - t0):.0f} showers/s)")
    return 0


def benchmark_main(args):
    """Aux model vs --baseline, alternated: generation (batch 1024, 10,000 on CUDA), training steps."""
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
        G, D, R = build(a, dev)
        batch = (torch.rand(tb, 1, 30, 30, device=dev), torch.randn(tb, 5, device=dev), raw,
                 torch.randn(tb, AUX_DIMS[a.aux], device=dev))

        @torch.no_grad()
        def gen(G=G, a=a):
            G.eval()
            with autocast(run, a):
                G(torch.randn(gb, a.nz, device=dev), c)
            G.train()
        models[name] = {"gen": gen, "train": lambda G=G, D=D, R=R, o=optimisers(a, G, D, R), b=batch, a=a: train_step(
            (G, D, R, D, R), o, b, a, run, norm)}
    times = {(m, k): [] for m in models for k in ("gen", "train")}
    for r in range(args.bench_rounds + 1):          # round 0 warms up
        for k, reps in (("gen", 1), ("train", 5)):
            for m in models:
                sync()
                t0 = time.perf_counter()
                [models[m][k]() for _ in range(reps)]
                sync()
                times[m, k].append((time.perf_counter() - t0) / reps)
    med = {key: float(np.median(v[1:])) for key, v in times.items()}
    print(json.dumps({"script": SCRIPT, "device": str(dev), "threads": torch.get_num_threads(),
                      "dtype": args.dtype if cuda else "fp32", "model": f"sagan+aux({args.aux})", "ch": args.ch,
                      "nz": args.nz, "rounds": args.bench_rounds, "gen_batch": gb, "train_batch": tb,
                      **{f"{k}_{m}_per_s": round((gb if k == "gen" else tb) / med[m, k], 1) for m, k in med},
                      **{f"{k}_time_ratio_aux_over_baseline": round(med["aux", k] / med["baseline", k], 3)
                         for k in ("gen", "train")}}))
    return 0


# ---------------------------------------------------------------- main

def train_main(args):   # every input is checked before the process group starts and anything is written
    run = Run(args)
    ckpt_path = os.path.join(out := args.out or os.path.join("runs", "sagan_aux"), "ckpt.pt")
    common.check_out_path(out)
    for name in ("ckpt.pt", "log.txt", "metrics.json", "run.json", "generated.h5", "generated.npz", "plots"):
        common.check_out_path(os.path.join(out, name), "--out", folder=name == "plots")
    common.check_run_folder(out, SCRIPT)
    resume = load_ckpt(ckpt_path, "cpu", "no checkpoint to resume from") if args.resume else None
    if resume is not None:
        if diff := [f"--{k} {resume['args'][k]} there, {getattr(args, k)} now" for k in MODEL
                    if resume["args"][k] != getattr(args, k)]:
            raise DataError(f"--resume {ckpt_path}: model flags differ from the checkpoint ({'; '.join(diff)})")
        vars(args).update({k: resume["args"][k] for k in ("pdg", "val_frac", "seed")})
    path = common.toy_path("lhcb", args.toy_n, 0) if args.data is None else args.data
    if args.data is None:
        print(f"no --data: training on TOY lhcb showers ({path})", flush=True) if run.main else None
        if not os.path.isfile(path):   # under torchrun each rank writes the same file (unique temporary, rename)
            common.write_atomic(path, lambda tmp: common.write_toy("lhcb", tmp, args.toy_n, 0))
    d, toy = load_mlhep(path)
    toy = toy or args.data is None
    if args.pdg is not None and not (keep := d["ParticlePDG"] == args.pdg).any():
        raise DataError(f"{path}: no events with ParticlePDG == {args.pdg}")
    d = d if args.pdg is None else {k: v[keep] for k, v in d.items()}
    n_val = max(1, int(round(args.val_frac * (n := len(d["EnergyDeposit"])))))
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
    # in float32, as trained: with 1e30 cells G's largest energy (t = 1.5; R sums 900 cells) overflows
    cap = t32(norm["s"] * 1.5).expm1() * norm["e0"] * 900
    for what, t in (("EnergyDeposit spans too many decades: e0 expm1(1.5 s) x 900 cells", cap),
                    ("EnergyDeposit as log1p(E / e0) / s", X), ("standardised conditions", C), ("aux targets", Y),
                    ("shower centre point + 25 p_xy / p_z", RAW[:, 3:5] + 25 * RAW[:, :2] / RAW[:, 2:3])):
        if not bool(t.isfinite().all()):
            raise DataError(f"{path}: {what}: not finite in float32")
    random.seed(args.seed + run.rank)
    np.random.seed(args.seed + run.rank)
    torch.manual_seed(args.seed)                      # same initial weights on every rank
    G, D, R = build(args, dev)
    nets = {k: m for k, m in (("G", G), ("D", D), ("R", R)) if m is not None}
    torch.manual_seed(args.seed + run.rank)
    opts = dict(zip("GD", optimisers(args, G, D, R)))
    epoch0, step = 0, 0
    if resume is not None:
        try:
            for part, objs in (("model", nets), ("optim", opts)):
                for k, o in objs.items():
                    o.load_state_dict(resume[part][k])
            epoch0, step, rngs = resume["epoch"], resume["step"], resume["rng"]
            s = rngs[run.rank] if run.rank < len(rngs) else rngs[0]
            random.setstate(s["python"])
            np.random.set_state(s["numpy"])
            torch.set_rng_state(s["torch"])
            torch.cuda.set_rng_state_all(s["cuda"]) if "cuda" in s and torch.cuda.is_available() else None
        except Exception as e:  # noqa: BLE001 - a checkpoint that does not fit is bad input
            raise DataError(f"{ckpt_path}: does not fit this model ({type(e).__name__}: {str(e)[:80]})")
    if run.ddp:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    # training views: DDP-wrapped for D's step; D, R (plain) score G's fakes; all compiled with --compile
    views = [DDP(m) if run.ddp and m is not None else m for m in (G, D, R)] + [D, R]
    views = tuple(torch.compile(m) if args.compile and m is not None else m for m in views)
    common.stamp_run_folder(out, SCRIPT, {k: getattr(args, k) for k in MODEL}) if run.main else None
    log = open(os.path.join(out, "log.txt"), "a") if run.main else None
    say = (lambda msg: [print(msg, file=f, flush=True) for f in (sys.stdout, log)]) if run.main else (lambda msg: 0)
    if args.dtype == "bf16" and dev.type != "cuda":
        say("--dtype bf16 is ignored on CPU (autocast is used on CUDA only)")
    b, spe = args.batch_size, max(1, len(tr_idx) // (args.batch_size * run.world))   # spe: steps per epoch
    say(f"{SCRIPT}: {'baseline GAN' if args.baseline else 'SAGAN + aux regressor (' + args.aux + ')'} | "
        f"{'TOY ' * toy}data {path}: {len(tr_idx)} train, {len(val_idx)} held out | device {dev} | "
        + " ".join(f"{k} {sum(p.numel() for p in m.parameters())}" for k, m in nets.items()) + " parameters")
    t0, done = time.time(), 0
    for epoch in range(epoch0, args.epochs):
        order = tr[torch.randperm(len(tr), device=dev)]
        for i in range(spe):
            idx = order[(i * b) % len(order):][:b]
            last = train_step(views, (opts["G"], opts["D"]), (X[idx], C[idx], RAW[idx], Y[idx]), args, run, norm)
            step, done = step + 1, done + 1
            if step % args.log_every == 0 or i == spe - 1:
                rate = done * b * run.world / (time.time() - t0)
                left = int(max(((args.epochs - epoch) * spe - i - 1) * b * run.world / rate, 0))
                say(f"epoch {epoch + 1}/{args.epochs} | step {step} | loss_d {last['loss_d']:.4f} loss_g "
                    f"{last['loss_g']:.4f} mse {last['mse']:.4f} | {rate:.0f} samples/s | ETA {left // 3600}:"
                    f"{left % 3600 // 60:02d}:{left % 60:02d}")
        st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}
        rngs = [None] * run.world if run.ddp else [st]
        dist.all_gather_object(rngs, st) if run.ddp else None
        if (epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs:
            ck = {"model": {k: m.state_dict() for k, m in nets.items()}, "optim": {k: o.state_dict() for k, o in
                  opts.items()}, "epoch": epoch + 1, "step": step, "args": vars(args), "rng": rngs, "norm": norm,
                  "geometry": "lhcb", "toy": toy, "script": SCRIPT}
            common.check_finite(ck, ckpt_path)   # on every rank: a NaN model stops all; the last ckpt is kept
            common.write_atomic(ckpt_path, lambda tmp: torch.save(ck, tmp)) if run.main else None
    if run.main:
        # generate for the held-out conditions (generated.h5/.npz), metrics, plots
        mom, point, pdg = d["ParticleMomentum"][val_idx], d["ParticlePoint"][val_idx], d["ParticlePDG"][val_idx]
        torch.manual_seed(args.seed + 12345)
        gen = sample(G, (raw[val_idx] - norm["cond_mean"]) / norm["cond_std"], norm, args.nz, dev)
        for ext in (".h5", ".npz") if path.endswith(".npz") else (".h5",):
            write_mlhep(os.path.join(out, "generated" + ext), gen, mom, point, pdg, toy)
        real, rr = images[val_idx][:(m := min(len(val_idx), args.n_eval))], raw[val_idx][:m]
        metrics, feats = {"prd_auc_images": None, "prd_auc_physics": None, "score": None}, None
        if 2 * m >= 20:   # MLHEP protocol (common.lhcb_prd)
            r = common.lhcb_prd(real, gen[:m], mom[:m], point[:m], seed=args.seed)
            metrics, feats = {k: r[k] for k in ("prd_auc_physics", "prd_auc_images", "score")}, r["features"]
        if R is not None:   # regressor's error on held-out real showers, in target units
            R.eval()
            with torch.no_grad():
                pred = R(t32(real).unsqueeze(1), frame_maps(t32(rr)), t32((rr - norm["cond_mean"]) / norm["cond_std"]))
            pred = pred.cpu().numpy() * norm["aux_std"] + norm["aux_mean"]
            truth = aux_target(args.aux, real, mom[:m], point[:m])
            metrics["aux_rmse_val"] = np.sqrt(((pred - truth) ** 2).mean(0)).tolist()
            metrics["aux_target_std_val"] = truth.std(0).tolist()
        if feats is not None:   # plots: real vs generated
            import matplotlib.pyplot as plt
            plt.switch_backend("Agg")
            (fr, fg), gm, side, lab = feats, gen[:m], ("along", "across"), "TOY " * toy
            panels = {"mean_image": [(real.mean(0), gm.mean(0), "mean image (x right, y up; colours to the real max)")],
                      "asymmetry": [(fr[:, j], fg[:, j], f"asymmetry, line {side[1 - j]} p_xy") for j in (0, 1)],
                      "width": [(fr[:, 2 + j], fg[:, 2 + j], f"width {side[j]} p_xy [cells]") for j in (0, 1)],
                      "sparsity": [(fr[:, 4:].mean(0), fg[:, 4:].mean(0), "mean fraction of cells >= alpha E_total")],
                      "energy_sum": [(np.log10(real.sum((1, 2)) + 1e-12), np.log10(gm.sum((1, 2)) + 1e-12),
                                      "log10 sum of cells")]}
            for name, rows in panels.items():
                fig, ax = plt.subplots(1, len(rows) + (name == "mean_image"), figsize=(9, 3.6), squeeze=False)
                for a, (r, g, title) in zip(ax[0], rows):
                    for j, (v, who) in enumerate(((r, "real"), (g, "generated"))):
                        if name == "mean_image":
                            ax[0][j].imshow(v, origin="lower", extent=(-15, 15, -15, 15), vmin=0, vmax=r.max())
                            ax[0][j].set(title=f"{lab}{title}, {who}")
                        elif name == "sparsity":
                            a.plot(np.logspace(-5, -1, 20), v, label=who)
                        else:
                            a.hist(v, np.linspace(*np.percentile(np.r_[r, g], [0.5, 99.5]) + [-1e-9, 1e-9], 41),
                                   histtype="step", density=True, label=who)
                    if name != "mean_image":
                        a.set(title=lab + title, **({"xscale": "log", "xlabel": "alpha"} if name == "sparsity" else {}))
                        a.legend()
                fig.tight_layout()
                common.write_atomic(os.path.join(out, "plots", name + ".png"), lambda tmp: fig.savefig(tmp, dpi=80))
                plt.close(fig)
        metrics.update(script=SCRIPT, toy=toy, data=path, model="baseline" if args.baseline else "sagan_aux",
                       aux=args.aux, aux_weight=args.aux_weight, seed=args.seed, ch=args.ch, n_val=len(val_idx),
                       n_eval=m, val_indices=val_idx.tolist(), epochs=args.epochs, step=step,
                       resumed_from_epoch=epoch0, n_train=len(tr_idx))
        common.check_finite(metrics, os.path.join(out, "metrics.json"))
        common.write_atomic(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
        say(f"{'TOY ' * toy}PRD-AUC physics {metrics['prd_auc_physics']} images {metrics['prd_auc_images']} "
            f"score {metrics['score']} -> {out}/metrics.json")
        log.close()
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def main(argv=None):
    args = get_args(argv)
    try:
        return (benchmark_main if args.benchmark else train_main if args.generate is None else generate_main)(args)
    except (DataError, OSError) as e:
        if int(os.environ.get("RANK", 0)):   # torchrun stops all ranks when one exits: rank 0 prints, all exit 2
            signal.signal(signal.SIGTERM, lambda *_: os._exit(2))
            time.sleep(10)
        return common.fail(SCRIPT, e)


if __name__ == "__main__":
    sys.exit(main())
