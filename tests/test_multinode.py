"""Two nodes on one host: two torchrun launchers (--nnodes 2, --node_rank 0 and 1, gloo on
127.0.0.1) train exactly what one launcher with two processes trains."""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import REPO, run_ok, trained_tensors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_launchers_of_one_node_each_match_one_launcher_of_two(tiny_model, tiny_pairs, tmp_path):
    common = ["train_dpo.py", "--cfg", "tiny", f"model.path={tiny_model}", f"data.root={tiny_pairs}",
              "max_steps=2", "lora.dropout=0.0", "train.save_every=0"]
    port = free_port()
    launchers = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port), *common,
               f"output_dir={tmp_path / 'nodes'}", "train.micro_batch_size=1", "train.grad_accum=2"]
        launchers.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                          env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"}))
    outputs = [p.communicate(timeout=300)[0] for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "2 rank(s)" in outputs[0]

    # One launcher, two processes; its split chosen by auto (2 x 1 per rank on CPU): the same pairs per step.
    log = run_ok([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                  f"output_dir={tmp_path / 'one'}", "train.micro_batch_size=auto", "train.grad_accum=null",
                  "train.pairs_per_step=2"])
    assert "auto on cpu" in log and "2 x accumulation 1" in log
    nodes = trained_tensors(tmp_path / "nodes" / "checkpoints" / "step_0000002")
    one = trained_tensors(tmp_path / "one" / "checkpoints" / "step_0000002")
    assert nodes.keys() == one.keys()
    for key in one:
        np.testing.assert_allclose(nodes[key], one[key], atol=2e-6, rtol=1e-4, err_msg=key)
