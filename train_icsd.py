#!/usr/bin/env python
"""Distil a light semantic-segmentation student from a heavy teacher with AICSD (arXiv:2308.04243).

    accelerate launch train_icsd.py --dataset cityscapes
    accelerate launch train_icsd.py --dataset synthetic --distill none \
        --student_model_name_or_path config:segformer-b0 --output_dir runs/teacher   # train a teacher

``--distill`` picks the objective: ``none`` (the student alone, also how a teacher is trained), ``kd``,
``cwd``, ``ickd`` (baselines), ``icsd`` (CE + ICSD + KD with fixed weights) and ``aicsd`` (the same under
Adaptive Loss Weighting). Mixed precision, several GPUs and several nodes come from Accelerate.

This file is the recipe; checkpoints, the output folder, stop requests and the one-line errors live in
``utils_training.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import BatchSampler, DataLoader, Subset
from tqdm.auto import tqdm
from transformers import get_scheduler

import alw
import data
import losses
import models
import pictures
import teacher_cache
import utils_hub
import utils_training as utils
from utils_training import UsageError

logger = get_logger(__name__)

# The logged terms of each objective, as step_losses returns them ("loss", the total, is logged first).
LOSS_TERMS: dict[str, tuple[str, ...]] = {
    "none": ("ce",), "kd": ("ce", "kd", "raw_kd"), "cwd": ("ce", "cwd", "raw_cwd"), "ickd": ("ce", "ickd", "raw_ickd"),
    "icsd": ("ce", "ics", "kd", "raw_ce", "raw_ics", "raw_kd"), "aicsd": ("ce", "ics", "kd", "raw_ce", "raw_ics",
                                                                          "raw_kd"),
}
DISTILL_MODES = tuple(LOSS_TERMS)
# transformers' schedule names (get_scheduler); "poly" is "polynomial" with power 0.9, the segmentation default.
SCHEDULERS = ("poly", "polynomial", "linear", "cosine", "cosine_with_restarts", "constant", "constant_with_warmup",
              "inverse_sqrt")
PREFLIGHT_SAMPLES = 8  # per split, decoded and checked before any model is loaded
# Every flag that changes the trained weights: a resumed run must have the same values (after defaults).
RUN_SETTINGS = (
    "distill", "lambda_ics", "lambda_kd", "lambda_cwd", "lambda_ickd", "temperature", "alw_granularity",
    "student_model_name_or_path", "teacher_model_name_or_path", "dataset", "dataset_name", "dataset_config_name",
    "image_column", "label_column", "id2label", "ignore_index", "do_reduce_labels", "train_split",
    "validation_split", "train_val_split", "max_train_samples", "skip_bad_samples", "crop_size", "seed",
    "learning_rate", "weight_decay", "lr_scheduler_type", "num_warmup_steps", "max_grad_norm", "max_train_steps",
    "num_train_epochs", "teacher_cache", "teacher_cache_stride",
)
# Refused before anything runs, as they would fail later or train silently wrong: a negative clip norm ascends the
# gradient, 0 freezes the model, a negative weight flips a loss term.
AT_LEAST_1 = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
              "num_train_epochs", "logging_steps", "max_train_steps", "eval_steps", "checkpoints_total_limit",
              "max_train_samples", "max_eval_samples", "eval_short_side", "teacher_cache_stride")
AT_LEAST_0 = ("num_pictures", "dataloader_num_workers", "num_warmup_steps")
FINITE_POSITIVE = ("learning_rate", "temperature", "max_grad_norm")
FINITE_NON_NEGATIVE = ("weight_decay", "lambda_ics", "lambda_kd", "lambda_cwd", "lambda_ickd")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default once: argparse's, unless the help already says where it comes from."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        shown = "none" if action.default is None else "off" if action.default is False else "%(default)s"
        return f"{text} (default: {shown})"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with defaults filled in from the dataset preset; a bad value raises UsageError."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    g = p.add_argument_group("data").add_argument
    g("--dataset", help=f"Preset ({', '.join(sorted(data.DATASET_PRESETS))}): its Hub id, classes, crop, models.")
    g("--dataset_name", help="Hub id or local folder (default: the preset's; one of the two is needed).")
    g("--dataset_config_name", help="Configuration of the dataset, if it has several.")
    g("--image_column", help="Image column (default: found among image, pixel_values, img).")
    g("--label_column", help="Label column (default: found among label, mask, annotation, gt, ...).")
    g("--id2label", help="JSON file {id: name} (default: the dataset's id2label.json, else the preset's).")
    g("--ignore_index", type=int, help="Label value to ignore (default: the preset's, else 255).")
    g("--do_reduce_labels", action="store_true", default=None,
      help="Label 0 becomes ignored, the others shift down by one, ADE20K style (default: the preset's, else off).")
    g("--train_split", default="train", help="Training split.")
    g("--validation_split", help="Evaluation split (default: validation/val/valid/test, else --train_val_split).")
    g("--train_val_split", type=float, default=0.1, help="Share of train carved out (seeded) without an eval split.")
    g("--crop_size", type=int, nargs="+", help="Training crop: S or H W (default: the preset's).")
    g("--eval_short_side", type=int, help="Resize evaluation images to this short side (default: whole images).")
    g("--max_train_samples", type=int, help="Use only the first N training samples.")
    g("--max_eval_samples", type=int, help="Use only the first N evaluation samples.")
    g("--skip_bad_samples", action="store_true", help="Skip (and count) undecodable samples.")
    g("--dataloader_num_workers", type=int, default=2, help="DataLoader worker processes per process.")
    g = p.add_argument_group("models").add_argument
    g("--teacher_model_name_or_path", help="Hub id, local folder (e.g. a --distill none run) or config: preset "
                                           "(default: the preset's teacher).")
    g("--student_model_name_or_path", "--model_name_or_path",
      help="Hub id, local folder or config: preset (default: the dataset preset's student).")
    g("--trust_remote_code", action="store_true", help="Allow models and datasets to run their own code.")
    g("--eval_teacher", action="store_true", help="Evaluate the teacher once before training.")
    g = p.add_argument_group("distillation").add_argument
    g("--distill", choices=DISTILL_MODES, default="aicsd",
      help="Objective: none (CE only; also trains a teacher), kd, cwd, ickd, icsd (fixed weights) or aicsd.")
    g("--lambda_ics", type=float, default=alw.DEFAULT_LAMBDA_ICS, help="Weight of ICSD.")
    g("--lambda_kd", type=float, default=alw.DEFAULT_LAMBDA_KD, help="Weight of pixel-wise KD.")
    g("--lambda_cwd", type=float, default=3.0, help="Weight of the CWD baseline.")
    g("--lambda_ickd", type=float, default=10.0, help="Weight of the ICKD baseline.")
    g("--temperature", type=float, default=alw.DEFAULT_TEMPERATURE, help="Softmax temperature T of KD, ICSD, CWD.")
    g("--alw_granularity", choices=("step", "epoch"), default="step",
      help="ALW's alpha rises every optimizer step (step / steps) or once per epoch (epoch / epochs: the paper's).")
    g("--teacher_cache", metavar="DIR",
      help="Keep the teacher's logits of the whole training images in DIR (reused when teacher, data and classes "
           "match), cropped, scaled and flipped as each image: training then runs no teacher.")
    g("--teacher_cache_stride", type=int, default=1,
      help="Keep the cached logits this many times coarser than the teacher's output (2: a quarter of the bytes).")
    g = p.add_argument_group("optimization").add_argument
    g("--per_device_train_batch_size", type=int, default=8, help="Training batch per process.")
    g("--per_device_eval_batch_size", type=int, default=4, help="Evaluation batch per process.")
    g("--learning_rate", type=float, default=6e-5, help="AdamW learning rate (config: models from scratch need ~1e-3).")
    g("--weight_decay", type=float, default=0.01, help="AdamW weight decay.")
    g("--num_train_epochs", type=int, default=50, help="Epochs, unless --max_train_steps is given.")
    g("--max_train_steps", type=int, help="Optimizer steps; overrides --num_train_epochs (default: epochs x steps "
                                          "per epoch).")
    g("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g("--lr_scheduler_type", choices=SCHEDULERS, default="poly",
      help="Learning-rate schedule (transformers' get_scheduler; poly: polynomial, power 0.9).")
    g("--num_warmup_steps", type=int, default=0, help="Linear warm-up steps.")
    g("--max_grad_norm", type=float, help="Clip gradients to this norm (default: no clipping).")
    g("--mixed_precision", choices=("no", "fp16", "bf16"),
      help="Mixed precision (default: what `accelerate config` / `accelerate launch` says).")
    g("--seed", type=int, default=42, help="Seed of data order, augmentation, initialization.")
    g = p.add_argument_group("output").add_argument
    g("--output_dir", default="outputs/aicsd", help="Where the student, checkpoints and logs go.")
    g("--overwrite_output_dir", action="store_true", help="Start a new run in --output_dir even if it holds another "
                                                          "run's files or files no run wrote (the export is replaced).")
    g("--checkpointing_steps", help="Save the training state every N optimizer steps, or 'epoch' (default: never).")
    g("--checkpoints_total_limit", type=int, help="Keep only the newest N checkpoints (default: keep all).")
    g("--resume_from_checkpoint", help="A checkpoint folder, or 'latest' (default: start afresh).")
    g("--eval_steps", type=int, help="Evaluate every N optimizer steps (default: only at the end).")
    g("--logging_steps", type=int, default=10, help="Log the loss terms every N optimizer steps.")
    g("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    g("--report_to", default="all", help="Tracker(s) for --with_tracking: tensorboard, wandb, ..., all.")
    g("--log_file", help="Append the logged metrics, averaged over all processes, as JSON lines ({'step': N, ...}); a "
                         "resume logs the steps after its checkpoint again, the later line wins. (default: none)")
    g("--push_to_hub", action="store_true", help="Push the student and its model card to the Hub.")
    g("--hub_model_id", help="Hub repo id (default: the output folder's name).")
    g("--hub_private_repo", action="store_true", help="Create the Hub repo private.")
    g("--hub_license", help="Licence id for the model card, e.g. apache-2.0 (default: the dataset card's license).")
    g("--num_pictures", type=int, default=utils_hub.DEFAULT_NUM_PICTURES,
      help="Validation images drawn in predictions.png and ics.png (0: no pictures).")
    args = p.parse_args(argv)
    _resolve_defaults(args)
    _check_values(args)
    return args


def _resolve_defaults(args: argparse.Namespace) -> None:
    """Fill in what the preset implies, so that equal settings compare equal (a resume checks them)."""
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
        if preset is None or preset.default_teacher is None:
            raise UsageError(f"--distill {args.distill} needs --teacher_model_name_or_path")
        args.teacher_model_name_or_path = preset.default_teacher
    if args.crop_size is None:
        args.crop_size = list(preset.crop_size if preset else (512, 512))
        size = re.fullmatch(r"(\d+)x(\d+)", args.dataset_config_name or "")
        if args.dataset == "synthetic" and size:  # scenes smaller than the preset's crop
            args.crop_size = [min(c, int(s)) for c, s in zip(args.crop_size, size.groups())]
    if len(args.crop_size) not in (1, 2) or min(args.crop_size) <= 0:
        raise UsageError(f"--crop_size takes S or H W (positive); got {args.crop_size}")
    args.crop_size = tuple(args.crop_size * 2 if len(args.crop_size) == 1 else args.crop_size)
    if args.ignore_index is None:
        args.ignore_index = preset.ignore_index if preset else 255
    if args.do_reduce_labels is None:
        args.do_reduce_labels = preset is not None and preset.label_handling == data.LABELS_REDUCE
    args.lr_scheduler_type = "polynomial" if args.lr_scheduler_type == "poly" else args.lr_scheduler_type
    if args.push_to_hub and args.hub_model_id is None:
        args.hub_model_id = Path(args.output_dir).resolve().name
        if problem := utils_hub.repo_id_problem(args.hub_model_id):
            raise UsageError(f"--hub_model_id defaults to the --output_dir folder's name, which {problem}: pass one")


def _check_values(args: argparse.Namespace) -> None:
    """Refuse the values of :data:`AT_LEAST_1` and its kin that would fail later or train silently wrong, a tracker
    that is not installed and a push that would fail after training."""
    for name in AT_LEAST_1 + AT_LEAST_0:
        value, least = getattr(args, name), 1 if name in AT_LEAST_1 else 0
        if value is not None and value < least:
            raise UsageError(f"--{name} must be >= {least}; got {value}")
    for name in FINITE_POSITIVE + FINITE_NON_NEGATIVE:
        value, positive = getattr(args, name), name in FINITE_POSITIVE
        if value is not None and not (math.isfinite(value) and (value > 0 or value == 0 and not positive)):
            raise UsageError(f"--{name} must be a finite number {'> 0' if positive else '>= 0'}; got {value}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32); got {args.seed}")
    if args.teacher_cache is not None and args.distill == "none":
        raise UsageError("--teacher_cache keeps a teacher's logits, but --distill none trains without a teacher: drop "
                         "it, or pick a distilling --distill (kd, cwd, ickd, icsd, aicsd)")
    if not 0 < args.train_val_split < 1:
        raise UsageError(f"--train_val_split must be between 0 and 1; got {args.train_val_split}")
    if args.checkpointing_steps not in (None, "epoch") and not (
            args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) >= 1):
        raise UsageError(f"--checkpointing_steps takes a positive integer or 'epoch'; got {args.checkpointing_steps!r}")
    # Before the id reaches a tracker's hparams or the card: a token pasted here would be published.
    if args.hub_model_id is not None and (problem := utils_hub.repo_id_problem(args.hub_model_id)):
        raise UsageError(f"--hub_model_id {problem}")
    if args.with_tracking:
        from accelerate.tracking import get_available_trackers

        installed = sorted(str(getattr(t, "value", t)) for t in get_available_trackers())
        asked = [name.strip() for name in args.report_to.split(",")]
        if missing := [n for n in asked if n not in installed and not (n == "all" and installed)]:
            raise UsageError(f"--report_to {args.report_to}: {', '.join(missing)} is not an installed tracker; "
                             f"installed: {', '.join(installed) or 'none (pip install tensorboard, for one)'}")
    if args.push_to_hub:
        try:
            utils_hub.probe_hub_login()
        except utils_hub.HubProbeError as err:
            advice = (": unset it, or drop --push_to_hub and upload the folder later (`hf upload`)"
                      if err.kind == utils_hub.OFFLINE else "")
            raise UsageError(f"--push_to_hub needs the Hub, but {err}{advice}") from None


def run_settings(args: argparse.Namespace, accelerator: Accelerator) -> dict:
    """What defines the run, as ``run.json`` records it: :data:`RUN_SETTINGS`, the global batch and the mixed
    precision. A local folder is recorded by name and fingerprint, never its path; the id2label file by content."""
    settings = {name: utils.fingerprint(getattr(args, name)) for name in RUN_SETTINGS}
    id2label = Path(args.id2label) if args.id2label else None
    settings.update(
        teacher_model_name_or_path=None if args.distill == "none" else settings["teacher_model_name_or_path"],
        id2label=hashlib.sha256(id2label.read_bytes()).hexdigest()[:10] if id2label and id2label.is_file()
        else args.id2label,
        num_train_epochs=None if args.max_train_steps is not None else args.num_train_epochs,  # steps override it
        teacher_cache=args.teacher_cache is not None,  # cached or live logits, wherever they are kept
        teacher_cache_stride=args.teacher_cache_stride if args.teacher_cache else None,
        global_batch_size=args.per_device_train_batch_size * accelerator.num_processes
        * args.gradient_accumulation_steps,
        mixed_precision=accelerator.mixed_precision)
    return json.loads(json.dumps(settings))  # tuples as lists, as a reread run.json holds them


# --- The objective of each --distill mode
def step_losses(args: argparse.Namespace, s_logits: torch.Tensor, t_logits: torch.Tensor | None,
                labels: torch.Tensor, ignore_index: int, alpha: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss of ``--distill`` and its terms for logging, named as in :data:`LOSS_TERMS`.

    ``s_logits`` (B, C, hs, ws), ``t_logits`` (B, C, ht, wt) or None for ``none``, ``labels`` (B, H, W). The
    logged terms are weighted as they enter the loss; the unweighted ones are logged as ``raw_*``.
    """
    ce = losses.masked_cross_entropy(s_logits, labels, ignore_index)
    valid, T, mode = labels != ignore_index, args.temperature, args.distill
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
        return loss, {**terms, "raw_ce": ce.detach(), "raw_ics": ics.detach(), "raw_kd": kd.detach()}
    if mode == "kd":
        term, weight = losses.kd_loss(s_logits, t_logits, valid, T), args.lambda_kd
    elif mode == "cwd":
        term, weight = losses.cwd_loss(s_logits, t_logits, valid, T), args.lambda_cwd
    else:
        term, weight = losses.ickd_loss(s_logits, t_logits, valid), args.lambda_ickd
    return ce + weight * term, {"ce": ce.detach(), mode: (weight * term).detach(), f"raw_{mode}": term.detach()}


