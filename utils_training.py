"""The operations code behind ``train_icsd.py``: one-line errors, stop requests, the output folder (one run per
folder, locked), all-or-nothing writes, checkpoints and resume past damaged ones, loss bookkeeping, metrics."""

from __future__ import annotations

import atexit
import errno
import faulthandler
import fnmatch
import gc
import hashlib
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from torch.utils.data import Sampler

from utils_hub import CHECKPOINT_DIR, TRACKER_DIR, UPLOAD_PATTERNS, source_kind

try:
    import fcntl
except ImportError:  # not POSIX: output folders are not locked
    fcntl = None

logger = get_logger(__name__)

STATE_FILE = "training_state.json"  # written last: a checkpoint folder without it is never resumed from
RUN_FILE = "run.json"  # the record of the run that owns the output folder: its id and settings
EXPORT_STAGING, EXPORT_READY = ".export-tmp", ".export-ready"


class UsageError(ValueError):
    """A problem with the user's input, reported as one line before any training step."""


class OutputError(UsageError):
    """The output folder cannot be used: not writable, full, or in use by another run."""


class AfterTrainingError(RuntimeError):
    """A failure after the trained model was saved: one line that says where the model is."""


@contextmanager
def report_saved_model(output_dir: str) -> Iterator[None]:
    """Turn any failure inside into an :class:`AfterTrainingError` whose one line says the model is saved."""
    try:
        yield
    except Exception as err:
        raise AfterTrainingError(
            f"after training, the final evaluation or export failed ({type(err).__name__}: {one_line(err)}); "
            f"the trained model is saved in {output_dir} (from_pretrained loads it)") from err


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
    release_locks()
    # Printed once the failed run's workers are stopped and its frames released: its progress bar closes (and
    # redraws itself) first, so the error stays the last line the user sees. (The sleep: see end_run.)
    kill_dataloader_workers()
    if torch.distributed.is_initialized():
        time.sleep(0.25)
    gc.collect()
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)`` only (the same on every process and after a
    resume), cut to a multiple of ``multiple``, the samples of one optimizer step: each gets all its micro-batches."""

    def __init__(self, n: int, seed: int, multiple: int = 1) -> None:
        self.n, self.seed, self.epoch, self.used = n, seed, 0, n - n % multiple

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[: self.used].tolist())

    def __len__(self) -> int:
        return self.used


# --- Stop requests: SIGTERM (preemption) or the launcher's death ask for a checkpoint and a clean exit
_STOP_CAUSE: str | None = None  # this process's first reason to stop (None: not asked)
LAUNCHER_GRACE_S = 30.0  # after the launcher's death: time to save a checkpoint before the process ends itself


def _request_stop(cause: str) -> None:
    global _STOP_CAUSE
    _STOP_CAUSE = _STOP_CAUSE or cause


def stop_requested() -> bool:
    """Whether this process has been asked to stop (SIGTERM, or its launcher died)."""
    return _STOP_CAUSE is not None


def stop_cause() -> str:
    """Why training stops early: this process's first stop request, or another process's."""
    return _STOP_CAUSE or "a stop request of another process"


def install_stop_handlers() -> None:
    """Turn SIGTERM and the launcher's death into a stop request (a new run starts unasked)."""
    global _STOP_CAUSE
    _STOP_CAUSE = None
    signal.signal(signal.SIGTERM, lambda *_: _request_stop("SIGTERM"))
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints where a process that seems stuck is
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    _follow_launcher()
    # Registered after multiprocessing's own atexit handler, so it runs first: see kill_dataloader_workers.
    atexit.unregister(kill_dataloader_workers)
    atexit.register(kill_dataloader_workers)


def end_run(accelerator: Accelerator) -> None:
    """Close the trackers and the process group, then give gloo's threads a moment without the GIL.

    A gloo worker thread frees a finished collective's tensors, which needs the GIL; the last reference to the
    process group (DDP's reducer) is dropped when the caller's frame is freed, and its destructor joins that
    thread while holding the GIL: a deadlock that left a rank alive after its run was complete (torch 2.13,
    seen with tools/stress_ending.py in 2 of 9 runs). Sleeping here lets the thread finish first.
    """
    accelerator.end_training()
    if accelerator.num_processes > 1:
        time.sleep(0.25)


