"""Kill -9 soak: kill training runs at random wall-clock moments, resume, compare the weights.

    python experiments/fault_soak.py --work /tmp/soak --kills 10 --procs 1 2 --seed 0

For each process count (1 = plain python, 2 = torchrun with 2 gloo ranks on CPU):
  1. one uninterrupted reference run of the tiny model (save_every=1, so a kill often lands
     inside a checkpoint write), with its timeline measured;
  2. N trials: a fresh run is killed with SIGKILL from outside at a seeded random moment, the
     state it left is recorded (newest complete checkpoint, temporary folders), then the same
     command with --resume runs to the end;
  3. each trial is checked: the resumed run started from the newest complete checkpoint that
     the kill left (or started fresh when there was none), metrics.jsonl holds steps 1..N once
     each, no temporary folder is left, and the final trained.safetensors and final/ weights
     are compared with the reference, bit for bit.

Kill moments: with probability --early a moment anywhere from the launch to the start of the
training loop (model loading, frozen features, reference logits); otherwise a moment in the
training window (from the line `training N steps` to the end of the reference run, steps,
checkpoint writes and the final export). With 2 processes the victim is drawn too: both ranks
and the launcher, rank 0 only, or rank 1 only (torchrun then stops the survivor).

The CI test tests/test_reliability.py runs the same code with 2 kills (1 process) and 1 kill
(2 processes). Prints a table and writes WORK/soak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANCHOR = re.compile(r"^training \d+ steps", re.M)
RESUMED = re.compile(r"resumed from (\S+) at step (\d+)")
FRESH = "--resume: no complete checkpoint"
# Steps per setting: both cross an epoch boundary (8 pairs: 8 steps/epoch on 1 rank, 4 on 2).
STEPS = {1: 10, 2: 6}


def make_inputs(work: Path) -> tuple[Path, Path]:
    """The tiny checkpoint and 8 synthetic 128 px pairs (as tests/conftest.py makes them)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from sa2va.synth import write_dilated_pairs
    from sa2va.tiny import write_tiny_checkpoint

    model = work / "tiny"
    if not (model / "model.safetensors").is_file():
        write_tiny_checkpoint(model, seed=0)
    data = work / "pairs"
    if not (data / "dpo_annotations.json").is_file():
        shutil.rmtree(data, ignore_errors=True)
        write_dilated_pairs(data, n=8, size=128, seed=1)
    return model, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_cmd(procs: int, model: Path, data: Path, out: Path, steps: int, resume: bool = False,
              extra: tuple[str, ...] = ()) -> list[str]:
    if procs == 1:
        launcher = [sys.executable]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    cmd = launcher + ["train_dpo.py", "--cfg", "tiny", f"model.path={model}", f"data.root={data}",
                      f"output_dir={out}", "train.micro_batch_size=1", "train.grad_accum=1",
                      f"max_steps={steps}", "train.save_every=1", "train.keep_checkpoints=2", *extra]
    return cmd + (["--resume"] if resume else [])


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    env.pop("SA2VA_DPO_KILL_AT_STEP", None)
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's workers (its children with RANK in their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def kill9(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    """Wait for the launched process; if it hangs, kill it and its workers (by pid)."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill9(list(worker_pids(proc.pid).values()) + [proc.pid])
        proc.wait()
        return None


