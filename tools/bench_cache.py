"""The teacher-logit cache: what a distilled step costs with it, what it costs to build, what it stores.

    python tools/bench_cache.py                      # CamVid, SegFormer-b2 teacher -> SegFormer-tiny student
    python tools/bench_cache.py --rows 16 --rounds 3 --compare_stride 0   # quicker
    python tools/bench_cache.py --table              # the README's storage table, the resampling cost per item

In one process, with the same flags (crop, batch, student, DataLoader workers): milliseconds per optimizer
step of the student alone (``--distill none``), of AICSD with the live teacher and of AICSD from the cache
(``--teacher_cache``), each step from fetching the batch to the optimizer's step as train_icsd.py's loop does
it, timed in turns (each turn: one untimed step, then ``--steps`` timed ones; ``--rounds`` rounds, the order
rotating; medians). Both the process's CPU time and the wall time are given: on a shared machine the wall time
charges other processes' load to whichever step it overlapped, so by default torch runs one thread and the
batches are made in the process (``--workers 0``), where its CPU time counts them. Then the
cache's build time and size, and with ``--compare_stride N`` the effect of ``--teacher_cache_stride N`` on the KD
and ICSD loss values (relative difference against the full-resolution cache, and of both against the live
teacher on the same crops). The models are ``config:`` presets with random weights.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import alw  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import teacher_cache  # noqa: E402

# (name, training rows, image (H, W), classes) as the README's storage table states them.
DATASETS = (("CamVid", 367, (360, 480), 11), ("Pascal VOC 2012", 1464, (375, 500), 21),
            ("Cityscapes", 2975, (1024, 2048), 19), ("ADE20K", 20210, (512, 683), 150))


def storage_table() -> str:
    """Bytes of a float16 cache per dataset, teacher stride (SegFormer 4, DeepLabV3 8) and --teacher_cache_stride."""
    lines = ["| dataset | train rows | image | classes | SegFormer (stride 4) | DeepLabV3 (stride 8) | SegFormer, "
             "`--teacher_cache_stride 2` |", "|---|---|---|---|---|---|---|"]
    for name, rows, (h, w), classes in DATASETS:
        size = [rows * classes * 2 * math.ceil(math.ceil(h / s) / k) * math.ceil(math.ceil(w / s) / k)
                for s, k in ((4, 1), (8, 1), (4, 2))]
        shown = [f"{b / 1e9:.1f} GB" if b >= 1e9 else f"{b / 1e6:.0f} MB" for b in size]
        lines.append(f"| {name} | {rows:,} | {w}x{h} | {classes} | {' | '.join(shown)} |")
    return "\n".join(lines)


def resample_costs(repeats: int = 20) -> str:
    """Milliseconds a training item's cached map takes to cut (``teacher_cache.resample``, one thread), per
    dataset of the table with a stride-4 teacher at its preset's crop: the cache's cost in the DataLoader."""
    crops = {"CamVid": (352, 480), "Pascal VOC 2012": (512, 512), "Cityscapes": (512, 1024), "ADE20K": (512, 512)}
    lines = ["| dataset | map (h, w, C) | crop | output | ms per item (median) |", "|---|---|---|---|---|"]
    for name, _, (h, w), classes in DATASETS:
        cached = np.random.default_rng(0).standard_normal((-(-h // 4), -(-w // 4), classes)).astype(np.float16)
        crop, laps = crops[name], []
        out = (crop[0] // 4, crop[1] // 4)
        for index in range(repeats):
            geometry = data.crop_geometry(0, 0, index, (h, w), crop)
            started = time.process_time()
            teacher_cache.resample(cached, (h, w), geometry, crop, out)
            laps.append(1000 * (time.process_time() - started))
        lines.append(f"| {name} | {cached.shape} | {crop[0]}x{crop[1]} | {out[0]}x{out[1]} | "
                     f"{statistics.median(laps):.1f} |")
    return "\n".join(lines)


def loader(dataset, batch: int, workers: int, seed: int = 0):
    """An endless iterator of training batches (reshuffled each pass)."""
    while True:
        yield from DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                              collate_fn=data.train_collate, generator=torch.Generator().manual_seed(seed))


def aicsd(s_logits, t_logits, labels, ignore_index: int) -> torch.Tensor:
    """train_icsd.py's ``--distill aicsd`` loss at alpha 0.5 (or CE alone when there is no teacher)."""
    ce = losses.masked_cross_entropy(s_logits, labels, ignore_index)
    if t_logits is None:
        return ce
    valid = labels != ignore_index
    ics, kd = losses.icsd_loss(s_logits, t_logits, valid), losses.kd_loss(s_logits, t_logits, valid)
    return alw.alw_combine(ce, ics, kd, 0.5, alw.DEFAULT_LAMBDA_ICS, alw.DEFAULT_LAMBDA_KD)[0]


