"""WGAN-GP for the ATLAS calorimeter cluster (P. Klein's ATLAS fast-simulation study) in PyTorch.

    python wgan_gp.py                                  # no --data: 40k TOY atlas89 showers, CPU, < 5 minutes
    python wgan_gp.py --data atlas.h5 --out runs/atlas # real 89/247-cell clusters, 1000 epochs (the original's)
    python wgan_gp.py --data dataset_1_photons_1.hdf5  # CaloChallenge dataset 1 photons (368 voxels)
    python wgan_gp.py --seeds 5                        # 5 seeds as one batched model, samples pooled
    python wgan_gp.py --epochs 1000 --out runs/wgan_gp_1000   # the original's epoch count on TOY data
    python wgan_gp.py --resume --epochs 200            # continue runs/wgan_gp/ckpt.pt up to epoch 200
    python wgan_gp.py --generate 10000 --ckpt runs/wgan_gp/ckpt.pt --energy 10:100 --out gen.h5  # or --energy-file
    python wgan_gp.py --benchmark --seeds 5            # JSON: showers/s, ms per training iteration, 5 vs 1 seed
    torchrun --nproc_per_node=4 wgan_gp.py --data atlas.h5

Dense generator: (noise, standardised log E) -> softmax cell fractions (energy conserved); dense critic scores (cells,
E). In: ATLAS `cells` (N,89|247) MeV, `energy` (N,), `cell_layer/eta/phi`; CaloChallenge ds1 `showers` (N,368),
`incident_energies` (N,1). Noise cuts (geometry.noise_cut: ATLAS PreSampler 120, Strip 60, Middle and Back 200 MeV;
ds1 none) zero the cells below them in training and generated showers. Faithful to github polklin/CERN_project: Keras
Dense init, LeakyReLU 0.3, Adam(5e-5, 0.5, 0.5) as Keras 2, batch 64, 5 critic steps over consecutive minibatches
(training.py 245-265), GP weight 10, 300 GeV cut (PreProcessing.py 18-24); critic loss and exact gradient by hand
(critic_grads, no double backward). Out (--out): ckpt.pt, generated.h5 (input format, one shower per held-out event
and seed), metrics.json, log.txt, run.json (another script's folder, or changed model flags on --resume, are refused),
plots/ (Klein's figures: per-layer energy, fraction, centres, widths; Middle core fraction and width vs energy (ATLAS);
mean shower, correlations, cell variance, nearest neighbours, training). Bad input: one line on stderr, exit status 2.

Deviations from the original (its lines in brackets): per-sample gradient penalty (training.py:112-116 takes one
norm over the whole batch); seeded random split --val-frac (training.py:168-175: the first 35000 events); log E
standardised on the training events (PreProcessing.py:58-60: on all events); the critic scores real high (training.py:
+1 real / -1 fake labels), a mirror image; --l1 acts on the logits (training.py:131: on the softmax output, a
constant); default epochs 1000 with --data (config.py:16: 1001), TOY_EPOCHS on TOY data; CaloChallenge ds1 (not in
the original): condition = incident energy, second head log(total/E_inc), no 300 GeV cut; negative ATLAS cells
accepted (signed noise, removed by the noise cut); --seeds K: one batched network, member k = the single-seed run of
seed+k, generated.h5 pools K per held-out event; validation binned as evaluate.py (common.auto_bins /
separation_power_clipped), not every 250 epochs; generated.h5 `energy`: the held-out event's true energy (ATLAS), with
--generate --energy the cluster total (attribute energy_is).
"""
import datetime, json, math, os, sys, time  # noqa: E401

import h5py
import numpy as np
import torch
import torch.distributed as dist

import common

SCRIPT = "wgan_gp.py"
TOY_EPOCHS = 175        # default epochs without --data (README main job: < 5 min on one core)
HP = ("latent", "width", "layers")      # the flags that set the networks' shapes
OUT_FILES = ("ckpt.pt", "generated.h5", "metrics.json", "log.txt", "run.json")

# ---------------------------------------------------------------- flags
def get_args(argv=None):
    p = common._Parser(prog=SCRIPT, description="Conditional WGAN-GP for ATLAS clusters (and CaloChallenge ds1).")
    a = p.add_argument
    a("--data", default=None, help="HDF5 file, ATLAS or CaloChallenge ds1 (none: toy atlas89 made once in ./data/)")
    a("--toy-n", type=int, default=40000, help="number of toy showers without --data (the study had ~40k)")
    a("--out", default=None, help="output folder (default runs/wgan_gp); with --generate: the output .h5 file")
    a("--epochs", type=int, default=None, help=f"critic passes over the data (1000 with --data, {TOY_EPOCHS} on toy)")
    a("--batch-size", type=int, default=64, help="minibatch size per process")
    a("--lr", type=float, default=5e-5, help="Adam learning rate of G and critic (Keras 2 update, epsilon 1e-7)")
    a("--betas", default="0.5,0.5", help="Adam betas b1,b2")
    a("--layers", type=int, default=3, help="dense hidden layers in generator and critic")
    a("--width", type=int, default=128, help="units per hidden layer")
    a("--latent", type=int, default=100, help="latent (noise) dimension")
    a("--n-critic", type=int, default=5, help="critic steps per generator step")
    a("--gp", type=float, default=10.0, help="gradient-penalty weight (per-sample penalty)")
    a("--l1", type=float, default=0.0, help="L1 penalty on the generator's logits (the original used 1e-5)")
    a("--val-frac", type=float, default=0.125, help="fraction of events held out for validation (35k of 40k)")
    a("--seed", type=int, default=0, help="random seed (also of the train/validation split)")
    a("--seeds", type=int, default=1, help="train K seeds (seed..seed+K-1) as one batched model, samples pooled")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = cuda if available")
    a("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast on CUDA (ignored on CPU)")
    a("--compile", action="store_true", help="torch.compile the critic and generator steps (worth it on CUDA)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt (model, optimiser, epoch, RNG states)")
    a("--ckpt-every", type=int, default=10, help="save the checkpoint every N epochs (and at the end)")
    a("--log-every", type=int, default=1, help="print a progress line every N epochs")
    a("--eval-every", type=int, default=0, help="print the validation figures every N epochs (0: at the end only)")
    a("--no-plots", action="store_true", help="skip plots/ (faster; metrics.json and generated.h5 still written)")
    a("--generate", type=int, default=None, metavar="N", help="write N showers from --ckpt to --out FILE")
    a("--ckpt", default=None, help="checkpoint to generate from")
    a("--energy", default=None, help="with --generate: LO:HI GeV, log-uniform (ATLAS cluster total; ds1 E_inc)")
    a("--energy-file", default=None, help="with --generate: take the conditions from this file (input format)")
    a("--benchmark", action="store_true", help="JSON: showers/s, time of a training iteration, 1 vs --seeds K")
    args = p.parse_args(argv)
    try:
        args.betas = tuple(float(b) for b in args.betas.split(","))
        assert len(args.betas) == 2 and all(0 <= b < 1 for b in args.betas)
    except (ValueError, AssertionError):
        p.error(f"--betas must be b1,b2 in [0,1), got {args.betas!r}")
    for rule, ok, keys in ((">= 1", lambda v: v >= 1, "epochs toy_n batch_size layers width latent n_critic seeds "
                            "ckpt_every log_every"), ("> 0, finite", lambda v: 0 < v < math.inf, "lr"),
                           (">= 0, finite", lambda v: 0 <= v < math.inf, "gp l1"), (">= 0", lambda v: v >= 0,
                           "eval_every"), ("in (0, 1)", lambda v: 0 < v < 1, "val_frac")):
        for k, v in ((k, getattr(args, k)) for k in keys.split()):
            if v is not None and not ok(v):
                p.error(f"--{k.replace('_', '-')} must be {rule}, got {v}")
    if args.generate is not None:
        if args.generate < 1 or not args.ckpt or not args.out or (args.energy is None) == (args.energy_file is None):
            p.error("--generate N needs N >= 1, --ckpt, --out FILE and one of --energy LO:HI / --energy-file")
        try:
            args.energy = None if args.energy is None else common.parse_range(args.energy, "--energy")
        except common.InputError as e:
            p.error(str(e))
    return args

