"""2DGAN: conditional GAN of 2D convolutions for the 25x25x25 CLIC/LCD ECAL (Rehm, Vallecorsa et al.,
vCHEP 2021), in one PyTorch file.

    python 2dgan.py                                    # no --data: toy LCD showers (data/...), labelled TOY
    python 2dgan.py --data 'EleEscan_*.h5' --epochs 30 # real LCD files (one file or a quoted glob)
    python 2dgan.py --generate 10000 --ckpt runs/2dgan/ckpt.pt --energy 2:500 --out gen.h5
    python 2dgan.py --benchmark [--device cuda --dtype bf16 --compile]
    torchrun --nproc_per_node=4 2dgan.py --data 'EleEscan_*.h5'
    python 2dgan.py --resume                           # continue runs/2dgan/ckpt.pt

Model (reference.md): the generator multiplies a N(0,1)^200 latent by Ep/100, maps it to a 5x5x5 volume and
runs three branches of 2D convolutions on three permutations of it (each branch sees a different pair of
axes as the image, the third as channels), 5 -> 15 -> 30 -> 26 -> 25; the branches are permuted back,
concatenated (75 channels) and merged by a 3x3 convolution into 25x25x25. The discriminator runs the same
three permuted branches down to 9x9x9 each, then Dense(10) and three heads: real/fake, Ep/100 regression,
and Ecal = the plain sum of the input image. Losses: BCE with soft labels 0.9/0.1 and 5% flips (weight 6),
100*MAPE of Ep (0.2) and of Ecal (0.1); per batch one D step on real, one on fake, one G step.

Choices and deviations (the original Keras code was not available; reference.md gives the layers):
- Block = conv -> LeakyReLU(0.3) -> BatchNorm(momentum 0.01 = Keras 0.99, eps 1e-3) -> Dropout(0.2); convs
  feeding a BatchNorm have no bias except the two transposed ones. Counted the Keras way (+ BatchNorm moving
  mean/variance): 2,055,349 generator parameters (original 2,055,324; +25 = the merge conv's bias), exactly
  714,114 discriminator.
  "same" padding of even kernels is TF's (extra row/column at the end); ConvT k5 "same" is padding 1
  (stride 3), padding 2 + output_padding 1 (stride 2).
- Images are multiplied by --xscale 50 inside the networks (sum ~ Ep, as in the group's 3DGAN code); files
  stay in GeV. Generated cells below 1e-6 GeV are set to 0.
- Not in reference.md: ExponentialLR per epoch (--lr-decay 0.97); Adam with Keras' defaults (eps 1e-7); the
  generator step targets the soft "real" label 0.9.
- Fakes get Ep ~ U(100, 400) GeV for the first --early-epochs (3), then the real minibatch's Ep (so a
  weighted draw, as adagan.py makes, also shapes the fakes' Ep distribution).
- Validation metric (lower is better, best epoch kept): in +-5 GeV windows around 0, 50, 100, 200, 250, 300,
  400, 500 GeV of the held-out set, relative error of the first two moments along x, y, z plus relative L1
  error of the mean profiles, averaged over windows with >= --val-min events (else all in one window).
- Data on the device when it fits (size vs --max-data-gb, default half the free device memory / available
  RAM); otherwise the files are streamed one by one each epoch, without their held-out events (weighted
  draws need the in-memory mode).
"""
import argparse
import glob
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = "2dgan.py"
THRESHOLD = 1e-6                                   # GeV: cells below are 0 (data and generated)
VAL_CENTRES = (0, 50, 100, 200, 250, 300, 400, 500)  # GeV, +-5 GeV windows of the validation metric


# ---------------------------------------------------------------- flags


