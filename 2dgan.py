"""2DGAN: conditional GAN of 2D convolutions for the 25x25x25 CLIC/LCD ECAL (Rehm, Vallecorsa et al., vCHEP 2021).

    python 2dgan.py                                    # no --data: the TOY reproduction (reduced, below)
    python 2dgan.py --data 'EleEscan_*.h5'             # real LCD files, the paper's configuration
    python 2dgan.py --generate 10000 --ckpt runs/2dgan/ckpt.pt --energy 2:500 --out gen.h5
    python 2dgan.py --benchmark [--device cuda --dtype bf16 --compile]
    torchrun --nproc_per_node=4 2dgan.py --data 'EleEscan_*.h5'
    python 2dgan.py --resume                           # continue runs/2dgan/ckpt.pt

Model: reference.md; Keras parameter counts 2,055,324 (G) and 714,114 (D), as the original. The original's regime
(svalleco/3Dgan, branch frehm/Conv2D; M = Conv2D/Models_m4_1_ReLU.py, P = PTF_k_v6_1_ReLU.py, F =
Conv2D/Functions_v1_5_8.py): labels 0.9/0, 5% flips (M:278-294, 317); lr constant 4.05 epochs then x0.79 per epoch,
new Adam per file (P:196-204, 301-304); BatchNorm frozen on its initial statistics (P:328-352, M:288,313); ReLU
output from epoch 3 (P:50,262-268); fake Ep U(100,400) then U(2,500) (M:266-271, 312); best-epoch metric of
F:463-640 (common.lcd_shower_metric). TOY run (no --data): 4000 showers, 10 epochs; claim (SF within 10%, depth
profile within 20%) not reached: SF 0.73-1.01, profile off up to x4 (README: the table of runs).
Bad input (flags, files, --out, checkpoints, another script's run folder): one line, exit 2, nothing written;
OUT/run.json names the script and the model flags (--latent/--width/--xscale) that --resume must keep.
Deviations from the original (its lines in brackets): images x --xscale 50 inside the networks (F:45-90 feeds
GeV; at x1 adagan.py's MIXDISC fails); the Ecal target fitted on the training set (M:252-263 hard-codes the LCD
fit); held-out events by a --val-frac split (F:547-556 reads two fixed files, also trained on); validation noise
N(0,1) (F:616: N(0.1,1)); random streams per (seed, rank, epoch), for torchrun ranks and resumes (no original
counterpart); --fake-ep real: fakes at the real batch's Ep (M:266-271 draws uniform).
"""
import argparse, json, math, os, shutil, sys, time  # noqa: E401

import h5py
import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SCRIPT = "2dgan.py"
THRESHOLD = 1e-6                                  # GeV: cells below are 0 (data and generated)
# sized flags left unset: the paper's configuration with --data, the CPU-sized toy reproduction without
PAPER = dict(toy_n=10000, epochs=30, batch_size=128, width=1.0, val_frac=0.1, val_window=5.0)
TOY = dict(toy_n=4000, epochs=10, batch_size=32, width=0.125, val_frac=0.25, val_window=50.0)
UNBOUNDED = ("early_epochs", "relu_epoch", "val_min")    # integer flags not checked; the others are >= 1 (seed >= 0)
POSITIVE = ("width", "xscale", "lr_g", "lr_d", "val_window", "max_data_gb")
OUT_FILES = ("ckpt.pt", "generated.h5", "metrics.json", "log.txt", "run.json", "plots/profiles.png",
             "plots/sampling_fraction.png")      # checked before anything is read (run_train)

# ---------------------------------------------------------------- flags
def fail(err):
    """Exit status 2, the error as one line (common.fail: rank 0 prints, the other ranks wait for it)."""
    return common.fail(SCRIPT, err)

