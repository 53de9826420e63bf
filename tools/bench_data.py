"""Input-pipeline benchmark: image decoding (the floor) against a training item and an evaluation item.

    python tools/bench_data.py                       # from the repository root
    python tools/bench_data.py --samples 2 --epochs 2 --loader_samples 16   # quicker

Builds Cityscapes- (2048x1024 PNG, labelId masks), VOC- (500x375 JPEG, palette masks) and ADE20K-sized
(683x512 JPEG, 0 = "other" masks) samples from the procedural road scenes, written as files to a temporary
folder, and prints per sample size:

* decode: Pillow decode of the image file and the mask file (``Image.open(...).load()``), the floor;
* train item: ``SegmentationTrainDataset[i]`` (decode, label checks, random scale/crop/pad/flip), averaged
  over ``--epochs`` epochs so that it averages over the random scales;
* eval item: ``SegmentationEvalDataset[i]`` (whole image, no resize);
* DataLoader throughput (samples/s) with 1 and 2 workers and ``train_collate``;
* bytes per training batch that cross to the device (``pixel_values`` + ``labels``).

Per-item times are CPU times with one torch thread, as in a DataLoader worker (on a shared machine, wall
times would charge other processes' load to whichever measurement it overlapped). The script also runs
against older code (dataset builders that took ``mean``/``std``, a ``DataInfo`` with more fields), so one
script measures before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import data  # noqa: E402

from synthetic import render_synthetic_scene  # noqa: E402

MEAN = (0.485, 0.456, 0.406)  # SegFormer's (ImageNet) input mean and std
STD = (0.229, 0.224, 0.225)

# Scene classes (sky, building, road, sidewalk, vegetation, car, person, pole, sign) as Cityscapes labelIds;
# the scenes' 255 edges become labelId 0 ("unlabeled").
_SCENE_TO_CITYSCAPES_LABELID = np.zeros(256, dtype=np.uint8)
_SCENE_TO_CITYSCAPES_LABELID[:9] = (23, 11, 7, 8, 21, 26, 24, 17, 20)


@dataclass(frozen=True)
class Case:
    name: str
    height: int
    width: int
    image_format: str  # "PNG" or "JPEG"
    mask_mode: str  # "L" or "P"
    crop: tuple[int, int]
    label_mapping: str
    classes: tuple[str, ...]


CASES = (
    Case("Cityscapes", 1024, 2048, "PNG", "L", (512, 1024), data.LABELS_CITYSCAPES_LABELID, data.CITYSCAPES_CLASSES),
    Case("VOC", 375, 500, "JPEG", "P", (512, 512), data.LABELS_IDENTITY, data.PASCAL_VOC_CLASSES),
    Case("ADE20K", 512, 683, "JPEG", "L", (512, 512), data.LABELS_REDUCE, data.ADE20K_CLASSES),
)


def write_samples(case: Case, folder: Path, count: int) -> list[tuple[str, str]]:
    """``count`` (image path, mask path) pairs of distinct scenes in the dataset's own file formats."""
    pairs = []
    palette = list(np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8))
    for index in range(count):
        image, scene = render_synthetic_scene(0, index, case.height, case.width)
        if case.label_mapping == data.LABELS_CITYSCAPES_LABELID:
            mask = _SCENE_TO_CITYSCAPES_LABELID[scene]
        elif case.label_mapping == data.LABELS_REDUCE:
            mask = np.where(scene == 255, 0, scene + 1).astype(np.uint8)  # ADE20K: 0 = other, classes from 1
        else:
            mask = scene
        suffix = "png" if case.image_format == "PNG" else "jpg"
        image_path = folder / f"{case.name}_{index}.{suffix}"
        mask_path = folder / f"{case.name}_{index}_mask.png"
        options = {"quality": 90} if suffix == "jpg" else {}
        Image.fromarray(image).save(image_path, format=case.image_format, **options)
        mask_image = Image.fromarray(mask, mode="L")
        if case.mask_mode == "P":
            mask_image = mask_image.convert("P")
            mask_image.putpalette(palette)
        mask_image.save(mask_path)
        pairs.append((str(image_path), str(mask_path)))
    return pairs


def hf_dataset(pairs: list[tuple[str, str]], rows: int) -> datasets.Dataset:
    """``rows`` rows cycling over the files, undecoded as ``load_splits`` leaves them."""
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Image(decode=False)})
    chosen = [pairs[i % len(pairs)] for i in range(rows)]
    return datasets.Dataset.from_dict({"image": [p[0] for p in chosen], "label": [p[1] for p in chosen]},
                                      features=features, split="train")


def data_info(case: Case) -> data.DataInfo:
    id2label = dict(enumerate(case.classes))
    # Older DataInfo versions (which the script also measures) stored label2id, num_labels and label_transform.
    older = {"label2id": {v: k for k, v in id2label.items()}, "num_labels": len(id2label),
             "label_transform": case.label_mapping}
    accepted = {f.name for f in dataclasses.fields(data.DataInfo)}
    return data.DataInfo(id2label=id2label, ignore_index=255, image_column="image", label_column="label",
                         crop_size=case.crop, label_mapping=case.label_mapping,
                         **{k: v for k, v in older.items() if k in accepted})


def colour_args(builder) -> dict:
    # The builders before the uint8 pipeline normalised on the CPU and took mean/std.
    if "pad_mean" in inspect.signature(builder).parameters:
        return {"pad_mean": MEAN}
    return {"mean": MEAN, "std": STD}