# ---------------------------------------------------------------- data
DataError = common.InputError           # bad input: one line on stderr, exit status 2, nothing written
FORMATS = {"atlas": ("cells", "energy", (89, 247)), "calochallenge": ("showers", "incident_energies", (368,))}
E_MAX_MEV = 300_000.0    # PreProcessing.py lines 18-24: clusters above 300 GeV (total before noise cuts) removed

def need(ok, msg):      # refuse bad input before anything is written: main prints msg, one line, exit status 2
    if not ok:
        raise DataError(msg)

def read_showers(path):     # a checked file of either format -> dict(fmt, geom, cells (N,C) MeV, energy (N,) MeV, ...)
    need(os.path.isfile(path), f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            fmt = next((k for k, keys in FORMATS.items() if keys[0] in f or keys[1] in f), None)
            need(fmt, f"{path}: missing key 'cells' (ATLAS) or 'showers' (CaloChallenge)")
            (ck, ek, allowed), toy = FORMATS[fmt], bool(f.attrs.get("toy", False))
            for key in (ck, ek):
                need(key in f and isinstance(f[key], h5py.Dataset), f"{path}: missing key '{key}'")
            cells, energy = f[ck][()], f[ek][()]
            per_cell = {k: f[k][()] for k in ("cell_layer", "cell_eta", "cell_phi") if k in f}
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({str(e).splitlines()[0]})")
    cells = common.check_real(path, ck, cells)           # float32, the training dtype: 1e39 is inf there
    common.check_real(path, ek, energy)
    need(cells.ndim == 2 and len(cells), f"{path}: '{ck}' must be (N, n_cells) with N > 0, got shape {cells.shape}")
    n, c = cells.shape
    need(c in allowed, f"{path}: '{ck}' has {c} cells, expected {' or '.join(map(str, allowed))}")
    need(energy.shape in ((n,), (n, 1)), f"{path}: '{ek}' has shape {energy.shape}, expected ({n},) as '{ck}'")
    need(np.abs(cells.sum(1, dtype=np.float64)).max() <= np.finfo(np.float32).max,
         f"{path}: a shower's total of '{ck}' overflows float32")
    need(np.all(energy > 0), f"{path}: '{ek}' has non-positive energies")
    need(fmt == "atlas" or np.all(cells >= 0), f"{path}: '{ck}' has negative energies")
    geom = common.geometry({89: "atlas89", 247: "atlas247", 368: "calochallenge1"}[c])
    for key, arr in per_cell.items():
        need(arr.shape == (c,), f"{path}: '{key}' has shape {arr.shape}, expected ({c},)")
    need(np.array_equal(per_cell.get("cell_layer", geom.layer), geom.layer),
         f"{path}: 'cell_layer' differs from the {geom.name} cell order of common.py")
    return dict(fmt=fmt, geom=geom, cells=cells, energy=energy.reshape(n).astype(np.float64), toy=toy, path=path)

def noise_cut(cells, geom):     # cells below the geometry's noise cut -> 0 (training data and generated showers alike)
    return np.where(cells >= geom.noise_cut, cells, 0.0).astype(np.float32)

def prepare(d, seed, val_frac, toy=False):     # 300 GeV cut (ATLAS), noise cuts, fractions, conditions, seeded split
    atlas = d["fmt"] == "atlas"
    over = (d["cells"].sum(1, dtype=np.float64) > E_MAX_MEV) & atlas
    cells = noise_cut(d["cells"], d["geom"])
    total = cells.sum(1, dtype=np.float64)
    keep = np.flatnonzero((total > 0) & ~over)
    need(len(keep) >= 2, f"{d['path']}: fewer than 2 showers with energy left after the 300 GeV and noise cuts")
    perm, n_val = np.random.default_rng(seed).permutation(keep), max(1, int(round(val_frac * len(keep))))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    need(len(train), f"{d['path']}: no training events left after the validation split")
    cond_e = total if atlas else d["energy"]            # ATLAS: cluster total; ds1: incident energy
    log_e, safe = np.log(cond_e), np.where(total > 0, total, 1.0)
    norm = {"mu_e": float(log_e[train].mean()), "sd_e": float(log_e[train].std() + 1e-6)}
    x = [cells / safe[:, None].astype(np.float32)]
    if not atlas:                                       # second head: log(total / incident)
        log_r = np.log(safe / d["energy"])
        norm.update(mu_r=float(log_r[train].mean()), sd_r=float(log_r[train].std() + 1e-6))
        x.append(((log_r - norm["mu_r"]) / norm["sd_r"])[:, None].astype(np.float32))
    c = ((log_e - norm["mu_e"]) / norm["sd_e"])[:, None].astype(np.float32)
    return dict(x=np.concatenate(x, 1), c=c, cells=cells, cond_e=cond_e, train=train, val=val, norm=norm,
                n_over=int(over.sum()), n_dropped=int(((total <= 0) & ~over).sum()), toy=d["toy"] or toy,
                ratio_head=not atlas, geom=d["geom"], fmt=d["fmt"], energy=d["energy"])

def write_h5(path, fmt, geom, cells, energy, **attrs):      # generated showers in the input's format, atomically
    arrays = (dict(cells=cells, energy=energy, cell_layer=geom.layer, cell_eta=geom.x, cell_phi=geom.y)
              if fmt == "atlas" else dict(showers=cells, incident_energies=energy[:, None]))
    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for k, v in arrays.items():
                f[k] = v.astype(np.int32 if k == "cell_layer" else np.float32)
            f.attrs.update(generated=True, model="wgan_gp", **attrs)
    common.write_atomic(path, write)

# ---------------------------------------------------------------- model
SLOPE = 0.3     # keras.layers.LeakyReLU() default alpha, as training.py uses it (lines 126-148)
lrelu_bwd = torch.ops.aten.leaky_relu_backward

class Dense(torch.nn.Module):
    """K independent dense networks (one per seed), layer l of member k: h[k] @ W_l[k] + b_l[k], LeakyReLU
    between; all weights in ONE flat parameter (K, P): one tensor per network for the optimiser and DDP."""
    def __init__(self, sizes, k=1):
        super().__init__()
        self.sizes, self.k, self.io = list(sizes), k, list(zip(sizes[:-1], sizes[1:]))
        self.flat = torch.nn.Parameter(torch.zeros(k, sum(i * o + o for i, o in self.io)))
    def layers(self, t=None):   # [(W (K,in,out), b (K,1,out))] as views of the flat parameter (or a tensor like it)
        parts = (self.flat if t is None else t).split([n for i, o in self.io for n in (i * o, o)], 1)
        return [(parts[2 * j].view(-1, i, o), parts[2 * j + 1].view(-1, 1, o)) for j, (i, o) in enumerate(self.io)]
    @torch.no_grad()
    def glorot_(self, gens):    # Keras Dense defaults: glorot-uniform kernels, zero biases; member k draws from gens[k]
        self.flat.zero_()
        for k, g in enumerate(gens):
            for W, _ in self.layers():
                lim = math.sqrt(6.0 / sum(W.shape[1:]))
                W[k].copy_(torch.rand(W.shape[1:], generator=g, device=g.device) * (2 * lim) - lim)

def build(hp, n_x, k=1):        # (generator, critic) of k members
    w, L = hp["width"], hp["layers"]
    return Dense([hp["latent"] + 1] + [w] * L + [n_x], k), Dense([n_x + 1] + [w] * L + [1], k)

def forward(layers, h, slope):
    """(K,B,in) -> (K,B,out), each layer's input and each hidden pre-activation (for the backward by hand)."""
    hs, pre = [h], []
    for W, b in layers[:-1]:
        pre.append(torch.baddbmm(b, hs[-1], W))
        hs.append(torch.nn.functional.leaky_relu(pre[-1], slope))
    return torch.baddbmm(layers[-1][1], hs[-1], layers[-1][0]), hs, pre

def deltas(layers, pre, dy):    # backward through the hidden layers: d loss / d each hidden pre-activation, first first
    ds = []
    for (W, _), a in zip(reversed(layers[1:]), reversed(pre)):
        ds.insert(0, dy := lrelu_bwd(torch.bmm(dy, W.transpose(1, 2)), a, SLOPE, False))
    return ds

def flat_grad(lefts, ds, n_bias_rows):  # weights: left^T @ d, biases: d[:, :n_bias_rows].sum; packed like Dense.flat
    return torch.cat([t for left, d in zip(lefts, ds) for t in (torch.bmm(left.transpose(1, 2), d).flatten(1),
                                                                d[:, :n_bias_rows].sum(1))], 1)

def generator_out(gl, gin, n_cells):    # (noise | condition) -> (softmax cell fractions [+ ratio head], logits, cache)
    out, hs, pre = forward(gl, gin, SLOPE)
    logits = out[..., :n_cells]
    p = torch.softmax(logits, -1)                       # fp32 under autocast
    x = p if out.shape[-1] == n_cells else torch.cat([p, out[..., n_cells:].to(p.dtype)], -1)
    return x, logits, (hs, pre, p)

def critic_grads(cl, h, B, nx, gp_weight):
    """Critic loss -W + gp_weight * mean_i (|grad_x D(x_i)|_2 - 1)^2 and its exact gradient, no double backward.
    h (K, 3B, n_in): real, fake, interpolate rows (+ condition), overwritten. One forward and one backward give the
    interpolates' input gradient g; the penalty's gradient through g is (LeakyReLU'' = 0) a forward pass of dGP/dg
    through the network linearised at the interpolates. -> (flat gradient (K,P), loss (K,), W estimate (K,))."""
    y, hs, pre = forward(cl, h, SLOPE)
    # dL/dD: real -1/B, fake +1/B; interpolates 1, the seed of their input gradient
    dy = y.new_tensor([-1.0 / B, 1.0 / B, 1.0]).repeat_interleave(B)[None, :, None].expand(h.shape[0], -1, -1)
    ds = deltas(cl, pre, dy)
    W0 = cl[0][0][:, :nx]
    g = torch.bmm(ds[0][:, 2 * B:], W0.transpose(1, 2))        # grad_x D at the interpolates
    norm = g.norm(dim=2, keepdim=True)
    gp = ((norm - 1) ** 2).mean((1, 2))
    G = g * ((2.0 * gp_weight / B) * (norm - 1) / norm.clamp_min(1e-12))   # dL/dg
    e = torch.bmm(G, W0)
    for l in range(1, len(cl)):             # interpolate rows of each layer's input -> penalty terms
        hs[l][:, 2 * B:] = lrelu_bwd(e, pre[l - 1][:, 2 * B:], SLOPE, False)
        if l + 1 < len(cl):
            e = torch.bmm(hs[l][:, 2 * B:], cl[l][0])
    hs[0][:, 2 * B:] = torch.nn.functional.pad(G, (0, h.shape[2] - nx))    # the condition is not penalised
    wd = (y[:, :B] - y[:, B:2 * B]).mean((1, 2))
    return flat_grad(hs, ds + [dy], 2 * B), -wd + gp_weight * gp, wd

def generator_grads(gl, cl, gin, n_cells, l1):     # loss -mean D(G(z, c)) (+ l1 * |logits|), its gradient by hand
    B = gin.shape[1]
    x, logits, (hs, pre_g, p) = generator_out(gl, gin, n_cells)
    y, _, pre_c = forward(cl, torch.cat([x, gin[..., -1:]], -1), SLOPE)
    dx = torch.bmm(deltas(cl, pre_c, torch.full_like(y, -1.0 / B))[0], cl[0][0][:, :x.shape[-1]].transpose(1, 2))
    dxp = dx[..., :n_cells]
    dout = p * (dxp - (p * dxp).sum(-1, keepdim=True))          # through the softmax
    loss = -y.mean((1, 2))
    if l1:
        dout = dout + (l1 / B) * torch.sign(logits)
        loss = loss + l1 * logits.abs().sum(-1).mean(-1)
    if x.shape[-1] > n_cells:
        dout = torch.cat([dout, dx[..., n_cells:]], -1)         # ratio head (CaloChallenge)
    return flat_grad(hs, deltas(gl, pre_g, dout) + [dout], B), loss

# ---------------------------------------------------------------- train
def adam(p, lr, betas, state=None, eps=1e-7):
    """Adam as Keras 2 computes it (training.py lines 191, 222: Adam(5e-5, 0.5, 0.5), epsilon 1e-7): p -= lr_t m /
    (sqrt(v) + eps), lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); elementwise (K members as K runs). -> step(gradient);
    step.state {t, m, v} is what the checkpoint stores (and gives back on --resume)."""
    (b1, b2), s = betas, state or {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)}
    @torch.no_grad()
    def step(g):
        s["t"] += 1
        s["m"].lerp_(g, 1 - b1)
        s["v"].mul_(b2).addcmul_(g, g, value=1 - b2)
        p.addcdiv_(s["m"], s["v"].sqrt().add_(eps), value=-lr * math.sqrt(1 - b2 ** s["t"]) / (1 - b1 ** s["t"]))
    step.state = s
    return step