def get_args(argv=None, toy_config=False):
    """Parse flags; sized flags not given take PAPER values, or TOY ones if toy_config and no --data."""
    p = argparse.ArgumentParser(prog=SCRIPT, description="2DGAN for the 25x25x25 LCD ECAL (PyTorch).")
    p.error = lambda msg: sys.exit(fail(msg))                     # one line, not argparse's usage block
    a = p.add_argument
    a("--data", help="LCD .h5 file or quoted glob (ECAL + target, or 51x51x25 ECAL + energy); none: TOY showers")
    a("--toy-n", type=int, help="number of toy showers when no --data (default 4000)")
    a("--out", help="run folder (default runs/2dgan); with --generate: the output .h5 (default generated.h5)")
    a("--epochs", type=int, help="training epochs (default 30; toy 10)")
    a("--batch-size", type=int, help="minibatch size per process under torchrun (default 128; toy 32)")
    a("--width", type=float, help="channel-count multiplier (default 1 = the original's; toy 0.125)")
    a("--lr-g", type=float, default=5e-4, help="initial Adam learning rate of the generator")
    a("--lr-d", type=float, default=1e-4, help="initial Adam learning rate of the discriminator")
    a("--lr-const-epochs", type=float, default=4.0, help="epochs at the initial learning rate")
    a("--lr-decay", type=float, default=0.24, help="then the learning rate is x exp(-this) per epoch")
    a("--file-events", type=int, default=9000, help="training events per 'file' (lr update, new Adam)")
    a("--latent", type=int, default=200, help="latent dimension")
    a("--xscale", type=float, default=50.0, help="images are multiplied by this inside the networks (sum ~ Ep)")
    a("--w-gan", type=float, default=6.0, help="loss weight of real/fake BCE")
    a("--w-ep", type=float, default=0.2, help="loss weight of the Ep regression MAPE")
    a("--w-ecal", type=float, default=0.1, help="loss weight of the Ecal MAPE")
    a("--label-real", type=float, default=0.9, help="BCE target of real showers and of the G step")
    a("--label-fake", type=float, default=0.0, help="BCE target of generated showers")
    a("--label-flip", type=float, default=0.05, help="probability that a label becomes 1 (if 0) or 0 (else)")
    a("--bn-mode", default="frozen", choices=["frozen", "batch"], help="frozen: no BatchNorm update, no dropout")
    a("--fake-ep", default="uniform", choices=["uniform", "real"], help="fakes' Ep: U(2,500) GeV or the real batch's")
    a("--early-epochs", type=int, default=2, help="first epochs with fake Ep ~ U(100,400) GeV")
    a("--relu-epoch", type=int, default=3, help="epoch (from 1) from which the output is ReLU, not linear")
    a("--val-frac", type=float, help="held-out fraction (metric, generated.h5; default 0.1; toy 0.25)")
    a("--val-max", type=int, default=20000, help="at most this many held-out events in the per-epoch metric")
    a("--val-window", type=float, help="half-width in GeV of the metric's Ep windows (default 5; toy 50)")
    a("--val-min", type=int, default=100, help="fewest events for an Ep window to count in the metric")
    a("--max-data-gb", type=float, help="load the data on the device below this (default: half the free memory)")
    a("--seed", type=int, default=0, help="random seed (data split, initialisation, batches)")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the networks (opt-in)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--ckpt-every", type=int, default=1, help="save OUT/ckpt.pt every this many epochs (and at the end)")
    a("--log-every", type=int, default=50, help="progress line every this many steps")
    a("--generate", type=int, metavar="N", help="sample N showers from --ckpt into --out")
    a("--ckpt", help="checkpoint to sample from (with --generate)")
    a("--energy", default="2:500", help="LO:HI GeV, Ep range of --generate (uniform)")
    a("--gen-batch", type=int, help="generation batch (default 1024; --benchmark: 4096 on CUDA, 8 on CPU)")
    a("--bench-batch", type=int, help="training batch of --benchmark (default --batch-size on CUDA, 4 on CPU)")
    a("--benchmark", action="store_true", help="print one JSON line of generation and training speed, write nothing")
    a("--bench-steps", type=int, default=3, help="timed iterations of --benchmark (after one warm-up)")
    args = p.parse_args(argv)
    for k, v in (TOY if toy_config and args.data is None else PAPER).items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    for name, v in vars(args).items():
        flag, low = "--" + name.replace("_", "-"), int(name != "seed")
        if type(v) is int and name not in UNBOUNDED and v < low:
            p.error(f"{flag} must be >= {low}")
        if isinstance(v, float) and not math.isfinite(v) or name in POSITIVE and v is not None and v <= 0:
            p.error(f"{flag} must be finite" + (" and > 0" if name in POSITIVE else ""))
    if not 0 < args.val_frac < 1:
        p.error("--val-frac must be in (0, 1)")
    try:
        args.energy_range = common.parse_range(args.energy, "--energy", "GeV", common.TOY_MAX_GEV)
    except common.InputError as e:
        p.error(e)
    return args

# ---------------------------------------------------------------- data
DataError = common.InputError      # bad input: one line '<file or flag>: <problem>', exit status 2

def _lcd_header(path):       # (n_events, Ep key) of one LCD file after checking keys and shapes, reading no cells
    try:
        with h5py.File(path, "r") as f:
            shape = f["ECAL"].shape if "ECAL" in f else None
            ekey = "target" if "target" in f and f["target"].ndim == 2 and f["target"].shape[1] >= 2 else \
                "energy" if "energy" in f else None
            n_e = f[ekey].shape[0] if ekey else None
    except (OSError, AttributeError, TypeError, IndexError) as e:       # a group where a dataset should be, too
        raise DataError(f"{path}: " + (f"cannot read as an LCD HDF5 file ({e.__class__.__name__})"
                                       if os.path.isfile(path) else "no such file"))
    for bad, msg in ((shape is None, "missing key 'ECAL'"),
                     (shape is not None and (len(shape) != 4 or shape[1:] not in ((25, 25, 25), (51, 51, 25))),
                      f"ECAL has shape {shape}, expected (N,25,25,25) or (N,51,51,25)"),
                     (ekey is None, "missing key 'target' (N,>=2) or 'energy' (N,)"),
                     (shape[0] == 0 if shape else False, "empty file (0 events)"),
                     (n_e != (shape or [None])[0], f"{shape and shape[0]} ECAL events but {n_e} in '{ekey}'")):
        if bad:
            raise DataError(f"{path}: {msg}")
    return shape[0], ekey

def _read_lcd(path, idx=None, cells=True):
    """One file (all events or sorted indices idx) -> (ECAL (n,25,25,25) or None, Ep (n,)) GeV, checked in float32."""
    ekey, sel = _lcd_header(path)[1], slice(None) if idx is None else np.asarray(idx)
    with h5py.File(path, "r") as f:
        e = common.check_real(path, ekey, f[ekey][sel])
        x = common.check_real(path, "ECAL", f["ECAL"][sel]) if cells else None
    ep = e[:, 1] if ekey == "target" else e.reshape(len(e), -1)[:, 0]
    x = np.ascontiguousarray(x[:, 13:38, 13:38, :] if x.shape[1] == 51 else x) if cells else None
    for bad, msg in (((ep <= 0).any(), "primary energy Ep must be > 0"),
                     (cells and (x < 0).any(), "ECAL has negative energies")):
        if bad:
            raise DataError(f"{path}: {msg}")
    _ = cells and np.putmask(x, x < THRESHOLD, 0.0)
    return x, ep

def load_lcd(pattern):      # one LCD file or a glob of them -> (ECAL (N,25,25,25) float32 GeV, Ep (N,) float32 GeV)
    files = [f for f in common.input_files(pattern) if _lcd_header(f)]      # every header before any cell
    return tuple(np.concatenate(a) for a in zip(*[_read_lcd(f) for f in files]))