def cpu_ms(fn) -> float:
    # CPU time of this process, not wall time: the machine is shared, and other processes' load would
    # otherwise land in whichever measurement it happened to overlap. One torch thread, so CPU = work.
    start = time.process_time()
    fn()
    return 1000 * (time.process_time() - start)


def interleaved(floor_fn, item_fn, repeats: int) -> tuple[float, float]:
    """Median ms of ``floor_fn`` and of ``item_fn``, measured alternately so that both see the same machine."""
    floors, items = [], []
    for _ in range(repeats):
        floors.append(cpu_ms(floor_fn))
        items.append(cpu_ms(item_fn))
    return statistics.median(floors), statistics.median(items)


def decode_floor(image_path: str, mask_path: str) -> None:
    for path in (image_path, mask_path):
        with Image.open(path) as image:
            image.load()


def loader_throughput(ds: torch.utils.data.Dataset, workers: int, batch_size: int) -> float:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers,
                                         collate_fn=data.train_collate)
    start = time.perf_counter()
    seen = sum(int(batch["pixel_values"].shape[0]) for batch in loader)
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4, help="distinct scenes per size")
    p.add_argument("--epochs", type=int, default=4, help="augmentations timed per training sample")
    p.add_argument("--repeats", type=int, default=5, help="timings per item and augmentation (median)")
    p.add_argument("--loader_samples", type=int, default=48, help="samples per DataLoader throughput run")
    p.add_argument("--loader_repeats", type=int, default=3, help="DataLoader runs per setting (best counts)")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--scale_range", type=float, nargs=2, default=(0.5, 2.0), help="training scale range")
    p.add_argument("--cases", nargs="+", default=[c.name for c in CASES], choices=[c.name for c in CASES])
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker

    timing_rows, loader_rows, byte_rows = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        for case in (c for c in CASES if c.name in args.cases):
            pairs = write_samples(case, Path(tmp), args.samples)
            info = data_info(case)
            hf = hf_dataset(pairs, len(pairs))
            train = data.build_train_dataset(hf, info, crop_size=case.crop, seed=0, scale_range=args.scale_range,
                                             **colour_args(data.build_train_dataset))
            evaluation = data.build_eval_dataset(hf, info, **colour_args(data.build_eval_dataset))
            for i in range(len(pairs)):  # warm-up: file cache, lazy imports, allocator
                decode_floor(*pairs[i]), train[i], evaluation[i]

            train_pairs, eval_pairs = [], []
            for i, pair in enumerate(pairs):
                for epoch in range(args.epochs):  # each epoch draws another scale and crop
                    train.set_epoch(epoch)
                    train_pairs.append(interleaved(lambda: decode_floor(*pair), lambda: train[i], args.repeats))
                eval_pairs.append(interleaved(lambda: decode_floor(*pair), lambda: evaluation[i], args.repeats))
            floor = statistics.mean(f for f, _ in train_pairs + eval_pairs)
            train_ms = statistics.mean(t for _, t in train_pairs)
            eval_ms = statistics.mean(t for _, t in eval_pairs)
            size = f"{case.width}x{case.height} {case.image_format}"
            timing_rows.append(f"| {case.name} ({size}, crop {case.crop[1]}x{case.crop[0]}) | {floor:.1f} | "
                               f"{train_ms:.1f} | {train_ms / floor:.2f}x | {eval_ms:.1f} | {eval_ms / floor:.2f}x |")

            loader_ds = data.build_train_dataset(hf_dataset(pairs, args.loader_samples), info, crop_size=case.crop,
                                                 seed=0, scale_range=args.scale_range,
                                                 **colour_args(data.build_train_dataset))
            # Best of a few runs: on a shared machine the slower runs measure the neighbours.
            rates = [max(loader_throughput(loader_ds, workers, args.batch_size) for _ in range(args.loader_repeats))
                     for workers in (1, 2)]
            loader_rows.append(f"| {case.name} | {rates[0]:.1f} | {rates[1]:.1f} |")

            batch = data.train_collate([train[i % len(pairs)] for i in range(args.batch_size)])
            pixels, labels = batch["pixel_values"], batch["labels"]
            byte_rows.append(
                f"| {case.name} (B{args.batch_size}, {case.crop[1]}x{case.crop[0]}) | {pixels.dtype} | "
                f"{pixels.nbytes / 2**20:.2f} | {labels.dtype} | {labels.nbytes / 2**20:.2f} | "
                f"{(pixels.nbytes + labels.nbytes) / 2**20:.2f} |")
            print(f"done: {case.name}", file=sys.stderr, flush=True)

    print(f"\ntorch {torch.__version__}, {os.cpu_count()} CPUs, {args.samples} scenes per size, train item over "
          f"{args.epochs} epochs (scale {args.scale_range[0]:g}-{args.scale_range[1]:g}); CPU ms per item, "
          f"median of {args.repeats} measured alternately with the decode, one torch thread\n")
    print("| samples | decode image+mask (floor) | train item | train / floor | eval item | eval / floor |")
    print("|---|---|---|---|---|---|")
    print("\n".join(timing_rows))
    print(f"\nDataLoader throughput, samples/s (batch {args.batch_size}, train_collate, "
          f"{args.loader_samples} samples, worker start included, best of {args.loader_repeats})\n")
    print("| samples | 1 worker | 2 workers |\n|---|---|---|")
    print("\n".join(loader_rows))
    print("\nBytes per training batch that cross to the device (MiB)\n")
    print("| batch | pixel_values | MiB | labels | MiB | total MiB |\n|---|---|---|---|---|---|")
    print("\n".join(byte_rows))


if __name__ == "__main__":
    main()
