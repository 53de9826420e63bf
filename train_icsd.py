#!/usr/bin/env python
"""Distil a light semantic-segmentation student from a heavy teacher with AICSD (arXiv:2308.04243).

    accelerate launch train_icsd.py --dataset cityscapes
    accelerate launch train_icsd.py --dataset synthetic --distill none \
        --student_model_name_or_path config:segformer-b0 --output_dir runs/teacher   # train a teacher

``--distill`` picks the objective: ``none`` (the student alone, also how a teacher is trained), ``kd``,
``cwd``, ``ickd`` (baselines), ``icsd`` (CE + ICSD + KD with fixed weights) and ``aicsd`` (the same under
Adaptive Loss Weighting). Mixed precision, several GPUs and several nodes come from Accelerate.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import logging
import math
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import BatchSampler, DataLoader, Sampler, Subset
from tqdm.auto import tqdm

import alw
import data
import losses
import models

logger = get_logger(__name__)

DISTILL_MODES = ("none", "kd", "cwd", "ickd", "icsd", "aicsd")
SCHEDULERS = ("poly", "linear", "cosine", "constant")
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "training_state.json"
PREFLIGHT_SAMPLES = 8  # per split, decoded and checked before any model is loaded


class UsageError(ValueError):
    """A problem with the user's input, reported as one line before any training step."""


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None, help=f"Preset: one of {sorted(data.DATASET_PRESETS)}.")
    g.add_argument("--dataset_name", default=None, help="Hub id or local folder (overrides the preset's id).")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--image_column", default=None)
    g.add_argument("--label_column", default=None)
    g.add_argument("--id2label", default=None, help="JSON file {id: name} when the dataset has no id2label.json.")
    g.add_argument("--ignore_index", type=int, default=None, help="Label value to ignore (default: preset's, else 255).")
    g.add_argument("--do_reduce_labels", action="store_true", default=None,
                   help="Map label 0 to the ignore index and shift the others down by one (ADE20K style).")
    g.add_argument("--train_split", default="train")
    g.add_argument("--validation_split", default=None)
    g.add_argument("--crop_size", type=int, nargs="+", default=None, help="Training crop: S or H W (default: preset's).")
    g.add_argument("--eval_short_side", type=int, default=None, help="Resize eval images to this short side.")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--skip_bad_samples", action="store_true", help="Skip (and count) undecodable samples.")
    g.add_argument("--dataloader_num_workers", type=int, default=2)

    g = p.add_argument_group("models")
    g.add_argument("--teacher_model_name_or_path", default=None,
                   help="Hub id, local folder (e.g. an earlier --distill none run) or config: preset.")
    g.add_argument("--student_model_name_or_path", default=None)
    g.add_argument("--trust_remote_code", action="store_true")
    g.add_argument("--eval_teacher", action="store_true", help="Evaluate the teacher once before training.")

    g = p.add_argument_group("distillation")
    g.add_argument("--distill", choices=DISTILL_MODES, default="aicsd")
    g.add_argument("--lambda_ics", type=float, default=alw.DEFAULT_LAMBDA_ICS)
    g.add_argument("--lambda_kd", type=float, default=alw.DEFAULT_LAMBDA_KD)
    g.add_argument("--lambda_cwd", type=float, default=3.0, help="Weight of the CWD baseline.")
    g.add_argument("--lambda_ickd", type=float, default=10.0, help="Weight of the ICKD baseline.")
    g.add_argument("--temperature", type=float, default=alw.DEFAULT_TEMPERATURE)
    g.add_argument("--alw_granularity", choices=("epoch", "step"), default="epoch")

    g = p.add_argument_group("optimisation")
    g.add_argument("--per_device_train_batch_size", type=int, default=8)
    g.add_argument("--per_device_eval_batch_size", type=int, default=4)
    g.add_argument("--learning_rate", type=float, default=6e-5)
    g.add_argument("--weight_decay", type=float, default=0.01)
    g.add_argument("--num_train_epochs", type=int, default=50)
    g.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_scheduler_type", choices=SCHEDULERS, default="poly")
    g.add_argument("--num_warmup_steps", type=int, default=0)
    g.add_argument("--max_grad_norm", type=float, default=None, help="Clip gradients to this norm.")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="Default: what `accelerate config` / `accelerate launch` says.")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--skip_nonfinite_steps", action="store_true",
                   help="Skip (and count) a step whose loss is NaN/Inf instead of stopping the run.")

    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="outputs/aicsd")
    g.add_argument("--checkpointing_steps", default=None, help="Save state every N optimizer steps, or 'epoch'.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    g.add_argument("--eval_steps", type=int, default=None, help="Evaluate every N optimizer steps (and at the end).")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--with_tracking", action="store_true")
    g.add_argument("--log_file", default=None,
                   help="Append the logged metrics as JSON lines ({'step': N, 'train/loss': ...}), from the main "
                        "process, averaged over all processes. Needs no tracker. After a resume, the steps after "
                        "the checkpoint are logged again (the later line wins).")
    g.add_argument("--report_to", default="all", help="Tracker(s) for --with_tracking: tensorboard, wandb, …, all.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_private_repo", action="store_true")

    args = p.parse_args(argv)
    _resolve_defaults(args)
    return args


