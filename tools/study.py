#!/usr/bin/env python
"""CamVid study: does AICSD help? Teacher once, then every method × seed at an equal number of steps.

    python tools/study.py                                   # the full study (GPU sized), ../shared/data/camvid
    python tools/study.py --quick                           # a CPU smoke run of every stage, a few minutes
    python tools/study.py --teacher_path runs/teacher ...   # reuse a trained teacher

Each run is `accelerate launch train_icsd.py ...` in its own folder under --output_dir; a run whose
folder already holds all_results.json is not repeated, so an interrupted study (or one split across
several GPU slices) continues where it stopped. At the end it writes

    results.json   every run's metrics, and mean ± std per method
    results.md     the table (validation mIoU and pixel accuracy, mean ± std over seeds)
    miou.png       mIoU per method (bars: mean, ticks: seeds)
    ics.png        ICS matrices (row-normalised, averaged over validation images): teacher, baseline, AICSD
    overlays.png   image | ground truth | teacher | baseline student | AICSD student, for a few images
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent  # the repo root: this file lives in tools/
sys.path.insert(0, str(ROOT))  # the flat modules (data, losses, models)
METHODS = ("none", "kd", "cwd", "ickd", "icsd", "aicsd")
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "camvid"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="CamVid folder (Hub-style parquet) or Hub id.")
    p.add_argument("--output_dir", default="outputs/camvid_study")
    p.add_argument("--teacher", default="config:segformer-b2")
    p.add_argument("--teacher_path", default=None, help="A trained teacher folder: skip teacher training.")
    p.add_argument("--student", default="config:segformer-b0")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--teacher_steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--crop", type=int, nargs=2, default=[352, 352])
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--eval_short_side", type=int, default=None)
    p.add_argument("--mixed_precision", default="bf16" if torch.cuda.is_available() else "no")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--extra", default="", help="Extra train_icsd.py flags for the student runs (quoted).")
    p.add_argument("--with_tracking", action="store_true", help="Log the figures to the trackers too.")
    p.add_argument("--quick", action="store_true", help="Tiny models, steps and data: a CPU smoke run.")
    p.add_argument("--carve", type=float, default=None,
                   help="Hold out this share of the training split (with --carve_seed) once, in OUTPUT/data: every "
                        "run trains on the rest; --eval_on picks the carve or the validation split.")
    p.add_argument("--carve_seed", type=int, default=0)
    p.add_argument("--eval_on", choices=("validation", "carve"), default="validation")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD[:FLAGS]",
                   help="A student run per seed named NAME: --distill METHOD plus FLAGS (e.g. "
                        "'kd_t4=kd:--temperature 4'); replaces --methods when given.")
    args = p.parse_args(argv)
    if args.quick:
        args.teacher, args.student = "config:segformer-b0", "config:segformer-tiny"
        args.teacher_steps, args.steps, args.seeds = 4, 3, [0]
        args.crop, args.batch_size, args.warmup, args.workers = [64, 96], 2, 1, 0
        args.max_train_samples, args.max_eval_samples = 8, 3
        args.learning_rate = 1e-3
    return args


# ---------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------
def parse_variant(text: str) -> tuple[str, tuple[str, list[str]]]:
    """``"kd_t4=kd:--temperature 4"`` -> ``("kd_t4", ("kd", ["--temperature", "4"]))``."""
    name, _, rest = text.partition("=")
    method, _, flags = (rest or name).partition(":")
    if method not in METHODS or not name:
        raise SystemExit(f"study.py: error: --variant {text!r}: want NAME=METHOD[:FLAGS] with METHOD in {METHODS}")
    return name, (method, shlex.split(flags))


def carve_dataset(args: argparse.Namespace, out: Path) -> Path:
    """``out/data``: the training split less a held-out share (``carve``), and the validation split, as parquet
    with the dataset's id2label.json; written once (the row indices of the carve go into carve.json)."""
    import datasets

    folder = out / "data"
    if (folder / "carve.json").is_file():
        return folder
    source = Path(args.data)
    splits = datasets.load_dataset(str(source))
    train = splits["train"].add_column("source_row", list(range(len(splits["train"]))))
    parts = train.train_test_split(test_size=args.carve, seed=args.carve_seed, shuffle=True)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, split in (("train", parts["train"]), ("carve", parts["test"]), ("validation", splits["validation"])):
        split.to_parquet(str(folder / "data" / f"{name}-00000-of-00001.parquet"))
    for extra in ("id2label.json", "README.md"):  # the classes, and the dataset's licence and source
        if (source / extra).is_file():
            (folder / extra).write_bytes((source / extra).read_bytes())
    (folder / "carve.json").write_text(json.dumps({
        "fraction": args.carve, "seed": args.carve_seed, "train_rows": len(parts["train"]),
        "carve_rows": sorted(parts["test"]["source_row"]), "how": "datasets.Dataset.train_test_split"}, indent=2))
    return folder


