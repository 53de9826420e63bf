#!/usr/bin/env python
"""Stress the end of 2-process runs: many short runs, each resumed once, and how long each rank outlives its card.

Issue 23 saw one rank of a resumed 2-process run stay alive for 8 minutes after the model and card were written.
This starts ``--runs`` pairs (a 4-step run with checkpoints at steps 2 and 4, then a resume from step 2) under
``accelerate launch --multi_gpu --num_processes 2`` on the CPU, and reports, per run, the seconds from
``all_results.json`` appearing to the launcher's exit. A launcher still running ``--hang_s`` after its card gets
each rank's Python stack dumped (``py-spy dump`` when installed, else SIGUSR1 to faulthandler) and is killed.

    python tools/stress_ending.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def launch(out: Path, steps: int, resume: bool) -> list[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["--dataset", "synthetic", "--student_model_name_or_path", "config:segformer-tiny", "--distill", "kd",
            "--teacher_model_name_or_path", "config:segformer-tiny", "--max_train_steps", str(steps),
            "--per_device_train_batch_size", "2", "--crop_size", "32", "--max_train_samples", "16",
            "--max_eval_samples", "4", "--dataloader_num_workers", "1", "--checkpointing_steps", "2",
            "--output_dir", str(out)] + (["--resume_from_checkpoint", "latest"] if resume else [])
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(port), str(ROOT / "train_icsd.py"), *args]


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    return found


def dump_stacks(pid: int) -> str:
    ranks = children(pid)
    if shutil.which("py-spy"):
        return "\n".join(subprocess.run(["py-spy", "dump", "--native", "--pid", str(r)], capture_output=True,
                                        text=True).stdout for r in ranks)
    for rank in ranks:
        os.kill(rank, signal.SIGUSR1)
    time.sleep(2)
    return f"(SIGUSR1 sent to {ranks}: see the run's log)"


def one_run(out: Path, steps: int, resume: bool, hang_s: float, env: dict) -> tuple[float | None, str]:
    """Seconds from the card to the launcher's exit (None: the run failed), and a note."""
    log = out.parent / f"{out.name}-{steps}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(launch(out, steps, resume), cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    card_at = None
    while proc.poll() is None:
        if card_at is None and (out / "all_results.json").is_file():
            card_at = time.time()
        if card_at is not None and time.time() - card_at > hang_s:
            stacks = dump_stacks(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            return hang_s, f"HUNG: {log}\n{stacks}"
        time.sleep(0.05)
    if proc.returncode != 0 or card_at is None:
        return None, f"failed ({proc.returncode}): {log}"
    return time.time() - card_at, ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=10, help="Run pairs (a run, then its resume).")
    p.add_argument("--hang_s", type=float, default=60.0, help="Seconds after the card that count as a hang.")
    p.add_argument("--workdir", default=None, help="Where the runs go (default: a temporary folder).")
    args = p.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="stress-ending-"))
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1",
               PYTHONFAULTHANDLER="1")
    rows = []
    for i in range(args.runs):
        out = root / f"run{i:03d}"
        for steps, resume in ((4, False), (4, True)):
            if resume:  # back to the checkpoint of step 2: the resume trains steps 3-4 and writes the card again
                (out / "all_results.json").unlink(missing_ok=True)
                shutil.rmtree(out / "checkpoints" / "step_00000004", ignore_errors=True)
            seconds, note = one_run(out, steps, resume, args.hang_s, env)
            rows.append({"run": i, "resumed": resume, "seconds_after_card": seconds, "note": note})
            print(f"run {i} {'resume' if resume else 'start '}: "
                  f"{'failed' if seconds is None else f'{seconds:.2f} s after the card'} {note}", flush=True)
    done = [r["seconds_after_card"] for r in rows if r["seconds_after_card"] is not None]
    hung = [r for r in rows if r["note"].startswith("HUNG")]
    print(f"\n{len(rows)} runs, {len(rows) - len(done)} failed, {len(hung)} hung; seconds from card to exit: "
          f"max {max(done, default=0):.2f}, mean {sum(done) / max(len(done), 1):.2f}")
    (root / "stress.json").write_text(json.dumps(rows, indent=2))
    return 1 if hung or len(done) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
