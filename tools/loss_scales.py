#!/usr/bin/env python
"""Print the size of every loss term for a teacher/student pair on a few training batches.

Use it to choose λ for a new dataset: the defaults (λ_ics = 10, λ_kd = 1, T = 1) were picked from this table.

    python tools/loss_scales.py --dataset synthetic --teacher outputs/demo/teacher --student config:segformer-tiny
    python tools/loss_scales.py --dataset_name ../shared/data/camvid --teacher runs/teacher \
        --student config:segformer-tiny --crop 128 160
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's flat modules
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    """Print one table row per student: CE, KD and ICSD at each temperature, CWD and ICKD."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default=None)
    p.add_argument("--dataset_name", default=None)
    p.add_argument("--teacher", required=True, help="Teacher folder, Hub id or config: preset.")
    p.add_argument("--student", nargs="+", required=True, help="One or more students (e.g. a fresh and a trained one).")
    p.add_argument("--crop", type=int, nargs=2, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    train_hf, _, info = data.load_splits(data.DataOptions(dataset=args.dataset, dataset_name=args.dataset_name, seed=args.seed))
    teacher = models.load_teacher(args.teacher, info.id2label)
    t_processor = models.load_image_processor(args.teacher)
    ds = data.build_train_dataset(train_hf, info, crop_size=tuple(args.crop or info.crop_size),
                                  pad_mean=models.processor_mean_std(t_processor)[0], seed=args.seed)
    batch = data.train_collate([ds[i] for i in range(min(args.batch_size, len(ds)))])
    labels = batch["labels"]
    valid = labels != info.ignore_index
    temps = args.temperatures
    print(f"| student | CE | KD, T = {' / '.join(f'{t:g}' for t in temps)} | ICSD, T = "
          f"{' / '.join(f'{t:g}' for t in temps)} | CWD, T = {temps[0]:g} | ICKD |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        t_logits = models.segmentation_logits(
            teacher, models.make_input_adapter(t_processor)(batch["pixel_values"]))
        for name in args.student:
            student = models.load_student(name, info.id2label).eval()
            s_processor = models.load_image_processor(name)
            s_logits = models.segmentation_logits(
                student, models.make_input_adapter(s_processor)(batch["pixel_values"]))
            ce = losses.masked_cross_entropy(s_logits, labels, info.ignore_index)
            kd = [losses.kd_loss(s_logits, t_logits, valid, t).item() for t in temps]
            ics = [losses.icsd_loss(s_logits, t_logits, valid, t).item() for t in temps]
            cwd = losses.cwd_loss(s_logits, t_logits, valid, temps[0]).item()
            ickd = losses.ickd_loss(s_logits, t_logits, valid).item()
            print(f"| {name} | {ce.item():.3f} | {' / '.join(f'{v:.3g}' for v in kd)} | "
                  f"{' / '.join(f'{v:.3g}' for v in ics)} | {cwd:.3g} | {ickd:.3g} |")


if __name__ == "__main__":
    main()