def get_args(argv=None):
    p = argparse.ArgumentParser(prog=SCRIPT, description="2DGAN for the 25x25x25 LCD ECAL (PyTorch).")
    a = p.add_argument
    a("--data", default=None, help="LCD HDF5 file or quoted glob (ECAL + target, or 51x51x25 ECAL + energy); "
                                    "none: toy LCD showers made once under ./data/")
    a("--toy-n", type=int, default=10000, help="number of toy showers when no --data")
    a("--out", default=None, help="run folder (default runs/2dgan); with --generate: the output .h5 file "
                                  "(default generated.h5)")
    a("--epochs", type=int, default=30, help="training epochs")
    a("--batch-size", type=int, default=128, help="minibatch size (per process under torchrun)")
    a("--lr-g", type=float, default=5e-4, help="Adam learning rate of the generator")
    a("--lr-d", type=float, default=1e-4, help="Adam learning rate of the discriminator")
    a("--lr-decay", type=float, default=0.97, help="exponential learning-rate decay factor per epoch")
    a("--latent", type=int, default=200, help="latent dimension")
    a("--width", type=float, default=1.0, help="channel-count multiplier (1 = original sizes; small for tests)")
    a("--xscale", type=float, default=50.0, help="images are multiplied by this inside the networks")
    a("--w-gan", type=float, default=6.0, help="loss weight of real/fake BCE")
    a("--w-ep", type=float, default=0.2, help="loss weight of the Ep regression MAPE")
    a("--w-ecal", type=float, default=0.1, help="loss weight of the Ecal MAPE")
    a("--label-flip", type=float, default=0.05, help="probability of flipping a discriminator label")
    a("--early-epochs", type=int, default=3, help="first epochs with fake Ep ~ U(100,400) GeV")
    a("--relu-epoch", type=int, default=3, help="epoch (0-based) from which the generator output is ReLU "
                                                 "instead of LeakyReLU")
    a("--val-frac", type=float, default=0.1, help="held-out fraction (validation metric, generated.h5)")
    a("--val-max", type=int, default=2000, help="at most this many held-out events in the per-epoch metric")
    a("--val-min", type=int, default=5, help="fewest events for an Ep window to count in the metric")
    a("--max-data-gb", type=float, default=None, help="load the data on the device if smaller than this "
                                                       "(default: half the free device memory / available RAM)")
    a("--seed", type=int, default=0, help="random seed (data split, initialisation, batches)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the networks (opt-in)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--ckpt-every", type=int, default=1, help="save OUT/ckpt.pt every this many epochs (and at the end)")
    a("--log-every", type=int, default=50, help="progress line every this many steps")
    a("--generate", type=int, default=None, metavar="N", help="sample N showers from --ckpt into --out")
    a("--ckpt", default=None, help="checkpoint to sample from (with --generate)")
    a("--energy", default="2:500", help="LO:HI GeV, Ep range of --generate (uniform)")
    a("--gen-batch", type=int, default=None, help="generation batch (default 1024; --benchmark: 4096 on CUDA, "
                                                   "8 on CPU)")
    a("--bench-batch", type=int, default=None, help="training batch of --benchmark (default --batch-size on "
                                                     "CUDA, 4 on CPU, where the full-size model is slow)")
    a("--benchmark", action="store_true", help="print one JSON line of generation and training speed, write nothing")
    a("--bench-steps", type=int, default=3, help="timed iterations of --benchmark (after one warm-up)")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size", "latent", "toy_n", "ckpt_every", "log_every", "val_max", "bench_steps",
                 "gen_batch", "bench_batch", "generate"):         # the last three may be None (= default)
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.val_frac < 1:
        p.error("--val-frac must be in (0, 1)")
    if args.width <= 0 or args.xscale <= 0:
        p.error("--width and --xscale must be > 0")
    try:
        lo, hi = (float(v) for v in args.energy.split(":"))
    except ValueError:
        p.error(f"--energy must be LO:HI in GeV, got {args.energy!r}")
    if not 0 < lo <= hi:
        p.error(f"--energy needs 0 < LO <= HI, got {args.energy!r}")
    args.energy_range = (lo, hi)
    return args


# ---------------------------------------------------------------- data


class DataError(Exception):
    """Bad input file: the message is '<file>: <problem>'."""


def lcd_files(pattern):
    files = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
    if not files:
        raise DataError(f"{pattern}: no file matches")
    for f in files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: no such file")
    return files


def _lcd_header(path):
    """(n_events, keys) of one LCD file after checking keys and shapes, reading no cells."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "ECAL" not in f:
                raise DataError(f"{path}: missing key 'ECAL'")
            shape = f["ECAL"].shape
            if len(shape) != 4 or shape[1:] not in ((25, 25, 25), (51, 51, 25)):
                raise DataError(f"{path}: ECAL has shape {shape}, expected (N,25,25,25) or (N,51,51,25)")
            if "target" in f and len(f["target"].shape) == 2 and f["target"].shape[1] >= 2:
                ekey = "target"
            elif "energy" in f:
                ekey = "energy"
            else:
                raise DataError(f"{path}: missing key 'target' (N,>=2) or 'energy' (N,)")
            n = shape[0]
            if n == 0:
                raise DataError(f"{path}: empty file (0 events)")
            if f[ekey].shape[0] != n:
                raise DataError(f"{path}: {n} ECAL events but {f[ekey].shape[0]} in '{ekey}'")
            return n, ekey
    except OSError as e:
        raise DataError(f"{path}: cannot read as HDF5 ({e.__class__.__name__})")


def _ep_column(e, ekey):
    """Ep (n,) GeV from the 'target' (n,>=2) or 'energy' (n,...) dataset."""
    e = np.asarray(e, np.float32)
    return e[:, 1] if ekey == "target" else e.reshape(len(e), -1)[:, 0]


def _read_lcd(path, idx=None):
    """Read one file (all events or the sorted indices idx): ECAL (n,25,25,25) GeV and Ep (n,) GeV."""
    import h5py
    n, ekey = _lcd_header(path)
    sel = slice(None) if idx is None else np.asarray(idx)
    with h5py.File(path, "r") as f:
        x = f["ECAL"][sel]
        e = f[ekey][sel]
    if x.shape[1] == 51:
        x = x[:, 13:38, 13:38, :]
    x, ep = np.ascontiguousarray(x, dtype=np.float32), _ep_column(e, ekey)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: ECAL has NaN or inf values")
    if (x < 0).any():
        raise DataError(f"{path}: ECAL has negative energies")
    if not np.isfinite(ep).all() or (ep <= 0).any():
        raise DataError(f"{path}: primary energy Ep must be finite and > 0")
    x[x < THRESHOLD] = 0.0
    return x, ep


def load_lcd(pattern):
    """One LCD file or a glob of them -> (ECAL (N,25,25,25) float32 GeV, Ep (N,) float32 GeV)."""
    files = lcd_files(pattern)
    for f in files:            # check every header before reading any cell
        _lcd_header(f)
    xs, eps = zip(*[_read_lcd(f) for f in files])
    return np.concatenate(xs), np.concatenate(eps)


def write_lcd(path, ecal, ep):
    """LCD format (ECAL (N,25,25,25) GeV, target (N,2) = [pdg 11, Ep]), written atomically."""
    import h5py
    tmp = path + f".tmp{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ECAL", data=np.asarray(ecal, np.float32), chunks=(min(len(ecal), 256), 25, 25, 25))
            f["target"] = np.c_[np.full(len(ep), 11.0), np.asarray(ep, np.float64)].astype(np.float32)
            f.attrs["generator"] = "2dgan.py"
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def split_indices(n, val_frac, seed):
    """Seeded held-out split: (train_idx, val_idx), both sorted."""
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(val_frac * n)))
    if n - n_val < 1:
        raise DataError(f"{n} events are too few to hold out a validation set")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class LCDStream:
    """Files too large for the device: read one file at a time; per-file seeded split."""

    def __init__(self, files, val_frac, seed):
        self.files = files
        self.splits = [split_indices(_lcd_header(f)[0], val_frac, seed + 7919 * i) for i, f in enumerate(files)]

    def train_part(self, i):
        return _read_lcd(self.files[i], self.splits[i][0])

    def val_ep(self):
        import h5py
        out = []
        for f, (_, v) in zip(self.files, self.splits):
            key = _lcd_header(f)[1]
            with h5py.File(f, "r") as h:
                out.append(_ep_column(h[key][v], key))
        return np.concatenate(out)

    def val_events(self, max_events):
        parts, left = [], max_events
        for f, (_, v) in zip(self.files, self.splits):
            if left <= 0:
                break
            parts.append(_read_lcd(f, v[:left]))
            left -= len(parts[-1][1])
        return tuple(np.concatenate(a) for a in zip(*parts))


def is_toy(files):
    """True if any file carries the toy=True attribute of common.write_toy."""
    import h5py

    def toy(f):
        with h5py.File(f, "r") as h:
            return bool(h.attrs.get("toy", False))
    return any(toy(f) for f in files)


def memory_budget(device, max_gb=None):
    if max_gb is not None:
        return max_gb * 1e9
    if device.type == "cuda":
        return 0.5 * torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return 0.5 * float(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# ---------------------------------------------------------------- model


def _ch(c, width):
    return max(1, int(round(c * width)))


def _pad_same(k):
    """TF 'same' padding for stride 1: (k-1)//2 before, the rest after (asymmetric for even k)."""
    lo = (k - 1) // 2
    return nn.ZeroPad2d((lo, k - 1 - lo, lo, k - 1 - lo))