def run_training(args: argparse.Namespace, out: Path, flags: list[str], log: Path) -> dict:
    """One `accelerate launch train_icsd.py` run; skipped when its results already exist."""
    results = out / "all_results.json"
    if results.is_file():
        print(f"   (done before: {out})")
        return json.loads(results.read_text())
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--dynamo_backend", "no",
                "--mixed_precision", args.mixed_precision, "--num_processes", str(args.num_processes)]
    if args.num_processes > 1:
        launcher.append("--multi_gpu")
    common = ["--dataset_name", args.data, "--validation_split", args.eval_on, "--crop_size", *map(str, args.crop),
              "--per_device_train_batch_size", str(args.batch_size), "--per_device_eval_batch_size", "4",
              "--learning_rate", str(args.learning_rate), "--num_warmup_steps", str(args.warmup),
              "--dataloader_num_workers", str(args.workers), "--output_dir", str(out), "--logging_steps", "50",
              "--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--resume_from_checkpoint", "latest"]
    for flag, value in (("--eval_short_side", args.eval_short_side), ("--max_train_samples", args.max_train_samples),
                        ("--max_eval_samples", args.max_eval_samples)):
        if value is not None:
            common += [flag, str(value)]
    cmd = launcher + [str(ROOT / "train_icsd.py")] + common + flags
    with open(log, "a") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
    start = time.time()
    with open(log, "a") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"study.py: error: run {out} failed (exit {proc.returncode}); see {log}")
    print(f"   {time.time() - start:.0f} s")
    return json.loads(results.read_text())


def class_names(model_dir: Path) -> list[str] | None:
    """The class names in index order from a saved model's config.json, or None when it has none."""
    config = model_dir / "config.json"
    if not config.is_file():
        return None
    id2label = json.loads(config.read_text()).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)] or None


def teacher_description(args: argparse.Namespace) -> str:
    """The teacher as the table names it: preset and steps, or a folder with the steps its run recorded."""
    if args.teacher_path is None:
        return f"`{args.teacher}` ({args.teacher_steps} steps)"
    results = Path(args.teacher_path) / "all_results.json"
    steps = json.loads(results.read_text()).get("train_steps") if results.is_file() else None
    return f"`{args.teacher_path}`" + (f" ({steps} steps)" if steps is not None else "")


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    table = {}
    for method, results in runs.items():
        row = {}
        for key in ("eval_mean_iou", "eval_overall_accuracy", "eval_mean_accuracy"):
            values = [100 * r[key] for r in results]
            row[key] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "values": values}
        table[method] = row
    return table


# (better, worse): each pair's per-seed difference is reported when both methods ran.
PAIRS = (("aicsd", "kd"), ("kd", "none"), ("aicsd", "none"), ("icsd", "kd"), ("aicsd", "aicsd_live"))


def paired_differences(runs: dict[str, list[dict]], seeds: Sequence[int],
                       key: str = "eval_mean_iou") -> dict[str, dict]:
    """Per-seed differences ``better - worse`` in percentage points, for every pair of PAIRS that ran.

    ``runs[method][i]`` is the run of ``seeds[i]``; both runs of a pair share the seed, hence the data order,
    the augmentation and (for the same architecture) the initial weights, so the difference removes that
    variation. Returns ``{"aicsd-kd": {"seeds", "values", "mean", "std", "wins"}, ...}``; ``wins`` counts the
    seeds where the difference is > 0.
    """
    out = {}
    for better, worse in PAIRS:
        if better not in runs or worse not in runs:
            continue
        if not len(runs[better]) == len(runs[worse]) == len(seeds):
            raise ValueError(f"{better} and {worse} need one run per seed {list(seeds)}")
        values = [100 * (b[key] - w[key]) for b, w in zip(runs[better], runs[worse])]
        out[f"{better}-{worse}"] = {"seeds": list(seeds), "values": values, "mean": statistics.fmean(values),
                                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                    "wins": sum(v > 0 for v in values)}
    return out