def training_done() -> None:
    """Everything is saved: a SIGTERM now ends the process at once, whatever it still waits for at exit."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def worker_init(_: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore a SIGTERM sent to the process group (the main process saves)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def kill_dataloader_workers() -> None:
    """Stop this process's DataLoader workers at once, before it exits: at exit multiprocessing would SIGTERM
    them (ours ignore it) and join them forever, and torch's own shutdown waits 5-10 s for them."""
    if hasattr(signal, "SIGCHLD"):  # torch's handler would report the kills as worker crashes
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def _follow_launcher() -> None:
    """Under ``accelerate launch`` or torchrun, ask for a stop when the launcher dies: torchrun starts each rank
    in a session of its own, so a ``kill -9`` of the launcher would leave the ranks training on with PPID 1. A
    thread watches (it runs while the main thread waits in a collective); a shell parent is not watched."""
    parent = os.getppid()
    if "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's agent is each rank's parent
        try:
            parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[:3]
        except OSError:
            return
        if not any(b"accelerate" in arg for arg in parent_argv):
            return
    threading.Thread(target=_watch_launcher, args=(parent,), name="launcher-watch", daemon=True).start()


def _watch_launcher(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    _request_stop("the launcher's exit")
    me = f"[pid {os.getpid()}]"
    print(f"{me} the launcher (pid {parent}) is gone: saving a checkpoint and exiting", file=sys.stderr, flush=True)
    # A process still here later is stuck (a collective waiting for a rank that died): end it, keeping the
    # previous checkpoint, rather than leave it running without a launcher.
    time.sleep(LAUNCHER_GRACE_S)
    print(f"{me} still running {LAUNCHER_GRACE_S:.0f} s after the launcher died: exiting now (the previous "
          "checkpoint is kept)", file=sys.stderr, flush=True)
    for child in multiprocessing.active_children():  # os._exit runs no atexit handler
        child.kill()
    os._exit(1)


# --- The loss terms between optimizer steps, and the decision all processes take from them
class StepOutcome(NamedTuple):
    """What all processes agreed on at the end of an optimizer step."""

    nonfinite_term: str | None  # the first non-finite logged term, None if all were finite
    stop: bool  # some process was asked to stop
    skipped_samples: int  # undecodable samples met since the last step


class LossTracker:
    """Sums of the logged loss terms (``keys``, "loss" first) and their non-finite flags, kept on the device:
    checking each micro-batch on the host would sync the GPU each time; one small all-reduce per step instead."""

    def __init__(self, keys: Sequence[str], device: torch.device) -> None:
        self.keys, self.pending_skipped = list(keys), 0
        self.sums = torch.zeros(len(self.keys) + 1, device=device)  # the terms' sums, then the batch count
        self.nonfinite = torch.zeros(len(self.keys), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Record one micro-batch; one whose samples were all skipped (``terms`` empty) is not counted."""
        if terms:
            values = torch.stack([loss.detach(), *(terms[k] for k in self.keys[1:])]).float()
            self.nonfinite |= ~torch.isfinite(values)
            self.sums += torch.cat([values, values.new_ones(1)])

    def end_step(self, accelerator: Accelerator, stop: bool) -> StepOutcome:
        """Agree with every process on non-finite terms, stop requests and skipped samples; reset the flags."""
        flags = torch.tensor([0.0, float(stop), float(self.pending_skipped)], device=accelerator.device)
        flags[0] = self.nonfinite.any().float()
        any_nonfinite, any_stop, skipped = accelerator.reduce(flags, reduction="sum").tolist()
        bad = [k for k, flag in zip(self.keys, self.nonfinite.tolist()) if flag]
        term = next((k for k in bad if k != "loss"), bad[0] if bad else "on another process") if any_nonfinite else None
        self.nonfinite.zero_()
        self.pending_skipped = 0
        return StepOutcome(term, bool(any_stop), int(skipped))

    def averages(self, accelerator: Accelerator) -> dict[str, float]:
        """``{"train/<key>": mean}`` over the batches since the last call and all processes; resets."""
        totals = accelerator.reduce(self.sums, reduction="sum").tolist()
        self.sums.zero_()
        return {f"train/{k}": v / max(totals[-1], 1.0) for k, v in zip(self.keys, totals)}


def metric_logger(accelerator: Accelerator, with_tracking: bool, log_file: str | None) -> Callable[[dict, int], None]:
    """``log(metrics, step)``: to the trackers (``--with_tracking``) and, from the main process, ``--log_file``."""
    failed = []

    def log(logs: dict, step: int) -> None:
        if with_tracking:
            accelerator.log(logs, step=step)
        if log_file and accelerator.is_main_process and not failed:
            try:
                with open(log_file, "a") as f:  # reopened each time: a kill loses at most this line
                    f.write(json.dumps({"step": step, **logs}) + "\n")
            except OSError as err:  # the metrics log is a copy of what the log lines say: losing it stops nothing
                failed.append(err)
                logger.warning(f"--log_file {log_file}: cannot write to it ({err.strerror or err}); training goes "
                               "on without it (checkpoints and the export are unaffected)")
    return log


def show_progress_bars(accelerator: Accelerator) -> bool:
    """Progress bars on the local main process, and only on a terminal: in a log file their frames are noise."""
    return accelerator.is_local_main_process and sys.stderr.isatty()


def quiet_libraries(accelerator: Accelerator) -> None:
    """Library progress bars off where ours are; Python warnings as one line without their source line."""
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"
    if not show_progress_bars(accelerator):
        import datasets
        import huggingface_hub
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
        huggingface_hub.utils.disable_progress_bars()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def format_metrics(metrics: dict, prefix: str = "") -> str:
    """``mIoU 41.75 %, mean acc 51.41 %, pixel acc 76.59 %`` from ``{prefix}mean_iou`` and the accuracies."""
    names = (("mean_iou", "mIoU"), ("mean_accuracy", "mean acc"), ("overall_accuracy", "pixel acc"))
    return ", ".join(f"{label} {'n/a' if metrics.get(prefix + key) is None else f'{100 * metrics[prefix + key]:.2f} %'}"
                     for key, label in names)


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``2h03m``."""
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_train_log(step: int, total: int, logs: dict, elapsed: float, steps_timed: int) -> str:
    """``step 20/300: loss 1.2345, ce 0.8123, ..., alpha 0.063, lr 9.40e-04; 1m02s, 3.10 s/step, 14m28s left``,
    timed over this sitting's ``steps_timed`` steps; the raw (unweighted) terms go to trackers and the log file."""
    terms = [f"{k[6:]} {v:.4f}" for k, v in logs.items()
             if k.startswith("train/") and k[6:] not in ("lr", "epoch", "alpha") and not k[6:].startswith("raw_")]
    if "train/alpha" in logs:
        terms.append(f"alpha {logs['train/alpha']:.3f}")
    terms.append(f"lr {logs['train/lr']:.2e}")
    per_step = elapsed / max(steps_timed, 1)
    timing = f"{format_duration(elapsed)}, {per_step:.2f} s/step, {format_duration(per_step * (total - step))} left"
    return f"step {step}/{total}: " + ", ".join(terms) + f"; {timing}"


# --- The output folder: one run per folder, one process at a time
@dataclass
class Run:
    """The run this process belongs to: its folder, settings, id (None until resume adopts a checkpoint's)."""

    output_dir: Path
    settings: dict
    run_id: str | None

    def record(self) -> dict:
        return {"run_id": self.run_id, "settings": self.settings}


# Descriptors of the output folders this process has locked (flock, so the lock belongs to the open file, which
# a forked child shares): a child, such as a DataLoader worker, closes its copies, so the lock lives and dies
# with this process alone.
_HELD_LOCKS: set[int] = set()


def release_locks() -> None:
    """Unlock every output folder this process holds (at the end of a run, for a caller that goes on)."""
    while _HELD_LOCKS:
        os.close(_HELD_LOCKS.pop())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=release_locks)


def fingerprint(value: object) -> object:
    """A local folder as its name and a hash of its absolute path (the output names no path of this machine)."""
    if isinstance(value, str) and source_kind(value) == "local":
        path = Path(value).expanduser().resolve()
        return f"local folder {path.name} #{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"
    return value


def _differences(ours: dict, theirs: dict) -> list[str]:
    """``--flag A here, B there`` for each setting both record with different values."""
    names = {"global_batch_size": "a global batch (per-device batch x processes x accumulation steps) of",
             "mixed_precision": "--mixed_precision (or Accelerate's configuration)"}
    return [f"{names.get(name, '--' + name)} {ours[name]} here, {theirs[name]} there" for name in ours
            if name in theirs and ours[name] != theirs[name]]


def claim_output_dir(accelerator: Accelerator, output_dir: str, settings: dict, sources: dict[str, str | None],
                     resume: str | None, overwrite: bool, log_file: str | None) -> Run:
    """Take ``output_dir`` for this run before anything else, or raise one line on every process: the main
    process refuses a folder that is, holds or lies inside one the run reads (``sources``: flag -> path), locks
    it, finishes what a killed run left half done, decides whose it is and checks ``log_file``."""
    decision, failure = ("ok", None), None
    if accelerator.is_main_process:
        try:
            out = Path(output_dir)
            for flag, source in sources.items():
                _refuse_overlap(out, flag, source)
            _lock(out)
            _finish_interrupted_writes(out)
            decision = ("ok", _decide(out, settings, resume, overwrite))
            check_log_file(log_file)
        except Exception as err:
            decision, failure = (type(err).__name__, one_line(err)), err
    if accelerator.num_processes > 1:
        decision = broadcast_object_list([decision], from_process=0)[0]
    if failure is not None:
        raise failure
    if decision[0] != "ok":
        raise (OutputError if decision[0] == "OutputError" else UsageError)(decision[1])
    return Run(Path(output_dir), settings, decision[1])


def _refuse_overlap(out: Path, flag: str, source: str | None) -> None:
    """A run must not write into, over or around a local folder it reads (a dataset's README, a teacher's weights)."""
    if not source or not Path(source).expanduser().is_dir():
        return
    src, here = Path(source).expanduser().resolve(), out.expanduser().resolve()
    relation = "is" if src == here else "lies inside" if src in here.parents else "holds" if here in src.parents else ""
    if relation:
        raise UsageError(f"--output_dir {out} {relation} the folder of --{flag}" + ("" if src == here else f" ({source})")
                         + ": this run would write over what it reads; choose another --output_dir")


def _lock(out: Path) -> None:
    """Create ``out``, prove it writable and lock it (flock on the folder itself: the kernel drops the lock when
    the process ends, however it ends, and no lock file is left behind)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"probe" * 13)  # some bytes: a folder that holds nothing more refuses them
        probe.unlink()
        fd = os.open(out, os.O_RDONLY) if fcntl else None
    except OSError as err:
        raise OutputError(f"--output_dir {out}: cannot write there ({err.strerror or err}); choose a writable "
                          "folder") from None
    if fd is None:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OutputError(f"--output_dir {out} is in use by another run (a live process holds its lock): wait "
                          "for it to end, or choose another --output_dir") from None
    _HELD_LOCKS.add(fd)


def _read_run_record(out: Path, overwrite: bool) -> dict | None:
    """The run recorded in ``out/run.json`` (None: no record); an unreadable one is refused unless ``overwrite``."""
    try:
        previous = json.loads((out / RUN_FILE).read_text()) if (out / RUN_FILE).is_file() else None
        if previous is not None and not (isinstance(previous, dict) and isinstance(previous.get("settings"), dict)
                                         and previous.get("run_id")):
            raise ValueError("no run_id and settings in it")
        return previous
    except (OSError, ValueError) as err:
        if not overwrite:
            raise UsageError(f"{out / RUN_FILE} cannot be read ({err}): pass --overwrite_output_dir to start a new "
                             f"run in {out}, or choose another --output_dir") from None
        return None


def _decide(out: Path, settings: dict, resume: str | None, overwrite: bool) -> str | None:
    """This run's id (None: adopt the resumed checkpoint's), or a one-line refusal: the run in ``run.json`` is
    continued only by a resume with its settings and is otherwise refused while it left checkpoints or an export;
    files no run wrote are refused; ``overwrite`` starts a new run whatever the folder holds."""
    previous = _read_run_record(out, overwrite)
    checkpoints = list_checkpoints(out)
    foreign = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")
                     and p.name not in (RUN_FILE, TRACKER_DIR, CHECKPOINT_DIR))
    differences = _differences(settings, previous["settings"]) if previous else []
    summary = "; ".join(differences[:3]) or "with the same settings"
    if overwrite:
        if previous or foreign or checkpoints:
            logger.warning(f"--overwrite_output_dir: {out} held " + (f"another run ({summary}); its checkpoints stay "
                           "but are no longer used, its export is replaced at the end" if previous else
                           f"files of no run of this one ({', '.join(foreign + [CHECKPOINT_DIR] * bool(checkpoints))})"))
        return uuid.uuid4().hex
    if previous is not None and resume is not None:
        if differences:
            raise UsageError(f"--resume_from_checkpoint {resume}: the run in {out} had other settings: "
                             f"{'; '.join(differences)}; resume with its settings, or pass --overwrite_output_dir "
                             "to start a new run there")
        return previous["run_id"]
    if previous is not None:
        if checkpoints or _export_files(out):
            raise UsageError(f"--output_dir {out} holds another run ({summary}): pass --resume_from_checkpoint "
                             "latest to continue it, --overwrite_output_dir to replace it, or choose another "
                             "--output_dir")
        return uuid.uuid4().hex  # that run stopped before writing anything worth keeping
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
    return None if checkpoints else uuid.uuid4().hex


def check_log_file(path: str | None) -> None:
    """Fail now, in one line, if ``--log_file`` cannot be appended to. Creates missing folders but not the file:
    a run that stops before its record leaves no file that makes its folder look like someone else's."""
    if not path:
        return
    log = Path(path).expanduser()
    if log.is_dir():
        raise OutputError(f"--log_file {path} is a folder: pass a file path such as {log / 'metrics.jsonl'}")
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        # An existing file is opened for appending; else a dot-named probe (ignored by the foreign-file check
        # should the run die right here) shows the folder takes new files.
        probe = log if log.exists() else log.parent / f".log-probe-{os.getpid()}"
        open(probe, "a").close()
        if probe != log:
            probe.unlink()
    except OSError as err:
        raise OutputError(f"--log_file {path}: cannot write there ({err.strerror or err}); choose a writable "
                          "path") from None