def _block(layers, c_out, dropout=0.2):
    """layers -> LeakyReLU(0.3) -> BatchNorm (Keras momentum 0.99, eps 1e-3) -> Dropout."""
    return nn.Sequential(*layers, nn.LeakyReLU(0.3), nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01),
                         nn.Dropout(dropout))


def _conv(c_in, c_out, k, same=True):
    conv = nn.Conv2d(c_in, c_out, k, bias=False)
    return [_pad_same(k), conv] if same and k > 1 else [conv]


# the three branches see the volume (N, x, y, z) as (N, C, H, W) with C = z, y, x in turn
_TO_BRANCH = ((0, 3, 1, 2), (0, 2, 1, 3), (0, 1, 2, 3))
_FROM_BRANCH = ((0, 2, 3, 1), (0, 2, 1, 3), (0, 1, 2, 3))   # inverses of the above


class Generator(nn.Module):
    """(Ep/100) * N(0,1)^latent -> Dense(125) -> 5x5x5 -> 3 permuted 2D-conv branches -> (N,25,25,25)."""

    def __init__(self, latent=200, width=1.0, xscale=50.0):
        super().__init__()
        c32, c64 = _ch(32, width), _ch(64, width)
        self.latent = latent
        self.dense = nn.Linear(latent, 125)

        def branch():
            return nn.Sequential(
                _block(_conv(5, c32, 5), c32),                                         # 5x5
                _block([nn.ConvTranspose2d(c32, c64, 5, stride=3, padding=1)] + _conv(c64, c64, 5), c64),  # 15
                _block([nn.ConvTranspose2d(c64, c64, 5, stride=2, padding=2, output_padding=1)]
                       + _conv(c64, c64, 8), c64),                                     # 30
                _block(_conv(c64, c64, 5, same=False), c64),                           # 26
                _block(_conv(c64, c32, 4), c32),
                _block(_conv(c32, c32, 3), c32),
                _block(_conv(c32, 25, 2, same=False), 25))                             # 25
        self.branches = nn.ModuleList([branch() for _ in range(3)])
        self.merge = nn.Sequential(_pad_same(3), nn.Conv2d(75, 25, 3))
        self.register_buffer("relu_out", torch.tensor(False))     # LeakyReLU -> ReLU output switch
        self.register_buffer("xscale", torch.tensor(float(xscale)))

    def forward(self, z):
        v = self.dense(z).view(-1, 5, 5, 5)
        outs = [br(v.permute(*p)).permute(*q).permute(0, 3, 1, 2)          # each -> (N, z, x, y)
                for br, p, q in zip(self.branches, _TO_BRANCH, _FROM_BRANCH)]
        x = self.merge(torch.cat(outs, 1)).permute(0, 2, 3, 1)             # (N, x, y, z)
        return torch.where(self.relu_out, F.relu(x), F.leaky_relu(x, 0.3))