def _resolve_defaults(args: argparse.Namespace) -> None:
    if args.dataset is None and args.dataset_name is None:
        raise UsageError("pass --dataset (a preset) or --dataset_name (a Hub id or local folder)")
    if args.dataset is not None and args.dataset not in data.DATASET_PRESETS:
        raise UsageError(f"unknown --dataset {args.dataset!r}; presets: {', '.join(sorted(data.DATASET_PRESETS))}")
    preset = data.DATASET_PRESETS.get(args.dataset) if args.dataset else None
    if args.student_model_name_or_path is None:
        if preset is None:
            raise UsageError("pass --student_model_name_or_path (no --dataset preset to take a default from)")
        args.student_model_name_or_path = preset.default_student
    if args.teacher_model_name_or_path is None and (args.distill != "none" or args.eval_teacher):
        if preset is None:
            raise UsageError(f"--distill {args.distill} needs --teacher_model_name_or_path")
        args.teacher_model_name_or_path = preset.default_teacher
    if args.crop_size is not None:
        if len(args.crop_size) not in (1, 2) or min(args.crop_size) <= 0:
            raise UsageError(f"--crop_size takes S or H W (positive); got {args.crop_size}")
        args.crop_size = tuple(args.crop_size * 2 if len(args.crop_size) == 1 else args.crop_size)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "logging_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1; got {getattr(args, name)}")
    for name in ("max_train_steps", "eval_steps", "checkpoints_total_limit", "max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1; got {getattr(args, name)}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0; got {args.temperature}")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            raise UsageError(f"--checkpointing_steps takes a positive integer or 'epoch'; got {args.checkpointing_steps!r}")
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).resolve().name


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
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def lr_factor(step: int, total: int, kind: str, warmup: int = 0, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based) of ``total``."""
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
# Losses of one step
# ---------------------------------------------------------------------------------------------------------
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean CE over valid pixels of ``logits`` (B, C, h, w) upsampled to ``labels`` (B, H, W); 0 if none is valid.

    (transformers' own loss divides by the number of valid pixels without a floor: NaN for an all-ignore batch.)
    """
    logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")  # batches carry uint8
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count


def step_losses(
    args: argparse.Namespace,
    s_logits: torch.Tensor,
    t_logits: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    alpha: float,
) -> tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The training objective of ``--distill`` and the weighted terms for logging (raw terms under ``raw_*``)."""
    ce = cross_entropy(s_logits, labels, ignore_index)
    valid = labels != ignore_index
    T, mode = args.temperature, args.distill
    if mode == "none":
        return ce, {"ce": ce.detach()}
    if mode in ("icsd", "aicsd"):
        ics = losses.icsd_loss(s_logits, t_logits, valid, T)
        kd = losses.kd_loss(s_logits, t_logits, valid, T)
        if mode == "aicsd":
            loss, terms = alw.alw_combine(ce, ics, kd, alpha, args.lambda_ics, args.lambda_kd)
        else:
            loss, terms = alw.fixed_combine(ce, ics, kd, args.lambda_ics, args.lambda_kd)
        terms = {k: v for k, v in terms.items() if k != "alpha"}
        terms.update(raw_ce=ce.detach(), raw_ics=ics.detach(), raw_kd=kd.detach())
        return loss, terms
    if mode == "kd":
        term, weight = losses.kd_loss(s_logits, t_logits, valid, T), args.lambda_kd
    elif mode == "cwd":
        term, weight = losses.cwd_loss(s_logits, t_logits, valid, T), args.lambda_cwd
    else:
        term, weight = losses.ickd_loss(s_logits, t_logits, valid), args.lambda_ickd
    return ce + weight * term, {"ce": ce.detach(), mode: (weight * term).detach(), f"raw_{mode}": term.detach()}


# ---------------------------------------------------------------------------------------------------------
# Evaluation: a confusion matrix on the device, summed over processes
# ---------------------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_labels: int, ignore_index: int) -> torch.Tensor:
    """``cm[true, pred]`` counts (C, C) int64 over pixels whose label is not ``ignore_index``."""
    keep = label != ignore_index
    idx = label[keep].long() * num_labels + pred[keep].long()
    return torch.bincount(idx, minlength=num_labels * num_labels).view(num_labels, num_labels)


@torch.no_grad()
def predict_batch(model: torch.nn.Module, batch: Dict[str, torch.Tensor], adapter: Callable) -> List[torch.Tensor]:
    """Argmax predictions at each label's full resolution, undoing eval padding and resizing."""
    pixel_values = batch["pixel_values"]
    logits = models.segmentation_logits(model, adapter(pixel_values)).float()
    logits = F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    preds = []
    for b in range(logits.shape[0]):
        ih, iw = batch["image_sizes"][b].tolist()
        lh, lw = batch["label_sizes"][b].tolist()
        one = logits[b : b + 1, :, :ih, :iw]
        if (ih, iw) != (lh, lw):
            one = F.interpolate(one, size=(lh, lw), mode="bilinear", align_corners=False)
        preds.append(one.argmax(dim=1)[0])
    return preds