def _export_files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file() and any(fnmatch.fnmatch(p.name, pattern)
                                                                       for pattern in UPLOAD_PATTERNS))


def write_json(path: Path, obj: object) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _finish_interrupted_writes(out: Path) -> None:
    """Clear a half-written checkpoint (``.tmp-*``), a half-done rotation (``.del-*``) or export
    (``.export-tmp``); finish an export that was being moved into place (``.export-ready``)."""
    root = out / CHECKPOINT_DIR
    for stale in [*root.glob(".del-*"), *root.glob(".tmp-*"), out / EXPORT_STAGING]:
        shutil.rmtree(stale, ignore_errors=True)
    if (out / EXPORT_READY).is_dir():
        logger.warning(f"{out}: finishing the export that an interrupted run was moving into place")
        _move_export(out / EXPORT_READY, out)


# --- Writes that fail (a full disk, a quota, a read-only folder): one line on every process
def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers: about what its weights take on disk."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _write_failure(err: BaseException) -> str | None:
    """Why a write failed (``"No space left on device"``, ...), or None when ``err`` is no write failure."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    found = re.search(r"\(os error (\d+)\)", str(err))  # safetensors' I/O errors
    if found:
        return os.strerror(int(found.group(1)))
    if "inline_container.cc" in str(err) or "PytorchStreamWriter" in str(err):  # torch.save's, without the errno
        return "the write failed"
    return None


def after_write(accelerator: Accelerator, error: BaseException | None, what: str, folder: Path, needed: int,
                cleanup: Path | None = None) -> None:
    """Agree with every process on whether a write failed; if one did, remove ``cleanup`` and raise on all: an
    :class:`OutputError` naming ``folder`` and the ``needed`` bytes (any other error as it is)."""
    reason = None if error is None else (_write_failure(error) or "")
    failed = [(i, r) for i, r in enumerate([reason] if accelerator.num_processes == 1 else gather_object([reason]))
              if r is not None]
    if not failed:
        return
    if cleanup is not None and accelerator.is_main_process:
        shutil.rmtree(cleanup, ignore_errors=True)
    if error is not None and not reason:
        raise error
    index, reason = (accelerator.process_index, reason) if error is not None else failed[0]
    if not reason:
        raise OutputError(f"process {index} failed while writing {what} to {folder} (its error is above)")
    free = None
    with suppress(OSError):  # the folder may be gone, or on a file system that cannot say
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if reason == "the write failed" and free is not None and free < needed:
        reason = os.strerror(errno.ENOSPC)
    room = f"; {free / 1e6:.1f} MB free there" if free is not None else ""
    raise OutputError(f"cannot write {what} to {folder}: {reason} (it needs about {needed / 1e6:.1f} MB{room}); free "
                      "some space or choose another --output_dir, then resume with --resume_from_checkpoint latest")


@contextmanager
def ExportWriter(accelerator: Accelerator, output_dir: str | Path, needed_bytes: int,  # noqa: N802 (was a class)
                 keep_others: bool = False) -> Iterator[Path]:
    """``with ExportWriter(accelerator, output_dir, needed_bytes) as staging:`` the main process writes the export
    into ``staging``, moved into ``output_dir`` on leaving, all or nothing (a failed write leaves the folder as it
    was and raises :class:`OutputError` on every process). ``keep_others``: join the export in place (the card
    after the model) rather than replace it."""
    out, error = Path(output_dir), None
    staging, ready = out / EXPORT_STAGING, out / EXPORT_READY
    if accelerator.is_main_process:
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        except OSError as err:
            error = err
    try:
        yield staging
    except BaseException as err:
        error = error or err
    if error is None and accelerator.is_main_process:
        try:  # from the rename to .export-ready on, an interrupted move is finished at the next start
            shutil.rmtree(ready, ignore_errors=True)
            new = {p.name for p in staging.iterdir()}
            stale = [] if keep_others else [out / n for n in _export_files(out) if n not in new]
            os.replace(staging, ready)
            for path in stale:
                path.unlink(missing_ok=True)
            _move_export(ready, out)
        except Exception as err:
            error = err
    after_write(accelerator, error, "the export", out, needed_bytes, cleanup=staging)


def _move_export(ready: Path, out: Path) -> None:
    """Rename the files of ``ready`` into ``out``: the previous weights are deleted first and the new weights
    come last, so a folder caught midway holds no weights (it fails to load, loudly) rather than a new
    config.json beside old weights."""
    def is_weights(name: str) -> bool:
        return name.endswith(".safetensors") or name.startswith(("model.safetensors.index", "pytorch_model"))

    names = sorted((p.name for p in ready.iterdir()), key=is_weights)
    if any(map(is_weights, names)):
        for path in out.iterdir():
            if path.is_file() and is_weights(path.name):
                path.unlink()
    for name in names:
        _fsync(ready / name)
        os.replace(ready / name, out / name)
    _fsync(out)
    shutil.rmtree(ready)


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to disk, as far as the file system allows."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


# --- Checkpoints: accelerate's save_state into a hidden folder, then a rename
# Accelerate's own `automatic_checkpoint_naming` deletes the oldest folder before writing the new one, and its
# `load_state()` takes the newest folder without checking that it is whole: a kill during a save would leave
# neither. Hence our names, the state file written last, the rename, and rotation through `.del-` names.
@dataclass
class TrainState:
    """Where training stands (``training_state.json``); the position in the epoch is counted in samples, so a
    run resumed with another number of processes (and the same global batch) starts at the same sample."""

    completed_steps: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0
    skipped_samples: int = 0


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """The complete checkpoints (state file written) under ``output_dir/checkpoints``, oldest first; with
    ``run_id``, only that run's and those whose state file cannot be read (resume reports them as damaged)."""
    def recorded_run_id(path: Path) -> str | None:
        try:
            return (json.loads((path / STATE_FILE).read_text()).get("run") or {}).get("run_id")
        except (OSError, ValueError, AttributeError):
            return "unreadable"

    root = Path(output_dir) / CHECKPOINT_DIR
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)
             and (p / STATE_FILE).is_file() and (run_id is None or recorded_run_id(p) in (run_id, "unreadable"))
             ] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def first_nonfinite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter or floating-point buffer holding NaN/Inf, else None (syncs the host)."""
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if b.is_floating_point())]
    return next((name for name, t in tensors if not torch.isfinite(t).all()), None)


def check_finite_model(model: torch.nn.Module, what: str) -> None:
    """Raise FloatingPointError (one line) if ``model`` holds NaN/Inf: such a model is never saved."""
    bad = first_nonfinite(model)
    if bad is not None:
        raise FloatingPointError(f"refusing to save {what}: the model holds NaN/Inf (first in {bad}); lower "
                                 "--learning_rate or set --max_grad_norm, then resume from the last checkpoint")


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, run: Run, state: TrainState, extra: dict,
                    total_limit: int | None) -> Path:
    """Save the training state as ``checkpoints/step_XXXXXXXX``, all or nothing (``.tmp-`` folder, state file
    last, rename); keep this run's newest ``total_limit``, each renamed ``.del-`` before it is deleted."""
    step = state.completed_steps
    what = f"the checkpoint of step {step}"
    check_finite_model(model, what)
    root = run.output_dir / CHECKPOINT_DIR
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}"
    needed = 3 * state_bytes(accelerator.unwrap_model(model)) + 2**20  # weights and AdamW's two moments
    error = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        except OSError as err:
            error = err
    after_write(accelerator, error, what, root, needed)  # every process takes part in each of these
    try:
        accelerator.save_state(str(tmp))
    except Exception as err:
        error = err
    after_write(accelerator, error, what, root, needed, cleanup=tmp)
    if accelerator.is_main_process:
        try:
            record = {**asdict(state), **extra, "num_processes": accelerator.num_processes, "run": run.record()}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2))
            _fsync(tmp)
            if final.exists():
                _delete_checkpoint(final)
            os.replace(tmp, final)
            _fsync(root)
        except Exception as err:
            error = err
    after_write(accelerator, error, what, root, needed, cleanup=tmp)
    if accelerator.is_main_process:
        mine = [p for p in list_checkpoints(run.output_dir, run.run_id) if int(p.name[5:]) <= step]
        for old in mine[:-total_limit] if total_limit else []:
            _delete_checkpoint(old)
        for stale in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _delete_checkpoint(path: Path) -> None:
    """Rename ``path`` to ``.del-<name>`` (it stops being a checkpoint at once), then delete it."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _read_problem(err: BaseException) -> tuple[str, str]:
    """``("refused", why)`` for a pickle that torch.load(weights_only=True) will not build (it holds code or
    objects), else ``("damaged", what went wrong)``, in a short line (torch's messages run to paragraphs)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if "Weights only load failed" in str(err):
        detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1])
        return "refused", (f"it holds code or objects that torch.load(weights_only=True) refuses to build: {detail}; "
                           "nothing of it was loaded")
    detail = next((line for line in lines if not line.startswith(("Please file an issue", "Check the documentation"))),
                  type(err).__name__)
    return "damaged", detail[: detail.index(". ") + 1] if len(detail) > 160 and ". " in detail else detail