class Discriminator(nn.Module):
    """3 permuted 2D-conv branches -> 9x9x9 each -> Dense(10) -> (real/fake logit, Ep/100, Ecal = sum)."""

    def __init__(self, width=1.0):
        super().__init__()
        c32, c64 = _ch(32, width), _ch(64, width)

        def branch():
            return nn.Sequential(
                _block(_conv(25, c64, 8), c64),                                        # 25
                _block(_conv(c64, c32, 6, same=False), c32),                           # 20
                _block(_conv(c32, c32, 5, same=False), c32),                           # 16
                _block(_conv(c32, c32, 4, same=False), c32),                           # 13
                _block(_conv(c32, c32, 3, same=False), c32),                           # 11
                _block(_conv(c32, 9, 3, same=False), 9))                               # 9
        self.branches = nn.ModuleList([branch() for _ in range(3)])
        self.dense = nn.Sequential(nn.Linear(3 * 729, 10), nn.LeakyReLU(0.3),
                                   nn.BatchNorm1d(10, eps=1e-3, momentum=0.01))
        self.fake = nn.Linear(10, 1)
        self.ep = nn.Linear(10, 1)

    def forward(self, x):
        h = torch.cat([br(x.permute(*p)).flatten(1) for br, p in zip(self.branches, _TO_BRANCH)], 1)
        h = self.dense(h)
        return self.fake(h).squeeze(1), self.ep(h).squeeze(1), x.float().sum((1, 2, 3))


def keras_param_count(module):
    """Parameters counted as Keras does: trainable ones plus BatchNorm moving mean and variance."""
    return sum(p.numel() for p in module.parameters()) + sum(
        m.running_mean.numel() + m.running_var.numel() for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm))


# ---------------------------------------------------------------- train


def resolve_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def _autocast(device, dtype):
    if dtype == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def mape(target, pred):
    return 100.0 * ((target - pred).abs() / target.abs().clamp_min(1e-6)).mean()


def val_windows(ep, min_count):
    """Indices of held-out events per +-5 GeV window; if none has min_count events, one window of all."""
    wins = [np.flatnonzero(np.abs(ep - c) <= 5.0) for c in VAL_CENTRES]
    wins = [w for w in wins if len(w) >= min_count]
    return wins or [np.arange(len(ep))]


def shower_metric(real, fake, ep, min_count=5):
    """Relative error of the first two moments and of the x/y/z profiles, averaged over Ep windows."""
    errs = []
    for w in val_windows(ep, min_count):
        mr, mf = common.axis_moments(real[w]), common.axis_moments(fake[w])
        e_mom = np.mean([abs(mf[k].mean() - mr[k].mean()) / max(abs(mr[k].mean()), 1e-12) for k in mr])
        e_prof = np.mean([np.abs(pf.mean(0) - pr.mean(0)).sum() / max(pr.mean(0).sum(), 1e-12)
                          for pr, pf in zip(common.axis_profiles(real[w]), common.axis_profiles(fake[w]))])
        errs.append(e_mom + e_prof)
    return float(np.mean(errs))