def ordering_verdict(runs: dict[str, list[dict]], seeds: Sequence[int], key: str = "eval_mean_iou") -> str | None:
    """One sentence: did AICSD > KD > student alone hold in every seed, on average, or not at all?"""
    if not all(m in runs for m in ("aicsd", "kd", "none")):
        return None
    held = [a[key] > k[key] > n[key] for a, k, n in zip(runs["aicsd"], runs["kd"], runs["none"])]
    mean = {m: statistics.fmean(r[key] for r in runs[m]) for m in ("aicsd", "kd", "none")}
    on_average = mean["aicsd"] > mean["kd"] > mean["none"]
    where = "in every seed" if all(held) else f"in {sum(held)} of {len(held)} seeds"
    # The margins go with the verdict: "held on average" by +0.00 points is not evidence.
    return (f"AICSD > KD > student alone ({key.removeprefix('eval_')}) held {where}; "
            f"on average it {'held' if on_average else 'did not hold'} "
            f"(AICSD − KD {100 * (mean['aicsd'] - mean['kd']):+.2f}, KD − alone {100 * (mean['kd'] - mean['none']):+.2f} "
            f"points).")


def gap_closed(table: dict[str, dict], teacher: dict) -> dict[str, float]:
    """The share of the teacher - student-alone mIoU gap each distilled method closes (mean over seeds)."""
    if "none" not in table:
        return {}
    alone, top = table["none"]["eval_mean_iou"]["mean"], 100 * teacher["eval_mean_iou"]
    return {m: (row["eval_mean_iou"]["mean"] - alone) / (top - alone) for m, row in table.items()
            if m != "none" and top != alone}