def checkpoint_problem(path: Path, accelerator: Accelerator) -> tuple[str, str] | None:
    """Why this process cannot resume from ``path``, found without changing any state: ``("damaged", what)`` for
    a missing, truncated or unreadable file, ``("refused", what)`` for a pickle holding code, else None."""
    try:
        saved = json.loads((path / STATE_FILE).read_text())
        if not all(isinstance(saved.get(k), int) for k in ("completed_steps", "epoch", "samples_in_epoch")):
            return "damaged", f"{STATE_FILE} lacks the step counters"
    except (OSError, ValueError, AttributeError) as err:
        return "damaged", f"{STATE_FILE}: {_read_problem(err)[1]}"
    sharded = any(path.glob("*_fsdp*")) or any(path.glob("optimizer_*"))  # FSDP's own layout: not checked here
    try:
        if not sharded:
            with safe_open(str(path / "model.safetensors"), framework="pt"):
                pass
    except Exception as err:  # missing, or a header that promises more bytes than the file holds
        return "damaged", f"model.safetensors: {_read_problem(err)[1]}"
    rng, saved_by = f"random_states_{accelerator.process_index}.pkl", saved.get("num_processes", 1)
    for name in ([] if sharded else ["optimizer.bin"]) + [rng]:
        if name == rng and not (path / name).is_file() and accelerator.process_index >= saved_by:
            logger.warning(f"{path} was saved by {plural(saved_by, 'process')}: process "
                           f"{accelerator.process_index} starts its random generators from the seed",
                           main_process_only=False)
            continue
        try:
            loaded = accelerate_load(path / name, map_location="cpu")
            if name == rng:  # accelerate's load_state would only log at INFO that these cannot be restored
                random.Random().setstate(loaded["random_state"])
                np.random.RandomState().set_state(loaded["numpy_random_seed"])
                torch.Generator().set_state(loaded["torch_manual_seed"])
        except Exception as err:
            kind, detail = _read_problem(err)
            return kind, f"{name}: {detail}" + (" (not an RNG state)" if name == rng and kind == "damaged" else "")
    return None