def epoch_seed(seed, rank, epoch):
    """Seed of one rank's random stream (batches, noise, flips, dropout) in one epoch: a function of
    (seed, rank, epoch) only, so a resumed rank continues with its own stream, not rank 0's."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] % 2 ** 63)


def train(args, ecal, ep, weights=None, out_dir=None, log=print, split=None):
    """Train a 2DGAN. ecal (N,25,25,25) GeV and ep (N,) GeV numpy arrays (or ecal an LCDStream, ep None).
    split: optional (train_idx, val_idx) index arrays into ecal, used instead of
    split_indices(N, args.val_frac, args.seed). weights: optional sampling probabilities of the training
    events (length len(train_idx), or N) for minibatch draws with replacement.
    Saves out_dir/ckpt.pt (rank 0) if out_dir. Returns dict(generator, discriminator, best_epoch, history,
    train_idx, val_idx, metric) with the best epoch's modules, unwrapped, in eval mode, on args' device."""
    ddp = "RANK" in os.environ and torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    device = resolve_device(args.device)
    if args.dtype == "bf16" and device.type != "cuda" and rank == 0:
        log("--dtype bf16 is ignored on CPU (autocast only on CUDA): training in fp32")
    torch.manual_seed(args.seed)
    gen = torch.Generator(device)        # batches, noise, flips: reseeded per rank and epoch (epoch_seed)

    stream = isinstance(ecal, LCDStream)
    if stream:
        if weights is not None or split is not None:
            raise ValueError("weights and split need the data in memory (not streamed)")
        n_train = sum(len(tr) for tr, _ in ecal.splits)
        val_x, val_ep = ecal.val_events(args.val_max)
        x0, e0 = ecal.train_part(0)                    # the fit uses the first file
        sf0 = common.sampling_fraction(x0, e0)
        del x0
        train_idx = val_idx = None
    else:
        n = len(ep)
        if split is None:
            train_idx, val_idx = split_indices(n, args.val_frac, args.seed)
        else:
            train_idx, val_idx = (np.asarray(a, np.int64).reshape(-1) for a in split)
            if not (len(train_idx) and len(val_idx)) or min(train_idx.min(), val_idx.min()) < 0 \
                    or max(train_idx.max(), val_idx.max()) >= n:
                raise ValueError(f"split must be two non-empty index arrays into the {n} events")
        n_train = len(train_idx)
        vsel = val_idx[np.random.default_rng(args.seed).permutation(len(val_idx))[:args.val_max]]
        val_x, val_ep = ecal[np.sort(vsel)], ep[np.sort(vsel)]
        # per-event sampling fraction of the training set, in chunks (no copy of the whole set)
        e0 = ep[train_idx]
        sf0 = np.concatenate([common.sampling_fraction(ecal[train_idx[s:s + 4096]], e0[s:s + 4096])
                              for s in range(0, n_train, 4096)])
        if weights is not None:
            weights = np.asarray(weights, np.float64)
            if len(weights) == n:
                weights = weights[train_idx]
            if len(weights) != n_train or not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights must be {n_train} (or {n}) finite non-negative numbers, not all 0")
    # sampling fraction vs Ep (4th-order polynomial) fitted on training data: Ecal target of the fakes
    sf_poly = np.polyfit(e0.astype(np.float64), sf0, 4)
    del e0, sf0
    sf_t = torch.tensor(sf_poly[::-1].copy(), dtype=torch.float32, device=device)
    win_ev = np.sort(np.concatenate(val_windows(val_ep, args.val_min)))
    val_x, val_ep = val_x[win_ev], val_ep[win_ev]

    G = Generator(args.latent, args.width, args.xscale).to(device)
    D = Discriminator(args.width).to(device)
    nets = (("G", G), ("D", D))
    opt_g, opt_d = (torch.optim.Adam(net.parameters(), lr=lr, eps=1e-7) for net, lr in ((G, args.lr_g), (D, args.lr_d)))
    sch_g, sch_d = (torch.optim.lr_scheduler.ExponentialLR(opt, args.lr_decay) for opt in (opt_g, opt_d))
    start_epoch, step, history, best = 0, 0, [], {"epoch": -1, "metric": float("inf"), "G": None, "D": None}
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if out_dir else None
    if args.resume and ckpt_path and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        for key, pair in (("model", (G, D)), ("optim", (opt_g, opt_d)), ("sched", (sch_g, sch_d))):
            for name, obj in zip("GD", pair):
                obj.load_state_dict(ck[key][name])
        start_epoch, step, history, best = ck["epoch"], ck["step"], ck["history"], ck["best"]
        if rank == 0:
            log(f"resumed from {ckpt_path} at epoch {start_epoch}, step {step}")

    G_run, D_run = G, D
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [device.index] if device.type == "cuda" else None
        G_run, D_run = DDP(G, device_ids=ids), DDP(D, device_ids=ids)
    if args.compile:
        G_run, D_run = torch.compile(G_run), torch.compile(D_run)
    amp = _autocast(device, args.dtype)
    xs = args.xscale

    if not stream:
        x_all = torch.from_numpy(ecal).to(device)          # in memory / on the device, once
        ep_all = torch.from_numpy(ep).to(device)
        tr_t = torch.from_numpy(train_idx).to(device)
        w_t = torch.from_numpy(weights).to(device) if weights is not None else None
    steps_per_epoch = max(1, n_train // args.batch_size)
    bs = args.batch_size

    def chunks(epoch):
        """(images, Ep, list of index batches) per chunk of the epoch: the whole set, or file by file."""
        if not stream:
            if w_t is not None:
                draw = torch.multinomial(w_t, steps_per_epoch * bs, replacement=True, generator=gen)
            else:
                draw = torch.randperm(n_train, device=device, generator=gen)
                draw = draw[:steps_per_epoch * bs] if n_train >= bs else draw.repeat(bs // n_train + 1)[:bs]
            yield x_all, ep_all, tr_t[draw].view(-1, bs)
            return
        order = torch.randperm(len(ecal.files), generator=torch.Generator().manual_seed(args.seed + epoch))
        for i in order.tolist():
            x, e = ecal.train_part(i)
            m = len(e) // bs
            if m == 0:
                continue
            perm = torch.randperm(len(e), device=device, generator=gen)[:m * bs].view(m, bs)
            yield torch.from_numpy(x).to(device), torch.from_numpy(e).to(device), perm

    def labels(value):
        flip = torch.rand(bs, device=device, generator=gen) < args.label_flip
        return torch.where(flip, torch.full((bs,), 1.0 - value, device=device), torch.full((bs,), value, device=device))

    def noise(e):
        return torch.randn(len(e), args.latent, device=device, generator=gen) * (e[:, None] / 100.0)

    def gan_loss(d_out, target, e_t, ecal_t):
        logit, ep_p, ecal_p = d_out
        return (args.w_gan * F.binary_cross_entropy_with_logits(logit.float(), target)
                + args.w_ep * mape(e_t / 100.0, ep_p.float()) + args.w_ecal * mape(ecal_t, ecal_p.float()))

    def speed():
        rate = (step - done0) * bs * world / (time.time() - t0)
        eta = int(max(0, (args.epochs * steps_per_epoch - step) * bs * world / max(rate, 1e-9)))
        return f"{rate:.0f} samples/s | ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}"

    t0, done0 = time.time(), step
    for epoch in range(start_epoch, args.epochs):
        gen.manual_seed(epoch_seed(args.seed, rank, epoch))
        torch.manual_seed(epoch_seed(args.seed, rank, epoch) + 1)      # dropout
        G.relu_out.fill_(epoch >= args.relu_epoch)
        for net in (G_run, D_run):
            net.train()
        sums, n_b, first = np.zeros(2), 0, []
        for xc, ec, batches in chunks(epoch):
            for bidx in batches:
                if n_b == 0:
                    first = bidx[:4].tolist()
                real = xc[bidx].float() * xs
                e_real = ec[bidx].float()
                e_fake = (100.0 + 300.0 * torch.rand(e_real.shape, device=device, generator=gen)
                          if epoch < args.early_epochs else e_real)
                ecal_fake = xs * e_fake * sum(c * e_fake ** i for i, c in enumerate(sf_t))
                with torch.no_grad(), amp:
                    fake = G(noise(e_fake)).float()
                # D step on real, D step on fake
                for img, lab, e_t, ecal_t in ((real, 0.9, e_real, real.sum((1, 2, 3))),
                                               (fake, 0.1, e_fake, ecal_fake)):
                    with amp:
                        loss_d = gan_loss(D_run(img), labels(lab), e_t, ecal_t)
                    opt_d.zero_grad(set_to_none=True)
                    loss_d.backward()
                    opt_d.step()
                # one G step
                with amp:
                    loss_g = gan_loss(D_run(G_run(noise(e_fake))), torch.full((bs,), 0.9, device=device), e_fake,
                                      ecal_fake)
                opt_g.zero_grad(set_to_none=True)
                loss_g.backward()
                opt_g.step()
                step += 1
                n_b += 1
                sums += (loss_d.item(), loss_g.item())
                if rank == 0 and (step % args.log_every == 0):
                    log(f"epoch {epoch + 1}/{args.epochs} | step {step} | loss_d {loss_d.item():.4g} "
                        f"loss_g {loss_g.item():.4g} | {speed()}")
        sch_g.step()
        sch_d.step()
        # validation metric on the held-out events of the Ep windows
        G.eval()
        metric = shower_metric(val_x, generate(G, val_ep, device=device, seed=args.seed), val_ep, args.val_min)
        rec = {"epoch": epoch + 1, "step": step, "loss_d": sums[0] / max(n_b, 1), "loss_g": sums[1] / max(n_b, 1),
               "val_metric": metric, "lr_g": opt_g.param_groups[0]["lr"], "lr_d": opt_d.param_groups[0]["lr"]}
        if ddp:     # the events each rank drew first: ranks must differ (resume test)
            firsts = [None] * world
            torch.distributed.all_gather_object(firsts, first)
            rec["first_batch"] = firsts
        else:
            rec["first_batch"] = [first]
        history.append(rec)
        if metric < best["metric"]:
            best = {"epoch": epoch + 1, "metric": metric,
                    **{name: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()} for name, net in nets}}
        if rank == 0:
            log(f"epoch {epoch + 1}/{args.epochs} | step {step} | loss_d {rec['loss_d']:.4g} loss_g "
                f"{rec['loss_g']:.4g} | val_metric {metric:.4f} (best {best['metric']:.4f} @ {best['epoch']}) | "
                f"{speed()}")
        if rank == 0 and ckpt_path and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs):
            rng = {"scheme": "per rank and epoch: epoch_seed(seed, rank, epoch)", "seed": args.seed}
            torch.save({"model": {"G": G.state_dict(), "D": D.state_dict()},
                        "optim": {"G": opt_g.state_dict(), "D": opt_d.state_dict()},
                        "sched": {"G": sch_g.state_dict(), "D": sch_d.state_dict()},
                        "epoch": epoch + 1, "step": step, "history": history, "best": best, "args": dict(vars(args)),
                        "rng": rng, "sf_poly": sf_poly.tolist(), "geometry": "lcd", "xscale": args.xscale,
                        "latent": args.latent, "width": args.width,
                        "val_idx": None if val_idx is None else val_idx.tolist()}, ckpt_path + ".tmp")
            os.replace(ckpt_path + ".tmp", ckpt_path)
    for name, net in nets:
        if best["G"] is not None:
            net.load_state_dict(best[name])
        net.eval()
    return {"generator": G, "discriminator": D, "best_epoch": best["epoch"], "history": history,
            "metric": best["metric"], "train_idx": train_idx, "val_idx": val_idx, "sf_poly": sf_poly}


# ---------------------------------------------------------------- generate


@torch.no_grad()
def generate(G, ep, batch_size=1024, device="cpu", seed=None, dtype="fp32"):
    """Showers (N,25,25,25) float32 GeV for primary energies ep (N,) GeV; cells < 1e-6 GeV set to 0."""
    device = torch.device(device)
    was_training = G.training
    G.eval()
    g = torch.Generator(device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2 ** 62)
    ep = np.asarray(ep, np.float32).reshape(-1)
    out = np.empty((len(ep), 25, 25, 25), np.float32)
    xs = float(G.xscale)
    for s in range(0, len(ep), batch_size):
        e = torch.from_numpy(ep[s:s + batch_size]).to(device)
        z = torch.randn(len(e), G.latent, device=device, generator=g) * (e[:, None] / 100.0)
        with _autocast(device, dtype):
            x = G(z).float() / xs
        x = torch.where(x < THRESHOLD, torch.zeros_like(x), x)
        out[s:s + len(e)] = x.cpu().numpy()
    G.train(was_training)
    return out


def load_checkpoint(path, device="cpu"):
    """(generator with the best epoch's weights, in eval mode on device, checkpoint dict)."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        G = Generator(ck["latent"], ck["width"], ck["xscale"]).to(device)
        G.load_state_dict(ck["best"]["G"] if ck.get("best", {}).get("G") is not None else ck["model"]["G"])
    except Exception as e:      # unpickling errors come in many classes
        raise DataError(f"{path}: not a 2dgan.py checkpoint ({e.__class__.__name__})")
    return G.eval(), ck


# ---------------------------------------------------------------- main


def make_plots(real, fake, ep, folder, toy):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(folder, exist_ok=True)
    tag = "TOY " if toy else ""
    sets = (("real", real, "o"), ("2DGAN", fake, "s"))

    def save(fig, name):
        tmp = os.path.join(folder, f".{name}.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        os.replace(tmp, os.path.join(folder, name))

    # sampling fraction vs Ep, and the ratio in 10 GeV bins
    edges = np.arange(0.0, max(510.0, ep.max() + 10), 10.0)
    c = 0.5 * (edges[1:] + edges[:-1])
    fig, ax = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    means = []
    for label, x, mk in sets:
        m, sd, _ = common.binned_stat(ep, common.sampling_fraction(x, ep), edges)
        ax[0].errorbar(c, m, sd, fmt=mk, ms=3, label=label)
        means.append(m)
    ax[0].set(ylabel="Ecal / Ep", title=f"{tag}sampling fraction vs Ep")
    ax[0].legend()
    ax[1].plot(c, means[1] / means[0], "k.")
    ax[1].axhline(1, color="grey", lw=0.5)
    ax[1].set(ylabel="gen / real", xlabel="Ep [GeV]")
    save(fig, "sampling_fraction.png")
    # profiles along x, y, z
    fig, ax = plt.subplots(2, 3, figsize=(12, 6), sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for k, (pr, pf) in enumerate(zip(common.axis_profiles(real), common.axis_profiles(fake))):
        r, f = pr.mean(0), pf.mean(0)
        for (label, _, mk), v in zip(sets, (r, f)):
            ax[0, k].plot(np.log10(np.maximum(v, 1e-12)), mk + "-", ms=3, label=label)
        ax[0, k].set(title=f"{tag}profile along {'xyz'[k]}", ylabel="log10 mean deposit [GeV]")
        with np.errstate(divide="ignore", invalid="ignore"):
            ax[1, k].plot(r / f, "k.")
        ax[1, k].set(ylabel="real / gen", xlabel=f"{'xyz'[k]} cell" + (" (depth)" if k == 2 else ""))
    ax[0, 0].legend()
    save(fig, "profiles.png")
    # first two moments per axis
    mr, mf = common.axis_moments(real), common.axis_moments(fake)
    fig, ax = plt.subplots(2, 3, figsize=(12, 6))
    for (axis, order), v in mr.items():
        a = ax[order - 1, axis]
        lo, hi = np.percentile(np.r_[v, mf[(axis, order)]], [0.5, 99.5])
        for label, vals in (("real", v), ("2DGAN", mf[(axis, order)])):
            a.hist(vals, np.linspace(lo, hi + 1e-9, 40), histtype="step", density=True, label=label)
        a.set_title(f"{tag}{'xyz'[axis]} {'centre' if order == 1 else 'variance'} [cells]")
    ax[0, 0].legend()
    save(fig, "moments.png")
    # cell-energy spectrum and hit counts
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    hits = [(x > 0).sum((1, 2, 3)) for _, x, _ in sets]
    hit_bins = np.linspace(0, max(h.max() for h in hits) + 1, 50)
    for (label, x, _), h in zip(sets, hits):
        ax[0].hist(x[x > 0].ravel(), np.logspace(-6, 1, 60), histtype="step", label=label)
        ax[1].hist(h, hit_bins, histtype="step", label=label)
    ax[0].set(xscale="log", yscale="log", xlabel="cell energy [GeV]", title=f"{tag}cell-energy spectrum")
    ax[0].legend()
    ax[1].set(xlabel="hits (cells > 1e-6 GeV)", title=f"{tag}hit count")
    save(fig, "hits_spectrum.png")


def benchmark(args):
    device = resolve_device(args.device)
    if args.dtype == "bf16" and device.type != "cuda":
        print("--dtype bf16 is ignored on CPU: benchmarking fp32", file=sys.stderr)
    dtype = args.dtype if device.type == "cuda" else "fp32"
    torch.manual_seed(args.seed)
    G = Generator(args.latent, args.width, args.xscale).to(device)
    D = Discriminator(args.width).to(device)
    Gc, Dc = (torch.compile(G), torch.compile(D)) if args.compile else (G, D)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def rate(fn, batch):
        """Items/s of fn over --bench-steps calls, after one warm-up call."""
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(args.bench_steps):
            fn()
        sync()
        return batch * args.bench_steps / (time.perf_counter() - t)

    gb = args.gen_batch or (4096 if device.type == "cuda" else 8)
    G.eval()
    z = torch.randn(gb, args.latent, device=device)
    with torch.no_grad(), _autocast(device, dtype):
        gen_rate = rate(lambda: Gc(z), gb)
    G.train()
    bs = args.bench_batch or (args.batch_size if device.type == "cuda" else 4)
    opt_g, opt_d = torch.optim.Adam(G.parameters()), torch.optim.Adam(D.parameters())
    real = torch.rand(bs, 25, 25, 25, device=device)
    e = torch.full((bs,), 1.0, device=device)

    def one_step():     # D on real, D on fake, G: the three passes of a training step
        fake = Gc(torch.randn(bs, args.latent, device=device)).detach()
        for opt, img in ((opt_d, lambda: real), (opt_d, lambda: fake),
                         (opt_g, lambda: Gc(torch.randn(bs, args.latent, device=device)))):
            with _autocast(device, dtype):
                logit, ep_p, _ = Dc(img())
                loss = F.binary_cross_entropy_with_logits(logit.float(), e * 0.9) + ep_p.float().abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_rate = rate(one_step, bs)
    print(json.dumps({"script": SCRIPT, "device": str(device) if device.type == "cpu" else
                      torch.cuda.get_device_name(device), "dtype": dtype, "compile": args.compile,
                      "width": args.width, "gen_batch": gb, "gen_showers_per_s": round(gen_rate, 2),
                      "train_batch": bs, "train_samples_per_s": round(train_rate, 2)}))


def run_generate(args):
    out = args.out or "generated.h5"
    if not args.ckpt:
        raise DataError("--generate needs --ckpt PATH")
    if not os.path.isfile(args.ckpt):
        raise DataError(f"{args.ckpt}: no such file")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise DataError(f"{out}: output folder does not exist")
    device = resolve_device(args.device)
    G, _ = load_checkpoint(args.ckpt, device)
    lo, hi = args.energy_range
    ep = np.random.default_rng(args.seed).uniform(lo, hi, args.generate).astype(np.float32)
    t = time.time()
    x = generate(G, ep, args.gen_batch or 1024, device, seed=args.seed,
                 dtype=args.dtype if device.type == "cuda" else "fp32")
    write_lcd(out, x, ep)
    print(f"wrote {args.generate} showers (Ep {lo:g}-{hi:g} GeV) to {out} in {time.time() - t:.1f} s")


def main(argv=None):
    args = get_args(argv)
    try:
        if args.benchmark:
            benchmark(args)
            return 0
        if args.generate is not None:
            run_generate(args)
            return 0
        return run_train(args)
    except DataError as e:
        print(f"{SCRIPT}: error: {e}", file=sys.stderr)
        return 2


def run_train(args):
    ddp = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    out = args.out or os.path.join("runs", "2dgan")
    device = resolve_device(args.device)
    toy = args.data is None
    if toy:
        path = common.toy_path("lcd", args.toy_n, args.seed)
        if rank == 0:
            print(f"no --data: training on TOY lcd showers ({path})", flush=True)
            if not os.path.exists(path):
                os.makedirs("data", exist_ok=True)
                common.write_toy("lcd", path, args.toy_n, args.seed)
        if ddp:
            while not os.path.exists(path):
                time.sleep(0.5)
        args.data = path
    files = lcd_files(args.data)
    size = sum(_lcd_header(f)[0] for f in files) * 25 ** 3 * 4    # checks every file's keys and shapes
    toy = toy or is_toy(files)
    in_memory = size <= memory_budget(device, args.max_data_gb)
    if in_memory:
        ecal, ep = load_lcd(args.data)                # full validation before anything is written
        split_indices(len(ep), args.val_frac, args.seed)
    else:
        ecal, ep = LCDStream(files, args.val_frac, args.seed), None
    if args.resume and not os.path.exists(os.path.join(out, "ckpt.pt")):
        raise DataError(f"{os.path.join(out, 'ckpt.pt')}: --resume but no checkpoint there")
    if ddp:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    lines = []
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        if args.resume and os.path.exists(os.path.join(out, "log.txt")):
            with open(os.path.join(out, "log.txt")) as f:
                lines = f.read().splitlines()

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    if rank == 0:
        log(f"{SCRIPT}: {'TOY ' if toy else ''}data {args.data}: {size / 1e9:.2f} GB, "
            + ("in memory on " + str(device) if in_memory else "streamed file by file (larger than the budget)"))
    res = train(args, ecal, ep, out_dir=out, log=log)
    if rank == 0:
        G = res["generator"]
        if in_memory:
            real, ep_val = ecal[res["val_idx"]], ep[res["val_idx"]]
            val_ids = res["val_idx"].tolist()
        else:
            ep_val = ecal.val_ep()
            real = ecal.val_events(args.val_max)[0]
            val_ids = {f: s[1].tolist() for f, s in zip(ecal.files, ecal.splits)}
        fake = generate(G, ep_val, args.gen_batch or 1024, device, seed=args.seed + 1,
                        dtype=args.dtype if device.type == "cuda" else "fp32")
        write_lcd(os.path.join(out, "generated.h5"), fake, ep_val)
        pairs, ep_plot = (("real", real), ("generated", fake[:len(real)])), ep_val[:len(real)]
        make_plots(real, pairs[1][1], ep_plot, os.path.join(out, "plots"), toy)
        metrics = {"script": SCRIPT, "data": args.data, "toy": toy, "best_epoch": res["best_epoch"],
                   "best_val_metric": res["metric"], "history": res["history"],
                   "sampling_fraction_mean": {k: float(common.sampling_fraction(x, ep_plot).mean()) for k, x in pairs},
                   "hits_mean": {k: float((x > 0).sum((1, 2, 3)).mean()) for k, x in pairs},
                   "n_generated": int(len(ep_val)), "val_indices": val_ids, "args": vars(args)}
        log(f"best epoch {res['best_epoch']} (val_metric {res['metric']:.4f}); wrote {out}/generated.h5, "
            f"metrics.json, plots/, ckpt.pt")
        for name, text in (("metrics.json", json.dumps(metrics, indent=1, default=str)),
                           ("log.txt", "\n".join(lines) + "\n")):
            with open(os.path.join(out, name + ".tmp"), "w") as f:
                f.write(text)
            os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
    if ddp:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
