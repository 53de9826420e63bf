"""Shared by the end-to-end tests: run train_icsd.py as a user would, as a plain process or under
`accelerate launch`, on the CPU and offline."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
TINY = "config:segformer-tiny"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
ENV.pop("HF_TOKEN", None)


def free_port() -> int:
    """A TCP port free on this machine now: each multi-process launch gets its own, so a run that failed and
    left a rank behind cannot block the next test's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script_cmd(args) -> list:
    """``python train_icsd.py ARGS``: what `accelerate launch` runs in each process."""
    return [sys.executable, str(ROOT / "train_icsd.py"), *map(str, args)]


def launcher_cmd(args, nproc: int = 1) -> list:
    """``accelerate launch ... train_icsd.py ARGS`` with ``nproc`` CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    if nproc > 1:
        # `--cpu --num_processes 2` silently starts one process; --multi_gpu with ACCELERATE_USE_CPU starts two.
        cmd += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(free_port())]
    else:
        cmd += ["--num_processes", "1"]
    return cmd + [str(ROOT / "train_icsd.py"), *map(str, args)]


def launch(args, *, nproc: int = 1, check: bool = True, timeout: int = 300,
           threads: int | None = None) -> subprocess.CompletedProcess:
    """Run train_icsd.py under `accelerate launch` on the CPU (``threads`` per process: 1 with several processes,
    else $OMP_NUM_THREADS or 2); with ``check``, fail the test on a non-zero exit."""
    threads = str(threads or (1 if nproc > 1 else os.environ.get("OMP_NUM_THREADS", 2)))
    env = dict(ENV, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=threads)
    proc = subprocess.run(launcher_cmd(args, nproc), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_icsd.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def numpy_metrics(preds, labels, num_labels, ignore_index):
    """mIoU, mean and overall accuracy of integer maps, written independently of the script with numpy."""
    inter = np.zeros(num_labels)
    area_pred = np.zeros(num_labels)
    area_label = np.zeros(num_labels)
    for p, l in zip(preds, labels):
        keep = l != ignore_index
        p, l = p[keep], l[keep]
        for c in range(num_labels):
            inter[c] += np.sum((p == c) & (l == c))
            area_pred[c] += np.sum(p == c)
            area_label[c] += np.sum(l == c)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_label
    return {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": inter.sum() / area_label.sum(), "per_category_iou": iou}


class Ran:
    """What an in-process run of train_icsd.py left: its exit status and everything it wrote to stderr."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def run_inprocess(args) -> Ran:
    """``train_icsd.py ARGS`` in this process, through the same ``cli()`` a plain ``python train_icsd.py`` runs:
    exit status and stderr, without the ~5 s of imports a subprocess pays. Accelerate's process-wide state, the
    SIGTERM handler and the output folder's lock are reset afterwards, so runs do not see each other."""
    import contextlib
    import io
    import signal

    from accelerate.state import AcceleratorState, GradientState

    import train_icsd
    import utils_training

    import torch

    stderr, handler, threads = io.StringIO(), signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    torch.set_num_threads(int(ENV["OMP_NUM_THREADS"]))  # as in a subprocess: the same float summation order
    try:
        with contextlib.redirect_stderr(stderr):
            status = train_icsd.cli([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, handler)
        utils_training.release_locks()
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return Ran(status, stderr.getvalue())


def train_ok(args) -> Ran:
    """An in-process run (:func:`run_inprocess`) that must succeed."""
    ran = run_inprocess(args)
    if ran.returncode != 0:
        raise AssertionError(f"train_icsd.py failed ({ran.returncode}):\n{ran.stderr[-4000:]}")
    return ran