def wait_for(log: Path, proc: subprocess.Popen, pattern: re.Pattern, timeout: float) -> float | None:
    """Seconds until `pattern` appears in the log; None if the process ended first."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pattern.search(log.read_text(errors="replace")):
            return time.monotonic() - start
        if proc.poll() is not None:
            return None
        time.sleep(0.01)
    return None


@dataclass
class Timeline:
    anchor: float  # launch -> "training N steps"
    first: float  # launch -> the first checkpoint appears
    loop_end: float  # launch -> the last step's checkpoint appears
    total: float  # launch -> exit

    @property
    def end(self) -> float:
        """The end of the kill window: the loop, plus a fifth of it into the export."""
        return min(self.total, self.loop_end + 0.2 * (self.loop_end - self.anchor))

    @property
    def window(self) -> float:
        return self.end - self.anchor


def reference_run(procs: int, model: Path, data: Path, out: Path, steps: int) -> Timeline:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log = out.parent / f"{out.name}.log"
    start = time.monotonic()
    proc = launch(train_cmd(procs, model, data, out, steps), log)
    anchor = wait_for(log, proc, ANCHOR, 600)
    first_dir, last_dir = out / "checkpoints" / "step_0000001", out / "checkpoints" / f"step_{steps:07d}"
    first = loop_end = None
    while proc.poll() is None and loop_end is None:
        if first is None and first_dir.is_dir():
            first = time.monotonic() - start
        if last_dir.is_dir():
            loop_end = time.monotonic() - start
        time.sleep(0.01)
    code = wait_exit(proc, 600)
    total = time.monotonic() - start
    if code != 0 or anchor is None:
        raise RuntimeError(f"reference run failed ({code}); see {log}")
    return Timeline(anchor=anchor, first=first or anchor, loop_end=loop_end or total, total=total)


def tensors(file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(file))


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """(bit-identical, max |difference|) of two safetensors files."""
    import torch

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return False, float("inf")
    worst, same = 0.0, True
    for key in ta:
        if ta[key].shape != tb[key].shape or ta[key].dtype != tb[key].dtype:
            return False, float("inf")
        same = same and torch.equal(ta[key], tb[key])
        if ta[key].numel():
            worst = max(worst, float((ta[key].double() - tb[key].double()).abs().max()))
    return same, worst


def leftovers(out: Path) -> list[str]:
    """Temporary folders/files a killed write left (hidden names ending .tmp or .old)."""
    found = []
    for folder in (out, out / "checkpoints"):
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    return sorted(found)


@dataclass
class Kill:
    phase: str  # early | training | checkpointed
    delay: float  # seconds after the launch (early), the training line (training) or the first checkpoint
    victim: str  # process | all | rank0 | rank1
    landed: str = ""  # startup | between saves | during a save | export | after the end
    newest_complete: int | None = None  # step of the newest complete checkpoint the kill left
    temp_folders: list[str] = field(default_factory=list)
    resumed_from: int | None = None  # what the next run said (None = started fresh)


@dataclass
class Trial:
    procs: int
    index: int
    kills: list[Kill] = field(default_factory=list)
    exit_code: int | None = None
    resumed_correctly: bool = False
    metrics_steps_ok: bool = False
    no_leftovers: bool = False
    identical: bool = False
    identical_final: bool = False
    max_abs_diff: float = float("nan")

    @property
    def held(self) -> bool:
        return self.resumed_correctly and self.metrics_steps_ok and self.no_leftovers and self.identical \
            and self.identical_final


def _newest(out: Path) -> int | None:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from sa2va.checkpoint import latest_checkpoint

    last = latest_checkpoint(out)
    return None if last is None else int(last.name.split("_")[1])


def _landed(out: Path, finished: bool, log_text: str) -> str:
    if finished:
        return "after the end"
    temps = leftovers(out)
    if any(t.startswith(".final") for t in temps) or "exported" in log_text or (out / "final").exists():
        return "export"
    if any(t.startswith((".step_", ".best")) for t in temps):
        return "during a save"
    if not ANCHOR.search(log_text):
        return "startup"
    return "between saves"


def killed_run(procs: int, model: Path, data: Path, out: Path, steps: int, resume: bool, kill: Kill,
               log: Path) -> None:
    """Launch, kill at the drawn moment, record what the kill left."""
    start = time.monotonic()
    proc = launch(train_cmd(procs, model, data, out, steps, resume=resume), log)
    if kill.phase == "training":
        if wait_for(log, proc, ANCHOR, 600) is None:
            raise RuntimeError(f"run ended before training started; see {log}")
        time.sleep(kill.delay)
    elif kill.phase == "checkpointed":
        while proc.poll() is None and _newest(out) is None:
            time.sleep(0.01)
        time.sleep(kill.delay)
    else:
        time.sleep(max(0.0, kill.delay - (time.monotonic() - start)))
    finished = proc.poll() is not None
    if procs == 1:
        kill9([proc.pid])
    else:
        workers = worker_pids(proc.pid)
        if kill.victim == "all":
            kill9(list(workers.values()) + [proc.pid])
        else:
            rank = int(kill.victim[-1])
            kill9([workers[rank]] if rank in workers else [proc.pid])
    code = wait_exit(proc, 120)
    if code is None:
        kill.landed = "hung"
    kill.newest_complete = _newest(out)
    kill.temp_folders = leftovers(out)
    kill.landed = kill.landed or _landed(out, finished, log.read_text(errors="replace"))


def run_trial(procs: int, index: int, model: Path, data: Path, ref: Path, work: Path, timeline: Timeline,
              rng: random.Random, kills: int = 1, early: float = 0.2, checkpointed: bool = False) -> Trial:
    """One run with `kills` kills (each in the next resumed run), then a resume to the end.

    checkpointed=True draws the first kill after the first checkpoint exists (CI: the window
    before it is a known problem with its own test)."""
    steps = STEPS[procs]
    out = work / f"p{procs}_trial{index:02d}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trial = Trial(procs, index)
    for k in range(kills):
        if k == 0 and checkpointed:
            kill = Kill("checkpointed", rng.uniform(0.0, timeline.end - timeline.first), "all")
        elif k == 0 and rng.random() < early:
            kill = Kill("early", rng.uniform(0.0, timeline.anchor), "all")
        else:
            kill = Kill("training", rng.uniform(0.0, timeline.window), "all")
        kill.victim = "process" if procs == 1 else rng.choice(["all", "rank0", "rank1"])
        killed_run(procs, model, data, out, steps, resume=k > 0, kill=kill, log=work / f"{out.name}_kill{k}.log")
        trial.kills.append(kill)
    log = work / f"{out.name}_resume.log"
    proc = launch(train_cmd(procs, model, data, out, steps, resume=True), log)
    trial.exit_code = wait_exit(proc, 600)
    # Each run after a kill must start where the kill left things.
    logs = [work / f"{out.name}_kill{k}.log" for k in range(1, kills)] + [log]
    ok = True
    for kill, text in zip(trial.kills, (p.read_text(errors="replace") for p in logs)):
        match = RESUMED.search(text)
        kill.resumed_from = int(match.group(2)) if match else None
        if kill.landed == "hung":
            ok = False
        elif kill.newest_complete is None:
            ok = ok and FRESH in text and match is None
        else:
            ok = ok and kill.resumed_from == kill.newest_complete
    trial.resumed_correctly = ok and trial.exit_code == 0
    metrics = out / "metrics.jsonl"
    if metrics.is_file():
        recorded = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if x.strip()]
        trial.metrics_steps_ok = recorded == list(range(1, steps + 1))
    trial.no_leftovers = not leftovers(out)
    name = f"step_{steps:07d}"
    mine = out / "checkpoints" / name / "trained.safetensors"
    if mine.is_file():
        trial.identical, trial.max_abs_diff = compare(ref / "checkpoints" / name / "trained.safetensors", mine)
    final = out / "final" / "model.safetensors"
    if final.is_file():
        trial.identical_final, _ = compare(ref / "final" / "model.safetensors", final)
    if trial.held:
        shutil.rmtree(out, ignore_errors=True)  # keep the disk small; failures stay for a look
    return trial


def soak(work: Path, procs_list: list[int], kills: int, seed: int, early: float, kills_per_trial: int = 1,
         say=print) -> dict[int, list[Trial]]:
    work.mkdir(parents=True, exist_ok=True)
    model, data = make_inputs(work)
    results: dict[int, list[Trial]] = {}
    for procs in procs_list:
        rng = random.Random(f"{seed}-{procs}")
        ref = work / f"p{procs}_reference"
        timeline = reference_run(procs, model, data, ref, STEPS[procs])
        say(f"{procs} process(es): reference run {timeline.total:.1f} s, training loop from "
            f"{timeline.anchor:.1f} s to {timeline.loop_end:.1f} s (training-phase kills drawn over "
            f"{timeline.window:.1f} s)")
        results[procs] = []
        for i in range(kills):
            t = run_trial(procs, i, model, data, ref, work, timeline, rng, kills_per_trial, early)
            results[procs].append(t)
            for k in t.kills:
                say(f"  trial {i}: kill {k.victim} at {k.phase}+{k.delay:.2f}s -> landed {k.landed}, newest "
                    f"complete {k.newest_complete}, temp {k.temp_folders or '-'}; resumed from "
                    f"{k.resumed_from if k.resumed_from is not None else 'fresh'}")
            say(f"  trial {i}: {'held' if t.held else 'FAILED'} (resumed correctly {t.resumed_correctly}, "
                f"steps {t.metrics_steps_ok}, no leftovers {t.no_leftovers}, bit-identical {t.identical}, "
                f"final/ identical {t.identical_final}, max |diff| {t.max_abs_diff:.3g})")
    return results


def summary(results: dict[int, list[Trial]]) -> list[dict]:
    rows = []
    for procs, trials in results.items():
        kills = [k for t in trials for k in t.kills]
        landed = {}
        for k in kills:
            landed[k.landed] = landed.get(k.landed, 0) + 1
        rows.append({
            "processes": procs,
            "trials": len(trials),
            "kills": len(kills),
            "landed": landed,
            "resumed_from_newest_complete": sum(t.resumed_correctly for t in trials),
            "bit_identical": sum(t.identical and t.identical_final for t in trials),
            "held": sum(t.held for t in trials),
            "max_abs_diff": max((t.max_abs_diff for t in trials), default=0.0),
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/sa2va_fault_soak"))
    p.add_argument("--kills", type=int, default=10, help="trials per process count (one kill each)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--early", type=float, default=0.2, help="share of kills drawn before the training loop")
    args = p.parse_args(argv)
    started = time.time()
    results = soak(args.work, args.procs, args.kills, args.seed, args.early,
                   say=lambda *a: print(*a, flush=True))
    rows = summary(results)
    print("\nprocesses  kills  landed                                   resumed-from-newest  bit-identical  held")
    for r in rows:
        landed = ", ".join(f"{k} {v}" for k, v in sorted(r["landed"].items()))
        print(f"{r['processes']:>9}  {r['kills']:>5}  {landed:<40} {r['resumed_from_newest_complete']:>19}"
              f"  {r['bit_identical']:>13}  {r['held']:>4}/{r['trials']}")
    doc = {"command": " ".join([sys.executable.rsplit('/', 1)[-1], *sys.argv]), "seed": args.seed,
           "minutes": round((time.time() - started) / 60, 1), "summary": rows,
           "trials": {str(k): [asdict(t) for t in v] for k, v in results.items()}}
    (args.work / "soak.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.work / 'soak.json'}")
    return 0 if all(r["held"] == r["trials"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