def write_lcd(path, ecal, ep):
    """LCD format (ECAL (N,25,25,25) GeV, target (N,2) = [pdg 11, Ep]), written atomically; NaN/inf refused."""
    common.check_finite([ecal, ep], path)
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.create_dataset("ECAL", data=np.asarray(ecal, np.float32), chunks=(min(len(ecal), 256), 25, 25, 25))
            f["target"], f.attrs["generator"] = np.c_[np.full(len(ep), 11.0), ep].astype(np.float32), SCRIPT
    common.write_atomic(path, write)

def split_indices(n, val_frac, seed):        # seeded held-out split: (train_idx, val_idx), both sorted
    perm, n_val = np.random.default_rng(seed).permutation(n), max(1, int(round(val_frac * n)))
    if n - n_val < 1:
        raise DataError(f"{n} events are too few to hold out a validation set")
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])

class LCDStream:            # files too large for the device: read one file at a time; per-file seeded split
    def __init__(self, files, val_frac, seed):
        self.files = [f for f in files if _read_lcd(f)]      # every cell of every file checked before training
        self.splits = [split_indices(_lcd_header(f)[0], val_frac, seed + 7919 * i) for i, f in enumerate(files)]
    def train_part(self, i):
        return _read_lcd(self.files[i], self.splits[i][0])
    def val_ep(self):
        return np.concatenate([_read_lcd(f, v, cells=False)[1] for f, (_, v) in zip(self.files, self.splits)])
    def val_events(self, max_events):        # the first max_events held-out events, file after file
        starts = np.cumsum([0] + [len(v) for _, v in self.splits])
        return tuple(np.concatenate(a) for a in zip(*[_read_lcd(f, v[:max_events - s]) for f, (_, v), s in
                                                       zip(self.files, self.splits, starts) if s < max_events]))

def free_bytes(device):     # free device memory, or available RAM
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return float(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

# ---------------------------------------------------------------- model
def _pad_same(k):           # TF 'same' padding for stride 1: (k-1)//2 before, the rest after (asymmetric for even k)
    return nn.ZeroPad2d(((k - 1) // 2, k // 2) * 2)      # (left, right, top, bottom)

def _conv(c_in, c_out, k, same=True, he=True):
    conv = nn.Conv2d(c_in, c_out, k, bias=False)
    conv.he = he                   # Keras kernel_initializer='he_uniform' (else its default glorot_uniform)
    return [_pad_same(k), conv] if same and k > 1 else [conv]

def _block(c_in, c_out, k, same=True, he=True, up=None):
    """[up ->] conv k ('same' or 'valid') -> LeakyReLU(0.3) -> BatchNorm (Keras momentum 0.99, eps 1e-3) -> Dropout."""
    return nn.Sequential(*([] if up is None else [up]), *_conv(c_in, c_out, k, same, he), nn.LeakyReLU(0.3),
                         nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.01), nn.Dropout(0.2))

def keras_init(net):        # Keras' initialisers: he_uniform where the original names it, else glorot_uniform; biases 0
    for mod in net.modules():
        if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            _ = nn.init.kaiming_uniform_(mod.weight, nonlinearity="relu") if getattr(mod, "he", False) else \
                nn.init.xavier_uniform_(mod.weight)
            _ = mod.bias is not None and nn.init.zeros_(mod.bias)

_TO_BRANCH = ((0, 3, 1, 2), (0, 2, 1, 3), (0, 1, 2, 3))  # branches see (N, x, y, z) as (N, C, H, W), C = z, y, x
_FROM_BRANCH = ((0, 2, 3, 1), (0, 2, 1, 3), (0, 1, 2, 3))   # inverses of the above

class Generator(nn.Module):
    """(Ep/100) * N(0,1)^latent -> Dense(125) -> 5x5x5 -> 3 permuted 2D-conv branches -> (N,25,25,25)."""
    def __init__(self, latent=200, width=1.0, xscale=50.0):
        super().__init__()
        c32, c64 = (max(1, round(c * width)) for c in (32, 64))      # channels x --width
        self.latent, self.dense = latent, nn.Linear(latent, 125)
        self.branches = nn.ModuleList(nn.Sequential(                  # sizes 5x5 -> 5, 15, 30, 26, 26, 26, 25
            _block(5, c32, 5, he=False), _block(c64, c64, 5, up=nn.ConvTranspose2d(c32, c64, 5, stride=3, padding=1)),
            _block(c64, c64, 8, up=nn.ConvTranspose2d(c64, c64, 5, stride=2, padding=2, output_padding=1)),
            _block(c64, c64, 5, same=False), _block(c64, c32, 4), _block(c32, c32, 3),
            _block(c32, 25, 2, same=False)) for _ in range(3))
        self.merge = nn.Sequential(*_conv(75, 25, 3))                 # no bias (M:82)
        self.register_buffer("relu_out", torch.tensor(False))         # linear -> ReLU output switch
        self.register_buffer("xscale", torch.tensor(float(xscale)))
        keras_init(self)
    def forward(self, z):
        v = self.dense(z).view(-1, 5, 5, 5)
        outs = [br(v.permute(*p)).permute(*q).permute(0, 3, 1, 2)          # each -> (N, z, x, y)
                for br, p, q in zip(self.branches, _TO_BRANCH, _FROM_BRANCH)]
        x = self.merge(torch.cat(outs, 1)).permute(0, 2, 3, 1)             # (N, x, y, z)
        return torch.where(self.relu_out, torch.relu(x), x)

class Discriminator(nn.Module):
    """3 permuted 2D-conv branches -> 9x9x9 each -> Dense(10) -> (real/fake logit, Ep/100, Ecal = sum)."""
    def __init__(self, width=1.0):
        super().__init__()
        c32, c64 = (max(1, round(c * width)) for c in (32, 64))      # channels x --width
        convs = ((25, c64, 8), (c64, c32, 6), (c32, c32, 5), (c32, c32, 4), (c32, c32, 3), (c32, 9, 3))
        self.branches = nn.ModuleList(nn.Sequential(*[_block(i, o, k, same=j == 0, he=j > 0) for j, (i, o, k) in
            enumerate(convs)]) for _ in range(3))       # sizes 25 ('same', glorot) -> 20, 16, 13, 11, 9 ('valid')
        self.dense = nn.Sequential(nn.Linear(3 * 729, 10), nn.LeakyReLU(0.3),
                                   nn.BatchNorm1d(10, eps=1e-3, momentum=0.01))
        self.fake, self.ep = nn.Linear(10, 1), nn.Linear(10, 1)
        keras_init(self)
    def forward(self, x):
        h = self.dense(torch.cat([br(x.permute(*p)).flatten(1) for br, p in zip(self.branches, _TO_BRANCH)], 1))
        return self.fake(h).squeeze(1), self.ep(h).squeeze(1), x.float().sum((1, 2, 3))

# ---------------------------------------------------------------- train
def resolve_device(name):
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda: no CUDA device available")
    return torch.device(name, int(os.environ["LOCAL_RANK"]) if name == "cuda" and "LOCAL_RANK" in os.environ else None)

def _autocast(device, dtype):
    return torch.autocast(device.type, torch.bfloat16, enabled=dtype == "bf16" and device.type == "cuda")

def mape(target, pred):
    return 100.0 * ((target - pred).abs() / target.abs().clamp_min(1e-6)).mean()

def lr_factor(t, const_epochs=4.0, decay=0.24):
    """lr / initial at epoch t = e + k/S (file k of S); constant 81 files of 20 = 4.05 epochs (P:196-204)."""
    return math.exp(-decay * max(0.0, t - const_epochs - 0.05))

def flip_labels(value, n, prob, gen, device):
    """n labels `value`, each flipped with probability prob as bit_flip_tf (M:278-284) does: 0 -> 1, else -> 0."""
    return torch.where(torch.rand(n, device=device, generator=gen) < prob, float(value == 0), float(value)).to(device)

def epoch_seed(seed, rank, epoch):     # one rank's random stream in one epoch: resumed ranks continue their own
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1, np.uint64)[0] % 2 ** 63)