def teacher_logits(nets, args: argparse.Namespace, pixel_values: torch.Tensor, accelerator: Accelerator,
                   cached: torch.Tensor | None = None) -> torch.Tensor | None:
    """The frozen teacher's logits (B, C, ht, wt), or None when the objective needs no teacher; ``cached``: the
    batch's from ``--teacher_cache`` instead (float16). The first batch's are checked (one host sync): non-finite
    teacher logits are the teacher's fault, not a learning rate's."""
    if nets.teacher is None or args.distill == "none":
        return None
    if cached is not None:
        logits = cached.float()
    else:
        with torch.no_grad(), accelerator.autocast():
            logits = models.segmentation_logits(nets.teacher, nets.teacher_adapter(pixel_values))
    if not nets.teacher_checked:
        nets.teacher_checked = True
        if not torch.isfinite(logits).all():
            hint = "; try --mixed_precision bf16 or no" if accelerator.mixed_precision == "fp16" else ""
            hint += f"; then delete --teacher_cache {args.teacher_cache} to rebuild it" if cached is not None else ""
            raise FloatingPointError(f"the teacher {args.teacher_model_name_or_path} gives NaN/Inf logits on the "
                                     f"first training batch: its weights are finite, its activations overflow{hint}")
    return logits


# --- Evaluation: a confusion matrix on the device, summed over processes
def predict_batch(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Argmax maps (lh, lw) at each label's full resolution from ``logits`` (B, C, h, w) of ``batch``, undoing the
    evaluation padding and resizing."""
    pixel_values = batch["pixel_values"]
    logits = F.interpolate(logits.float(), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    preds = []
    for b in range(logits.shape[0]):
        (ih, iw), (lh, lw) = batch["image_sizes"][b].tolist(), batch["label_sizes"][b].tolist()
        one = logits[b : b + 1, :, :ih, :iw]
        if (ih, iw) != (lh, lw):
            one = F.interpolate(one, size=(lh, lw), mode="bilinear", align_corners=False)
        preds.append(one.argmax(dim=1)[0])
    return preds


@torch.no_grad()
def evaluate(accelerator: Accelerator, model: torch.nn.Module, adapter: Callable, dataloader: DataLoader,
             info: data.DataInfo, desc: str = "eval") -> tuple[dict | None, int]:
    """The metrics (``utils.metrics_from_confusion``) of ``model`` over the evaluation set and the samples skipped
    as undecodable, both summed over processes (each evaluates its own shard). None when a process was asked to
    stop: each stops within one batch. Without a terminal, progress is logged every 30 s."""
    was_training = model.training
    model.eval()
    cm = torch.zeros(info.num_labels, info.num_labels, dtype=torch.long, device=accelerator.device)
    skipped, stopped, started, shown = 0, False, time.time(), time.time()
    logger.info(f"{desc}: {utils.plural(len(dataloader.dataset), 'image')} on this process")
    quiet = not utils.show_progress_bars(accelerator)
    for i, batch in enumerate(tqdm(dataloader, desc=desc, disable=quiet, leave=False)):
        if utils.stop_requested():  # shards differ in length: processes agree after the loop, not per batch
            stopped = True
            break
        skipped += int(batch.pop("num_skipped"))
        if batch["pixel_values"].shape[0] == 0:  # every sample of the batch was skipped
            continue
        # Sizes stay on the CPU: they are read per image, and reading them from the GPU would sync each time.
        batch = {k: v if k.endswith("_sizes") else v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        with accelerator.autocast():
            preds = predict_batch(models.segmentation_logits(model, adapter(batch["pixel_values"])), batch)
        for b, pred in enumerate(preds):
            lh, lw = batch["label_sizes"][b].tolist()
            cm += utils.confusion_matrix(pred, batch["labels"][b, :lh, :lw], info.num_labels, info.ignore_index)
        if quiet and time.time() - shown > 30:
            shown, elapsed = time.time(), time.time() - started
            logger.info(f"{desc}: batch {i + 1}/{len(dataloader)}, {utils.format_duration(elapsed)}, about "
                        f"{utils.format_duration(elapsed / (i + 1) * (len(dataloader) - i - 1))} left")
    model.train(was_training)
    flags = accelerator.reduce(torch.tensor([skipped, int(stopped)], device=accelerator.device), reduction="sum")
    skipped, stopped = (int(v) for v in flags)
    if skipped and not stopped:
        logger.warning(f"{desc}: {skipped} undecodable evaluation samples were skipped")
    return None if stopped else utils.metrics_from_confusion(accelerator.reduce(cm, reduction="sum")), skipped


def eval_logs(metrics: dict) -> dict[str, float]:
    """The metrics a tracker and ``--log_file`` take, as ``eval/*`` (no per-class lists, no undefined means)."""
    return {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}


# --- The pieces main() puts together
def load_data(args: argparse.Namespace, accelerator: Accelerator):
    """The training and evaluation splits and their :class:`data.DataInfo`, refused in one line before any model
    loads when they cannot work: too few classes, a split smaller than a global batch, or a problem of the whole
    dataset (labels outside the classes, images and masks of different sizes, undecodable files) met in
    ``PREFLIGHT_SAMPLES`` samples spread over each split. Every other sample is checked when its batch is loaded."""
    options = dataclasses.replace(data.DataOptions.from_args(args), validation_fraction=args.train_val_split)
    train_hf, eval_hf, info = data.load_splits(options)
    for note in info.notes:
        logger.info(note)
    if info.num_labels < 2:
        raise UsageError(f"the dataset has one class ({info.id2label[0]!r}): segmentation needs at least 2; check "
                         "its id2label.json or --id2label")
    if info.num_labels == 2 and args.distill in ("icsd", "aicsd"):  # two rows normalised: always [[0, 1], [1, 0]]
        raise UsageError(f"--distill {args.distill} with 2 classes: the inter-class similarity matrix of two classes "
                         "is always [[0, 1], [1, 0]] once its rows are normalised, so ICSD would add nothing (only CE "
                         "and KD would act); use --distill kd, or a dataset of 3 or more classes")
    data.check_split_sizes(train_hf, eval_hf, args.per_device_train_batch_size, accelerator.num_processes)
    for split in (train_hf, eval_hf):
        ds = data.build_eval_dataset(split, info, pad_mean=(0.0, 0.0, 0.0), skip_bad_samples=args.skip_bad_samples)
        for index in torch.linspace(0, len(ds) - 1, min(len(ds), PREFLIGHT_SAMPLES)).round().long().unique().tolist():
            ds[index]  # raises DataError naming the sample (or, with skip_bad_samples, warns)
    return train_hf, eval_hf, info


def load_models(args: argparse.Namespace, info: data.DataInfo, accelerator: Accelerator) -> argparse.Namespace:
    """The student (trainable) and the frozen teacher (on the device, never wrapped in DDP; None when the run needs
    none) with their image processors' input adapters, and ``min_side``, the smallest input side both run on."""
    trust = args.trust_remote_code
    nets = argparse.Namespace(teacher=None, teacher_adapter=None, teacher_checked=False)
    nets.student = models.load_student(args.student_model_name_or_path, info.id2label, trust_remote_code=trust)
    nets.processor = models.load_image_processor(args.student_model_name_or_path, trust_remote_code=trust)
    nets.student_adapter = models.make_input_adapter(nets.processor)
    nets.mean = models.processor_mean_std(nets.processor)[0]  # the student's mean colour pads images
    if args.teacher_model_name_or_path and (args.distill != "none" or args.eval_teacher):
        nets.teacher = models.load_teacher(args.teacher_model_name_or_path, info.id2label, trust_remote_code=trust)
        models.check_same_classes(nets.teacher, nets.student)
        nets.teacher_adapter = models.make_input_adapter(
            models.load_image_processor(args.teacher_model_name_or_path, role="teacher", trust_remote_code=trust))
        nets.teacher.to(accelerator.device)  # prepare() refuses a model without trainable parameters
    roles = [("student", nets.student)] + ([("teacher", nets.teacher)] if nets.teacher is not None else [])
    nets.min_side = max(check_model(args, role, model) for role, model in roles)
    logger.info("; ".join(f"{role} {getattr(args, f'{role}_model_name_or_path')}: "
                          f"{models.count_parameters(model) / 1e6:.2f} M parameters" for role, model in roles))
    return nets


def check_model(args: argparse.Namespace, role: str, model: torch.nn.Module) -> int:
    """Refuse in one line a model whose weights hold NaN/Inf, and a crop, ``--eval_short_side`` or batch of one
    that it cannot take (found by dry passes); return the smallest input side it runs on."""
    flag = f"--{role}_model_name_or_path {getattr(args, f'{role}_model_name_or_path')}"
    if (bad := utils.first_nonfinite(model)) is not None:
        raise UsageError(f"{flag}: the {role}'s weights hold NaN/Inf (first in {bad}); train it again or load "
                         "another checkpoint")
    side, crop = models.smallest_input_side(model), args.crop_size
    if min(crop) < side and (role == "student" or args.distill != "none"):
        raise UsageError(f"the training crop {crop[0]}x{crop[1]} (--crop_size) is smaller than the {role} ({flag}) "
                         f"takes: at least {side} px per side")
    if role == "student" and args.per_device_train_batch_size == 1 and (
            problem := models.one_sample_training_error(model, max(side, min(crop)))):
        raise UsageError(f"--per_device_train_batch_size 1: the student ({flag}) cannot train on one sample per "
                         f"device ({problem}); use 2 or more")
    if args.eval_short_side is not None and args.eval_short_side < side:
        raise UsageError(f"--eval_short_side {args.eval_short_side} is smaller than the {role} ({flag}) takes: at "
                         f"least {side} px")
    return side


def build_dataloaders(args, train_hf, eval_hf, info: data.DataInfo, nets, accelerator: Accelerator):
    """``train``: a seeded permutation per epoch cut to whole optimizer steps, with per-sample deterministic
    augmentation (``sampler`` and ``train_ds`` take ``set_epoch``); ``eval``: this process's shard, exact for
    any number of processes (disjoint slices, no padding with repeated samples)."""
    train_ds = data.build_train_dataset(train_hf, info, crop_size=args.crop_size, pad_mean=nets.mean, seed=args.seed,
                                        skip_bad_samples=args.skip_bad_samples)
    eval_ds = data.build_eval_dataset(eval_hf, info, pad_mean=nets.mean, short_side=args.eval_short_side,
                                      skip_bad_samples=args.skip_bad_samples, min_size=nets.min_side)
    kwargs = dict(num_workers=args.dataloader_num_workers, worker_init_fn=utils.worker_init,
                  pin_memory=accelerator.device.type == "cuda", generator=torch.Generator().manual_seed(args.seed))
    step_samples = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    sampler = utils.EpochShuffleSampler(len(train_ds), args.seed, multiple=step_samples)
    if len(sampler) == 0:
        raise UsageError(f"the training split has {len(train_ds)} samples, fewer than one optimizer step takes "
                         f"({args.per_device_train_batch_size} per device x {accelerator.num_processes} processes x "
                         f"{args.gradient_accumulation_steps} accumulation steps = {step_samples}): lower the batch "
                         "size or --gradient_accumulation_steps, or use more training data")
    train = DataLoader(train_ds, batch_sampler=BatchSampler(sampler, args.per_device_train_batch_size, drop_last=True),
                       collate_fn=data.train_collate, **kwargs)
    shard = Subset(eval_ds, range(accelerator.process_index, len(eval_ds), accelerator.num_processes))
    evaluation = DataLoader(shard, batch_size=args.per_device_eval_batch_size, collate_fn=data.eval_collate, **kwargs)
    return argparse.Namespace(train=train, eval=evaluation, sampler=sampler, train_ds=train_ds, eval_ds=eval_ds)


def plan_schedule(args: argparse.Namespace, steps_per_epoch: int) -> argparse.Namespace:
    """``max_train_steps``, ``num_epochs``, the ALW horizon ``alw_total`` and the checkpoint interval."""
    if args.max_train_steps is None:
        max_train_steps, num_epochs = args.num_train_epochs * steps_per_epoch, args.num_train_epochs
    else:
        max_train_steps, num_epochs = args.max_train_steps, math.ceil(args.max_train_steps / steps_per_epoch)
    if args.distill == "aicsd" and args.alw_granularity == "epoch":
        if num_epochs == 1:  # alpha = epoch / epochs is 0 for the whole run: no CE, no ICSD, only KD
            raise UsageError("--alw_granularity epoch over a 1-epoch run keeps ALW's alpha at 0 throughout (no CE, "
                             "no ICSD: pure KD); use --alw_granularity step (the default) or train for more epochs")
        if num_epochs < 10:
            logger.warning(f"ALW at epoch granularity over {num_epochs} epochs: alpha takes only {num_epochs} values "
                           f"({', '.join(f'{alw.alw_alpha(e, num_epochs):.2f}' for e in range(num_epochs))}); "
                           "--alw_granularity step moves it every optimizer step")
    every = {None: None, "epoch": steps_per_epoch}.get(args.checkpointing_steps) or int(args.checkpointing_steps or 0)
    return argparse.Namespace(steps_per_epoch=steps_per_epoch, max_train_steps=max_train_steps, num_epochs=num_epochs,
                              alw_total=num_epochs if args.alw_granularity == "epoch" else max_train_steps,
                              checkpoint_every=every or None)


def alw_alpha_at(args: argparse.Namespace, plan: argparse.Namespace, epoch: int, step: int) -> float:
    """ALW's alpha for optimizer step ``step`` (0-based) of ``epoch``: ``step / steps`` or ``epoch / epochs``."""
    return alw.alw_alpha(epoch if args.alw_granularity == "epoch" else step, plan.alw_total)


def lr_schedule(args: argparse.Namespace, optimizer, max_train_steps: int) -> Callable[[int], float]:
    """The learning-rate factor of each optimizer step (0-based), from transformers' schedule of that name; a pure
    function of the step, so that a resumed run sets exactly the rates an uninterrupted one did."""
    kwargs = {"power": 0.9, "lr_end": 0.0} if args.lr_scheduler_type == "polynomial" else None
    return get_scheduler(args.lr_scheduler_type, optimizer.optimizer, num_warmup_steps=args.num_warmup_steps,
                         num_training_steps=max_train_steps, scheduler_specific_kwargs=kwargs).lr_lambdas[0]


def epoch_loader(accelerator: Accelerator, loaders: argparse.Namespace, epoch: int, skip_batches: int):
    """The training loader of ``epoch``, past its first ``skip_batches`` batches (a resumed epoch)."""
    loader = accelerator.skip_first_batches(loaders.train, skip_batches) if skip_batches else loaders.train
    # Accelerate's loader re-seeds the sampler with its own iteration count: align it with the epoch, which
    # differs after a resume; then seed the sampler and the augmentations ourselves.
    loader.set_epoch(epoch)
    loaders.sampler.set_epoch(epoch)
    loaders.train_ds.set_epoch(epoch)
    return loader


def setup_logging(accelerator: Accelerator, seed: int) -> None:
    """Log lines with a time stamp (the main process's, warnings from the others), quiet library bars, the seed
    and the stop handlers: what every run starts with."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)
    if not accelerator.is_local_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    logger.info(str(accelerator.state).replace("\n\n", "\n").strip().replace("\n", "; "), main_process_only=False)
    utils.quiet_libraries(accelerator)
    set_seed(seed)
    utils.install_stop_handlers()


# --- After training: the export, all or nothing
def save_model(args, accelerator: Accelerator, student, nets) -> None:
    """The trained student for ``from_pretrained`` (weights, config, an image processor that prepares images as
    evaluation does), moved into place all or nothing, before the final evaluation measures exactly it."""
    utils.check_finite_model(student, "the final model")
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(student)
    state_dict = accelerator.get_state_dict(student)  # every process takes part (the student may be sharded)
    with utils.ExportWriter(accelerator, args.output_dir, utils.state_bytes(unwrapped) + 2**20) as staging:
        if accelerator.is_main_process:
            unwrapped.save_pretrained(staging, save_function=accelerator.save, state_dict=state_dict)
            utils_hub.evaluation_processor(nets.processor, args.eval_short_side).save_pretrained(staging)
            utils_hub.make_readable(staging)


@torch.no_grad()
def picture_rows(accelerator: Accelerator, roles: dict[str, tuple[torch.nn.Module, Callable]], eval_ds, eval_hf,
                 info: data.DataInfo, count: int, temperature: float) -> list[pictures.PictureRow]:
    """The predictions and row-normalised ICS matrices (C, C) on ``count`` fixed validation images of each role:
    "student" (and "teacher") mapped to (model in eval mode, input adapter)."""
    rows = []
    for index in pictures.picture_indices(len(eval_ds), count):
        if (sample := eval_ds[index]).get("skipped"):
            continue
        batch = {k: v if k.endswith("_sizes") else v.to(accelerator.device)
                 for k, v in data.eval_collate([sample]).items() if k != "num_skipped"}
        label, out = batch["labels"][0], {}
        for role, (model, adapter) in roles.items():
            with accelerator.autocast():
                logits = models.segmentation_logits(model, adapter(batch["pixel_values"]))
                out[role] = predict_batch(logits, batch)[0].cpu().numpy()
            ics = losses.ics_matrix(logits.float(), (label != info.ignore_index)[None], temperature)
            out[f"{role}_ics"] = losses.row_normalize(ics)[0].cpu().numpy()
        rows.append(pictures.PictureRow(index=index, image=data.decode_image(eval_hf[index][info.image_column]),
                                        label=label.cpu().numpy(), **out))
    return rows


@torch.no_grad()
def inference_timing(accelerator: Accelerator, roles: dict, eval_ds) -> utils_hub.InferenceTiming | None:
    """Milliseconds per image of each role's forward pass (the median of 5, after a warm-up) on the first
    validation image at the evaluation size, on this device: what the card's speed sentence says."""
    sample = next((eval_ds[i] for i in range(min(len(eval_ds), 3)) if not eval_ds[i].get("skipped")), None)
    if sample is None:
        return None
    pixels, times = data.eval_collate([sample])["pixel_values"].to(accelerator.device), {}  # padded as evaluated
    cuda = accelerator.device.type == "cuda"
    for role, (model, adapter) in roles.items():
        laps = []
        for _ in range(6):
            started = time.perf_counter()
            with accelerator.autocast():
                models.segmentation_logits(model, adapter(pixels))
            if cuda:
                torch.cuda.synchronize()
            laps.append(1000 * (time.perf_counter() - started))
        times[role] = sorted(laps[1:])[2]
    device = torch.cuda.get_device_name() if cuda else f"CPU ({utils.plural(torch.get_num_threads(), 'thread')})"
    return utils_hub.InferenceTiming(device=device, student_ms=times["student"], teacher_ms=times.get("teacher"),
                                     image_size=tuple(pixels.shape[-2:]))


def save_card(args, accelerator: Accelerator, student, nets, loaders, eval_hf, info, results: dict) -> None:
    """Next to the saved model: the pictures, ``all_results.json`` and the model card (all or nothing); the push."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(student).eval()  # training is over
    roles = {"student": (unwrapped, nets.student_adapter)}
    if nets.teacher is not None:
        roles["teacher"] = (nets.teacher, nets.teacher_adapter)
    # Every process draws the predictions (the student may be sharded); the main process writes.
    rows = picture_rows(accelerator, roles, loaders.eval_ds, eval_hf, info, args.num_pictures, args.temperature)
    timing = inference_timing(accelerator, roles, loaders.eval_ds) if accelerator.is_main_process else None
    with utils.ExportWriter(accelerator, args.output_dir, 2**20, keep_others=True) as staging:
        if accelerator.is_main_process:
            (staging / utils_hub.RESULTS_FILE).write_text(json.dumps(results, indent=2))
            describe = utils_hub.describe_model
            split = str(getattr(eval_hf, "split", None) or "validation")
            utils_hub.export_folder(
                staging, args=args, info=info, results=results, processor=nets.processor, rows=rows, argv=sys.argv,
                student=describe(args.student_model_name_or_path, unwrapped), timing=timing,
                teacher=None if nets.teacher is None else describe(args.teacher_model_name_or_path, nets.teacher),
                dataset=utils_hub.describe_dataset(info, split, len(loaders.eval_ds), args.max_eval_samples is not None),
            )
    if args.push_to_hub and accelerator.is_main_process:
        utils_hub.push_to_hub(args.output_dir, args.hub_model_id, private=args.hub_private_repo,
                              commit_message=f"AICSD student ({args.distill})")
    accelerator.wait_for_everyone()


# --- main
def main(argv: Sequence[str] | None = None) -> dict:
    """Train (and distil) the student as the flags say; return the final metrics (``all_results.json``)."""
    args = parse_args(argv)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=args.report_to if args.with_tracking else None,
                              project_dir=str(Path(args.output_dir) / utils_hub.TRACKER_DIR))  # outside the export
    setup_logging(accelerator, args.seed)
    # Before anything else: the folder is writable, locked, and not another run's.
    sources = {f: getattr(args, f) for f in ("teacher_model_name_or_path", "student_model_name_or_path", "dataset_name")}
    run = utils.claim_output_dir(accelerator, args.output_dir, run_settings(args, accelerator), sources,
                                 args.resume_from_checkpoint, args.overwrite_output_dir, args.log_file)

    # Data and models, checked; then the loaders, the optimizer, the schedule and the trackers
    train_hf, eval_hf, info = load_data(args, accelerator)
    nets = load_models(args, info, accelerator)
    loaders = build_dataloaders(args, train_hf, eval_hf, info, nets, accelerator)
    if args.teacher_cache:  # one teacher pass over the training images: the batches then carry its logits
        loaders.train_ds.teacher_cache = teacher_cache.prepare(
            accelerator, nets.teacher, nets.teacher_adapter, train_hf, info, args.teacher_cache,
            crop_size=args.crop_size, stride=args.teacher_cache_stride, num_workers=args.dataloader_num_workers,
            skip_bad_samples=args.skip_bad_samples)
    optimizer = torch.optim.AdamW(nets.student.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    student, optimizer, loaders.train = accelerator.prepare(nets.student, optimizer, loaders.train)
    plan = plan_schedule(args, len(loaders.train) // args.gradient_accumulation_steps)
    schedule = lr_schedule(args, optimizer, plan.max_train_steps)
    if args.with_tracking:
        accelerator.init_trackers("aicsd", {k: v if isinstance(v, (int, float, bool)) else utils_hub.redact(str(v))
                                            for k, v in vars(args).items()})  # no path of this machine
    log = utils.metric_logger(accelerator, args.with_tracking, args.log_file)
    results = {}
    if args.eval_teacher and nets.teacher is not None:  # stopped by SIGTERM: so is training, at its first step
        metrics, _ = evaluate(accelerator, nets.teacher, nets.teacher_adapter, loaders.eval, info, "eval teacher")
        if metrics is not None:
            results = {f"teacher_eval_{k}": v for k, v in metrics.items()}
            logger.info(f"teacher: {utils.format_metrics(metrics)}")

    extra = {"schedule": {"max_train_steps": plan.max_train_steps}, "alw_total": plan.alw_total,
             "alw_granularity": args.alw_granularity, "distill": args.distill}
    state = utils.resume_or_start(accelerator, run, args.resume_from_checkpoint, extra["schedule"])
    batch_samples = args.per_device_train_batch_size * accelerator.num_processes  # one micro-batch, all processes
    logger.info(f"***** {args.distill}: {len(loaders.train_ds)} training images, {utils.plural(plan.num_epochs, 'epoch')}, "
                f"{plan.max_train_steps} steps, global batch {batch_samples * args.gradient_accumulation_steps}, "
                f"{utils.plural(accelerator.num_processes, 'process')} *****")
    progress = tqdm(range(plan.max_train_steps), initial=state.completed_steps,
                    disable=not utils.show_progress_bars(accelerator))
    tracker = utils.LossTracker(["loss", *LOSS_TERMS[args.distill]], accelerator.device)
    sitting, sitting_steps, stop_reason = time.time(), 0, None
    for epoch in range(state.epoch, plan.num_epochs):
        if state.completed_steps >= plan.max_train_steps or stop_reason:
            break
        student.train()  # the teacher stays in eval mode throughout
        skip = state.samples_in_epoch // batch_samples if epoch == state.epoch else 0
        state.epoch, state.samples_in_epoch = epoch, skip * batch_samples
        for batch in epoch_loader(accelerator, loaders, epoch, skip):
            state.samples_in_epoch += batch_samples
            tracker.pending_skipped += int(batch.pop("num_skipped", torch.zeros(())).sum())
            alpha = alw_alpha_at(args, plan, epoch, state.completed_steps)
            with accelerator.accumulate(student):
                if batch["pixel_values"].shape[0] == 0:
                    # Every sample was skipped: a zero loss that touches every parameter keeps DDP in step.
                    loss, terms = sum(p.sum() for p in student.parameters()) * 0.0, {}
                else:
                    t_logits = teacher_logits(nets, args, batch["pixel_values"], accelerator,
                                              batch.get("teacher_logits"))
                    s_logits = models.segmentation_logits(student, nets.student_adapter(batch["pixel_values"]))
                    loss, terms = step_losses(args, s_logits, t_logits, batch["labels"], info.ignore_index, alpha)
                accelerator.backward(loss)
            tracker.add(loss, terms)
            if not accelerator.sync_gradients:
                continue

            outcome = tracker.end_step(accelerator, utils.stop_requested())
            state.skipped_samples += outcome.skipped_samples
            if outcome.nonfinite_term is not None:
                raise FloatingPointError(f"non-finite loss at step {state.completed_steps + 1} (epoch {epoch}), term "
                                         f"{outcome.nonfinite_term}; lower --learning_rate or set --max_grad_norm, "
                                         "then resume from the last checkpoint")
            if args.max_grad_norm is not None:
                accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            for group in optimizer.param_groups:  # a pure function of the step: a resume sets the same rates
                group["lr"] = args.learning_rate * schedule(state.completed_steps)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.completed_steps += 1
            sitting_steps += 1
            progress.update(1)

            step, last = state.completed_steps, state.completed_steps >= plan.max_train_steps
            if step % args.logging_steps == 0 or last:
                logs = {**tracker.averages(accelerator), "train/lr": optimizer.param_groups[0]["lr"], "train/epoch": epoch}
                logs.update({"train/alpha": alpha} if args.distill == "aicsd" else {})
                progress.set_postfix({k[6:]: f"{logs[k]:.4f}" for k in ("train/loss", "train/alpha") if k in logs})
                logger.info(utils.format_train_log(step, plan.max_train_steps, logs, time.time() - sitting, sitting_steps))
                log(logs, step)
            stop = outcome.stop  # a SIGTERM during a mid-training evaluation stops it too
            if args.eval_steps and step % args.eval_steps == 0 and not last:
                metrics, _ = evaluate(accelerator, accelerator.unwrap_model(student), nets.student_adapter,
                                      loaders.eval, info)
                if metrics is None:
                    stop = True
                else:
                    logger.info(f"step {step}: {utils.format_metrics(metrics)}")
                    log(eval_logs(metrics), step)
            stop_reason = utils.stop_cause() if stop else None
            if (plan.checkpoint_every and step % plan.checkpoint_every == 0) or stop_reason:
                path = utils.save_checkpoint(accelerator, student, run, state, extra, args.checkpoints_total_limit)
                logger.info(f"saved {path}")
            if stop_reason or last:
                break
        else:
            state.samples_in_epoch = 0
    progress.close()

    # Save, then evaluate: the metrics are those of the saved model, and a failed evaluation keeps it
    if not stop_reason:
        save_model(args, accelerator, student, nets)
        with utils.report_saved_model(args.output_dir):
            metrics, eval_skipped = evaluate(accelerator, accelerator.unwrap_model(student), nets.student_adapter,
                                             loaders.eval, info)
        if metrics is None:  # SIGTERM: with a checkpoint of this step, a resume evaluates and finishes
            stop_reason = f"{utils.stop_cause()} during the final evaluation"
            utils.save_checkpoint(accelerator, student, run, state, extra, args.checkpoints_total_limit)
    if stop_reason:
        logger.warning(f"{stop_reason}: checkpoint saved at step {state.completed_steps}; resume with "
                       f"--resume_from_checkpoint latest")
        utils.end_run(accelerator)
        return {"stopped": stop_reason, "train_steps": state.completed_steps}
    results.update({f"eval_{k}": v for k, v in metrics.items()})
    results.update(train_steps=state.completed_steps, train_runtime_s=round(time.time() - sitting, 2),
                   skipped_samples=state.skipped_samples, eval_skipped_samples=eval_skipped,
                   num_processes=accelerator.num_processes, distill=args.distill)
    logger.info(f"final: {utils.format_metrics(metrics)}")
    if state.skipped_samples:
        logger.warning(f"{state.skipped_samples} undecodable training samples were skipped")
    log(eval_logs(metrics), state.completed_steps)
    with utils.report_saved_model(args.output_dir):  # pictures, results and model card (and push)
        save_card(args, accelerator, student, nets, loaders, eval_hf, info, results)
    utils.training_done()  # nothing is left to save: a SIGTERM from now on ends the process at once
    utils.end_run(accelerator)
    utils.release_locks()
    return results


def cli(argv: Sequence[str] | None = None) -> int:
    """``python train_icsd.py ...``: the user's mistakes end as one line on stderr with exit status 2."""
    user_errors = (UsageError, data.DataError, models.ModelSourceError, models.ClassMismatchError, FloatingPointError,
                   utils.AfterTrainingError)
    return utils.run_cli(lambda: main(argv), user_errors, "train_icsd.py")


if __name__ == "__main__":
    sys.exit(cli())
