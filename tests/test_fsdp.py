"""FSDP2 through sa2va.distributed on real torchrun (2 gloo processes): both dist.fsdp_gather
modes train to the same weights as one unwrapped process on all the data, and per_step
all-gathers each layer once per optimizer step instead of twice per micro-batch."""

import json
import os
import sys

import numpy as np
from conftest import REPO, run_ok


def test_fsdp_gather_modes_match_one_process_and_per_step_gathers_less(tmp_path):
    out = tmp_path / "fsdp.json"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "tests/fsdp_gather_worker.py", str(out)], env=env)
    result = json.loads(out.read_text())
    reference = result["reference"]["weights"]
    for mode in ("per_use", "per_step"):
        got = result[mode]["weights"]
        assert got.keys() == reference.keys()
        for key in reference:
            np.testing.assert_allclose(got[key], reference[key], atol=1e-6, rtol=1e-5, err_msg=f"{mode} {key}")
    per_use, per_step = result["per_use"]["gathers_per_step"], result["per_step"]["gathers_per_step"]
    layers, micro = 3, 3  # the worker's model and accumulation
    assert all(n >= 2 * layers * micro for n in per_use), per_use  # forward and backward, every micro-batch
    assert all(n <= layers + 1 for n in per_step), per_step  # each layer once (+ the root) per step