def time_steps(args, student, teacher, adapters, batches: dict, ignore_index: int) -> dict[str, list[tuple]]:
    """(CPU, wall) milliseconds of each mode's steps, the modes taking turns in a rotating order."""
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    times: dict[str, list[tuple]] = {mode: [] for mode in batches}
    modes = list(batches)
    for round_ in range(args.rounds):
        for mode in modes[round_ % 3:] + modes[:round_ % 3]:
            stream = batches[mode]
            for timed in [False] + [True] * args.steps:
                started = time.process_time(), time.perf_counter()
                batch = next(stream)
                t_logits = batch["teacher_logits"].float() if mode == "aicsd cached" else None
                if mode == "aicsd live":
                    with torch.no_grad():
                        t_logits = models.segmentation_logits(teacher, adapters[1](batch["pixel_values"]))
                s_logits = models.segmentation_logits(student, adapters[0](batch["pixel_values"]))
                aicsd(s_logits, t_logits, batch["labels"], ignore_index).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if timed:
                    times[mode].append((1000 * (time.process_time() - started[0]),
                                        1000 * (time.perf_counter() - started[1])))
    return times


@torch.no_grad()
def loss_effect(student, teacher, adapters, ds, caches: dict, batch: int, ignore_index: int) -> dict[str, list]:
    """KD and ICSD (T = 1) of one student against the live teacher and each cache, on the same crops."""
    values: dict[str, list] = {name: [] for name in ("live", *caches)}
    for start in range(0, len(ds) - batch + 1, batch):
        items = {}
        for name, cache in caches.items():
            ds.teacher_cache = cache
            items[name] = data.train_collate([ds[i] for i in range(start, start + batch)])
        first = next(iter(items.values()))
        s_logits = models.segmentation_logits(student, adapters[0](first["pixel_values"]))
        valid = first["labels"] != ignore_index
        t_all = {"live": models.segmentation_logits(teacher, adapters[1](first["pixel_values"])),
                 **{name: b["teacher_logits"].float() for name, b in items.items()}}
        for name, t_logits in t_all.items():
            values[name].append((float(losses.kd_loss(s_logits, t_logits, valid)),
                                 float(losses.icsd_loss(s_logits, t_logits, valid))))
    ds.teacher_cache = None
    return values


def step_table(times: dict[str, list[tuple]]) -> str:
    none = [statistics.median(lap[k] for lap in times["none"]) for k in (0, 1)]
    lines = ["| mode | CPU ms per step (median) | × student alone | wall ms per step (median, min–max) | × student "
             "alone |", "|---|---|---|---|---|"]
    for mode, laps in times.items():
        cpu, wall = ([lap[k] for lap in laps] for k in (0, 1))
        lines.append(f"| {mode} | {statistics.median(cpu):.0f} | {statistics.median(cpu) / none[0]:.2f} | "
                     f"{statistics.median(wall):.0f} ({min(wall):.0f}–{max(wall):.0f}) | "
                     f"{statistics.median(wall) / none[1]:.2f} |")
    return "\n".join(lines)