def _resume_candidates(run: Run, resume: str | None) -> list[Path]:
    """The checkpoints to try, newest first: this run's for ``latest``, the named one (which must be complete)."""
    if resume is None:
        return []
    if resume != "latest":
        if not (Path(resume) / STATE_FILE).is_file():
            raise UsageError(f"--resume_from_checkpoint {resume}: not a complete checkpoint folder (no {STATE_FILE})")
        return [Path(resume)]
    candidates = list_checkpoints(run.output_dir, run.run_id)[::-1]
    if not candidates:
        logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {run.output_dir}; starting fresh")
    return candidates


def resume_or_start(accelerator: Accelerator, run: Run, resume: str | None, schedule: dict) -> TrainState:
    """Resume as ``--resume_from_checkpoint`` says (or start at step 0), then record the run in ``run.json``.
    ``latest`` passes over a damaged checkpoint for the one before it; a pickle holding code, or a run with other
    settings or another ``schedule`` (the resolved step count), is refused in one line naming each difference."""
    state, broken = TrainState(), []
    for path in _resume_candidates(run, resume):
        problem = checkpoint_problem(path, accelerator)
        if accelerator.num_processes > 1:  # every process checked its own files: all agree on the worst
            problems = [p for p in gather_object([problem]) if p is not None]
            problem = next((p for p in problems if p[0] == "refused"), problems[0] if problems else None)
        if problem is not None:
            if problem[0] == "refused" or resume != "latest":
                raise UsageError(f"--resume_from_checkpoint {path}: cannot load it ({problem[1]}); resume from "
                                 "another checkpoint or start afresh")
            logger.warning(f"checkpoint {path} is damaged ({problem[1]}): resuming from the one before it")
            broken.append(f"{path.name}: {problem[1]}")
            continue
        saved = json.loads((path / STATE_FILE).read_text())
        recorded = (saved.get("run") or {}).get("settings") or {}
        differences = _differences({**run.settings, **schedule}, {**recorded, **saved.get("schedule", {})})
        if differences:
            raise UsageError(f"--resume_from_checkpoint {path}: its run had other settings: {'; '.join(differences)}; "
                             "resume with the same settings")
        accelerator.load_state(str(path))
        state = TrainState(**{k: saved[k] for k in asdict(TrainState()) if k in saved})
        run.run_id = run.run_id or (saved.get("run") or {}).get("run_id")
        logger.info(f"resumed from {path}: step {state.completed_steps}, epoch {state.epoch}, "
                    f"sample {state.samples_in_epoch} of the epoch")
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
            write_json(run.output_dir / RUN_FILE, run.record())
        except OSError as err:
            error = err
    after_write(accelerator, error, f"the run's record ({RUN_FILE})", run.output_dir, 2**16)
    return state


