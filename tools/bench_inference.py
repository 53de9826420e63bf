"""Milliseconds per image of segmentation models' forward pass on this machine, for choosing a student.

    python tools/bench_inference.py mbv2-os8 mbv2-os16 mbv2-os32 --size 360 480 --threads 1

Each model (a folder or Hub id that ``AutoModelForSemanticSegmentation`` loads, or a ``config:`` preset of
models.py) runs ``--repeats`` forward passes on one random image of ``--size`` in inference mode after one
untimed warm-up; the table gives the median and each model's speed-up over the first (the teacher). On a
shared machine, give the timing a core of its own (``--threads 1`` while another job holds the other): medians
of a busy machine are not comparable.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

import models  # noqa: E402


def time_forward(model: torch.nn.Module, size: tuple[int, int], repeats: int) -> float:
    """Median milliseconds of ``model(pixel_values=x)`` for one random ``(1, 3, H, W)`` image."""
    x = torch.randn(1, 3, *size)
    laps = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            started = time.perf_counter()
            model(pixel_values=x)
            laps.append(1000 * (time.perf_counter() - started))
    return statistics.median(laps[1:])


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="Folders, Hub ids or config: presets; the first is the reference.")
    p.add_argument("--size", type=int, nargs=2, default=(360, 480), metavar=("H", "W"))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--num_labels", type=int, default=11, help="classes of a config: preset's head (CamVid's 11)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        if name.startswith("config:"):
            id2label = {i: f"class_{i}" for i in range(args.num_labels)}
        else:  # the folder's own classes: its head is timed as trained
            id2label = {int(k): v for k, v in AutoConfig.from_pretrained(name).id2label.items()}
        model = models.load_model(name, id2label, role="teacher").eval()
        rows.append((name, time_forward(model, tuple(args.size), args.repeats)))
    print(f"CPU, {torch.get_num_threads()} thread(s), {args.size[0]}x{args.size[1]}, median of {args.repeats}\n")
    print("| model | ms per image | speed-up over the first |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {rows[0][1] / ms:.2f}× |")
    return rows


if __name__ == "__main__":
    main()
