"""The operations code behind ``train_icsd.py``, so that the script reads as the recipe.

What is here, in the order the script meets it:

* :class:`UsageError` and :func:`run_cli`: user mistakes end as one line on stderr with exit status 2;
  :func:`report_saved_model`: a failure after the trained model is saved says where it is, in one line;
* :class:`EpochShuffleSampler` and :func:`lr_factor`: data order and learning rate as pure functions of
  counters, which is what makes a resumed run exact;
* :func:`install_stop_handlers` / :func:`stop_requested`: SIGTERM (preemption) or the launcher's death asks
  for a checkpoint and a clean exit at the next optimizer step (or evaluation batch);
* :class:`LossTracker`: the loss terms of each micro-batch kept on the device, non-finite flags included,
  with one small all-reduce per optimizer step so that every process takes the same decision;
  :class:`BufferSnapshot`: a skipped step leaves the BatchNorm statistics as they were;
* :func:`claim_output_dir`: one run per output folder (``run.json``), one process at a time (``run.lock``),
  a writable folder, all checked before anything else;
* :class:`ExportWriter`, :func:`save_checkpoint`: the export and checkpoints written all or nothing; a full
  disk is one line naming the folder and the bytes needed;
* :class:`TrainState`, :func:`resume_or_start`, :func:`load_checkpoint`: resume, past damaged checkpoints
  to the newest whole one of this run;
* :func:`check_finite_model`: a NaN/Inf parameter or buffer is never saved;
* :class:`MetricLogger`: trackers and the ``--log_file`` JSON lines;
* :func:`confusion_matrix` / :func:`metrics_from_confusion`: the evaluation metrics.

It imports torch, accelerate and (for folder and file names) utils_hub.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import fnmatch
import gc
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import pickle
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from torch.utils.data import Sampler

from utils_hub import CHECKPOINT_DIR, TRACKER_DIR, UPLOAD_PATTERNS, source_kind

try:
    import fcntl
except ImportError:  # not POSIX: output folders are not locked
    fcntl = None

logger = get_logger(__name__)

STATE_FILE = "training_state.json"


class UsageError(ValueError):
    """A problem with the user's input, reported as one line before any training step."""


class AfterTrainingError(RuntimeError):
    """A failure after the trained model was saved (final evaluation, pictures, card, push): one line that says
    where the model is."""


@contextmanager
def report_saved_model(output_dir: str) -> Iterator[None]:
    """Turn any failure inside into an :class:`AfterTrainingError` whose one line says the model is saved."""
    try:
        yield
    except Exception as err:
        raise AfterTrainingError(
            f"after training, the final evaluation or export failed ({type(err).__name__}: {one_line(err)}); "
            f"the trained model is saved in {output_dir} (from_pretrained loads it)") from err