def evaluate(
    accelerator: Accelerator,
    model: torch.nn.Module,
    dataloader: DataLoader,
    num_labels: int,
    ignore_index: int,
    adapter: Callable,
    desc: str = "eval",
) -> tuple[torch.Tensor, int]:
    """Confusion matrix (C, C) of ``model`` over the eval set and the number of samples skipped as undecodable
    (``--skip_bad_samples``), both summed over processes (each evaluates its own share)."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(num_labels, num_labels, dtype=torch.long, device=accelerator.device)
    skipped = 0
    for batch in tqdm(dataloader, desc=desc, disable=not accelerator.is_local_main_process, leave=False):
        skipped += int(batch.pop("num_skipped"))
        if batch["pixel_values"].shape[0] == 0:  # every sample of the batch was skipped
            continue
        # Sizes stay on the CPU: they are read per image, and reading them from the GPU would sync each time.
        batch = {k: v if k.endswith("_sizes") else v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            preds = predict_batch(model, batch, adapter)
        for b, pred in enumerate(preds):
            lh, lw = batch["label_sizes"][b].tolist()
            cm += confusion_matrix(pred, batch["labels"][b, :lh, :lw], num_labels, ignore_index)
    model.train(was_training)
    skipped = int(accelerator.reduce(torch.tensor(skipped, device=accelerator.device), reduction="sum"))
    if skipped:
        logger.warning(f"{desc}: {skipped} undecodable evaluation samples were skipped")
    return accelerator.reduce(cm, reduction="sum"), skipped


def metrics_from_confusion(cm: torch.Tensor) -> Dict[str, object]:
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

    def nanmean(x: torch.Tensor) -> Optional[float]:
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
# Checkpoints: written to a hidden folder, then renamed, so `latest` never picks a half-written one
# ---------------------------------------------------------------------------------------------------------
_CKPT_RE = re.compile(r"^step_(\d+)$")


def list_checkpoints(output_dir: str) -> List[Path]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)))


def check_finite_model(model: torch.nn.Module, what: str) -> None:
    """Raise FloatingPointError (one line for the user) if ``model`` holds NaN/Inf: such a model is never saved."""
    # A finite loss can still give a non-finite update (an overflowing gradient, a huge learning rate); with
    # --skip_nonfinite_steps the run would then skip every later step. The previous checkpoint stays as it is.
    bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:
        raise FloatingPointError(
            f"refusing to save {what}: the model holds NaN/Inf (first in {bad}); lower --learning_rate or set "
            "--max_grad_norm, then resume from the last checkpoint")


def save_checkpoint(accelerator: Accelerator, model: torch.nn.Module, output_dir: str, state: dict,
                    total_limit: Optional[int]) -> Path:
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


def resolve_resume(args: argparse.Namespace) -> Optional[Path]:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = list_checkpoints(args.output_dir)
        if not found:
            logger.warning(f"--resume_from_checkpoint latest: no checkpoint in {args.output_dir}; starting fresh")
            return None
        return found[-1]
    path = Path(args.resume_from_checkpoint)
    if not (path / STATE_FILE).is_file():
        raise UsageError(f"--resume_from_checkpoint {path}: not a complete checkpoint folder (no {STATE_FILE})")
    return path


# ---------------------------------------------------------------------------------------------------------
# Output: the student, its processor, metrics and a model card; optionally pushed to the Hub
# ---------------------------------------------------------------------------------------------------------
def write_model_card(args: argparse.Namespace, info: "data.DataInfo", results: dict, n_params: int) -> str:
    names = [info.id2label[i] for i in range(info.num_labels)]
    ious = results.get("eval_per_category_iou") or [None] * len(names)
    method = {
        "none": "none (cross-entropy only)",
        "kd": f"pixel-wise KD (λ_kd={args.lambda_kd}, T={args.temperature})",
        "cwd": f"channel-wise distillation (λ={args.lambda_cwd}, T={args.temperature})",
        "ickd": f"inter-channel correlation (λ={args.lambda_ickd})",
        "icsd": f"ICSD + KD, fixed weights (λ_ics={args.lambda_ics}, λ_kd={args.lambda_kd}, T={args.temperature})",
        "aicsd": (f"AICSD: ICSD + KD under adaptive loss weighting, {args.alw_granularity} granularity "
                  f"(λ_ics={args.lambda_ics}, λ_kd={args.lambda_kd}, T={args.temperature})"),
    }[args.distill]

    def pct(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}"

    dataset = info.source or args.dataset_name or args.dataset
    rows = "\n".join(f"| {n} | {pct(v)} |" for n, v in zip(names, ious))
    teacher_line = ""
    if "teacher_eval_mean_iou" in results:
        teacher_line = f"| teacher mIoU | {pct(results['teacher_eval_mean_iou'])} |\n"
    return f"""---