def member_generators(seeds, device, offset=0):
    return [torch.Generator(device).manual_seed(s + offset) for s in seeds]

def init_nets(hp, n_x, seeds, device, lr, betas, ck=None):
    """Generator and critic of K = len(seeds) members, member k Keras-initialised from torch.Generator seeds[k]
    (returned: it goes on to draw member k's minibatches), their Adams; or all three as checkpoint ck left them."""
    nets = dict(zip(("generator", "critic"), (m.to(device) for m in build(hp, n_x, len(seeds)))))
    gens, ck = member_generators(seeds, device), ck or {}
    for name, m in nets.items():
        m.glorot_(gens)
        if ck:
            m.load_state_dict(ck["model"][name])
    for g, st in zip(gens, ck.get("rng", [])):
        g.set_state(st.cpu())
    return nets, {n: adam(m.flat, lr, betas, ck.get("optim", {}).get(n)) for n, m in nets.items()}, gens

def iteration(gl, cl, opts, buf, real, cond, eps, gin_c, gin_g, n_cells, gp, l1, reduce=torch.Tensor.float):
    """n_critic critic steps, then one generator step -> (3, K) sums of critic loss, W, generator loss. real (K,
    n_critic, B, n_x), cond, eps (K, n_critic, B, 1), gin_c (K, n_critic*B, latent+1), gin_g (K, B, latent+1); buf
    (K, n_critic, 3B, n_x+1) scratch. The critic steps' fakes come from one generator pass."""
    K, nc, B, nx = real.shape
    fake = generator_out(gl, gin_c, n_cells)[0].view(K, nc, B, nx)
    for i, rows in enumerate((real, fake, torch.lerp(fake, real, eps))):     # critic rows: real, fake, interpolates
        buf[:, :, i * B:(i + 1) * B, :nx] = rows
    buf[..., nx:].unflatten(2, (3, B)).copy_(cond[:, :, None])
    sums = torch.zeros(3, K, device=buf.device)
    for j in range(nc):
        grad, loss, wd = critic_grads(cl, buf[:, j], B, nx, gp)
        opts["critic"](reduce(grad))
        sums[:2] += torch.stack([loss, wd])
    grad, loss = generator_grads(gl, cl, gin_g, n_cells, l1)
    opts["generator"](reduce(grad))
    sums[2] += loss
    return sums

