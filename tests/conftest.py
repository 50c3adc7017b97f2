"""Shared test fixtures: toy files written once per session, and a runner for the scripts."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import common  # noqa: E402


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """toy(kind, n=256, seed=0, suffix='.h5') -> path of a toy file, made once per session."""
    cache = {}

    def make(kind, n=256, seed=0, suffix=".h5"):
        key = (kind, n, seed, suffix)
        if key not in cache:
            path = tmp_path_factory.mktemp("toy") / f"{kind}_{n}_s{seed}{suffix}"
            common.write_toy(kind, str(path), n, seed, workers=1)
            cache[key] = str(path)
        return cache[key]
    return make


def run_script(script, *args, cwd, env=None, timeout=300):
    """Run a repo script as a user would (python script.py ...) in cwd; returns CompletedProcess."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    e.update(env or {})
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def run_torchrun(script, *args, cwd, nproc=2, timeout=300):
    """Run a repo script under torchrun with nproc CPU processes (gloo)."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
