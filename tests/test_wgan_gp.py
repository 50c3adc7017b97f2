"""wgan_gp.py end to end (subprocesses on tiny toy files) and its model pieces (imported)."""
import argparse
import importlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import run_script, run_torchrun

wg = importlib.import_module("wgan_gp")

def tiny(epochs=2):
    return ["--epochs", str(epochs), "--batch-size", "16", "--n-critic", "2", "--width", "16", "--latent", "8",
            "--ckpt-every", "1"]


def _ok(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _check_atlas(path, n, n_cells):
    geom = common.geometry(f"atlas{n_cells}")
    with h5py.File(path) as f:
        assert {"cells", "energy", "cell_layer", "cell_eta", "cell_phi"} <= set(f)
        cells, energy = f["cells"][()], f["energy"][()]
        assert np.array_equal(f["cell_layer"][()], geom.layer)
    assert cells.shape == (n, n_cells) and energy.shape == (n,)
    assert np.all(np.isfinite(cells)) and np.all(cells >= 0) and np.all(energy > 0)
    assert np.all((cells == 0) | (cells >= geom.noise_cut))          # noise cuts applied
    assert cells.sum() > 0        # (a barely trained model may leave a low-energy shower under the cuts)
    return cells, energy


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """One tiny training on toy atlas89, reused by several tests."""
    wd = tmp_path_factory.mktemp("wgan_run")
    data = toy("atlas89", 256)
    r = _ok(run_script("wgan_gp.py", "--data", data, "--out", "run", *tiny(), cwd=wd))
    return wd, data, r


def test_train_outputs(trained):
    wd, data, r = trained
    out = wd / "run"
    assert "epoch 2/2 | step" in r.stdout and "samples/s | ETA" in r.stdout
    assert "epoch 2/2" in (out / "log.txt").read_text()
    m = json.loads((out / "metrics.json").read_text())
    assert m["toy"] is True and m["geometry"] == "atlas89"
    assert set(m["separation_power"]["fraction_per_layer"]) == {"PreSampler", "Strip", "Middle", "Back"}
    assert 0 <= m["correlation_mse"] <= 4
    n_val = m["n_val"]
    assert n_val == len(m["val_indices"]) == round(0.125 * 256)
    cells, energy = _check_atlas(out / "generated.h5", n_val, 89)
    with h5py.File(data) as f:
        real = common.geometry("atlas89")
        real_cells = f["cells"][()][m["val_indices"]]
        real_cells[real_cells < real.noise_cut] = 0
        assert np.allclose(energy, f["energy"][()][m["val_indices"]])   # conditioned on held-out events
    # softmax x cluster total: energy conserved, minus what the noise cuts remove
    assert np.all(cells.sum(1) <= real_cells.sum(1) * (1 + 1e-5))
    for p in ("mean_shower", "energy_per_layer", "fraction_per_layer", "centre_x_per_layer", "centre_y_per_layer",
              "width_x_per_layer", "width_y_per_layer", "middle_core_fraction", "correlation", "cell_variance",
              "nearest_neighbours", "training"):
        assert (out / "plots" / f"{p}.png").stat().st_size > 1000, p
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["step"] > 0 and ck["geometry"] == "atlas89" and ck["toy"] is True
    assert ck["seeds"] == [0] and len(ck["rng"]) == 1                 # one generator state per seed
    assert not list(out.glob("*.tmp*")) and not list((out / "plots").glob("*.tmp*"))


def test_generate_from_ckpt(trained):
    wd, data, _ = trained
    r = _ok(run_script("wgan_gp.py", "--generate", "7", "--ckpt", "run/ckpt.pt", "--energy", "10:100",
                       "--out", "gen.h5", cwd=wd))
    assert "wrote 7" in r.stdout
    cells, energy = _check_atlas(wd / "gen.h5", 7, 89)
    assert np.all((energy >= 1e4 * 0.999) & (energy <= 1e5 * 1.001))
    assert np.all(cells.sum(1) <= energy * (1 + 1e-5))
    # conditions from a file, in process (same code path as the CLI)
    assert wg.main(["--generate", "5", "--ckpt", str(wd / "run/ckpt.pt"), "--energy-file", data,
                    "--out", str(wd / "gen2.h5")]) == 0
    _, e2 = _check_atlas(wd / "gen2.h5", 5, 89)
    with h5py.File(data) as f:
        assert np.allclose(e2, f["energy"][:5])


def test_resume_continues(trained):
    wd, data, _ = trained
    (wd / "run2").mkdir()
    shutil.copy(wd / "run" / "ckpt.pt", wd / "run2" / "ckpt.pt")
    r = _ok(run_script("wgan_gp.py", "--data", data, "--out", "run2", "--resume", "--no-plots", *tiny(3), cwd=wd))
    assert "resumed from" in r.stdout and "epoch 3/3" in r.stdout and "epoch 1/3" not in r.stdout
    before = torch.load(wd / "run" / "ckpt.pt", weights_only=False)
    after = torch.load(wd / "run2" / "ckpt.pt", weights_only=False)
    assert after["epoch"] == 3 and after["step"] > before["step"]


def test_resume_of_seeds_equals_uninterrupted(toy, tmp_path):
    data = toy("atlas89", 256)
    flags = ["--data", data, "--no-plots", "--seeds", "2", *tiny(2)]
    assert wg.main([*flags, "--out", str(tmp_path / "a")]) == 0
    assert wg.main(["--data", data, "--no-plots", "--seeds", "2", *tiny(1), "--out", str(tmp_path / "b")]) == 0
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["epoch"] == 1
    assert wg.main([*flags, "--out", str(tmp_path / "b"), "--resume"]) == 0
    a, b = (torch.load(tmp_path / x / "ckpt.pt", weights_only=False) for x in "ab")
    assert a["step"] == b["step"] and b["epoch"] == 2
    for part in ("generator", "critic"):
        assert torch.equal(a["model"][part]["flat"], b["model"][part]["flat"]), part
        assert torch.equal(a["optim"][part]["v"], b["optim"][part]["v"]), part
    with h5py.File(tmp_path / "a" / "generated.h5") as fa, h5py.File(tmp_path / "b" / "generated.h5") as fb:
        assert np.array_equal(fa["cells"][()], fb["cells"][()])


def test_calochallenge1(toy, tmp_path):
    data = toy("calochallenge1", 256)
    _ok(run_script("wgan_gp.py", "--data", data, "--out", "cc", "--no-plots", *tiny(1), cwd=tmp_path))
    with h5py.File(tmp_path / "cc" / "generated.h5") as f:
        assert set(f) == {"incident_energies", "showers"}
        showers, inc = f["showers"][()], f["incident_energies"][()]
    n_val = round(0.125 * 256)
    assert showers.shape == (n_val, 368) and inc.shape == (n_val, 1)
    assert np.all(np.isfinite(showers)) and np.all(showers >= 0) and np.all(showers.sum(1) > 0)
    ck = torch.load(tmp_path / "cc" / "ckpt.pt", weights_only=False)
    assert "mu_r" in ck["norm"]                                        # 368 cells + the ratio head:
    assert ck["model"]["generator"]["flat"].shape[1] == 9 * 16 + 16 + 2 * (16 * 16 + 16) + 16 * 369 + 369


def test_atlas247_two_seeds(toy, tmp_path):
    data = toy("atlas247", 256)
    r = _ok(run_script("wgan_gp.py", "--data", data, "--out", "s2", "--seeds", "2", "--no-plots",
                       *tiny(1), cwd=tmp_path))
    assert "mean of 2 seeds" in r.stdout
    out = tmp_path / "s2"
    assert torch.load(out / "ckpt.pt", weights_only=False)["model"]["generator"]["flat"].shape[0] == 2
    n_val = round(0.125 * 256)
    _check_atlas(out / "generated.h5", 2 * n_val, 247)                 # both seeds' samples pooled
    m = json.loads((out / "metrics.json").read_text())
    assert m["seeds"] == [0, 1] and m["n_generated"] == 2 * n_val


def test_torchrun_two_processes(toy, tmp_path):
    data = toy("atlas89", 256)
    r = run_torchrun("wgan_gp.py", "--data", data, "--out", "ddp", "--no-plots", *tiny(1),
                     cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.count("epoch 1/1 |") == 1                          # rank 0 alone logs
    ck = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    assert ck["epoch"] == 1 and ck["step"] >= 1
    _check_atlas(tmp_path / "ddp" / "generated.h5", round(0.125 * 256), 89)


def _bad_file(tmp_path, name, **arrays):
    path = tmp_path / name
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return str(path)


def test_bad_input_subprocess(toy, tmp_path):
    with h5py.File(toy("atlas89", 256)) as f:
        cells = f["cells"][()]
    bad = _bad_file(tmp_path, "nokey.h5", cells=cells)
    r = run_script("wgan_gp.py", "--data", bad, "--out", "out", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("wgan_gp.py: error: ") and "nokey.h5" in r.stderr and "'energy'" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing_file", "wrong_cells", "nan", "negative_energy", "mismatch", "empty",
                                  "negative_voxel", "not_hdf5"])
def test_bad_input(toy, tmp_path, capsys, case):
    with h5py.File(toy("atlas89", 256)) as f:
        cells, energy = f["cells"][:64], f["energy"][:64]
    files = {
        "missing_file": lambda: str(tmp_path / "missing_file.h5"),
        "wrong_cells": lambda: _bad_file(tmp_path, "wrong_cells.h5", cells=cells[:, :88], energy=energy),
        "nan": lambda: _bad_file(tmp_path, "nan.h5", cells=np.where(cells == cells.max(), np.nan, cells),
                                 energy=energy),
        "negative_energy": lambda: _bad_file(tmp_path, "negative_energy.h5", cells=cells, energy=-energy),
        "mismatch": lambda: _bad_file(tmp_path, "mismatch.h5", cells=cells, energy=energy[:10]),
        "empty": lambda: _bad_file(tmp_path, "empty.h5", cells=np.zeros((0, 89), np.float32),
                                   energy=np.zeros(0, np.float32)),
        "negative_voxel": lambda: _bad_file(tmp_path, "negative_voxel.h5", showers=-np.ones((5, 368)),
                                            incident_energies=np.ones((5, 1))),
        "not_hdf5": lambda: (tmp_path / "not_hdf5.h5").write_text("hello") and str(tmp_path / "not_hdf5.h5"),
    }
    path = files[case]()
    out = tmp_path / "out"
    assert wg.main(["--data", path, "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wgan_gp.py: error: ") and path in err and "\n" not in err, err
    assert not out.exists()


def test_bad_flags(tmp_path, capsys):
    for argv in (["--epochs", "0"], ["--betas", "0.5"], ["--generate", "5"], ["--val-frac", "1"]):
        with pytest.raises(SystemExit) as e:
            wg.get_args(argv)
        assert e.value.code == 2
    # a checkpoint that does not exist
    assert wg.main(["--generate", "3", "--ckpt", str(tmp_path / "no.pt"), "--energy", "1:2",
                    "--out", str(tmp_path / "g.h5")]) == 2
    assert "no.pt" in capsys.readouterr().err
    assert not (tmp_path / "g.h5").exists()


def test_help_on_every_flag(capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        wg.get_args(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--data", "--toy-n", "--out", "--epochs", "--batch-size", "--lr", "--betas", "--layers", "--width",
                 "--latent", "--n-critic", "--gp", "--l1", "--seed", "--seeds", "--device", "--dtype", "--compile",
                 "--resume", "--ckpt-every", "--log-every", "--generate", "--ckpt", "--energy", "--energy-file",
                 "--benchmark"):
        assert flag in text
    parsers = []
    orig = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        parsers.append(self)
        return orig(self, *a, **k)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    wg.get_args([])
    assert all(a.help for a in parsers[0]._actions), [a.dest for a in parsers[0]._actions if not a.help]


def test_benchmark_json(tmp_path):
    r = _ok(run_script("wgan_gp.py", "--benchmark", "--device", "cpu", cwd=tmp_path))
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["script"] == "wgan_gp.py" and line["device"] == "cpu" and line["train_batch"] == 64
    assert line["gen_showers_per_s"] > 0 and line["train_samples_per_s"] > 0
    assert list(tmp_path.iterdir()) == []                               # no files written


def test_model_shapes_and_parameter_counts():
    g, d = wg.build({"latent": 100, "width": 128, "layers": 3}, 89, k=2)
    # Dense(101->128), 2 x Dense(128->128), Dense(128->89) / Dense(90->128), 2 x Dense(128->128), Dense(128->1)
    assert g.flat.shape == (2, 101 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 89 + 89)
    assert d.flat.shape == (2, 90 * 128 + 128 + 2 * (128 * 128 + 128) + 129)
    g.glorot_(wg.member_generators([0, 1], "cpu"))
    x, logits, _ = wg.generator_out(g.layers(), torch.randn(2, 6, 101), 89)
    assert x.shape == logits.shape == (2, 6, 89)
    assert torch.allclose(x.sum(-1), torch.ones(2, 6)) and torch.all(x > 0)   # softmax: energy conserved
    assert wg.forward(d.layers(), torch.randn(2, 6, 90), wg.SLOPE)[0].shape == (2, 6, 1)
    W, b = g.layers()[0]                     # Keras defaults: glorot-uniform kernels, zero biases
    lim = (6 / (101 + 128)) ** 0.5
    assert torch.all(b == 0) and W.abs().max() <= lim and W.abs().max() > 0.9 * lim
    assert not torch.equal(W[0], W[1])                                  # members differ
    g2, _ = wg.build({"latent": 10, "width": 32, "layers": 1}, 369)
    x2, _, _ = wg.generator_out(g2.layers(), torch.randn(1, 4, 11), 368)
    assert x2.shape == (1, 4, 369) and torch.allclose(x2[..., :368].sum(-1), torch.ones(1, 4))


def test_leaky_relu_slope_is_keras_default():
    assert wg.SLOPE == 0.3
    net = wg.Dense([1, 1, 1])
    with torch.no_grad():
        net.flat.copy_(torch.tensor([[1.0, 0.0, 1.0, 0.0]]))             # identity, identity
    y = wg.forward(net.layers(), torch.tensor([[[-2.0], [3.0]]]), wg.SLOPE)[0]
    assert y.flatten().tolist() == pytest.approx([-0.6, 3.0])


def _critic_reference(flat, sizes, h, nx, B, gp_weight):
    """The critic loss by plain autograd, create_graph=True for the gradient penalty."""
    net = wg.Dense(sizes, k=flat.shape[0]).double()

    def D(x):
        for i, (W, b) in enumerate(net.layers(flat)):
            x = torch.baddbmm(b, x, W)
            x = torch.nn.functional.leaky_relu(x, 0.3) if i < len(sizes) - 2 else x
        return x
    real, fake, interp = h[:, :B], h[:, B:2 * B], h[:, 2 * B:].clone().requires_grad_(True)
    g = torch.autograd.grad(D(interp).sum(), interp, create_graph=True)[0][..., :nx]
    gp = ((g.norm(dim=2) - 1) ** 2).mean(1)
    return -(D(real).mean((1, 2)) - D(fake).mean((1, 2))) + gp_weight * gp


def test_explicit_gradient_penalty_equals_autograd():
    torch.manual_seed(0)
    K, B, nx, sizes = 2, 7, 5, [6, 9, 8, 1]
    net = wg.Dense(sizes, k=K).double()
    with torch.no_grad():
        net.flat.normal_(0, 0.5)
    h = torch.rand(K, 3 * B, 6, dtype=torch.double)
    h[:, B:, 5] = h[:, :B, 5].repeat(1, 2)                              # one condition per sample
    with torch.no_grad():
        grad, loss, _ = wg.critic_grads(net.layers(), h.clone(), B, nx, 10.0)
    flat = net.flat.detach().clone().requires_grad_(True)
    ref = _critic_reference(flat, sizes, h, nx, B, 10.0)
    ref.sum().backward()
    assert torch.allclose(loss, ref.detach(), rtol=0, atol=1e-6)
    assert torch.allclose(grad, flat.grad, rtol=0, atol=1e-6)
    assert grad.abs().max() > 1e-2


def test_generator_gradient_equals_autograd():
    torch.manual_seed(1)
    K, B, n_cells = 2, 6, 4
    for ratio in (False, True):
        gen, crit = wg.build({"latent": 3, "width": 7, "layers": 2}, n_cells + ratio, k=K)
        gen, crit = gen.double(), crit.double()
        with torch.no_grad():
            gen.flat.normal_()
            crit.flat.normal_()
        gin = torch.randn(K, B, 4, dtype=torch.double)
        with torch.no_grad():
            grad, loss = wg.generator_grads(gen.layers(), crit.layers(), gin, n_cells, 0.01)
        flat = gen.flat.detach().clone().requires_grad_(True)
        x, logits, _ = wg.generator_out(gen.layers(flat), gin, n_cells)
        y = wg.forward(crit.layers(), torch.cat([x, gin[..., -1:]], -1), wg.SLOPE)[0]
        ref = -y.mean((1, 2)) + 0.01 * logits.abs().sum(-1).mean(-1)
        ref.sum().backward()
        assert torch.allclose(loss, ref.detach(), atol=1e-10) and torch.allclose(grad, flat.grad, atol=1e-10)


def test_gradient_penalty_is_per_sample():
    # one hidden layer kept positive by its bias: D(x) = 3 x_0 + const, so |grad_x D| = 3 for each sample
    net = wg.Dense([3, 2, 1])
    with torch.no_grad():
        net.flat.copy_(torch.tensor([[1.0, 0, 0, 1, 0, 0, 10, 10, 3, 0, 0]]))
    h = torch.tensor([[[1.0, 0, 0], [3, 0, 0]]]).repeat(1, 3, 1)         # real = fake = interpolate rows
    _, loss, wdist = wg.critic_grads(net.layers(), h, 2, 2, 1.0)
    assert wdist.item() == 0.0
    # per sample: mean((3-1)^2, (3-1)^2) = 4; a whole-batch norm would give (3 sqrt(2) - 1)^2 = 10.5
    assert loss.item() == pytest.approx(4.0)


def test_300_gev_cut(toy, tmp_path):
    with h5py.File(toy("atlas89", 256)) as f:
        arrays = {k: f[k][()] for k in f}
    arrays["cells"][5] *= 400e3 / arrays["cells"][5].sum()              # a 400 GeV cluster
    path = _bad_file(tmp_path, "hot.h5", **arrays)
    data = wg.prepare(wg.read_showers(path), seed=0, val_frac=0.25)
    assert data["n_over"] == 1 and 5 not in set(data["train"]) | set(data["val"])
    assert len(data["train"]) + len(data["val"]) == 256 - 1 - data["n_dropped"]
    assert wg.prepare(wg.read_showers(toy("atlas89", 256)), seed=0, val_frac=0.25)["n_over"] == 0


def _train_args(seeds, epochs, out):
    return wg.get_args(["--epochs", str(epochs), "--batch-size", "16", "--n-critic", "2", "--width", "16",
                        "--latent", "8", "--out", str(out), "--seeds", str(seeds), "--ckpt-every", "1"])


def test_batched_seeds_equal_separate_runs(toy, tmp_path):
    d = wg.read_showers(toy("atlas89", 256))
    data = wg.prepare(d, seed=0, val_frac=0.125)
    quiet = lambda msg: None  # noqa: E731
    both, _ = wg.train(_train_args(2, 2, tmp_path), [3, 4], data, "cpu", str(tmp_path / "b.pt"), quiet, False)
    for k, s in enumerate((3, 4)):
        one, _ = wg.train(_train_args(1, 2, tmp_path), [s], data, "cpu", str(tmp_path / f"{s}.pt"), quiet, False)
        assert torch.allclose(both.flat[k], one.flat[0], rtol=0, atol=1e-5)
        assert not torch.allclose(both.flat[k], both.flat[1 - k], atol=1e-3)


def test_prepare_normalises_and_cuts(toy):
    d = wg.read_showers(toy("atlas89", 256))
    data = wg.prepare(d, seed=0, val_frac=0.25)
    assert np.allclose(data["x"].sum(1), 1.0, atol=1e-5)
    assert abs(data["c"][data["train"]].mean()) < 1e-4 and abs(data["c"][data["train"]].std() - 1) < 1e-3
    assert np.all((data["cells"] == 0) | (data["cells"] >= d["geom"].noise_cut))
    assert np.allclose(data["cond_e"], data["cells"].sum(1), rtol=1e-5)   # ATLAS condition: cluster total
    assert len(set(data["train"]) & set(data["val"])) == 0
    again = wg.prepare(d, seed=0, val_frac=0.25)
    assert np.array_equal(again["val"], data["val"])


@pytest.mark.parametrize("name,shapes", [("atlas89", [(2, 3), (2, 24), (7, 3), (7, 2)]),
                                         ("atlas247", [(2, 7), (2, 56), (11, 7), (11, 4)]),
                                         ("calochallenge1", [(1, 8), (10, 16), (10, 19), (1, 5), (1, 5)])])
def test_layer_images(name, shapes):
    geom = common.geometry(name)
    vec = np.arange(geom.n_cells, dtype=float)
    for lay, shape in enumerate(shapes):
        img = common.layer_image(geom, lay, vec)[0]
        assert img.shape == shape
        assert sorted(img.ravel()) == sorted(np.flatnonzero(geom.layer == lay))     # every cell once
    if name == "atlas89":       # Middle: eta-major 3x7 -> image rows are phi, columns eta
        img = common.layer_image(geom, 2, vec)[0]
        assert img[0, 1] == 7 and img[1, 0] == 1