def run_epoch(nets, opts, gens, xct, n_cells, args, amp, n_iter, bs, step_fn=iteration, reduce=torch.Tensor.float):
    """One epoch of train() (and of --benchmark) -> (3, K) sums of critic loss, W, generator loss. First its
    randomness, member by member from its own generator (K batched seeds draw what K single-seed runs draw): critic
    minibatches (consecutive slices of a permutation, training.py lines 251-257), generator-step conditions (line
    262), interpolation weights, noise; xct: data, conditions, training indices. Then n_iter iterations."""
    (x, c, tr), (n, nc, device) = xct, (len(xct[2]), args.n_critic, xct[0].device)
    def perms(m, g):            # m indices from back-to-back random permutations of range(n)
        return torch.cat([torch.randperm(n, generator=g, device=device) for _ in range(-(-m // n))])[:m]
    draws = [(perms(n_iter * nc * bs, g).view(n_iter, nc, bs), perms(n_iter * bs, g).view(n_iter, bs),
              torch.rand(n_iter, nc, bs, 1, generator=g, device=device),
              torch.randn(n_iter, nc * bs, args.latent, generator=g, device=device),
              torch.randn(n_iter, bs, args.latent, generator=g, device=device)) for g in gens]
    idx_c, idx_g, eps, z_c, z_g = (torch.stack(t) for t in zip(*draws))
    real, cond = x[tr[idx_c]], c[tr[idx_c]]
    batches = real, cond, eps, torch.cat([z_c, cond.flatten(2, 3)], -1), torch.cat([z_g, c[tr[idx_g]]], -1)
    buf, sums = torch.zeros(len(gens), nc, 3 * bs, x.shape[1] + 1, device=device), 0   # overwritten whole
    gl, cl = nets["generator"].layers(), nets["critic"].layers()        # views: the updates are in place
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=amp):
        for it in range(n_iter):
            sums = sums + step_fn(gl, cl, opts, buf, *(b[:, it] for b in batches), n_cells, args.gp, args.l1, reduce)
    return sums

def train(args, seeds, data, device, ckpt_path, log, amp, world=(0, 1), ck=None):  # -> (generator, {seed: history})
    (rank, size), K, hp = world, len(seeds), {k: getattr(args, k) for k in HP}
    xct = tuple(torch.as_tensor(data[k], device=device) for k in ("x", "c", "train"))   # whole dataset on device
    ck = load_ckpt(ckpt_path, device) if ck is None and args.resume else ck or {}    # train_main passes its own
    nets, opts, gens = init_nets(hp, xct[0].shape[1], seeds, device, args.lr, args.betas, ck)
    start, step = (ck["epoch"], ck["step"]) if ck else (0, 0)
    history = {int(s): h for s, h in ck["history"].items()} if ck else {s: [] for s in seeds}
    if ck:
        log(f"resumed from {ckpt_path} at epoch {start}, step {step}")
    gens = member_generators(seeds, device, 1000 * rank + start) if rank else gens    # each rank its own minibatches
    n_cells, bs = xct[0].shape[1] - int(data["ratio_head"]), min(args.batch_size, len(xct[2]))
    n_iter = max(1, len(xct[2]) // (bs * args.n_critic * size))   # training.py line 251
    step_fn = torch.compile(iteration) if args.compile else iteration
    def reduce(grad):                   # DDP: the ranks' mean gradient
        dist.all_reduce(grad := grad.float())
        return grad / size
    t0, seen = time.time(), 0
    for epoch in range(start, args.epochs):
        sums = run_epoch(nets, opts, gens, xct, n_cells, args, amp, n_iter, bs, step_fn,
                         reduce if size > 1 else torch.Tensor.float)
        step, seen, done = step + n_iter, seen + n_iter * args.n_critic * bs, epoch + 1
        s = (sums / torch.tensor([n_iter * args.n_critic] * 2 + [n_iter], device=device)[:, None]).tolist()
        for k, sd in enumerate(seeds):
            history[sd].append({"epoch": done, "loss_d": s[0][k], "wdist": s[1][k], "loss_g": s[2][k]})
        if rank:
            continue
        if done % args.log_every == 0 or done == args.epochs:
            el = time.time() - t0
            eta = datetime.timedelta(seconds=int(el / (done - start) * (args.epochs - done)))
            log(f"epoch {done}/{args.epochs} | step {step} | loss_d {np.mean(s[0]):.4f} loss_g {np.mean(s[2]):.4f} "
                f"W {np.mean(s[1]):.4f} | {seen * size / max(el, 1e-9):.0f} samples/s | ETA {eta}"
                + (f" | mean of {K} seeds" if K > 1 else ""))
        if args.eval_every and done % args.eval_every == 0 and done < args.epochs:
            log(f"epoch {done}: " + validate(nets["generator"], data, seeds, device)[3])
        if done % args.ckpt_every == 0 or done == args.epochs:
            ck = {"script": SCRIPT, "model": {n: m.state_dict() for n, m in nets.items()},
                  "optim": {n: o.state for n, o in opts.items()}, "epoch": done, "step": step, "args": vars(args),
                  "rng": [g.get_state() for g in gens], "history": history, "seeds": seeds, "norm": data["norm"],
                  "geometry": data["geom"].name, "format": data["fmt"], "toy": data["toy"], "hp": hp}
            common.check_finite(ck, ckpt_path)      # a diverged model is refused; the last checkpoint stays
            common.write_atomic(ckpt_path, lambda t: torch.save(ck, t))
    return nets["generator"], history

# ---------------------------------------------------------------- generate
@torch.no_grad()
def sample(gen, cond_e, norm, gens, batch=10000):   # showers (K, n, C) MeV for conditions cond_e (K, n) MeV
    device, out, ratio = gen.flat.device, [], "mu_r" in norm
    n_cells = gen.sizes[-1] - int(ratio)
    for s in range(0, cond_e.shape[1], batch):          # member k draws from gens[k]
        e = torch.as_tensor(cond_e[:, s:s + batch], dtype=torch.float64, device=device)
        c = ((torch.log(e) - norm["mu_e"]) / norm["sd_e"]).float()[..., None]
        z = torch.stack([torch.randn(e.shape[1], gen.sizes[0] - 1, generator=g, device=device) for g in gens])
        x = generator_out(gen.layers(), torch.cat([z, c], -1), n_cells)[0].double()
        total = e * torch.exp(norm["mu_r"] + norm["sd_r"] * x[..., -1]) if ratio else e   # ds1: E_inc x total/E_inc
        out.append((x[..., :n_cells] * total[..., None]).float().cpu().numpy())
    out = np.concatenate(out, 1)
    common.check_finite(out, "generated showers")          # before the noise cut would hide a NaN as 0
    return out

def validate(gen, data, seeds, device):
    """Generated showers for the held-out events (one per seed and event, noise cuts applied), their correlation
    MSE and separation powers against the held-out real showers (binned as evaluate.py), both samples'
    common.layer_observables, and the one-line summary."""
    val, geom = data["val"], data["geom"]
    cells = sample(gen, np.tile(data["cond_e"][val], (len(seeds), 1)), data["norm"],
                   member_generators(seeds, device, 10_000))
    fake, real = noise_cut(cells.reshape(len(seeds) * len(val), -1), geom), data["cells"][val]
    fr, ff = common.layer_observables(real, geom), common.layer_observables(fake, geom)
    bins = common.auto_bins(len(real), len(fake))
    sp = lambda a, b: common.separation_power_clipped(a, b, bins)  # noqa: E731
    m = {"toy": data["toy"], "correlation_mse": common.correlation_mse(real, fake), "bins": bins,
         "separation_power": {"total_energy": sp(real.sum(1), fake.sum(1))}}
    for k in fr:
        m["separation_power"][k] = ({n: sp(fr[k][:, i], ff[k][:, i]) for i, n in enumerate(geom.layer_names)}
                                    if fr[k].shape[1] == geom.n_layers else sp(fr[k], ff[k]))
    m["mean_fraction_per_layer"] = {w: dict(zip(geom.layer_names, f["fraction_per_layer"].mean(0).tolist()))
                                    for w, f in (("real", fr), ("generated", ff))}
    line = (f"{'TOY ' if m['toy'] else ''}correlation MSE {m['correlation_mse']:.4f} | fraction-per-layer separation "
            "power " + " ".join(f"{k} {v:.3f}" for k, v in m["separation_power"]["fraction_per_layer"].items()))
    return m, fake, (fr, ff), line

def load_ckpt(path, device="cpu"):  # missing, truncated, text or another script's checkpoint: one line, exit status 2
    need(os.path.isfile(path), f"{path}: no such checkpoint")
    try:                                # weights_only: plain containers and tensors, no code from the file
        ck = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:              # truncated zip: RuntimeError; text: UnpicklingError; ...
        raise DataError(f"{path}: not a readable checkpoint ({type(e).__name__})")
    keys = {"model", "optim", "epoch", "step", "rng", "history", "seeds", "norm", "geometry", "format", "toy", "hp"}
    who = ck.get("script") if isinstance(ck, dict) else None
    need(isinstance(ck, dict) and ck.get("script", SCRIPT) == SCRIPT and keys <= set(ck),
         f"{path}: not a {SCRIPT} checkpoint" + (f" (made by {who})" if who else ""))
    return ck

def generate_main(args, device):
    common.check_out_path(args.out, "--out", folder=False)
    ck = load_ckpt(args.ckpt, device)
    try:
        fmt, geom, atlas = ck["format"], common.geometry(ck["geometry"]), ck["format"] == "atlas"
        gen = build(ck["hp"], geom.n_cells + int(not atlas), len(ck["seeds"]))[0].to(device)
        gen.load_state_dict(ck["model"]["generator"])
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise DataError(f"{args.ckpt}: not a wgan_gp.py checkpoint ({type(e).__name__})")
    common.check_finite(ck["model"]["generator"], args.ckpt)
    if args.energy_file:
        d = read_showers(args.energy_file)
        need(d["fmt"] == fmt and d["geom"].name == geom.name,
             f"{args.energy_file}: {d['geom'].name} showers, the checkpoint is {geom.name}")
        total = noise_cut(d["cells"], geom).sum(1, dtype=np.float64)
        ok = np.flatnonzero(total > 0) if atlas else np.arange(len(total))
        need(len(ok), f"{args.energy_file}: no shower with energy after the noise cuts")
        pick = np.resize(ok, args.generate)                          # in order, cycled if N > events
        cond_e, true_e = (total if atlas else d["energy"])[pick], d["energy"][pick]
    else:
        (lo, hi), rng = args.energy, np.random.default_rng(args.seed)
        cond_e = true_e = 1000.0 * np.exp(rng.uniform(np.log(lo), np.log(hi), args.generate))
    K = gen.k                                                        # event i from seed member i % K
    cells = sample(gen, np.resize(cond_e, -(-args.generate // K) * K).reshape(-1, K).T, ck["norm"],
                   member_generators(range(K), device, args.seed))
    cells = noise_cut(cells.transpose(1, 0, 2).reshape(-1, cells.shape[2])[:args.generate], geom)
    write_h5(args.out, fmt, geom, cells, true_e, ckpt=args.ckpt, toy=bool(ck["toy"]), energy_is="incident energy"
             if not atlas else "true energy (from --energy-file)" if args.energy_file else "conditioning cluster total")
    print(f"wrote {len(cells)} generated {geom.name} showers to {args.out}")
    return 0

def benchmark(args, device, amp):
    """One JSON line: generation showers/s, and the time of a training iteration (n_critic critic + one generator
    step) on random atlas89-sized data for 1 and --seeds K batched members: blocks of 20 iterations run as train()
    runs them (run_epoch), alternated, medians of 8 (generation: of 3)."""
    C, B, n = 89, args.batch_size, 4096
    xct = (torch.softmax(torch.randn(n, C, device=device), 1), torch.randn(n, 1, device=device),
           torch.arange(n, device=device))
    nets = {K: init_nets({k: getattr(args, k) for k in HP}, C, range(K), device, args.lr, args.betas)
            for K in sorted({1, args.seeds})}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    def timed(fn, *a):                  # seconds of one call
        sync()
        t = time.perf_counter()
        fn(*a)
        sync()
        return time.perf_counter() - t
    for K in nets:                      # warm-up
        run_epoch(*nets[K], xct, C, args, amp, 20, B)
    med = dict(zip(nets, np.median([[timed(run_epoch, *nets[K], xct, C, args, amp, 20, B) / 20 for K in nets]
                                    for _ in range(8)], 0).tolist()))
    t_gen = np.median([timed(sample, nets[1][0]["generator"], np.full((1, 10000), 5e4),
                             {"mu_e": math.log(5e4), "sd_e": 1.0}, nets[1][2]) for _ in range(3)])
    out = {"script": SCRIPT, "device": str(device), "dtype": args.dtype if amp else "fp32",
           "threads": torch.get_num_threads(), "gen_batch": 10000, "gen_showers_per_s": round(1e4 / t_gen),
           "train_batch": B, "n_critic": args.n_critic, "train_iter_ms": round(1e3 * med[1], 3),
           "train_samples_per_s": round(args.n_critic * B / med[1])}
    if args.seeds > 1:
        out.update(seeds=args.seeds, train_iter_ms_seeds=round(1e3 * med[args.seeds], 3),
                   seeds_cost_ratio=round(med[args.seeds] / med[1], 3))
    print(json.dumps(out))
    return 0

# ---------------------------------------------------------------- plots
def plots(folder, real, fake, geom, toy, metrics, histories, fr, ff):
    """Klein's figures, real (grey) against generated (red), one PNG each in folder, from a table of panels."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names, L = geom.layer_names, geom.n_layers
    def figure(name, title, panels, size, legend=0, bar=None, **margins):
        """panels[row][col] = (calls [(axes method, *args, kwargs)], ax.set kwargs, title, title size); bar: a colour
        bar per "axes" or per "column"; legend: its font size on the first axes. Fixed margins: a layout engine
        costs seconds per figure on a CPU."""
        fig, axs = plt.subplots(len(panels), len(panels[0]), figsize=size, squeeze=False)
        fig.subplots_adjust(**{"left": 0.07, "right": 0.97, "bottom": 0.16, "top": 0.82, "wspace": 0.3,
                               "hspace": 0.45, **margins})
        for (r, c), ax in np.ndenumerate(axs):
            calls, settings, t, fs = panels[r][c]
            for fn, *a, kw in calls:
                h = getattr(ax, fn)(*a, **kw)
            if bar == "axes":
                fig.colorbar(h, ax=ax)
            ax.set(title=t, **settings)
            ax.title.set_fontsize(fs)
        for c in range(axs.shape[1] if bar == "column" else 0):
            fig.colorbar(axs[-1, c].images[0], ax=axs[:, c].tolist(), label="mean MeV")
        if legend:
            axs[0][0].legend(fontsize=legend)
        fig.suptitle(f"{'TOY ' if toy else ''}{geom.name}: {title}", fontsize=10)
        common.write_atomic(os.path.join(folder, name + ".png"), lambda t: fig.savefig(t, dpi=90))
        plt.close(fig)
    def curves(name, title, calls, xlabel, ylabel, size=(6, 3.5), left=0.16, log=False):     # one axes
        figure(name, title, [[(calls, dict(xlabel=xlabel, ylabel=ylabel, xscale="log" if log else "linear"), "",
                               9)]], size, 8, left=left, bottom=0.15, top=0.88)
    ax_names = ("eta", "phi") if geom.xy_unit == "eta/phi" else ("x [mm]", "y [mm]")
    specs = {f"{w}_{a}_per_layer": (f"{t} in {n} per layer", n) for w, t in (("centre", "energy-weighted centre"),
             ("width", "width")) for a, n in zip("xy", ax_names)}       # variate -> (title, x label)
    specs.update(energy_per_layer=("energy per layer", "MeV"), middle_core_fraction=("Middle 3x3 core / Middle",
                 "fraction"), fraction_per_layer=("fraction of the cluster energy per layer", "fraction"))
    styles = (dict(histtype="stepfilled", alpha=0.4, color="grey", label="real", density=True),
              dict(histtype="step", color="C3", lw=1.5, label="generated", density=True))
    for k in fr:        # per layer (or Middle) and variate: the histograms its separation power is computed on
        sps, panels = metrics["separation_power"][k], []
        for i, col in enumerate(names if fr[k].shape[1] == L else ["Middle"]):
            e, log = common.native_edges(fr[k][:, i], [ff[k][:, i]], metrics["bins"])
            panels.append(([("hist", np.clip(f[k][:, i], e[0], e[-1]), e, st) for f, st in zip((fr, ff), styles)],
                           dict(xscale="log" if log else "linear", xlabel=specs[k][1]),
                           f"{col}  SP {sps[col] if isinstance(sps, dict) else sps:.3f}", 9))
        figure(k, specs[k][0], [panels], (3.2 * len(panels), 3), legend=7)
    if geom.name.startswith("atlas"):   # width in phi of Middle vs energy; fakes share the real conditions
        mid, e_r = names.index("Middle"), real.sum(1) / 1000.0
        e = np.geomspace(e_r.min(), e_r.max() * 1.0001, 11)
        stats = [(common.binned_stat(x, f["width_y_per_layer"][:, mid], e), lab, col) for x, f, lab, col in
                 ((e_r, fr, "real", "grey"), (np.tile(e_r, len(fake) // len(real)), ff, "generated", "C3"))]
        curves("middle_width_vs_energy", "Middle-layer width in phi vs energy", [("errorbar", np.sqrt(e[1:] * e[:-1]),
               mean, std / np.sqrt(np.maximum(cnt, 1)), dict(fmt="o-", color=col, label=lab, ms=3))
               for (mean, std, cnt), lab, col in stats], "cluster energy [GeV]", "Middle width in phi", (5, 3.5),
               log=True)
    panels = [[], []]                   # mean shower: a row of real and one of generated layers, a colour scale each
    for lay in range(L):
        (im_r, xl, yl), (im_f, _, _) = (common.layer_image(geom, lay, v.mean(0)) for v in (real, fake))
        pos = np.r_[im_r.ravel(), im_f.ravel()]
        pos = pos[pos > 0]
        nrm = matplotlib.colors.LogNorm(pos.min(), pos.max()) if len(pos) and pos.max() > pos.min() else None
        for row, im, who in zip(panels, (im_r, im_f), ("real", "generated")):
            row.append(([("imshow", np.where(im > 0, im, np.nan), dict(norm=nrm, aspect="auto", origin="lower"))],
                        dict(xlabel=xl, ylabel=yl), f"{who} {names[lay]}", 9))
    figure("mean_shower", "mean shower per layer", panels, (3.4 * L, 5.5), bar="column", left=0.05, bottom=0.1,
           top=0.88, wspace=0.45)
    cr, cf = common.correlation_matrix(real), common.correlation_matrix(fake)
    figure("correlation", f"Pearson correlation of cells, MSE {metrics['correlation_mse']:.4f}",
           [[([("imshow", m, dict(vmin=-1, vmax=1, cmap="RdBu_r"))], {}, t, 9) for m, t in
             zip((cr, cf, cf - cr), ("real", "generated", "generated - real"))]], (14, 4.3), bar="axes", left=0.03,
           bottom=0.06, top=0.85, wspace=0.15)
    curves("cell_variance", "variance per cell",
           [("semilogy", common.cell_variance(real), ".", dict(color="grey", label="real")),
            ("semilogy", common.cell_variance(fake), ".", dict(color="C3", ms=3, label="generated"))]
           + [("axvline", b, dict(color="k", lw=0.5)) for b in np.flatnonzero(np.diff(geom.layer)) + 0.5],
           "cell index (file order)", "variance [MeV^2]", size=(10, 3.5), left=0.08)
    # nearest neighbours (memorisation check) in the space of fractions of the cluster total
    nr, nf = (v / np.maximum(v.sum(1, keepdims=True), 1e-12) for v in (real, fake))
    q, k = np.argsort(real.sum(1))[np.linspace(0, len(real) - 1, 3).astype(int)], min(5, len(nf))
    idx, dist_ = common.nearest_neighbours(nr[q], nf, k=k)
    lay = int(np.argmax(fr["fraction_per_layer"].mean(0)))
    panels = [[([("imshow", common.layer_image(geom, lay, nr[q[r]] if j == 0 else nf[idx[r, j - 1]])[0],
                  dict(aspect="auto", origin="lower"))], dict(xticks=[], yticks=[]),
                "real" if j == 0 else f"NN{j} d={dist_[r, j - 1]:.3f}", 8) for j in range(k + 1)]
              for r in range(len(q))]     # row r: a real shower, then its k nearest generated ones
    figure("nearest_neighbours", f"5 nearest generated showers (layer {names[lay]}, fractions)", panels,
           (2.2 * (k + 1), 2.2 * len(q)), left=0.02, right=0.98, bottom=0.03, top=0.85)
    curves("training", "training", [("plot", [e["epoch"] for e in h], [e["wdist"] for e in h], dict(label=f"seed {s}"))
                                    for s, h in histories.items()], "epoch", "critic's Wasserstein estimate")

# ---------------------------------------------------------------- main
def train_main(args, device, amp, ddp):
    """Every input checked before anything is written, on every rank before the process group (all ranks exit 2
    alike, none hangs): the --out paths, the run folder, the data, the checkpoint to resume. Then train (DDP over
    the ranks), and on rank 0 write generated.h5 (the held-out events' conditions), metrics.json and plots/."""
    rank, lines = int(os.environ.get("RANK", 0)), []
    def log(msg):                       # rank 0 alone logs; into OUT/log.txt once the run folder is made
        if rank == 0:
            print(msg, flush=True)
            lines.append(msg)
            if getattr(log, "path", None):
                with open(log.path, "a") as f:
                    f.write("\n".join(lines) + "\n")
                lines.clear()
    for name in ("", "plots", *OUT_FILES):
        common.check_out_path(os.path.join(args.out, name) if name else args.out, "--out", name in ("", "plots"))
    common.check_run_folder(args.out, SCRIPT)
    ckpt = os.path.join(args.out, "ckpt.pt")
    need(os.path.exists(ckpt) or not args.resume, f"{ckpt}: no checkpoint to resume from")
    if toy := args.data is None:        # cached_toy prints its line on rank 0; log.txt gets it too
        args.data = common.cached_toy("atlas89", args.toy_n, 0, rank=rank, wait=True)
        lines.append(f"no --data: training on TOY atlas89 showers ({args.data})")
    data = prepare(read_showers(args.data), args.seed, args.val_frac, toy)
    args.epochs, geom, val = args.epochs or (TOY_EPOCHS if toy else 1000), data["geom"], data["val"]
    seeds, atlas = list(range(args.seed, args.seed + args.seeds)), data["fmt"] == "atlas"
    model = {"geometry": geom.name, "seeds": seeds, **{k: getattr(args, k) for k in HP}}
    common.check_run_folder(args.out, SCRIPT, model, args.resume)
    ck = load_ckpt(ckpt, device) if args.resume else {}     # loaded once: checked here, resumed from by train()
    if ck:
        diff = [k for k, v in {"geometry": ck["geometry"], "seeds": ck["seeds"], **ck["hp"]}.items() if model[k] != v]
        need(not diff, f"--resume {ckpt}: the checkpoint's {', '.join(diff)} differ from this run's; resume with "
                       "the same flags and data, or choose another --out")
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:
        common.stamp_run_folder(args.out, SCRIPT, model)
        log.path = os.path.join(args.out, "log.txt")
        log(f"{geom.name} ({data['fmt']}): {len(data['train'])} train, {len(val)} validation events"
            + (f"; {data['n_over']} clusters above 300 GeV removed" if atlas else "")
            + (f"; {data['n_dropped']} empty after the noise cuts dropped" if data["n_dropped"] else "")
            + f"; {args.epochs} epochs, {len(seeds)} seed(s), device {device}")
    gen, histories = train(args, seeds, data, device, ckpt, log, amp, (rank, dist.get_world_size() if ddp else 1), ck)
    if rank:
        return 0
    metrics, fake, feats, line = validate(gen, data, seeds, device)
    write_h5(os.path.join(args.out, "generated.h5"), data["fmt"], geom, fake, np.tile(data["energy"][val], len(seeds)),
             toy=data["toy"], seeds=seeds, energy_is="held-out real event's " + ("true energy" if atlas else
                                                                                  "incident energy"))
    metrics.update(data=args.data, geometry=geom.name, seeds=seeds, epochs=args.epochs, n_train=len(data["train"]),
                   n_val=len(val), n_generated=len(fake), n_over_300GeV=data["n_over"], val_indices=val.tolist(),
                   final_wdist={s: h[-1]["wdist"] if h else None for s, h in histories.items()})
    common.check_finite(metrics, mpath := os.path.join(args.out, "metrics.json"))
    common.write_atomic(mpath, json.dumps(metrics, indent=1))
    if not args.no_plots:
        plots(os.path.join(args.out, "plots"), data["cells"][val], fake, geom, data["toy"], metrics, histories, *feats)
    log(f"wrote {args.out}/: ckpt.pt, generated.h5, metrics.json" + ("" if args.no_plots else ", plots/"))
    log(f"validation, {len(val)} held-out real vs {len(fake)} generated: " + line)
    return 0

def main(argv=None):
    args = get_args(argv)
    if args.generate is None and args.out is None:
        args.out = os.path.join("runs", "wgan_gp")
    ddp = "RANK" in os.environ and args.generate is None and not args.benchmark
    try:
        need(args.device != "cuda" or torch.cuda.is_available(), "--device cuda but CUDA is not available")
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) if ddp else 0}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        amp = args.dtype == "bf16" and use_cuda
        if args.dtype == "bf16" and not amp and int(os.environ.get("RANK", 0)) == 0:
            print(f"{SCRIPT}: --dtype bf16 is ignored on CPU (fp32)", file=sys.stderr)
        if args.benchmark:
            return benchmark(args, device, amp)
        return generate_main(args, device) if args.generate is not None else train_main(args, device, amp, ddp)
    except (DataError, OSError) as e:
        return common.fail(SCRIPT, e)
    finally:
        if ddp and dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    sys.exit(main())