library_name: transformers
pipeline_tag: image-segmentation
tags: [semantic-segmentation, knowledge-distillation, aicsd]
---

# {Path(args.output_dir).name}

A semantic-segmentation student distilled with [AICSD](https://arxiv.org/abs/2308.04243) tooling.

- **Base model (student):** `{args.student_model_name_or_path}` ({n_params / 1e6:.2f} M parameters)
- **Teacher:** `{args.teacher_model_name_or_path or 'none'}`
- **Dataset:** `{dataset}` ({info.num_labels} classes, ignore index {info.ignore_index})
- **Distillation:** {method}
- **Training:** {results.get('train_steps')} optimizer steps, learning rate {args.learning_rate}, {args.lr_scheduler_type} schedule, seed {args.seed}

## Validation metrics

| metric | value (%) |
|---|---|
| mIoU | {pct(results.get('eval_mean_iou'))} |
| mean accuracy | {pct(results.get('eval_mean_accuracy'))} |
| overall (pixel) accuracy | {pct(results.get('eval_overall_accuracy'))} |
{teacher_line}
| class | IoU (%) |
|---|---|
{rows}

## Usage

```python
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation
model = AutoModelForSemanticSegmentation.from_pretrained("{args.hub_model_id or args.output_dir}")
processor = AutoImageProcessor.from_pretrained("{args.hub_model_id or args.output_dir}")
```

## Command

```
{' '.join(_redact(sys.argv))}
```
"""


def _redact(argv: Sequence[str]) -> List[str]:
    # No flag takes a token, but a user may still paste one into a path or id: never publish it.
    return [re.sub(r"hf_[A-Za-z0-9]{20,}", "hf_***", a) for a in argv]


def push_to_hub(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi

    api = HfApi()  # token from `hf auth login` or HF_TOKEN; never printed
    repo = api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo)
    api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=args.output_dir,
        commit_message=f"AICSD student ({args.distill})",
        ignore_patterns=[f"{CHECKPOINT_DIR}/*", "runs/*", "*.tmp*"],
    )
    logger.info(f"pushed {args.output_dir} to https://huggingface.co/{repo.repo_id}")


# ---------------------------------------------------------------------------------------------------------
# Signals: SIGTERM (preemption) asks for a checkpoint and a clean exit at the next step boundary
# ---------------------------------------------------------------------------------------------------------
_STOP_REQUESTED = False


def _on_sigterm(signum, frame) -> None:  # noqa: ARG001
    global _STOP_REQUESTED
    _STOP_REQUESTED = True


def _worker_init(_: int) -> None:
    # Workers must outlive a SIGTERM sent to the whole process group until the main process has saved.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _kill_dataloader_workers() -> None:
    # For a process that is about to exit. After an error, a DataLoader iterator may still hold its workers:
    # at exit, multiprocessing stops such daemonic children with SIGTERM, which ours ignore, and then joins
    # them - forever; and torch's own shutdown, when garbage collection gets to the iterator, waits 5-10 s.
    if hasattr(signal, "SIGCHLD"):  # torch's handler would report the kills as worker crashes
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join()


def _follow_launcher_sigterm() -> None:
    """Under a single-process ``accelerate launch``, receive SIGTERM when the launcher dies.

    That launcher waits on this process but does not forward SIGTERM to it (torchrun, which Accelerate uses
    for several processes, does): without this, a SIGTERM sent to the launcher alone would leave this
    process training on as an orphan instead of saving a checkpoint. Linux only (prctl PR_SET_PDEATHSIG).
    """
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    parent = os.getppid()
    try:
        parent_argv = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[:3]
    except OSError:
        return
    if not any(b"accelerate" in arg for arg in parent_argv):  # `accelerate launch`, `-m accelerate.commands.launch`
        return
    import ctypes

    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0:
        if os.getppid() != parent:  # the launcher died before prctl took effect
            _on_sigterm(signal.SIGTERM, None)


# ---------------------------------------------------------------------------------------------------------
# Before the first step: a few samples of each split, decoded and checked on CPU
# ---------------------------------------------------------------------------------------------------------
def preflight(train_hf, eval_hf, info: "data.DataInfo", skip_bad_samples: bool) -> None:
    """Decode ``PREFLIGHT_SAMPLES`` samples spread over each split, as the pipelines will.

    Problems that affect a whole dataset (label values outside the classes, images and masks of different
    sizes, undecodable files) then stop the run with one line before any model is loaded. Every other
    sample gets the same checks when its batch is loaded, still on CPU.
    """
    for split in (train_hf, eval_hf):
        ds = data.build_eval_dataset(split, info, pad_mean=(0.0, 0.0, 0.0), skip_bad_samples=skip_bad_samples)
        for index in torch.linspace(0, len(ds) - 1, min(len(ds), PREFLIGHT_SAMPLES)).round().long().unique().tolist():
            ds[index]  # raises DataError naming the sample (or, with skip_bad_samples, warns)


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    logger.info(accelerator.state, main_process_only=False)
    set_seed(args.seed)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _follow_launcher_sigterm()
    atexit.register(_kill_dataloader_workers)  # registered after multiprocessing's atexit handler: runs before it
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)

    # Load dataset
    train_hf, eval_hf, info = data.load_splits(
        args.dataset,
        args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        image_column=args.image_column,
        label_column=args.label_column,
        id2label_file=args.id2label,
        ignore_index=args.ignore_index,
        do_reduce_labels=args.do_reduce_labels,
        train_split=args.train_split,
        validation_split=args.validation_split,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
        trust_remote_code=args.trust_remote_code,
    )
    for note in info.notes:
        logger.info(note)
    crop_size = args.crop_size or info.crop_size
    data.check_split_sizes(train_hf, eval_hf, args.per_device_train_batch_size, accelerator.num_processes)
    preflight(train_hf, eval_hf, info, args.skip_bad_samples)

    # Load models
    student = models.load_student(args.student_model_name_or_path, info.id2label, trust_remote_code=args.trust_remote_code)
    processor = models.load_image_processor(args.student_model_name_or_path, trust_remote_code=args.trust_remote_code)
    mean, _ = models.processor_mean_std(processor)  # the student's mean colour is the padding (data.py)
    student_adapter = models.make_input_adapter(processor)
    teacher, teacher_adapter = None, None
    if args.teacher_model_name_or_path and (args.distill != "none" or args.eval_teacher):
        teacher = models.load_teacher(args.teacher_model_name_or_path, info.id2label,
                                      trust_remote_code=args.trust_remote_code)
        models.check_same_classes(teacher, student)
        teacher_adapter = models.make_input_adapter(
            models.load_image_processor(args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code))
        # Frozen and never wrapped in DDP (prepare refuses a model without trainable parameters).
        teacher.to(accelerator.device)
    n_params = models.count_parameters(student)
    logger.info(f"student {args.student_model_name_or_path}: {n_params / 1e6:.2f} M parameters; "
                f"teacher {args.teacher_model_name_or_path}: "
                f"{models.count_parameters(teacher) / 1e6 if teacher is not None else 0:.2f} M")

    # Preprocessing and data loaders
    train_ds = data.build_train_dataset(train_hf, info, crop_size=crop_size, pad_mean=mean, seed=args.seed,
                                        skip_bad_samples=args.skip_bad_samples)
    eval_ds = data.build_eval_dataset(eval_hf, info, pad_mean=mean, short_side=args.eval_short_side,
                                      skip_bad_samples=args.skip_bad_samples)
    num_labels, ignore_index = info.num_labels, info.ignore_index

    sampler = EpochShuffleSampler(len(train_ds), args.seed)
    loader_kwargs = dict(num_workers=args.dataloader_num_workers, worker_init_fn=_worker_init,
                         pin_memory=accelerator.device.type == "cuda",
                         generator=torch.Generator().manual_seed(args.seed))
    train_dataloader = DataLoader(
        train_ds, batch_sampler=BatchSampler(sampler, args.per_device_train_batch_size, drop_last=True),
        # Every sample's labels are checked as it is decoded, in the worker, on CPU (data.py): a bad label never
        # reaches a GPU as a device-side assert.
        collate_fn=data.train_collate, **loader_kwargs)
    # Evaluation is sharded by hand (every process a disjoint slice, no padding with repeated samples) so
    # the summed confusion matrix is exact for any number of processes.
    shard = Subset(eval_ds, range(accelerator.process_index, len(eval_ds), accelerator.num_processes))
    eval_dataloader = DataLoader(shard, batch_size=args.per_device_eval_batch_size, shuffle=False,
                                 collate_fn=data.eval_collate, **loader_kwargs)

    # Optimizer
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)

    # Prepare everything with our accelerator
    student, optimizer, train_dataloader = accelerator.prepare(student, optimizer, train_dataloader)
    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        max_train_steps = args.num_train_epochs * steps_per_epoch
        num_epochs = args.num_train_epochs
    else:
        max_train_steps = args.max_train_steps
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    alw_total = num_epochs if args.alw_granularity == "epoch" else max_train_steps
    if args.distill == "aicsd" and args.alw_granularity == "epoch" and num_epochs < 10:
        logger.warning(f"ALW at epoch granularity over {num_epochs} epoch(s): alpha takes only {num_epochs} values "
                       f"({', '.join(f'{alw.alw_alpha(e, num_epochs):.2f}' for e in range(num_epochs))}); "
                       "--alw_granularity step moves it every optimizer step")
    checkpoint_every = (steps_per_epoch if args.checkpointing_steps == "epoch"
                        else int(args.checkpointing_steps) if args.checkpointing_steps else None)

    if args.with_tracking:
        config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers("aicsd", config)

    results: dict = {}
    if args.eval_teacher and teacher is not None:
        cm, _ = evaluate(accelerator, teacher, eval_dataloader, num_labels, ignore_index, teacher_adapter,
                         "eval teacher")
        results.update({f"teacher_eval_{k}": v for k, v in metrics_from_confusion(cm).items()})
        logger.info(f"teacher mIoU {results['teacher_eval_mean_iou']}")

    # Resume
    completed_steps, start_epoch, resume_batches, skipped_steps, skipped_samples = 0, 0, 0, 0, 0
    resume_from = resolve_resume(args)
    if resume_from is not None:
        try:
            accelerator.load_state(str(resume_from))
        except (pickle.UnpicklingError, RuntimeError, OSError) as err:
            # Accelerate reads the pickles of a checkpoint with torch.load(weights_only=True): one holding
            # anything but tensors and plain data is refused, never run. Say that in one line (torch's own
            # message suggests turning the protection off).
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            detail = next((line for line in lines if "GLOBAL" in line), lines[0])
            if isinstance(err, pickle.UnpicklingError):
                detail = f"a pickle that torch.load(weights_only=True) refuses: {detail}"
            raise UsageError(f"--resume_from_checkpoint {resume_from}: cannot load it ({detail}); resume from "
                             "another checkpoint or start afresh") from None
        state = json.loads((resume_from / STATE_FILE).read_text())
        completed_steps, start_epoch = state["completed_steps"], state["epoch"]
        resume_batches = state["batches_in_epoch"]
        skipped_steps, skipped_samples = state.get("skipped_steps", 0), state.get("skipped_samples", 0)
        if resume_batches >= len(train_dataloader):
            start_epoch, resume_batches = start_epoch + 1, 0
        logger.info(f"resumed from {resume_from}: step {completed_steps}, epoch {start_epoch}, "
                    f"batch {resume_batches}")

    # Train!
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** {args.distill}: {len(train_ds)} training images, {num_epochs} epochs, {max_train_steps} "
                f"steps, global batch {total_batch}, {accelerator.num_processes} process(es) *****")
    progress = tqdm(range(max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process)
    # Logged: the loss and its terms (names fixed by --distill), averaged over the batches since the last log
    # and over all processes: `running` holds their sums and, last, the number of batches.
    probe = torch.zeros(1, num_labels, 2, 2)
    log_keys = ["loss", *step_losses(args, probe, probe, torch.zeros(1, 2, 2, dtype=torch.long), ignore_index, 0.5)[1]]
    running = torch.zeros(len(log_keys) + 1, device=accelerator.device)
    # Which logged values were non-finite since the last optimizer step, kept on the device: checking each
    # micro-batch's loss on the host would synchronise the GPU every micro-batch.
    nonfinite = torch.zeros(len(log_keys), dtype=torch.bool, device=accelerator.device)
    pending_skipped = 0  # undecodable samples met since the last optimizer step, on this process
    started = time.time()
    stop_reason = None

    def log_metrics(logs: dict, step: int) -> None:
        if args.with_tracking:
            accelerator.log(logs, step=step)
        if args.log_file and accelerator.is_main_process:
            with open(args.log_file, "a") as f:  # reopened each time: nothing is lost to a kill but the line
                f.write(json.dumps({"step": step, **logs}) + "\n")

    def training_state(epoch: int, batches_in_epoch: int) -> dict:
        return {"completed_steps": completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                "max_train_steps": max_train_steps, "alw_total": alw_total, "alw_granularity": args.alw_granularity,
                "skipped_steps": skipped_steps, "skipped_samples": skipped_samples, "distill": args.distill}

    for epoch in range(start_epoch, num_epochs):
        if completed_steps >= max_train_steps or stop_reason:
            break
        student.train()
        loader, batches_in_epoch = train_dataloader, 0
        if epoch == start_epoch and resume_batches:
            loader, batches_in_epoch = accelerator.skip_first_batches(train_dataloader, resume_batches), resume_batches
        # Accelerate's loader re-seeds the sampler with its own iteration count when iterated: align it with
        # the epoch, which differs after a resume; then seed the sampler and the augmentations ourselves.
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        train_ds.set_epoch(epoch)
        for batch in loader:
            batches_in_epoch += 1
            pending_skipped += int(batch.pop("num_skipped", torch.zeros(())).sum())
            alpha = alw.alw_alpha(epoch if args.alw_granularity == "epoch" else completed_steps, alw_total)
            with accelerator.accumulate(student):
                pixel_values, labels = batch["pixel_values"], batch["labels"]
                if pixel_values.shape[0] == 0:
                    # Every sample was skipped: a zero loss that touches every parameter keeps DDP in step.
                    loss = sum(p.sum() for p in student.parameters()) * 0.0
                    terms = {}
                else:
                    t_logits = None
                    if teacher is not None and args.distill != "none":
                        with torch.no_grad(), accelerator.autocast():
                            t_logits = models.segmentation_logits(teacher, teacher_adapter(pixel_values))
                    s_logits = models.segmentation_logits(student, student_adapter(pixel_values))
                    loss, terms = step_losses(args, s_logits, t_logits, labels, ignore_index, alpha)
                accelerator.backward(loss)
            if terms:
                values = torch.stack([loss.detach(), *(terms[k] for k in log_keys[1:])]).float()
                nonfinite |= ~torch.isfinite(values)
                running[:-1] += values
                running[-1] += 1
            if not accelerator.sync_gradients:
                continue

            # One small all-reduce per optimizer step so that every process takes the same decision.
            # It also sums the skipped samples, so that the count in checkpoints and results covers all processes.
            flags = torch.stack([nonfinite.any().float(), torch.tensor(float(_STOP_REQUESTED), device=accelerator.device),
                                 torch.tensor(float(pending_skipped), device=accelerator.device)])
            any_nonfinite, stop, newly_skipped = accelerator.reduce(flags, reduction="sum").tolist()
            skipped_samples, pending_skipped = skipped_samples + int(newly_skipped), 0
            if any_nonfinite:
                bad = [k for k, flag in zip(log_keys, nonfinite.tolist()) if flag]
                term = next((k for k in bad if k != "loss"), bad[0] if bad else "on another process")
                where = f"step {completed_steps + 1} (epoch {epoch}), term {term}"
                if not args.skip_nonfinite_steps:
                    raise FloatingPointError(
                        f"non-finite loss at {where}; lower --learning_rate, set --max_grad_norm, "
                        "or pass --skip_nonfinite_steps to skip such steps")
                skipped_steps += 1
                logger.warning(f"skipping the update of {where} (non-finite loss; {skipped_steps} skipped so far)")
                optimizer.zero_grad(set_to_none=True)
            else:
                if args.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                lr = args.learning_rate * lr_factor(completed_steps, max_train_steps, args.lr_scheduler_type,
                                                    args.num_warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            nonfinite.zero_()
            completed_steps += 1
            progress.update(1)

            if completed_steps % args.logging_steps == 0 or completed_steps == max_train_steps:
                totals = accelerator.reduce(running, reduction="sum").tolist()
                logs = {f"train/{k}": v / max(totals[-1], 1.0) for k, v in zip(log_keys, totals)}
                logs.update({"train/lr": optimizer.param_groups[0]["lr"], "train/epoch": epoch})
                if args.distill == "aicsd":
                    logs["train/alpha"] = alpha
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}", alpha=f"{alpha:.3f}")
                else:
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}")
                log_metrics(logs, completed_steps)
                running.zero_()
            if args.eval_steps and completed_steps % args.eval_steps == 0 and completed_steps < max_train_steps:
                cm, _ = evaluate(accelerator, accelerator.unwrap_model(student), eval_dataloader, num_labels,
                                 ignore_index, student_adapter)
                m = metrics_from_confusion(cm)
                logger.info(f"step {completed_steps}: mIoU {m['mean_iou']}, pixel acc {m['overall_accuracy']}")
                log_metrics({f"eval/{k}": v for k, v in m.items() if not k.startswith("per_")}, completed_steps)
                student.train()
            if stop:
                stop_reason = "SIGTERM"
            if (checkpoint_every and completed_steps % checkpoint_every == 0) or stop_reason:
                path = save_checkpoint(accelerator, student, args.output_dir, training_state(epoch, batches_in_epoch),
                                       args.checkpoints_total_limit)
                logger.info(f"saved {path}")
            if stop_reason or completed_steps >= max_train_steps:
                break
    progress.close()

    if stop_reason:
        logger.warning(f"{stop_reason}: checkpoint saved at step {completed_steps}; resume with "
                       f"--resume_from_checkpoint latest")
        accelerator.end_training()
        return {"stopped": stop_reason, "train_steps": completed_steps}
    check_finite_model(student, "the final model")

    # Evaluate
    cm, eval_skipped = evaluate(accelerator, accelerator.unwrap_model(student), eval_dataloader, num_labels,
                                ignore_index, student_adapter)
    results.update({f"eval_{k}": v for k, v in metrics_from_confusion(cm).items()})
    results.update(train_steps=completed_steps, train_runtime_s=round(time.time() - started, 2),
                   skipped_steps=skipped_steps, skipped_samples=skipped_samples, eval_skipped_samples=eval_skipped,
                   num_processes=accelerator.num_processes, distill=args.distill)
    logger.info(f"final mIoU {results['eval_mean_iou']}, mean acc {results['eval_mean_accuracy']}, "
                f"pixel acc {results['eval_overall_accuracy']}")
    if skipped_samples:
        logger.warning(f"{skipped_samples} undecodable training samples were skipped")
    log_metrics({f"eval/{k[5:]}": v for k, v in results.items() if k.startswith("eval_") and isinstance(v, float)},
                completed_steps)

    # Save
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(student)
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=accelerator.get_state_dict(student))
    if accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)
        with open(Path(args.output_dir) / "all_results.json", "w") as f:
            json.dump(results, f, indent=2)
        (Path(args.output_dir) / "README.md").write_text(write_model_card(args, info, results, n_params))
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def _one_line(error: BaseException) -> str:
    # An error raised inside a DataLoader worker arrives wrapped with the worker's traceback: keep its last line.
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if "Original Traceback" in str(error) and lines:
        return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
    return " ".join(lines)


def cli() -> int:
    try:
        main()
        return 0
    except (UsageError, data.DataError, models.ModelSourceError, models.ClassMismatchError, FloatingPointError) as e:
        message = _one_line(e)
    # Printed once the failed run's workers are stopped and its frames released: its progress bar closes (and
    # redraws itself) first, so the error stays the last line the user sees.
    _kill_dataloader_workers()
    gc.collect()
    print(f"train_icsd.py: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(cli())