# --- Evaluation metrics: a confusion matrix on the device, summed over processes
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_labels: int, ignore_index: int) -> torch.Tensor:
    """``cm[true, pred]`` counts (C, C) int64 over pixels of integer maps ``pred``, ``label`` (same shape)
    whose label is not ``ignore_index``."""
    keep = label != ignore_index
    idx = label[keep].long() * num_labels + pred[keep].long()
    return torch.bincount(idx, minlength=num_labels * num_labels).view(num_labels, num_labels)


def metrics_from_confusion(cm: torch.Tensor) -> dict[str, object]:
    """``mean_iou``, ``mean_accuracy``, ``overall_accuracy``, ``per_category_iou``, ``per_category_accuracy`` as
    ``evaluate``'s ``mean_iou``: a class absent from labels and predictions has IoU None, left out of the means."""
    cm = cm.double().cpu()
    tp, label_area, pred_area = cm.diag(), cm.sum(dim=1), cm.sum(dim=0)
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(label_area + pred_area - tp > 0, tp / (label_area + pred_area - tp).clamp_min(1), nan)
    acc = torch.where(label_area > 0, tp / label_area.clamp_min(1), nan)

    def mean(x: torch.Tensor) -> float | None:
        return float(x[~x.isnan()].mean()) if (~x.isnan()).any() else None

    return {
        "mean_iou": mean(iou), "mean_accuracy": mean(acc),
        "overall_accuracy": float(tp.sum() / label_area.sum()) if label_area.sum() > 0 else None,
        "per_category_iou": [None if v != v else float(v) for v in iou.tolist()],
        "per_category_accuracy": [None if v != v else float(v) for v in acc.tolist()],
    }