class Steps:
    """D on real, D on fake, one G step with its own Ep draw (M:312); `gen`: noise, flips, fakes' Ep. G_run, D_run:
    G and D under DDP (ddp) and torch.compile (--compile); the saved modules stay G and D, unwrapped."""
    def __init__(self, args, G, D, sf_poly, device, gen, ddp=False):
        ids = [device.index] if device.type == "cuda" else None
        wrapped = [torch.nn.parallel.DistributedDataParallel(n, device_ids=ids) if ddp else n for n in (G, D)]
        self.G_run, self.D_run = (torch.compile(n) if args.compile else n for n in wrapped)
        self.a, self.G, self.dev, self.gen = args, G, device, gen
        self.nets, self.amp, self.opt = (("G", G), ("D", D)), _autocast(device, args.dtype), {}
        self.sf = torch.tensor(np.asarray(sf_poly)[::-1].copy(), dtype=torch.float32, device=device)
    def new_adam(self, t):      # recreated at every file, as the original (P:303-304); eps: Keras' default
        for name, net in self.nets:
            lr = (self.a.lr_g if name == "G" else self.a.lr_d) * lr_factor(t, self.a.lr_const_epochs, self.a.lr_decay)
            self.opt[name] = torch.optim.Adam(net.parameters(), lr=lr, eps=1e-7)
    def fakes(self, e_real, epoch, net):    # (Ep, Ecal target from the fit, net's showers) of fakes; Ep as M:266-271
        e = e_real                          # (the original counts epochs from 1: U(1,4) in 1 and 2)
        if epoch < self.a.early_epochs or self.a.fake_ep != "real":
            lo, hi = (100.0, 400.0) if epoch < self.a.early_epochs else (2.0, 500.0)
            e = lo + (hi - lo) * torch.rand(e_real.shape, device=self.dev, generator=self.gen)
        z = torch.randn(len(e), self.a.latent, device=self.dev, generator=self.gen) * (e[:, None] / 100.0)
        with self.amp:
            return e, self.a.xscale * e * sum(c * e ** i for i, c in enumerate(self.sf)), net(z)
    def update(self, name, img, label, e_t, ecal_t):    # one Adam step of G or D on D's loss for img -> its value
        with self.amp:
            logit, ep_p, ecal_p = self.D_run(img)
            target = flip_labels(label, len(e_t), self.a.label_flip, self.gen, self.dev)
            loss = (self.a.w_gan * nn.functional.binary_cross_entropy_with_logits(logit.float(), target)
                    + self.a.w_ep * mape(e_t / 100.0, ep_p.float()) + self.a.w_ecal * mape(ecal_t, ecal_p.float()))
        self.opt[name].zero_grad(set_to_none=True)
        loss.backward()
        self.opt[name].step()
        return loss.detach()          # summed on the device: no host sync per step
    def __call__(self, real, e_real, epoch):    # one step: real images (x xscale), Ep GeV -> (loss_d on fakes, loss_g)
        with torch.no_grad():
            e_f, ecal_f, fake = self.fakes(e_real, epoch, self.G)
        self.update("D", real, self.a.label_real, e_real, real.sum((1, 2, 3)))
        loss_d = self.update("D", fake.float(), self.a.label_fake, e_f, ecal_f)
        e_g, ecal_g, img = self.fakes(e_real, epoch, self.G_run)
        return loss_d, self.update("G", img, self.a.label_real, e_g, ecal_g)