def loss_table(values: dict[str, list], stride: int, batch: int) -> str:
    """Relative differences of KD and ICSD between the caches and the live teacher (mean and max over batches)."""
    exact, coarse = values["cache, stride 1"], values[f"cache, stride {stride}"]
    lines = ["\n| against | KD: mean relative difference (max) | ICSD: mean relative difference (max) |",
             "|---|---|---|"]
    for name, ref, other in ((f"stride {stride} vs stride 1", exact, coarse),
                             ("stride 1 vs live", values["live"], exact),
                             (f"stride {stride} vs live", values["live"], coarse)):
        cells = []
        for term in (0, 1):
            diffs = [abs(o[term] - r[term]) / r[term] for r, o in zip(ref, other)]
            cells.append(f"{100 * statistics.mean(diffs):.2f} % ({100 * max(diffs):.2f} %)")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines.append(f"\n(over {len(exact)} batches of {batch}; KD {statistics.mean(v[0] for v in exact):.4f}, ICSD "
                 f"{statistics.mean(v[1] for v in exact):.5f} on average with the full-resolution cache)")
    return "\n".join(lines)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset_name", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    p.add_argument("--teacher", default="config:segformer-b2")
    p.add_argument("--student", default="config:segformer-tiny")
    p.add_argument("--crop_size", type=int, nargs=2, default=(352, 480))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rows", type=int, default=32, help="training rows used (and cached)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers, as --dataloader_num_workers")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps of each mode per round")
    p.add_argument("--compare_stride", type=int, default=2, help="also build a cache this much coarser (0: no)")
    p.add_argument("--table", action="store_true", help="print the storage table and the resampling cost only")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.table:
        print(storage_table() + "\n\n" + resample_costs())
        return
    torch.manual_seed(0)
    train_hf, _, info = data.load_splits(data.DataOptions(dataset_name=args.dataset_name, max_train_samples=args.rows))
    student = models.load_student(args.student, info.id2label)
    teacher = models.load_teacher(args.teacher, info.id2label)
    adapters = [models.make_input_adapter(models.load_image_processor(name)) for name in (args.student, args.teacher)]
    mean = models.processor_mean_std(models.load_image_processor(args.student))[0]
    datasets_ = [data.build_train_dataset(train_hf, info, crop_size=args.crop_size, pad_mean=mean, seed=0)
                 for _ in range(3)]
    accelerator, work = Accelerator(cpu=True), Path(tempfile.mkdtemp(prefix="bench_cache_"))
    caches, built = {}, {}
    for stride in sorted({1, args.compare_stride} - {0}):
        started = time.perf_counter()
        caches[f"cache, stride {stride}"] = teacher_cache.prepare(
            accelerator, teacher, adapters[1], train_hf, info, work / f"stride{stride}", crop_size=args.crop_size,
            stride=stride, num_workers=args.workers)
        built[stride] = (time.perf_counter() - started, folder_bytes(work / f"stride{stride}"))
    datasets_[2].teacher_cache = caches["cache, stride 1"]
    load = os.getloadavg()
    streams = {mode: loader(ds, args.batch, args.workers) for mode, ds in
               zip(("none", "aicsd live", "aicsd cached"), datasets_)}
    times = time_steps(args, student, teacher, adapters, streams, info.ignore_index)
    load = [max(a, b) for a, b in zip(load, os.getloadavg())]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, " \
              f"{torch.get_num_threads()} threads"
    print(f"\n{args.teacher} -> {args.student}, {args.rows} CamVid rows, crop {args.crop_size[0]}x{args.crop_size[1]},"
          f" batch {args.batch}, {args.workers} DataLoader worker(s); {machine}; load average (1/5/15 min, the "
          f"higher of before and after) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n")
    print(step_table(times))
    for stride, (seconds, size) in built.items():
        print(f"\ncache, stride {stride}: built in {seconds:.1f} s ({1000 * seconds / args.rows:.0f} ms per image), "
              f"{size / 1e6:.2f} MB ({size / args.rows / 1e3:.0f} kB per image)")
    if len(caches) > 1:
        values = loss_effect(student, teacher, adapters, datasets_[0], caches, args.batch, info.ignore_index)
        print(loss_table(values, args.compare_stride, args.batch))
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
