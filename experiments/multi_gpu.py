"""The mission's command on several GPUs, at the Sa2VA-26B shape (random weights).

    python experiments/multi_gpu.py --out OUT [--gpus 4] [--steps 200]

Runs `torchrun --nproc_per_node N train_dpo.py --cfg configs/v8.yaml` exactly as a user would,
on a 26B-shaped model built from config (model.random_weights=true) and synthetic pairs:
  - DDP on 1, 2 and N GPUs (samples/s, scaling, peak memory per GPU);
  - FSDP2 on N GPUs;
  - fault: a DDP run on N GPUs whose rank N-1 is killed with SIGKILL after a checkpoint, then
    the same command with --resume; the two logs show how many steps were lost.
Writes OUT/multi_gpu.json and each run's metrics.jsonl / log under OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def sh(cmd: list[str], log: Path, env: dict | None = None) -> int:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def summary(run_dir: Path, skip: int = 5) -> dict:
    """samples/s over the steps after the first `skip` (warm-up, allocator growth)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steady = records[skip:] or records
    rates = sorted(r["samples_per_s"] for r in steady)
    out = {"steps": records[-1]["step"], "samples_per_s_total": rates[len(rates) // 2],
           "peak_mem_gb_rank0": max(r.get("peak_mem_gb", 0.0) for r in records),
           "final_loss": records[-1]["loss"]}
    configs = sorted((run_dir / "checkpoints").glob("step_*/config.yaml"))
    if configs:  # the split the loop chose (train.micro_batch_size: auto is resolved in the saved config)
        import yaml

        train = yaml.safe_load(configs[-1].read_text())["train"]
        out.update(micro_batch_size=train["micro_batch_size"], grad_accum=train["grad_accum"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--scaling-steps", type=int, default=40)
    parser.add_argument("--preset", default="26b")
    parser.add_argument("--family", default=None, help="LLM family of the preset (sa2va.tiny --family)")
    parser.add_argument("--fault-steps", type=int, default=80, help="fault run: steps (checkpoints every quarter)")
    parser.add_argument("--only", default="ddp,fsdp,fault", help="which parts to run")
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every run (e.g. train.micro_batch_size=4)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    work = Path("/tmp/multi_gpu_work")
    shutil.rmtree(work / "runs", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = out / "multi_gpu.log"
    py = sys.executable
    results: dict = {"preset": args.preset, "gpus": args.gpus}

    model = work / f"sa2va-{args.preset}{'-' + args.family if args.family else ''}"
    data = work / "data"
    setup = []
    if not model.is_dir():
        setup.append([py, "-m", "sa2va.tiny", "--out", str(model), "--preset", args.preset, "--no-weights",
                      *(["--family", args.family] if args.family else [])])
    if not (data / "dpo_annotations.json").is_file():
        setup.append([py, "-m", "sa2va.synth", "--out", str(data), "--n", "64", "--size", "512"])
        setup.append([py, "curate_data.py", "--data", str(data), "--rejected", "perturb", "--min-gap", "0.15",
                      "--perturbations", "dilate,break", "--seed", "0"])
    for cmd in setup:
        if sh(cmd, log) != 0:
            raise SystemExit(f"setup failed: {' '.join(cmd)} (see {log})")

    def torchrun(n: int, name: str, steps: int, *extra: str, env: dict | None = None) -> tuple[int, Path, float]:
        run_dir = work / "runs" / name
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "train_dpo.py", "--cfg", "configs/v8.yaml",
               f"model.path={model}", "model.random_weights=true", f"data.root={data}", f"output_dir={run_dir}",
               f"max_steps={steps}", "train.save_every=20", "data.max_samples=null", *args.overrides, *extra]
        started = time.perf_counter()
        rc = sh(cmd, log, env)
        if (run_dir / "metrics.jsonl").is_file():  # only small files travel back
            shutil.copy(run_dir / "metrics.jsonl", out / f"{name}_metrics.jsonl")
        results.setdefault("commands", {})[name] = " ".join(cmd).replace(py, "python").replace(str(REPO) + "/", "")
        return rc, run_dir, time.perf_counter() - started

    parts = args.only.split(",")
    if "ddp" in parts:
        for n in sorted({1, min(2, args.gpus), args.gpus}):
            steps = args.steps if n == args.gpus else args.scaling_steps
            rc, run_dir, wall = torchrun(n, f"ddp{n}", steps)
            results[f"ddp{n}"] = {"rc": rc, "wall_s": round(wall, 1), **(summary(run_dir) if rc == 0 else {})}
        base = results.get("ddp1", {}).get("samples_per_s_total")
        for n in sorted({min(2, args.gpus), args.gpus} - {1}):
            got = results.get(f"ddp{n}", {}).get("samples_per_s_total")
            if base and got:
                results[f"ddp{n}"]["scaling_vs_1gpu"] = round(got / base, 3)
    if "fsdp" in parts:
        rc, run_dir, wall = torchrun(args.gpus, f"fsdp{args.gpus}", args.scaling_steps * 2, "dist.strategy=fsdp")
        results[f"fsdp{args.gpus}"] = {"rc": rc, "wall_s": round(wall, 1), **(summary(run_dir) if rc == 0 else {})}
    if "fault" in parts:
        # Start a run, wait for its step-40 checkpoint, SIGKILL the last rank, then --resume.
        name = "fault"
        run_dir = work / "runs" / name
        cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(args.gpus), "train_dpo.py", "--cfg",
               "configs/v8.yaml", f"model.path={model}", "model.random_weights=true", f"data.root={data}",
               f"output_dir={run_dir}", f"max_steps={args.fault_steps}", f"train.save_every={args.fault_steps // 4}",
               "data.max_samples=null", *args.overrides]
        with open(log, "a") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            agent = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            target = run_dir / "checkpoints" / f"step_{args.fault_steps // 2:07d}" / "COMPLETE"
            killed_at = None
            while agent.poll() is None:
                if target.is_file() and killed_at is None and (run_dir / "metrics.jsonl").is_file():
                    time.sleep(2)  # let a few more steps run: they are the ones a crash loses
                    workers = subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()
                    if workers:
                        os.kill(int(workers[-1]), signal.SIGKILL)
                        killed_at = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
                time.sleep(0.5)
        rc_killed = agent.returncode
        sys.path.insert(0, str(REPO))
        from sa2va.checkpoint import latest_checkpoint

        last = latest_checkpoint(run_dir)
        resumed_from = int(last.name.split("_")[1]) if last else 0
        rc, _, wall = torchrun(args.gpus, name, args.fault_steps, f"train.save_every={args.fault_steps // 4}", "--resume")
        steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results["fault"] = {"killed_rank": args.gpus - 1, "last_logged_step_before_kill": killed_at,
                            "killed_run_exit": rc_killed, "resume_exit": rc, "resumed_from": resumed_from,
                            "steps_lost": (killed_at - resumed_from) if killed_at else None,
                            "final_step": steps[-1],
                            "steps_in_log_after_resume": steps == list(range(1, args.fault_steps + 1))}
    (out / "multi_gpu.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