class TrainData:
    """Split, held-out showers, fakes' Ecal/Ep fit (4th order; training events, streamed: the first file's), and per
    epoch the (images, Ep, index batches) of each 'file' (a new Adam): equal parts of the in-memory set (drawn by
    weight, or permuted), or the real files when streamed, in an order seeded per epoch, the same on every rank."""
    def __init__(self, args, ecal, ep, device, weights=None, split=None):
        self.a, self.ecal, self.dev, self.w, self.stream = args, ecal, device, None, isinstance(ecal, LCDStream)
        if self.stream and (weights is not None or split is not None):
            raise ValueError("weights and split need the data in memory (not streamed)")
        if self.stream:
            self.val_x, self.val_ep = ecal.val_events(args.val_max)
            x0, e0 = ecal.train_part(0)                    # the fit uses the first file
            sf0, self.train_idx, self.val_idx = common.sampling_fraction(x0, e0), None, None
            self.n, self.n_files = sum(len(tr) for tr, _ in ecal.splits), len(ecal.files)
        else:
            n = len(ep)
            tr, va = split_indices(n, args.val_frac, args.seed) if split is None else \
                (np.asarray(a, np.int64).reshape(-1) for a in split)
            if not (len(tr) and len(va)) or min(tr.min(), va.min()) < 0 or max(tr.max(), va.max()) >= n:
                raise ValueError(f"split must be two non-empty index arrays into the {n} events")
            self.train_idx, self.val_idx, self.n = tr, va, len(tr)
            self.n_files = max(1, round(self.n / args.file_events))
            vsel = np.sort(va[np.random.default_rng(args.seed).permutation(len(va))[:args.val_max]])
            self.val_x, self.val_ep, e0 = ecal[vsel], ep[vsel], ep[tr]
            sf0 = np.concatenate([common.sampling_fraction(ecal[tr[s:s + 4096]], e0[s:s + 4096])
                                  for s in range(0, len(tr), 4096)])     # in chunks: no copy of the whole set
            w = None if weights is None else np.asarray(weights, np.float64)[tr if len(weights) == n else slice(None)]
            if w is not None and (len(w) != len(tr) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0):
                raise ValueError(f"weights must be {len(tr)} (or {n}) finite non-negative numbers, not all 0")
            self.x, self.ep = torch.from_numpy(ecal).to(device), torch.from_numpy(ep).to(device)   # once
            self.tr, self.w = torch.from_numpy(tr).to(device), None if w is None else torch.from_numpy(w).to(device)
        self.sf_poly = np.polyfit(e0.astype(np.float64), sf0, 4)
        self.steps = max(1, self.n // args.batch_size)
    def files(self, epoch, gen):
        bs, dev, parts = self.a.batch_size, self.dev, [None]      # in memory: one part, its batches split into n_files
        if self.stream:
            parts = torch.randperm(self.n_files, generator=torch.Generator().manual_seed(self.a.seed + epoch)).tolist()
        for i in parts:
            x, e = (torch.from_numpy(v).to(dev) for v in self.ecal.train_part(i)) if self.stream else (self.x, self.ep)
            n = len(e) if self.stream else self.n
            if self.w is not None:
                draw = torch.multinomial(self.w, self.steps * bs, replacement=True, generator=gen)
            else:               # a streamed file smaller than a batch adds no step; the in-memory set repeats
                draw = torch.randperm(n, device=dev, generator=gen)
                draw = draw[:n // bs * bs] if n >= bs or self.stream else draw.repeat(bs // n + 1)[:bs]
            batches = (draw if self.stream else self.tr[draw]).view(-1, bs)
            yield from ((x, e, part) for part in torch.tensor_split(batches, 1 if self.stream else self.n_files))

def train(args, ecal, ep, weights=None, out_dir=None, log=print, split=None):
    """ecal (N,25,25,25), ep (N,) GeV (or an LCDStream, None); split: (train_idx, val_idx); weights: draw
    probabilities (len(train_idx) or N). Returns the best epoch's modules (eval mode) and run info."""
    ddp = "RANK" in os.environ and torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    device = resolve_device(args.device)
    if args.dtype == "bf16" and device.type != "cuda" and rank == 0:
        log("--dtype bf16 is ignored on CPU (autocast only on CUDA): training in fp32")
    torch.manual_seed(args.seed)
    data = TrainData(args, ecal, ep, device, weights, split)
    G, D = Generator(args.latent, args.width, args.xscale).to(device), Discriminator(args.width).to(device)
    st = {"epoch": 0, "step": 0, "history": [], "best": {"epoch": -1, "metric": float("inf"), "G": None, "D": None}}
    ckpt_path = os.path.join(out_dir, "ckpt.pt") if out_dir else None
    if args.resume and ckpt_path and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, device, args, best=False)[1]
        G.load_state_dict(ck["model"]["G"]), D.load_state_dict(ck["model"]["D"])
        st = {k: ck[k] for k in st}
        _ = rank == 0 and log(f"resumed from {ckpt_path} at epoch {st['epoch']}, step {st['step']}")
    step, t0, done0 = Steps(args, G, D, data.sf_poly, device, torch.Generator(device), ddp), time.time(), st["step"]
    def progress(loss_d, loss_g, extra=""):
        rate = (st["step"] - done0) * args.batch_size * world / (time.time() - t0)
        eta = int(max(0, (args.epochs * data.steps - st["step"]) * args.batch_size * world / max(rate, 1e-9)))
        return (f"epoch {epoch + 1}/{args.epochs} | step {st['step']} | loss_d {loss_d:.4g} loss_g {loss_g:.4g} | "
                f"{extra}{rate:.0f} samples/s | ETA {eta // 3600}:{eta % 3600 // 60:02d}:{eta % 60:02d}")
    for epoch in range(st["epoch"], args.epochs):
        step.gen.manual_seed(epoch_seed(args.seed, rank, epoch))      # batches, noise, flips
        torch.manual_seed(epoch_seed(args.seed, rank, epoch) + 1)      # dropout
        G.relu_out.fill_(epoch + 1 >= args.relu_epoch)
        for net in (step.G_run, step.D_run):          # frozen: BatchNorm on its moving statistics, no dropout
            net.train(args.bn_mode == "batch")
        sums, n_b, first = torch.zeros(2, dtype=torch.float64, device=device), 0, []
        for k, (xc, ec, batches) in enumerate(data.files(epoch, step.gen)):
            step.new_adam(epoch + k / data.n_files)
            for bidx in batches:
                first = first or bidx[:4].tolist()
                losses = step(xc[bidx].float() * args.xscale, ec[bidx].float(), epoch)
                st["step"], n_b, sums = st["step"] + 1, n_b + 1, sums + torch.stack(losses).double()
                _ = rank == 0 and st["step"] % args.log_every == 0 and log(progress(*torch.stack(losses).tolist()))
        common.check_finite([G.state_dict(), D.state_dict(), sums], ckpt_path or "the model")  # every rank, alike
        metric, sd = common.lcd_shower_metric(data.val_x, generate(G, data.val_ep, device=device, seed=args.seed),
                                              data.val_ep, args.val_window, args.val_min, n_boot=100, seed=args.seed)
        firsts = [first] * world          # the events each rank drew first: ranks must differ (resume test)
        _ = ddp and torch.distributed.all_gather_object(firsts, first)
        rec = {"epoch": epoch + 1, "step": st["step"], **dict(zip(("loss_d", "loss_g"), (sums / max(n_b, 1)).tolist())),
               "val_metric": metric, "val_metric_sd": sd, "lr_g": step.opt["G"].param_groups[0]["lr"],
               "lr_d": step.opt["D"].param_groups[0]["lr"], "first_batch": firsts}
        st["history"], st["epoch"] = st["history"] + [rec], epoch + 1
        if metric < st["best"]["metric"]:
            st["best"] = {"epoch": epoch + 1, "metric": metric, **{
                name: {k: v.detach().cpu().clone() for k, v in net.state_dict().items()} for name, net in step.nets}}
        _ = rank == 0 and log(progress(rec["loss_d"], rec["loss_g"], f"val_metric {metric:.4f} +- {sd:.4f} (best "
                                       f"{st['best']['metric']:.4f} @ {st['best']['epoch']}) | "))
        if ckpt_path and ((epoch + 1) % args.ckpt_every == 0 or epoch + 1 == args.epochs):
            # no optimiser state: Adam is new at every file; the RNG state is the epoch (epoch_seed)
            ck = {"script": SCRIPT, "model": {"G": G.state_dict(), "D": D.state_dict()}, **st,
                  "args": dict(vars(args)), "rng": "epoch_seed(seed, rank, epoch)", "sf_poly": data.sf_poly.tolist(),
                  "geometry": "lcd", "xscale": args.xscale, "latent": args.latent, "width": args.width,
                  "val_idx": None if data.val_idx is None else data.val_idx.tolist()}
            common.check_finite(ck, ckpt_path)      # every rank: all stop alike on NaN/inf, the previous file kept
            _ = rank == 0 and common.write_atomic(ckpt_path, lambda t: torch.save(ck, t))
    for name, net in step.nets:          # the best epoch's weights, in eval mode
        _ = st["best"]["G"] is not None and net.load_state_dict(st["best"][name])
        net.eval()
    return {"generator": G, "discriminator": D, "best_epoch": st["best"]["epoch"], "history": st["history"], "metric":
            st["best"]["metric"], "train_idx": data.train_idx, "val_idx": data.val_idx, "sf_poly": data.sf_poly}

# ---------------------------------------------------------------- generate
@torch.no_grad()
def generate(G, ep, batch_size=1024, device="cpu", seed=None, dtype="fp32", host=True):
    """Showers (N,25,25,25) float32 GeV for Ep ep (N,) GeV, cells < 1e-6 GeV set to 0: numpy, or on device."""
    device, was_training = torch.device(device), G.training
    G.eval()
    g = torch.Generator(device).manual_seed(seed if seed is not None else torch.seed() % 2 ** 62)
    ep = np.asarray(ep, np.float32).reshape(-1)
    out = np.empty((len(ep), 25, 25, 25), np.float32) if host else torch.empty(len(ep), 25, 25, 25, device=device)
    for s in range(0, len(ep), batch_size):
        e = torch.from_numpy(ep[s:s + batch_size]).to(device)
        z = torch.randn(len(e), G.latent, device=device, generator=g) * (e[:, None] / 100.0)
        with _autocast(device, dtype):
            x = G(z).float() / float(G.xscale)
        out[s:s + len(e)] = torch.where(x < THRESHOLD, 0.0, x).to("cpu" if host else device)
    G.train(was_training)
    return out

def load_checkpoint(path, device="cpu", args=None, best=True):
    """(G in eval mode on device, with the best epoch's weights if best; the checkpoint dict) of a 2dgan.py ckpt.pt;
    with args (--resume): the model flags must be the checkpoint's. A truncated, text or another script's: DataError."""
    try:
        ck = torch.load(path, map_location=device, weights_only=False)
        G, D = Generator(ck["latent"], ck["width"], ck["xscale"]).to(device), Discriminator(ck["width"]).to(device)
        G.load_state_dict(ck["model"]["G"]), D.load_state_dict(ck["model"]["D"])      # both must load
        _ = best and ck["best"]["G"] is not None and G.load_state_dict(ck["best"]["G"])
        made_by, _ = ck.get("script", SCRIPT), [ck[k] for k in ("epoch", "step", "history", "best")]
    except Exception as e:      # unpickling errors come in many classes
        raise DataError(f"{path}: not a {SCRIPT} checkpoint ({e.__class__.__name__})")
    diff = [f"--{k}" for k in ("latent", "width", "xscale") if args is not None and getattr(args, k) != ck[k]]
    if made_by != SCRIPT or diff:
        raise DataError(f"{path}: a checkpoint of {made_by}" if made_by != SCRIPT else f"--resume {path}: model "
                        f"flags differ from the checkpoint's ({', '.join(diff)}); use them or choose another --out")
    return G.eval(), ck

# ---------------------------------------------------------------- main
def make_plots(real, fake, ep, folder, toy):
    """The paper's figures: sampling fraction vs Ep and the x, y, z profiles; gen/real below, in the claim's band."""
    import matplotlib.pyplot as plt
    plt.switch_backend("Agg")
    tag, sets, hr = "TOY " if toy else "", (("real", real, "o"), ("2DGAN", fake, "s")), {"height_ratios": [3, 1]}
    edges = np.arange(0.0, max(510.0, ep.max() + 10), 10.0)            # sampling fraction in 10 GeV bins
    c = 0.5 * (edges[1:] + edges[:-1])
    fig_sf, ax = plt.subplots(2, 1, figsize=(6, 6), sharex=True, gridspec_kw=hr)
    means = [common.binned_stat(ep, common.sampling_fraction(x, ep), edges)[:2] for _, x, _ in sets]
    for (label, _, mk), (m, sd) in zip(sets, means):
        ax[0].errorbar(c, m, sd, fmt=mk, ms=3, label=label)
    ax[0].set(ylabel="Ecal / Ep", title=f"{tag}sampling fraction vs Ep")
    ax[1].plot(c, means[1][0] / means[0][0], "k.", ms=3, label="10 GeV bins")
    ax[1].stairs(*common.sf_ratio_per_bin(fake, ep, real, ep), baseline=None, color="C3", lw=2, label="50 GeV bins")
    fig_pr, axp = plt.subplots(2, 3, figsize=(12, 6), sharex="col", gridspec_kw=hr)
    for k, (pr, pf) in enumerate(zip(common.axis_profiles(real), common.axis_profiles(fake))):     # x, y, z
        r, f = pr.mean(0), pf.mean(0)
        for (label, _, mk), v in zip(sets, (r, f)):
            axp[0, k].plot(np.log10(np.maximum(v, 1e-12)), mk + "-", ms=3, label=label)
        axp[0, k].set(title=f"{tag}profile along {'xyz'[k]}", ylabel="log10 mean deposit [GeV]")
        with np.errstate(divide="ignore", invalid="ignore"):
            axp[1, k].plot(f / r, "k.")
    ax[0].legend(), ax[1].legend(fontsize=7), axp[0, 0].legend()
    for a, band, ylim, xlabel in [(ax[1], 0.1, (0.5, 1.5), "Ep [GeV]")] + [       # ratio panels: the claim's band
            (axp[1, k], 0.2, (0, 2), f"{'xyz'[k]} cell" + (" (depth)" if k == 2 else "")) for k in range(3)]:
        a.axhspan(1 - band, 1 + band, color="grey", alpha=0.2)
        a.set(ylabel="gen / real", ylim=ylim, xlabel=xlabel)
    for fig, name in ((fig_sf, "sampling_fraction.png"), (fig_pr, "profiles.png")):
        common.write_atomic(os.path.join(folder, name), lambda t: fig.savefig(t, dpi=90))
        plt.close(fig)

def benchmark(args):        # one JSON line: generation showers/s, training samples/s (the real training step) here
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    if args.dtype == "bf16" and not cuda:
        print("--dtype bf16 is ignored on CPU: benchmarking fp32", file=sys.stderr)
        args.dtype = "fp32"
    torch.manual_seed(args.seed)
    G, D = Generator(args.latent, args.width, args.xscale).to(device), Discriminator(args.width).to(device)
    step = Steps(args, G, D, [0.02], device, torch.Generator(device).manual_seed(0))    # the training step, compiled
    step.new_adam(0.0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    def rate(fn, batch):                # items/s of fn over --bench-steps calls, after one warm-up call
        fn(), sync()
        t = time.perf_counter()
        [fn() for _ in range(args.bench_steps)], sync()
        return batch * args.bench_steps / (time.perf_counter() - t)
    gb, bs = args.gen_batch or (4096 if cuda else 8), args.bench_batch or (args.batch_size if cuda else 4)
    z = torch.randn(gb, args.latent, device=device)
    with torch.no_grad(), _autocast(device, args.dtype):
        gen_rate = rate(lambda: step.G_run(z), gb)
    real, e = torch.rand(bs, 25, 25, 25, device=device), torch.full((bs,), 100.0, device=device)
    print(json.dumps({"script": SCRIPT, "device": torch.cuda.get_device_name(device) if cuda else str(device),
                      "dtype": args.dtype, "compile": args.compile, "width": args.width, "bn_mode": args.bn_mode,
                      "gen_batch": gb, "gen_showers_per_s": round(gen_rate, 2), "train_batch": bs,
                      "train_samples_per_s": round(rate(lambda: step(real, e, args.epochs), bs), 2)}))

def run_generate(args):
    out, device = args.out or "generated.h5", resolve_device(args.device)
    if not args.ckpt or not os.path.isfile(args.ckpt):
        raise DataError(f"--ckpt {args.ckpt}: no such file" if args.ckpt else "--generate needs --ckpt PATH")
    common.check_out_path(out, "--out", folder=False)
    G, (lo, hi), t = load_checkpoint(args.ckpt, device)[0], args.energy_range, time.time()
    ep = np.random.default_rng(args.seed).uniform(lo, hi, args.generate).astype(np.float32)
    write_lcd(out, generate(G, ep, args.gen_batch or 1024, device, seed=args.seed, dtype=args.dtype), ep)
    print(f"wrote {args.generate} showers (Ep {lo:g}-{hi:g} GeV) to {out} in {time.time() - t:.1f} s")

def main(argv=None):
    args = get_args(argv, toy_config=True)
    try:
        return (benchmark if args.benchmark else run_generate if args.generate is not None else run_train)(args) or 0
    except (DataError, OSError) as e:
        return fail(e)

def run_train(args):
    """Every input checked on every rank before anything is written or a group joined (all fail alike), then train."""
    t_start, ddp, rank = time.time(), "RANK" in os.environ, int(os.environ.get("RANK", 0))
    out, device = args.out or os.path.join("runs", "2dgan"), resolve_device(args.device)
    fresh, model = not os.path.exists(out), {k: getattr(args, k) for k in ("latent", "width", "xscale")}
    for name in ("", *OUT_FILES):
        common.check_out_path(os.path.join(out, name) if name else out, "--out", folder=not name)
    common.check_run_folder(out, SCRIPT, model, args.resume)
    if args.resume and not os.path.exists(os.path.join(out, "ckpt.pt")):
        raise DataError(f"{os.path.join(out, 'ckpt.pt')}: --resume but no checkpoint there")
    _ = args.resume and load_checkpoint(os.path.join(out, "ckpt.pt"), "cpu", args, best=False)
    if toy := args.data is None:
        args.data = common.cached_toy("lcd", args.toy_n, args.seed, rank, wait=ddp, workers=1)
    files = common.input_files(args.data)
    size = sum(_lcd_header(f)[0] for f in files) * 25 ** 3 * 4    # checks every file's keys and shapes
    toy = toy or any(h5py.File(f, "r").attrs.get("toy", False) for f in files)
    in_memory = size <= (args.max_data_gb * 1e9 if args.max_data_gb else 0.5 * free_bytes(device))
    ecal, ep = load_lcd(args.data) if in_memory else (LCDStream(files, args.val_frac, args.seed), None)  # cells read
    _ = in_memory and split_indices(len(ep), args.val_frac, args.seed)          # too few events: refused here
    if ddp:         # the inputs are good: the process group, the run folder, its log (continued on --resume), training
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _ = device.type == "cuda" and torch.cuda.set_device(device)
    log_path = os.path.join(out, "log.txt")
    if rank == 0 and not (args.resume and os.path.isfile(os.path.join(out, "run.json"))):
        common.stamp_run_folder(out, SCRIPT, model)
    lines = open(log_path).read().splitlines() if rank == 0 and args.resume and os.path.exists(log_path) else []
    log = lambda msg: (print(msg, flush=True), lines.append(msg))  # noqa: E731
    _ = rank == 0 and log(f"{SCRIPT}: {'TOY ' if toy else ''}data {args.data}: {size / 1e9:.2f} GB, " + (
        f"in memory on {device}" if in_memory else "streamed file by file (larger than the budget)"))
    try:
        res = train(args, ecal, ep, out_dir=out, log=log)
    except DataError:                    # a NaN/inf model: a new folder that holds nothing else goes
        _ = rank == 0 and fresh and os.listdir(out) == ["run.json"] and shutil.rmtree(out)
        raise
    if rank == 0:
        real, ep_val, val_ids = (ecal[res["val_idx"]], ep[res["val_idx"]], res["val_idx"].tolist()) if in_memory else (
            ecal.val_events(args.val_max)[0], ecal.val_ep(),
            {f: s[1].tolist() for f, s in zip(ecal.files, ecal.splits)})
        fake = generate(res["generator"], ep_val, args.gen_batch or 1024, device, seed=args.seed + 1, dtype=args.dtype)
        claim = common.lcd_claim_metrics(real, fake[:len(real)], ep_val[:len(real)])
        common.check_finite(claim, os.path.join(out, "generated.h5"))     # before any output; write_lcd checks fake
        write_lcd(os.path.join(out, "generated.h5"), fake, ep_val)
        make_plots(real, fake[:len(real)], ep_val[:len(real)], os.path.join(out, "plots"), toy)
        metrics = {"script": SCRIPT, "data": args.data, "toy": toy, "best_epoch": res["best_epoch"], "best_val_metric":
                   res["metric"], "history": res["history"], **claim, "n_generated": int(len(ep_val)),
                   "val_indices": val_ids, "wall_s": round(time.time() - t_start, 1), "args": vars(args)}
        log(f"best epoch {res['best_epoch']} (val_metric {res['metric']:.4f}); wrote {out}/generated.h5, "
            f"metrics.json, plots/, ckpt.pt")
        log(f"{'TOY ' if toy else ''}sampling fraction gen/real per 50 GeV bin (10-500 GeV): max |ratio-1| "
            f"{claim['sf_max_abs_dev']:.3f} (claim <= 0.10: {claim['claim_sf_within_10pct']}); z profile layers 3-20: "
            f"max |ratio-1| {claim['profile_z_max_abs_dev_layers_3_20']:.3f} (claim <= 0.20: "
            f"{claim['claim_profile_z_within_20pct']}); {metrics['wall_s']:.0f} s")
        common.write_atomic(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1, default=str))
        common.write_atomic(log_path, "\n".join(lines) + "\n")
    _ = ddp and torch.distributed.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
