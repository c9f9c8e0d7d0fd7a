"""Shared fixtures: the tiny Sa2VA checkpoint and a small synthetic pair folder, made once."""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# One thread per test process: pytest-xdist runs one worker per CI core (pytest.ini).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Each xdist worker gets its own remote-code module cache: two processes copying the same remote
# code into one cache folder at once could import a half-written file. Set before transformers is
# imported; subprocesses (torchrun, the CLIs) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["HF_MODULES_CACHE"] = os.path.join(
        tempfile.gettempdir(), f"sa2va-test-modules-{os.getppid()}-{os.environ['PYTEST_XDIST_WORKER']}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sa2va.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory) -> Path:
    """8 synthetic 128 px images; rejected = the ground truth dilated (a plausible bad mask)."""
    from sa2va.synth import write_dilated_pairs

    return write_dilated_pairs(tmp_path_factory.mktemp("data") / "pairs", n=8, size=128, seed=1)


def run_ok(cmd: list[str], **kw) -> str:
    """Run a command from the repo root; on failure show its output."""
    import subprocess

    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def trained_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "trained.safetensors"))
