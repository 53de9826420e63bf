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
* :class:`TrainState`, :func:`save_checkpoint`, :func:`resolve_resume`, :func:`load_checkpoint`: atomic
  checkpoints, rotation and resume; :func:`check_finite_model`: a NaN/Inf parameter or buffer is never saved;
* :class:`MetricLogger`: trackers and the ``--log_file`` JSON lines;
* :func:`confusion_matrix` / :func:`metrics_from_confusion`: the evaluation metrics.

It imports torch, accelerate and (for one folder name) utils_hub.
"""

from __future__ import annotations

import atexit
import gc
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch.utils.data import Sampler

from utils_hub import CHECKPOINT_DIR  # the one name of the folder that a push leaves out

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
_STOP_REQUESTED = False


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    global _STOP_REQUESTED
    _STOP_REQUESTED = True


def stop_requested() -> bool:
    """Whether this process has been asked to stop (SIGTERM, or its launcher died)."""
    return _STOP_REQUESTED


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
    global _STOP_REQUESTED
    while os.getppid() == parent:
        time.sleep(_POLL_S)
    _STOP_REQUESTED = True
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


def list_checkpoints(output_dir: str) -> list[Path]:
    """The complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


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
    """Save the full training state as ``checkpoints/step_XXXXXXXX`` atomically; keep the newest ``total_limit``."""
    check_finite_model(model, f"the checkpoint of step {state['completed_steps']}")
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{state['completed_steps']:08d}"
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file goes last: a folder without it is never taken for a checkpoint.
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                (old / STATE_FILE).unlink()  # first: a half-deleted folder is then never taken for a checkpoint
                shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    for f in [path, *path.iterdir()] if path.is_dir() else [path]:
        try:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> Path | None:
    """The checkpoint folder ``--resume_from_checkpoint`` names (``latest``: the newest in ``output_dir``)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}; starting fresh")
            return None
        return found[-1]
    path = Path(resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, batches_per_epoch: int) -> TrainState:
    """Restore model, optimizer and RNG states from ``path``; return where training stands."""
    try:
        accelerator.load_state(str(path))
    except (pickle.UnpicklingError, RuntimeError, OSError) as err:
        # Accelerate reads the pickles of a checkpoint with torch.load(weights_only=True): one holding
        # anything but tensors and plain data is refused, never run. Say that in one line (torch's own
        # message suggests turning the protection off).
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        detail = next((line for line in lines if "GLOBAL" in line), lines[0])
        if isinstance(err, pickle.UnpicklingError):
            detail = f"a pickle that torch.load(weights_only=True) refuses: {detail}"
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