# ---------------------------------------------------------------------------------------------------------
# Data order and learning-rate schedule: pure functions of counters, so a resumed run is exact
# ---------------------------------------------------------------------------------------------------------
class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` only.

    Every process draws the same permutation (Accelerate then gives each its share of the batches), and a
    resumed run draws the one an uninterrupted run would. Nothing is taken from the global RNG.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose permutation the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def lr_factor(step: int, total: int, kind: str, warmup: int = 0, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``.

    ``kind`` is ``poly`` (``(1 - progress) ** power``), ``linear``, ``cosine`` or ``constant``; a linear warm-up
    over the first ``warmup`` steps comes first.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    if kind == "poly":
        return (1.0 - progress) ** power
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


# ---------------------------------------------------------------------------------------------------------
# Stop requests: SIGTERM (preemption) or the launcher's death asks for a checkpoint and a clean exit
# ---------------------------------------------------------------------------------------------------------
_STOP_CAUSE: str | None = None  # the first reason this process was asked to stop (None: not asked)


def _request_stop(cause: str) -> None:
    global _STOP_CAUSE
    _STOP_CAUSE = _STOP_CAUSE or cause


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    _request_stop("SIGTERM")


def stop_requested() -> bool:
    """Whether this process has been asked to stop (SIGTERM, or its launcher died)."""
    return _STOP_CAUSE is not None


def stop_cause() -> str:
    """Why training stops early, in words: this process's first stop request, or, when all processes agreed to
    stop on another's request, that."""
    return _STOP_CAUSE or "a stop request of another process"


def install_stop_handlers() -> None:
    """Turn SIGTERM and the launcher's death into a stop request, and never hang at exit on workers."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    _follow_launcher()
    atexit.register(kill_dataloader_workers)  # registered after multiprocessing's atexit handler: runs before it


def worker_init(_: int) -> None:
    """DataLoader ``worker_init_fn``: workers outlive a SIGTERM sent to the process group until the main
    process has saved its checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_dataloader_workers() -> None:
    """Stop this process's DataLoader workers at once; for a process that is about to exit.

    After an error, a DataLoader iterator may still hold its workers: at exit, multiprocessing stops such
    daemonic children with SIGTERM, which ours ignore, and then joins them - forever; and torch's own
    shutdown, when garbage collection gets to the iterator, waits 5-10 s.
    """
    if hasattr(signal, "SIGCHLD"):  # torch's handler would report the kills as worker crashes
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


LAUNCHER_GRACE_S = 30.0  # after the launcher's death: time to save a checkpoint before the process ends itself
_POLL_S = 0.5


def _follow_launcher() -> None:
    """Under a launcher (``accelerate launch``, torchrun), ask for a stop when the launcher dies.

    torchrun (which ``accelerate launch`` runs for several processes) starts every rank in a session of its own,
    and the single-process ``accelerate launch`` does not forward SIGTERM: a launcher killed with ``kill -9``, or
    one whose process group was killed, would leave the ranks training on with PPID 1, writing checkpoints and
    the export. A daemon thread watches the parent instead (a thread, unlike a signal handler, also runs while
    the main thread waits in a collective): once the parent is gone it requests a stop, which saves a checkpoint
    at the next optimizer step (or evaluation batch) as SIGTERM does; a process still alive
    ``LAUNCHER_GRACE_S`` later (a collective waiting for a rank that died) ends itself, leaving the previous
    checkpoint. A plain ``python train_icsd.py`` is not watched: its parent is a shell, which may go away
    under ``nohup``.
    """
    parent = os.getppid()
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's agent is the parent of each rank
        try:
            parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[:3]
        except OSError:
            return
        if not any(b"accelerate" in arg for arg in parent_argv):  # `accelerate launch`, `-m accelerate.commands.launch`
            return
    threading.Thread(target=_watch_launcher, args=(parent,), name="launcher-watch", daemon=True).start()


def _watch_launcher(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    _request_stop("the launcher's exit")
    print(f"[pid {os.getpid()}] the launcher (pid {parent}) is gone: saving a checkpoint and exiting", file=sys.stderr,
          flush=True)
    time.sleep(LAUNCHER_GRACE_S)
    print(f"[pid {os.getpid()}] still running {LAUNCHER_GRACE_S:.0f} s after the launcher died: exiting now "
          "(the previous checkpoint is kept)", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():  # DataLoader workers: os._exit runs no atexit handler
        child.kill()
    os._exit(1)


# ---------------------------------------------------------------------------------------------------------
# The loss terms between optimizer steps, and the decision each step takes from them
# ---------------------------------------------------------------------------------------------------------
@dataclass
class StepOutcome:
    """What all processes agreed on at the end of one optimizer step."""

    nonfinite_term: str | None  # the first non-finite logged term on this process, None if all were finite
    stop: bool  # some process was asked to stop
    skipped_samples: int  # undecodable samples met since the last step, summed over processes


class LossTracker:
    """Sums of the logged loss terms and their non-finite flags, kept on the device.

    ``keys`` are the logged names, ``"loss"`` first. Checking each micro-batch's loss on the host would
    synchronise the GPU every micro-batch; instead :meth:`end_step` runs one small all-reduce per optimizer
    step, which also sums the skipped-sample counts so that checkpoints and results cover all processes.
    """

    def __init__(self, keys: Sequence[str], device: torch.device) -> None:
        self.keys = list(keys)
        self.sums = torch.zeros(len(self.keys) + 1, device=device)  # the terms' sums, then the batch count
        self.nonfinite = torch.zeros(len(self.keys), dtype=torch.bool, device=device)
        self.pending_skipped = 0  # undecodable samples met since the last optimizer step, on this process

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Record one micro-batch; a batch whose samples were all skipped (``terms`` empty) is not counted."""
        if not terms:
            return
        values = torch.stack([loss.detach(), *(terms[k] for k in self.keys[1:])]).float()
        self.nonfinite |= ~torch.isfinite(values)
        self.sums[:-1] += values
        self.sums[-1] += 1

    def end_step(self, accelerator: Accelerator, stop: bool) -> StepOutcome:
        """Agree with every process on non-finite terms, stop requests and skipped samples; reset the flags."""
        device = accelerator.device
        flags = torch.stack([self.nonfinite.any().float(), torch.tensor(float(stop), device=device),
                             torch.tensor(float(self.pending_skipped), device=device)])
        any_nonfinite, any_stop, skipped = accelerator.reduce(flags, reduction="sum").tolist()
        term = None
        if any_nonfinite:
            bad = [k for k, flag in zip(self.keys, self.nonfinite.tolist()) if flag]
            term = next((k for k in bad if k != "loss"), bad[0] if bad else "on another process")
        self.nonfinite.zero_()
        self.pending_skipped = 0
        return StepOutcome(nonfinite_term=term, stop=bool(any_stop), skipped_samples=int(skipped))

    def averages(self, accelerator: Accelerator) -> dict[str, float]:
        """``{"train/<key>": mean}`` over the batches since the last call and over all processes; resets."""
        totals = accelerator.reduce(self.sums, reduction="sum").tolist()
        self.sums.zero_()
        return {f"train/{k}": v / max(totals[-1], 1.0) for k, v in zip(self.keys, totals)}


class BufferSnapshot:
    """The model's buffers (BatchNorm running statistics) as they were before the current optimizer step.

    A skipped step (``--skip_nonfinite_steps``) must leave the model exactly as it was, but the forward passes
    of its micro-batches have already moved the running statistics, to NaN when the activations overflowed.
    :meth:`start_step` copies every buffer at the first micro-batch of an optimizer step (copies on the device,
    no host sync; BatchNorm buffers are small) and :meth:`end_step` copies them back when the step is skipped.
    """

    def __init__(self, model: torch.nn.Module, enabled: bool = True) -> None:
        self.buffers = list(model.buffers()) if enabled else []  # not enabled: a non-finite step ends the run
        self.saved = [b.detach().clone() for b in self.buffers]
        self.in_step = False

    def start_step(self) -> None:
        """Call before each micro-batch's forward pass; copies the buffers at the first one of a step."""
        if not self.in_step:
            for saved, buffer in zip(self.saved, self.buffers):
                saved.copy_(buffer)
            self.in_step = True

    def end_step(self, skipped: bool) -> None:
        """Call once the step's fate is known: a skipped step gets the buffers of its start back."""
        if skipped:
            for saved, buffer in zip(self.saved, self.buffers):
                buffer.copy_(saved)
        self.in_step = False


class MetricLogger:
    """Send metrics to the trackers (``--with_tracking``) and, from the main process, to ``--log_file``."""

    def __init__(self, accelerator: Accelerator, with_tracking: bool, log_file: str | None) -> None:
        self.accelerator, self.with_tracking, self.log_file = accelerator, with_tracking, log_file

    def __call__(self, logs: dict, step: int) -> None:
        if self.with_tracking:
            self.accelerator.log(logs, step=step)
        if self.log_file and self.accelerator.is_main_process:
            with open(self.log_file, "a") as f:  # reopened each time: nothing is lost to a kill but the line
                f.write(json.dumps({"step": step, **logs}) + "\n")


def show_progress_bars(accelerator: Accelerator) -> bool:
    """Progress bars on the local main process, and only on a terminal: in a log file their ``\\r`` frames are noise."""
    return accelerator.is_local_main_process and sys.stderr.isatty()


def quiet_library_progress_bars(accelerator: Accelerator) -> None:
    """Switch off the progress bars of transformers, datasets and huggingface_hub where ours are off."""
    if show_progress_bars(accelerator):
        return
    import datasets
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def one_line_warnings() -> None:
    """Print Python warnings as ``UserWarning: message``, one line, without the source line they point at."""
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"


def plural(count: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_metrics(metrics: dict, prefix: str = "") -> str:
    """``mIoU 41.75 %, mean acc 51.41 %, pixel acc 76.59 %`` from ``{prefix}mean_iou`` and the accuracies."""
    names = (("mean_iou", "mIoU"), ("mean_accuracy", "mean acc"), ("overall_accuracy", "pixel acc"))
    return ", ".join(f"{label} {'n/a' if metrics.get(prefix + key) is None else f'{100 * metrics[prefix + key]:.2f} %'}"
                     for key, label in names)


def format_train_log(step: int, total: int, logs: dict) -> str:
    """One log-file line: ``step 20/300: loss 1.2345, ce 0.8123, ..., alpha 0.063, lr 9.40e-04``.

    The raw (unweighted) terms stay in the trackers and ``--log_file``.
    """
    terms = [f"{k[6:]} {v:.4f}" for k, v in logs.items()
             if k.startswith("train/") and k[6:] not in ("lr", "epoch", "alpha") and not k[6:].startswith("raw_")]
    if "train/alpha" in logs:
        terms.append(f"alpha {logs['train/alpha']:.3f}")
    terms.append(f"lr {logs['train/lr']:.2e}")
    return f"step {step}/{total}: " + ", ".join(terms)


# ---------------------------------------------------------------------------------------------------------
# The output folder: one run per folder, one process at a time, writes that fail in one line
# ---------------------------------------------------------------------------------------------------------
RUN_FILE = "run.json"  # the record of the run that owns the folder: its id and the settings that define it
LOCK_FILE = "run.lock"  # pid and host of the process writing to the folder, while it runs
EXPORT_STAGING = ".export-tmp"  # the export while it is written
EXPORT_READY = ".export-ready"  # a complete export while it is moved into place
# The flags that define a run: resuming with other values would not continue the same training.
RUN_SETTINGS = (
    "distill", "lambda_ics", "lambda_kd", "lambda_cwd", "lambda_ickd", "temperature", "alw_granularity",
    "student_model_name_or_path", "teacher_model_name_or_path",
    "dataset", "dataset_name", "dataset_config_name", "train_split", "validation_split", "max_train_samples",
    "crop_size", "seed",
    "per_device_train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
    "learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps",
)
WRITE_FAILED = "the write failed"  # torch.save's writer reports no errno
_LOCKS: dict[Path, int] = {}  # lock file -> the descriptor holding its lock, in this process


class OutputError(UsageError):
    """The output folder cannot be used: not writable, full, or in use by another run."""


def run_settings(args: argparse.Namespace) -> dict[str, object]:
    """The values of :data:`RUN_SETTINGS` in ``args``, as ``run.json`` stores them.

    A local folder is recorded by its name and a fingerprint of its absolute path, never the path itself
    (nothing in the output folder names this machine's paths); the teacher only when the objective uses it.
    """
    settings = {}
    for name in RUN_SETTINGS:
        value = getattr(args, name, None)
        if name == "teacher_model_name_or_path" and args.distill == "none":
            value = None
        if isinstance(value, str) and source_kind(value) == "local":
            path = Path(value).expanduser().resolve()
            value = f"local folder {path.name} #{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
        settings[name] = value
    return json.loads(json.dumps(settings))  # tuples as lists, as a reread run.json holds them


def settings_differences(ours: dict, theirs: dict) -> list[str]:
    """``--flag A here, B there`` for each setting both record with different values."""
    return [f"--{name} {ours[name]} here, {theirs[name]} there" for name in RUN_SETTINGS
            if name in ours and name in theirs and ours[name] != theirs[name]]


@dataclass
class Run:
    """The run this process belongs to (:func:`claim_output_dir`): its folder, settings and id."""

    output_dir: Path
    settings: dict
    run_id: str | None  # None until resume takes the id of the checkpoint it continues (copied checkpoints)

    def record(self) -> dict:
        return {"run_id": self.run_id, "settings": self.settings}


def read_run(output_dir: str | Path) -> dict | None:
    """The record in ``output_dir/run.json`` (``run_id``, ``settings``), None without one; ValueError if unreadable."""
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(str(err)) from None
    if not isinstance(record, dict) or not isinstance(record.get("settings"), dict) or not record.get("run_id"):
        raise ValueError("no run_id and settings in it")
    return record


def claim_output_dir(accelerator: Accelerator, args: argparse.Namespace) -> Run:
    """Take ``--output_dir`` for this run, before anything else is done, or raise a one-line error.

    The main process creates and locks the folder (``run.lock`` with its pid and host: a second run on the folder
    is refused; the lock of a dead process of this host is taken over with a warning), which also proves the
    folder writable; finishes what a killed run left half done; and decides from what the folder holds
    (:func:`_decide`). Every process learns the decision before going on.
    """
    settings = run_settings(args)
    decision, failure = ("ok", None), None
    if accelerator.is_main_process:
        try:
            decision = ("ok", _claim(Path(args.output_dir), settings, args))
        except Exception as err:
            decision, failure = (type(err).__name__, one_line(err)), err
    if accelerator.num_processes > 1:
        shared = [decision]
        broadcast_object_list(shared, from_process=0)
        decision = shared[0]
    if failure is not None:
        raise failure
    kind, value = decision
    if kind != "ok":
        raise (OutputError if kind == "OutputError" else UsageError)(value)
    return Run(Path(args.output_dir), settings, value)


def _claim(out: Path, settings: dict, args: argparse.Namespace) -> str | None:
    """The main process's part of :func:`claim_output_dir`; returns the run id (None: adopt the checkpoint's)."""
    for flag in ("teacher_model_name_or_path", "student_model_name_or_path", "dataset_name"):
        source = getattr(args, flag, None)
        if source and Path(source).expanduser().is_dir() and Path(source).expanduser().resolve() == out.resolve():
            raise UsageError(f"--output_dir {out} is the folder of --{flag}: this run would write over what it "
                             "reads; choose another --output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--output_dir {out}: cannot create it ({err.strerror or err}); choose a writable "
                          "folder") from None
    _lock(out)
    _finish_interrupted_writes(out)
    run_id = _decide(out, settings, args.resume_from_checkpoint, getattr(args, "overwrite_output_dir", False))
    check_log_file(getattr(args, "log_file", None))
    return run_id


def check_log_file(path: str | None) -> None:
    """Fail now, in one line, if ``--log_file`` cannot be appended to; otherwise the first logging step would.

    Creates missing parent folders, but not the file: a run that stops before its record (``run.json``) must
    leave no file that would make its output folder look like someone else's to the next run.
    """
    if not path:
        return
    log = Path(path).expanduser()
    if log.is_dir():
        raise OutputError(f"--log_file {path} is a folder: pass a file path such as {log / 'metrics.jsonl'}")
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        if log.exists():
            with open(log, "a"):
                pass
        else:  # a dot-named probe: ignored by the foreign-file check should the run die right here
            fd, probe = tempfile.mkstemp(dir=log.parent, prefix=".log-probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OutputError(f"--log_file {path}: cannot write there ({err.strerror or err}); choose a writable "
                          "path") from None


def _decide(out: Path, settings: dict, resume: str | None, overwrite: bool) -> str | None:
    """Whose folder ``out`` is: the run recorded in ``run.json`` (resumed only with the same settings, otherwise
    refused while it left checkpoints or an export), files no run of ours wrote (refused), or checkpoints without
    a record (resumed from, adopting their run). ``overwrite`` starts a new run whatever the folder holds."""
    new_id = uuid.uuid4().hex
    try:
        previous = read_run(out)
    except ValueError as err:
        if not overwrite:
            raise UsageError(f"{out / RUN_FILE} cannot be read ({err}): pass --overwrite_output_dir to start a new "
                             f"run in {out}, or choose another --output_dir") from None
        previous = None
    if previous is not None:
        differences = settings_differences(settings, previous["settings"])
        if resume is not None and not differences:
            return previous["run_id"]  # the same run, continued
        summary = "; ".join(differences[:3]) if differences else "with the same settings"
        if overwrite:
            left = [f"its {len(found)} checkpoint(s) stay but are no longer used"
                    for found in [list_checkpoints(out, previous["run_id"])] if found]
            left += ["its export is replaced at the end"] if _export_files(out) else []
            logger.warning(f"--overwrite_output_dir: {out} held another run ({summary})"
                           + "".join(f"; {part}" for part in left))
            return new_id
        if resume is not None:
            raise UsageError(f"--resume_from_checkpoint {resume}: the run in {out} had other settings: "
                             f"{'; '.join(differences)}; resume with its settings, or pass --overwrite_output_dir "
                             "to start a new run there")
        if list_checkpoints(out, previous["run_id"]) or _export_files(out):
            raise UsageError(f"--output_dir {out} holds another run ({summary}): pass --resume_from_checkpoint "
                             "latest to continue it, --overwrite_output_dir to replace it, or choose another "
                             "--output_dir")
        return new_id  # that run stopped before writing anything worth keeping
    foreign = sorted(p.name for p in out.iterdir()
                     if not p.name.startswith(".") and p.name not in (LOCK_FILE, TRACKER_DIR, CHECKPOINT_DIR))
    checkpoints = list_checkpoints(out)
    if overwrite:
        if foreign or checkpoints:
            logger.warning(f"--overwrite_output_dir: writing into {out}, which holds files of no run of this one "
                           f"({', '.join(foreign + [CHECKPOINT_DIR] * bool(checkpoints))})")
        return new_id
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise UsageError(f"--output_dir {out} holds files this run did not write ({shown}): it may be a model, a "
                         "dataset or another project; choose an empty or new folder, or pass --overwrite_output_dir "
                         "to write into it anyway")
    if checkpoints and resume is None:
        raise UsageError(f"--output_dir {out} holds checkpoints of a run it has no record of ({checkpoints[-1].name}"
                         f"{', ...' if len(checkpoints) > 1 else ''}): pass --resume_from_checkpoint latest to "
                         "continue from them, --overwrite_output_dir to start a new run there, or choose another "
                         "--output_dir")
    return None if checkpoints else new_id


def _export_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file() and _is_export_file(p.name))


def _is_export_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in UPLOAD_PATTERNS)


def _is_weights(name: str) -> bool:
    return name.endswith(".safetensors") or name.startswith(("model.safetensors.index", "pytorch_model"))


def _lock(out: Path) -> None:
    """Hold ``out/run.lock`` until this process exits, or raise a one-line error.

    A POSIX record lock: the kernel drops it when the process dies (however), DataLoader workers forked later
    do not inherit it, and it works on NFS. The file says who holds it; at exit it is deleted.
    """
    if fcntl is None:  # not POSIX: no lock
        return
    path = out / LOCK_FILE
    host = socket.gethostname()
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputError(f"--output_dir {out}: cannot write there ({err.strerror or err}); choose a writable "
                              "folder") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"--output_dir {out} is in use by another run (pid {holder.get('pid', '?')} on "
                              f"{holder.get('host', '?')}, since {holder.get('started', '?')}): wait for it to end, "
                              "or choose another --output_dir") from None
        try:  # the holder deletes the file as it exits: make sure the locked file is the one at the path
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        holder = _lock_holder(fd)
        if holder and holder.get("host") != host:
            os.close(fd)
            raise OutputError(f"{path} names pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, which "
                              f"cannot be checked from {host}: if that run has ended, delete {path}")
        if holder:
            logger.warning(f"{path}: taking over the lock of pid {holder.get('pid', '?')} (since "
                           f"{holder.get('started', '?')}), which is no longer running")
        me = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            data, offset = json.dumps(me).encode(), 0
            while offset < len(data):  # a write cut short by a full disk fails on the next one
                offset += os.pwrite(fd, data[offset:], offset)
            os.fsync(fd)
        except OSError as err:
            path.unlink(missing_ok=True)
            os.close(fd)
            raise OutputError(f"--output_dir {out}: cannot write there ({err.strerror or err}); choose a writable "
                              "folder") from None
        if not _LOCKS:
            atexit.register(release_locks)
        _LOCKS[path] = fd
        return
    raise OutputError(f"{path}: could not take the lock (another run keeps taking it)")


def _lock_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode()
        return json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {"pid": "unknown (unreadable lock file)"}


def release_locks() -> None:
    """Delete and unlock the lock files this process holds (at exit)."""
    for path, fd in list(_LOCKS.items()):
        try:
            path.unlink()
        except OSError:
            pass
        os.close(fd)
        del _LOCKS[path]


def _finish_interrupted_writes(out: Path) -> None:
    """Complete or clear what a killed run left half done: a checkpoint rotation (``.del-*``), a checkpoint save
    (``.tmp-*``), an export being written (``.export-tmp``) or being moved into place (``.export-ready``)."""
    root = out / CHECKPOINT_DIR
    for stale in [*root.glob(".del-*"), *root.glob(".tmp-*"), out / EXPORT_STAGING]:
        shutil.rmtree(stale, ignore_errors=True)
    if (out / EXPORT_READY).is_dir():
        logger.warning(f"{out}: finishing the export that an interrupted run was moving into place")
        _move_export(out / EXPORT_READY, out)


def _write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# Writes that fail (a full disk, a quota, a read-only folder): one line on every process
# ---------------------------------------------------------------------------------------------------------
def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers: about what its weights take on disk."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def write_failure(err: BaseException) -> str | None:
    """Why a write failed (``"No space left on device"``, ...), or None when ``err`` is no write failure."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    text = str(err)
    found = re.search(r"\(os error (\d+)\)", text)  # safetensors' I/O errors
    if found:
        return os.strerror(int(found.group(1)))
    if "inline_container.cc" in text or "PytorchStreamWriter" in text:  # torch.save's, without the errno
        return WRITE_FAILED
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _after_write(accelerator: Accelerator, error: BaseException | None, what: str, folder: Path, needed: int,
                 cleanup: Path | None = None) -> None:
    """Agree with every process on whether a write failed; if one did, remove ``cleanup`` and raise on all.

    A write failure becomes :class:`OutputError` naming ``folder`` and the ``needed`` bytes; any other error is
    raised as it is on its process (a bug keeps its traceback).
    """
    reason = None if error is None else (write_failure(error) or "")
    reasons = [reason] if accelerator.num_processes == 1 else gather_object([reason])
    failed = [(index, r) for index, r in enumerate(reasons) if r is not None]
    if not failed:
        return
    if cleanup is not None and accelerator.is_main_process:
        shutil.rmtree(cleanup, ignore_errors=True)
    if error is not None and not reason:
        raise error
    index, reason = (accelerator.process_index, reason) if error is not None else failed[0]
    if not reason:
        raise OutputError(f"process {index} failed while writing {what} to {folder} (its error is above)")
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    if reason == WRITE_FAILED and free is not None and free < needed:
        reason = os.strerror(errno.ENOSPC)
    room = f"; {_mb(free)} free there" if free is not None else ""
    raise OutputError(f"cannot write {what} to {folder}: {reason} (it needs about {_mb(needed)}{room}); free some "
                      "space or choose another --output_dir, then resume with --resume_from_checkpoint latest")


class ExportWriter:
    """``with ExportWriter(accelerator, output_dir, needed_bytes) as staging:`` the main process writes the
    export into ``staging`` (``OUTPUT/.export-tmp``); on leaving, the complete export is moved into ``OUTPUT``
    (:func:`publish_export`). All or nothing: a write that fails (a full disk, a quota, a read-only folder)
    removes the staging folder, leaves ``OUTPUT`` as it was and raises :class:`OutputError` on every process,
    naming the folder and the bytes the export needs. Every process enters and leaves it: they agree on the outcome.
    """

    def __init__(self, accelerator: Accelerator, output_dir: str | Path, needed_bytes: int,
                 keep_others: bool = False) -> None:
        self.accelerator, self.out, self.needed = accelerator, Path(output_dir), needed_bytes
        self.keep_others = keep_others  # True: the files join the export (the card after the model), not replace it
        self.staging = self.out / EXPORT_STAGING
        self.error: BaseException | None = None

    def __enter__(self) -> Path:
        if self.accelerator.is_main_process:
            try:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging.mkdir(parents=True)
            except OSError as err:
                self.error = err
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> bool:
        error = self.error or exc
        if error is None and self.accelerator.is_main_process:
            try:
                publish_export(self.staging, self.out, self.keep_others)
            except Exception as err:
                error = err
        _after_write(self.accelerator, error, "the export", self.out, self.needed, cleanup=self.staging)
        return False


def publish_export(staging: Path, out: Path, keep_others: bool = False) -> None:
    """Move the complete export in ``staging`` into ``out``, never showing new files beside old weights.

    ``staging`` is renamed ``.export-ready`` first (from then on an interrupted move is finished at the next
    start); the previous export's files that the new one lacks are deleted (unless ``keep_others``: files that
    join an export already in place); then :func:`_move_export`.
    """
    ready = out / EXPORT_READY
    shutil.rmtree(ready, ignore_errors=True)
    new = {p.name for p in staging.iterdir()}
    stale = [] if keep_others else [
        p for p in out.iterdir() if p.is_file() and _is_export_file(p.name) and p.name not in new]
    os.replace(staging, ready)
    for path in stale:
        path.unlink(missing_ok=True)
    _move_export(ready, out)


def _move_export(ready: Path, out: Path) -> None:
    """Rename the files of ``ready`` into ``out``: the previous weights are deleted first and the new weights
    come last, so a folder caught midway holds no weights (it fails to load, loudly) rather than a new
    config.json beside old weights."""
    names = sorted((p.name for p in ready.iterdir()), key=_is_weights)
    if any(_is_weights(name) for name in names):
        for path in out.iterdir():
            if path.is_file() and _is_weights(path.name):
                path.unlink()
    for name in names:
        _fsync_dir(ready / name)
        os.replace(ready / name, out / name)
    # Not _fsync_dir(out): opening and closing run.lock would drop this process's lock on it (POSIX locks).
    _fsync_dir(out, files=False)
    shutil.rmtree(ready)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: written to a hidden folder, then renamed, so `latest` never picks a half-written one
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint as ``training_state.json``."""

    completed_steps: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0

    def to_json(self, **run: object) -> dict:
        """The counters plus ``run`` (the schedule and mode, recorded for whoever reads the checkpoint)."""
        return {**asdict(self), **run}


_CKPT_RE = re.compile(r"^step_(\d+)$")


def _step(path: Path) -> int:
    return int(_CKPT_RE.match(path.name).group(1))


def _recorded_run_id(path: Path) -> str | None:
    """The run id a checkpoint's state file records; None when it records none or cannot be read."""
    try:
        return (json.loads((path / STATE_FILE).read_text()).get("run") or {}).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """The complete checkpoints under ``output_dir/checkpoints`` (their state file written), oldest first.

    With ``run_id``, only that run's, and those whose state file cannot be read (resume reports them as
    damaged; rotation leaves them alone).
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    if run_id is not None:
        found = [p for p in found if _recorded_run_id(p) == run_id or _unreadable_state(p)]
    return sorted(found, key=_step)


def _unreadable_state(path: Path) -> bool:
    try:
        return not isinstance(json.loads((path / STATE_FILE).read_text()), dict)
    except (OSError, ValueError):
        return True


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or floating-point buffer (BatchNorm running statistics) holding NaN/Inf;
    None when every one is finite. Reads each tensor's verdict on the host: for occasional checks only."""
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    return next((name for name, t in tensors if not torch.isfinite(t).all()), None)


def check_finite_model(model: torch.nn.Module, what: str) -> None:
    """Raise FloatingPointError (one line for the user) if ``model`` holds NaN/Inf: such a model is never saved."""
    # A finite loss can still give a non-finite update (an overflowing gradient, a huge learning rate); with
    # --skip_nonfinite_steps the run would then skip every later step. The previous checkpoint stays as it is.
    bad = first_nonfinite(model)
    if bad is not None:
        raise FloatingPointError(
            f"refusing to save {what}: the model holds NaN/Inf (first in {bad}); lower --learning_rate or set "
            "--max_grad_norm, then resume from the last checkpoint")


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, output_dir: str, state: dict,
                    total_limit: int | None) -> Path:
    """Save the full training state as ``checkpoints/step_XXXXXXXX`` atomically; keep this run's newest ``total_limit``.

    Written to a hidden ``.tmp-`` folder, ``training_state.json`` last (with the run's record from ``run.json``
    and the number of processes), then renamed. A write that fails (a full disk, a quota) removes the hidden
    folder and raises :class:`OutputError` on every process, naming the folder and the bytes a checkpoint
    needs; the previous checkpoints stay. Rotation counts this run's checkpoints up to this step only; each is
    renamed ``.del-...`` before it is deleted, so a kill midway leaves nothing half deleted for ``latest`` (the
    next save or start finishes it off).
    """
    check_finite_model(model, f"the checkpoint of step {state['completed_steps']}")
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{state['completed_steps']:08d}"
    tmp = root / f".tmp-{final.name}"
    what = f"the checkpoint of step {state['completed_steps']}"
    needed = 3 * state_bytes(accelerator.unwrap_model(model)) + 2**20  # weights and AdamW's two moments
    error = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            error = err
    _after_write(accelerator, error, what, root, needed)
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:
        error = err
    _after_write(accelerator, error, what, root, needed, cleanup=tmp)
    run = None
    if accelerator.is_main_process:
        try:
            run = read_run(output_dir)
        except ValueError:
            run = None
        try:
            # The state file goes last: a folder without it is never taken for a checkpoint.
            record = {**state, "num_processes": accelerator.num_processes, "run": run}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
            _fsync_dir(tmp)
            if final.exists():
                _delete_checkpoint(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except Exception as err:
            error = err
    _after_write(accelerator, error, what, root, needed, cleanup=tmp)
    if accelerator.is_main_process:
        if total_limit is not None:
            run_id = run["run_id"] if run else None
            mine = [p for p in list_checkpoints(output_dir, run_id) if _step(p) <= _step(final)
                    and (run_id is None or _recorded_run_id(p) == run_id)]
            for old in mine[:-total_limit]:
                _delete_checkpoint(old)
        for stale in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _delete_checkpoint(path: Path) -> None:
    """Rename ``path`` to ``.del-<name>`` (atomic: it stops being a checkpoint at once), then delete it."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path: Path, files: bool = True) -> None:
    """Flush ``path`` (a file, or a folder and, with ``files``, the files in it) to disk, as far as possible."""
    for f in [path, *path.iterdir()] if path.is_dir() and files else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass


def checkpoint_candidates(resume_from_checkpoint: str | None, output_dir: str | Path,
                          run_id: str | None = None) -> list[Path]:
    """The checkpoints ``--resume_from_checkpoint`` may resume from, in the order to try them: the named one,
    or for ``latest`` the complete checkpoints of run ``run_id`` (any run's when None) in ``output_dir``, newest
    first. Empty without the flag, or (with a warning) when ``latest`` finds none."""
    if resume_from_checkpoint is None:
        return []
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir, run_id)
        if not found:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting fresh")
        return found[::-1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no {STATE_FILE})")
    return [path]


def _refused_pickle(err: BaseException) -> str | None:
    """torch.load(weights_only=True)'s refusal of a pickle that would build objects (run code), in one line."""
    if not isinstance(err, pickle.UnpicklingError):
        return None
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = next((line for line in lines if "GLOBAL" in line), None)
    return f"a pickle that torch.load(weights_only=True) refuses: {detail}" if detail else None


def _reading_error(err: BaseException) -> str:
    """What went wrong reading a file, in a short line (torch's messages run to paragraphs of advice)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = next((line for line in lines if not line.startswith(advice)), type(err).__name__)
    if len(detail) > 160 and ". " in detail:
        detail = detail[: detail.index(". ") + 1]
    return detail


def _check_rng_states(states: dict) -> None:
    """Raise if ``states`` (a ``random_states_N.pkl``) cannot restore every generator; Accelerate's load_state
    would only log that at INFO and go on with other random numbers. Checked on fresh generators."""
    random.Random().setstate(states["random_state"])
    np.random.RandomState().set_state(states["numpy_random_seed"])
    torch.Generator().set_state(states["torch_manual_seed"])
    if torch.cuda.is_available():
        cuda = states.get("torch_cuda_manual_seed")
        if cuda is None:
            logger.warning("the checkpoint holds no CUDA generator states (saved without a GPU): they start from "
                           "the seed", main_process_only=False)
        elif not all(torch.is_tensor(s) and s.dtype == torch.uint8 for s in cuda):
            raise ValueError("torch_cuda_manual_seed holds no generator states")


def checkpoint_problem(path: Path, accelerator: Accelerator) -> tuple[str, str] | None:
    """Why this process cannot resume from ``path``, found without changing any state.

    ``("damaged", what)`` for a missing, truncated or unreadable file (the state file, the weights' header, the
    optimizer state when one was prepared, this process's RNG states); ``("refused", what)`` for a pickle that
    torch.load(weights_only=True) refuses; None when every file this process reads is whole.
    """
    from accelerate.utils import load as accelerate_load
    from safetensors import safe_open

    try:
        saved = json.loads((path / STATE_FILE).read_text())
        if not all(isinstance(saved.get(k), int) for k in ("completed_steps", "epoch", "batches_in_epoch")):
            return "damaged", f"{STATE_FILE} lacks the step counters"
    except (OSError, ValueError, AttributeError) as err:
        return "damaged", f"{STATE_FILE}: {_reading_error(err)}"
    weights = path / "model.safetensors"
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt"):
                pass
        except Exception as err:  # the header promises more bytes than the file holds, or is garbage
            return "damaged", f"model.safetensors: {_reading_error(err)}"
    elif not any(path.glob("pytorch_model*")):
        return "damaged", "no model weights"
    process_index = accelerator.process_index
    rng = f"random_states_{process_index}.pkl"
    for name in ("optimizer.bin", rng):
        file = path / name
        if not file.is_file():
            if name == "optimizer.bin" and (not accelerator._optimizers or any(path.glob("optimizer_*"))):
                continue  # no optimizer to restore, or a sharded one (FSDP)
            if name == rng and process_index >= saved.get("num_processes", 1):
                logger.warning(f"{path} was saved by {saved.get('num_processes', 1)} process(es): process "
                               f"{process_index} starts its random generators from the seed", main_process_only=False)
                continue
            return "damaged", f"{name} is missing"
        try:
            loaded = accelerate_load(file, map_location="cpu")
            if name == rng:
                _check_rng_states(loaded)
        except Exception as err:
            refused = _refused_pickle(err)
            if refused:
                return "refused", refused
            return "damaged", f"{name}: {_reading_error(err)}"
    return None


def resume_or_start(accelerator: Accelerator, run: Run, resume_from_checkpoint: str | None,
                    batches_per_epoch: int) -> TrainState:
    """Resume as ``--resume_from_checkpoint`` says (or start at step 0), then record the run in ``run.json``.

    Every process checks the files it will read (:func:`checkpoint_problem`) and all agree. With ``latest``, a
    damaged checkpoint is passed over with a warning naming it, for the one before it; none complete is a
    one-line error. A named checkpoint must be whole; a refused pickle is an error either way; a checkpoint
    whose run had other settings is an error naming them.
    """
    state = TrainState()
    broken = []
    candidates = checkpoint_candidates(resume_from_checkpoint, run.output_dir, run.run_id)
    for path in candidates:
        problem = checkpoint_problem(path, accelerator)
        if accelerator.num_processes > 1:
            problems = [p for p in gather_object([problem]) if p is not None]
            problem = next((p for p in problems if p[0] == "refused"), problems[0] if problems else None)
        if problem is not None:
            if problem[0] == "refused" or resume_from_checkpoint != "latest":
                raise UsageError(f"--resume_from_checkpoint {path}: cannot load it ({problem[1]}); resume from "
                                 "another checkpoint or start afresh")
            logger.warning(f"checkpoint {path} is damaged ({problem[1]}): resuming from the one before it")
            broken.append(f"{path.name}: {problem[1]}")
            continue
        saved = json.loads((path / STATE_FILE).read_text()).get("run") or {}
        differences = settings_differences(run.settings, saved.get("settings") or {})
        if differences:
            raise UsageError(f"--resume_from_checkpoint {path}: its run had other settings: {'; '.join(differences)}; "
                             "resume with the same settings")
        state = load_checkpoint(accelerator, path, batches_per_epoch)
        run.run_id = run.run_id or saved.get("run_id")
        break
    else:
        if broken:
            raise UsageError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                             f"{run.output_dir / CHECKPOINT_DIR} ({'; '.join(broken)}); start afresh with "
                             "--overwrite_output_dir instead")
    run.run_id = run.run_id or uuid.uuid4().hex
    error = None
    if accelerator.is_main_process:
        try:
            _write_json(run.output_dir / RUN_FILE, run.record())
        except OSError as err:
            error = err
    _after_write(accelerator, error, f"the run's record ({RUN_FILE})", run.output_dir, 2**16)
    return state


def load_checkpoint(accelerator: Accelerator, path: Path, batches_per_epoch: int) -> TrainState:
    """Restore model, optimizer and RNG states from ``path``; return where training stands."""
    try:
        accelerator.load_state(str(path))
    except (pickle.UnpicklingError, RuntimeError, OSError) as err:
        # Accelerate reads the pickles of a checkpoint with torch.load(weights_only=True): one holding
        # anything but tensors and plain data is refused, never run. Say that in one line (torch's own
        # message suggests turning the protection off).
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = _refused_pickle(err) or lines[0]
        raise UsageError(f"--resume_from_checkpoint {path}: cannot load it ({detail}); resume from "
                         "another checkpoint or start afresh") from None
    saved = json.loads((path / STATE_FILE).read_text())
    state = TrainState(completed_steps=saved["completed_steps"], epoch=saved["epoch"],
                       batches_in_epoch=saved["batches_in_epoch"], skipped_steps=saved.get("skipped_steps", 0),
                       skipped_samples=saved.get("skipped_samples", 0))
    if state.batches_in_epoch >= batches_per_epoch:  # saved at the end of an epoch: the next one starts afresh
        state.epoch, state.batches_in_epoch = state.epoch + 1, 0
    logger.info(f"resumed from {path}: step {state.completed_steps}, epoch {state.epoch}, "
                f"batch {state.batches_in_epoch}")
    return state


# ---------------------------------------------------------------------------------------------------------
# Evaluation metrics: a confusion matrix on the device, summed over processes
# ---------------------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_labels: int, ignore_index: int) -> torch.Tensor:
    """``cm[true, pred]`` counts (C, C) int64 over pixels whose label is not ``ignore_index``.

    ``pred`` and ``label`` are integer maps of one shape, e.g. (H, W).
    """
    keep = label != ignore_index
    idx = label[keep].long() * num_labels + pred[keep].long()
    return torch.bincount(idx, minlength=num_labels * num_labels).view(num_labels, num_labels)


def metrics_from_confusion(cm: torch.Tensor) -> dict[str, object]:
    """``mean_iou``, ``mean_accuracy``, ``overall_accuracy``, ``per_category_iou``, ``per_category_accuracy``.

    Named and defined as in ``evaluate``'s ``mean_iou``: a class absent from both labels and predictions has
    IoU NaN (None in the output) and is left out of the means; accuracy is per ground-truth class.
    """
    cm = cm.double().cpu()
    tp = cm.diag()
    label_area, pred_area = cm.sum(dim=1), cm.sum(dim=0)
    union = label_area + pred_area - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(label_area > 0, tp / label_area.clamp_min(1), torch.full_like(tp, float("nan")))

    def nanmean(x: torch.Tensor) -> float | None:
        x = x[~torch.isnan(x)]
        return float(x.mean()) if x.numel() else None

    return {
        "mean_iou": nanmean(iou),
        "mean_accuracy": nanmean(acc),
        "overall_accuracy": float(tp.sum() / label_area.sum()) if label_area.sum() > 0 else None,
        "per_category_iou": [None if math.isnan(v) else float(v) for v in iou.tolist()],
        "per_category_accuracy": [None if math.isnan(v) else float(v) for v in acc.tolist()],
    }


# ---------------------------------------------------------------------------------------------------------
# The command line: one line on stderr, exit status 2, for the errors a user can fix
# ---------------------------------------------------------------------------------------------------------
def one_line(error: BaseException) -> str:
    """The error as one line; one raised in a DataLoader worker arrives wrapped in the worker's traceback."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if "Original Traceback" in str(error) and lines:
        return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
    return " ".join(lines)


def run_cli(main: Callable[[], object], user_errors: tuple[type[BaseException], ...], prog: str) -> int:
    """Run ``main``; report ``user_errors`` as ``<prog>: error: <one line>`` with exit status 2."""
    try:
        main()
        return 0
    except user_errors as e:
        message = one_line(e)
    # Printed once the failed run's workers are stopped and its frames released: its progress bar closes (and
    # redraws itself) first, so the error stays the last line the user sees.
    kill_dataloader_workers()
    gc.collect()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2