def markdown(table: dict[str, dict], teacher: dict, args: argparse.Namespace, device: str, minutes: float,
             paired: dict[str, dict] | None = None, verdict: str | None = None,
             class_names: Sequence[str] | None = None) -> str:
    names = {"none": "student alone", "kd": "+ KD", "cwd": "+ CWD", "ickd": "+ ICKD", "icsd": "+ ICSD + KD (fixed)",
             "aicsd": "+ AICSD (ICSD + KD, ALW)"}
    lines = [f"CamVid {args.eval_on} split ({'held out of train, ' if args.eval_on == 'carve' else ''}"
             f"{'all its images' if args.max_eval_samples is None else f'first {args.max_eval_samples} images'}), "
             f"{args.steps} student steps, "
             f"seeds {args.seeds}, crop {args.crop[0]}x{args.crop[1]}, batch {args.batch_size}, "
             f"teacher {teacher_description(args)}, student `{args.student}`; {device}; "
             f"{minutes:.1f} min of student training in all (sum of the runs' train_runtime_s).", "",
             "| method | mIoU (%) | pixel acc (%) | mean acc (%) | teacher-student gap closed |", "|---|---|---|---|---|",
             f"| teacher | {100 * teacher['eval_mean_iou']:.2f} | {100 * teacher['eval_overall_accuracy']:.2f} | "
             f"{100 * teacher['eval_mean_accuracy']:.2f} | |"]
    gaps = gap_closed(table, teacher)
    for method, row in table.items():
        cells = [f"{row[k]['mean']:.2f} ± {row[k]['std']:.2f}"
                 for k in ("eval_mean_iou", "eval_overall_accuracy", "eval_mean_accuracy")]
        cells.append(f"{100 * gaps[method]:+.0f}%" if method in gaps else "")
        lines.append(f"| {names.get(method, method)} | " + " | ".join(cells) + " |")
    if paired:
        short = {"none": "alone", "kd": "KD", "aicsd": "AICSD", "icsd": "ICSD+KD", "aicsd_live": "AICSD (live)"}
        lines += ["", "Paired mIoU differences (percentage points; same seed, same data order):", "",
                  "| difference | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean ± std | > 0 in |",
                  "|---|" + "---|" * (len(args.seeds) + 2)]
        for name, d in paired.items():
            better, worse = name.split("-")
            lines.append(f"| {short[better]} − {short[worse]} | " + " | ".join(f"{v:+.2f}" for v in d["values"])
                         + f" | {d['mean']:+.2f} ± {d['std']:.2f} | {d['wins']} of {len(d['values'])} |")
    if verdict:
        lines += ["", verdict]
    per_class = teacher.get("eval_per_category_iou")
    if per_class:
        names_ = list(class_names) if class_names else [str(i) for i in range(len(per_class))]
        lines += ["", "Teacher per-class IoU (%):", "", "| " + " | ".join(names_) + " |", "|" + "---|" * len(names_),
                  "| " + " | ".join("n/a" if v is None else f"{100 * v:.1f}" for v in per_class) + " |"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Figures, drawn with PIL so the study needs nothing beyond the project's requirements
# ---------------------------------------------------------------------------------------------------------
_PALETTE = np.array([[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
                     [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192], [200, 200, 40],
                     [40, 200, 200], [200, 40, 200], [120, 220, 90], [250, 150, 70]], dtype=np.uint8)


def colourise(label: np.ndarray, ignore_index: int) -> np.ndarray:
    out = _PALETTE[np.asarray(label) % len(_PALETTE)]
    out[np.asarray(label) == ignore_index] = 0
    return out


def heat(matrix: np.ndarray, cell: int = 18) -> Image.Image:
    """A C×C matrix as a heatmap, dark blue (0) to yellow (max)."""
    m = matrix / max(float(matrix.max()), 1e-12)
    low, mid, high = np.array([20, 20, 90.0]), np.array([30, 150, 140.0]), np.array([250, 230, 40.0])
    t = m[..., None]
    rgb = np.where(t < 0.5, low + (mid - low) * (t / 0.5), mid + (high - mid) * ((t - 0.5) / 0.5))
    img = Image.fromarray(rgb.astype(np.uint8))
    return img.resize((m.shape[1] * cell, m.shape[0] * cell), Image.NEAREST)


def grid(tiles: list[list[Image.Image]], captions: list[str], pad: int = 4) -> Image.Image:
    w = max(t.width for row in tiles for t in row)
    h = max(t.height for row in tiles for t in row)
    top = 16
    canvas = Image.new("RGB", (len(tiles[0]) * (w + pad) + pad, top + len(tiles) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for j, caption in enumerate(captions):
        draw.text((pad + j * (w + pad), 2), caption, fill="black")
    for i, row in enumerate(tiles):
        for j, tile in enumerate(row):
            canvas.paste(tile, (pad + j * (w + pad), top + pad + i * (h + pad)))
    return canvas


def bar_chart(table: dict[str, dict], teacher_miou: float) -> Image.Image:
    methods = list(table)
    width, height, left, bottom = 120 * len(methods) + 80, 320, 50, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    top_value = max([teacher_miou] + [max(r["eval_mean_iou"]["values"]) for r in table.values()]) * 1.1 or 1.0

    def y(v: float) -> float:
        return height - bottom - (height - bottom - 20) * v / top_value

    draw.line([(left, y(0)), (width - 10, y(0))], fill="black")
    draw.line([(left, y(teacher_miou)), (width - 10, y(teacher_miou))], fill=(200, 60, 60))
    draw.text((left + 4, y(teacher_miou) - 12), f"teacher {teacher_miou:.1f}", fill=(200, 60, 60))
    for i, method in enumerate(methods):
        row = table[method]["eval_mean_iou"]
        x0 = left + 20 + i * 120
        draw.rectangle([x0, y(row["mean"]), x0 + 70, y(0)], fill=(70, 110, 190))
        for v in row["values"]:
            draw.line([(x0 + 10, y(v)), (x0 + 60, y(v))], fill="black")
        draw.text((x0, y(0) + 6), method, fill="black")
        draw.text((x0, y(row["mean"]) - 12), f"{row['mean']:.1f}", fill="black")
    draw.text((4, 4), "validation mIoU (%)", fill="black")
    return img


@torch.no_grad()
def figures(args: argparse.Namespace, teacher_dir: Path, students: dict[str, Path], out: Path, n_images: int = 3
            ) -> dict[str, Image.Image]:
    """ICS heatmaps and prediction overlays from the saved models, on the first validation images."""
    import data
    import losses
    import models

    _, eval_hf, info = data.load_splits(data.DataOptions(dataset_name=args.data, validation_split=args.eval_on,
                                                         max_eval_samples=args.max_eval_samples))
    # Spread the images over the split: consecutive video frames would show the same scene.
    eval_hf = eval_hf.select(np.linspace(0, len(eval_hf) - 1, min(n_images, len(eval_hf))).round().astype(int).tolist())
    nets = {"teacher": teacher_dir, **students}
    preds: dict[str, list[np.ndarray]] = {}
    ics: dict[str, np.ndarray] = {}
    shown = None
    for name, folder in nets.items():
        model = models.load_model(str(folder), info.id2label, role="teacher").eval()
        processor = models.load_image_processor(str(folder))
        adapter = models.make_input_adapter(processor)
        ds = data.build_eval_dataset(eval_hf, info, pad_mean=models.processor_mean_std(processor)[0],
                                     short_side=args.eval_short_side)
        preds[name], mats = [], []
        shown = []
        for i in range(len(ds)):
            item = ds[i]
            logits = models.segmentation_logits(model, adapter(item["pixel_values"][None])).float()
            valid = item["labels"][None] != info.ignore_index
            mats.append(losses.row_normalize(losses.ics_matrix(logits, valid))[0].numpy())
            up = F.interpolate(logits, size=item["labels"].shape, mode="bilinear", align_corners=False)
            preds[name].append(up.argmax(1)[0].numpy())
            shown.append((item["pixel_values"].permute(1, 2, 0).numpy(), item["labels"].numpy()))
        ics[name] = np.mean(mats, axis=0)
    scale = 0.5 if shown[0][1].shape[0] > 200 else 1.0

    def tile(arr: np.ndarray) -> Image.Image:
        img = Image.fromarray(arr)
        return img.resize((int(img.width * scale), int(img.height * scale)), Image.NEAREST) if scale != 1 else img

    rows = []
    for i, (image, label) in enumerate(shown):
        image = np.asarray(Image.fromarray(image).resize(label.shape[::-1], Image.BILINEAR))
        row = [tile(image), tile(colourise(label, info.ignore_index))]
        for name in nets:
            blend = (0.45 * image + 0.55 * colourise(preds[name][i], info.ignore_index)).astype(np.uint8)
            row.append(tile(blend))
        rows.append(row)
    overlay = grid(rows, ["image", "ground truth", *nets])
    heatmaps = grid([[heat(m) for m in ics.values()]], [f"ICS {n}" for n in ics])
    overlay.save(out / "overlays.png")
    heatmaps.save(out / "ics.png")
    np.savez(out / "ics_matrices.npz", **ics)
    return {"overlays": overlay, "ics": heatmaps}


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "study.log"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    if args.carve:
        args.data = str(carve_dataset(args, out))
    variants = dict(parse_variant(v) for v in args.variant) or {m: (m, []) for m in args.methods}

    teacher_dir = Path(args.teacher_path) if args.teacher_path else out / "teacher"
    if args.teacher_path is None:
        print(f"== teacher {args.teacher}, {args.teacher_steps} steps")
        teacher = run_training(args, teacher_dir, ["--distill", "none", "--student_model_name_or_path", args.teacher,
                                                   "--max_train_steps", str(args.teacher_steps), "--seed", "0"], log)
    else:
        teacher = None

    runs: dict[str, list[dict]] = {}
    for name, (method, extra) in variants.items():
        for seed in args.seeds:
            print(f"== {name}, seed {seed}, {args.steps} steps")
            flags = ["--distill", method, "--student_model_name_or_path", args.student,
                     "--max_train_steps", str(args.steps), "--seed", str(seed), "--alw_granularity", "step"]
            if method != "none":
                flags += ["--teacher_model_name_or_path", str(teacher_dir)]
            if teacher is None and method != "none":
                flags.append("--eval_teacher")
            flags += shlex.split(args.extra) + extra
            result = run_training(args, out / f"{name}-seed{seed}", flags, log)
            runs.setdefault(name, []).append({**result, "variant": name, "seed": seed, "flags": flags})
            if teacher is None and "teacher_eval_mean_iou" in result:
                teacher = {k[len("teacher_"):]: v for k, v in result.items() if k.startswith("teacher_")}
    if teacher is None:
        raise SystemExit("study.py: error: no teacher metrics: train the teacher here or run a distillation method")

    table = summarise(runs)
    paired = paired_differences(runs, args.seeds)
    verdict = ordering_verdict(runs, args.seeds)
    # Training time, not this call's wall clock: a resumed study finds its runs done and takes seconds.
    minutes = sum(r.get("train_runtime_s", 0.0) for results in runs.values() for r in results) / 60
    md = markdown(table, teacher, args, device, minutes, paired, verdict, class_names(teacher_dir))
    (out / "results.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"device": device, "args": vars(args), "teacher": teacher,
                                                  "summary": table, "paired": paired, "verdict": verdict,
                                                  "gap_closed": gap_closed(table, teacher), "runs": runs}, indent=2))
    chart = bar_chart(table, 100 * teacher["eval_mean_iou"])
    chart.save(out / "miou.png")
    students = {f"student {m}": out / f"{m}-seed{args.seeds[0]}" for m in ("none", "aicsd") if m in runs}
    images = figures(args, teacher_dir, students, out)
    if args.with_tracking:
        from accelerate import Accelerator

        acc = Accelerator(log_with="all", project_dir=str(out))
        acc.init_trackers("aicsd-camvid-study")
        for tracker in acc.trackers:
            if hasattr(tracker, "log_images"):
                tracker.log_images({k: np.asarray(v) for k, v in {**images, "miou": chart}.items()}, step=0)
        acc.end_training()
    print(md)
    return {"teacher": teacher, "summary": table}


if __name__ == "__main__":
    main()
