"""A teacher-logit cache: the frozen teacher runs once over every training image, and each training sample then
takes its logits from disk, cropped, scaled and flipped as its image was (``train_icsd.py --teacher_cache DIR``).

A cache folder holds ``cache.json``, the promise of what the logits are of (teacher weights and config, training
split, classes, the teacher's input preprocessing, resolution, precision: :func:`promise`) and the layout, and
``chunks/NNNNN.npy`` (float16, the (h, w, C) maps of ``chunk_rows`` consecutive rows, concatenated) with
``chunks/NNNNN.index.npy`` (int64 (rows, 5): offset, h, w and the image's H, W). Each file is written under a
temporary name and renamed; a chunk is whole once its index is there (written last), so a killed build leaves
whole chunks only, and the next one builds just the missing chunks. Process i of N builds chunks i, i + N, ...
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object
from PIL import Image
from torch.utils.data import DataLoader, Subset

import data
import models
import utils_training as utils

logger = get_logger(__name__)

FORMAT = "aicsd-teacher-logits/1"
MAX_CHUNK_ROWS = 64
# What a reused cache must agree on, as the one-line refusal names it.
PROMISE_LABELS = {
    "format": "the cache format", "dtype": "the stored dtype", "teacher_weights": "the teacher's weights (sha256)",
    "teacher_config": "the teacher's config (sha256)", "dataset": "the training split (datasets fingerprint)",
    "rows": "the training rows", "classes": "the class list", "preprocessing": "the teacher's input preprocessing",
    "stride": "--teacher_cache_stride", "mixed_precision": "the mixed precision",
}
# Config fields that say nothing about the logits (the class list is recorded by itself).
_CONFIG_NOISE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "id2label",
                 "label2id", "output_hidden_states", "output_attentions", "return_dict"}


# ---- The promise ---------------------------------------------------------------------------------------------
def _sha(payload: bytes | Sequence[bytes]) -> str:
    digest = hashlib.sha256()
    for part in [payload] if isinstance(payload, bytes) else payload:
        digest.update(part)
    return digest.hexdigest()[:16]


def preprocessing_of(adapter: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict:
    """The mean, std (of [0, 1] input) and channel order an input adapter applies, read off a probe: pixel k
    of the probe is 255 in channel k alone, the last pixel 0."""
    probe = torch.zeros(1, 3, 1, 4, dtype=torch.uint8)
    probe[0, [0, 1, 2], 0, [0, 1, 2]] = 255
    y = adapter(probe.to(device))[0, :, 0].double().cpu()  # (3 model channels, 4 pixels)
    order = (y[:, :3] - y[:, 3:]).abs().argmax(1)
    std = 1.0 / (y[:, :3] - y[:, 3:]).gather(1, order[:, None])[:, 0]
    return {"channels": "".join("RGB"[int(c)] for c in order), "mean": [round(float(v), 6) for v in -y[:, 3] * std],
            "std": [round(float(v), 6) for v in std]}


def promise(teacher: torch.nn.Module, adapter: Callable, train_hf, info: data.DataInfo, stride: int,
            mixed_precision: str) -> dict:
    """What the cached logits are of: every key of :data:`PROMISE_LABELS`. The teacher is fingerprinted by
    its loaded tensors (a ``config:`` preset has no weights file) and its config's fields."""
    tensors = [part for name, t in sorted(teacher.state_dict().items()) for part in (
        name.encode(), str(t.dtype).encode(), t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())]
    config = getattr(teacher, "config", None)
    fields = {k: v for k, v in (config.to_dict() if config is not None else {}).items() if k not in _CONFIG_NOISE}
    return {"format": FORMAT, "dtype": "float16", "teacher_weights": _sha(tensors),
            "teacher_config": _sha(json.dumps([type(teacher).__name__, fields], sort_keys=True, default=str).encode()),
            "dataset": getattr(train_hf, "_fingerprint", None), "rows": len(train_hf),
            "classes": [info.id2label[i] for i in range(info.num_labels)],
            "preprocessing": preprocessing_of(adapter, next(teacher.parameters()).device), "stride": int(stride),
            "mixed_precision": str(mixed_precision)}


def differences(ours: dict, theirs: dict) -> list[str]:
    """``<what> A here, B there`` for each promise key on which two caches disagree."""
    def short(value) -> str:
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 60 else text[:57] + "..."
    return [f"{label} {short(ours.get(key))} here, {short(theirs.get(key))} there"
            for key, label in PROMISE_LABELS.items() if ours.get(key) != theirs.get(key)]


def chunk_rows(rows: int) -> int:
    """Rows per chunk: 64, or fewer so that a small split still has about 64 chunks to deal out and resume by."""
    return max(1, min(MAX_CHUNK_ROWS, rows // 64))


# ---- Building ------------------------------------------------------------------------------------------------
def _chunk_path(folder: Path, chunk: int, index: bool = False) -> Path:
    return folder / "chunks" / f"{chunk:05d}{'.index' if index else ''}.npy"


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as file:
        np.save(file, array)
    os.replace(tmp, path)


def _image_hw(value) -> tuple[int, int]:
    """(H, W) of an image column's value, from the file's header where there is a file."""
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (str, os.PathLike, io.BytesIO)):
        with Image.open(value) as image:
            return image.height, image.width
    if isinstance(value, Image.Image):
        return value.height, value.width
    return tuple(np.shape(value)[:2])


def _claim(folder: Path, ours: dict, train_hf, info: data.DataInfo, cells_per_pixel: tuple[float, float]) -> int:
    """On the main process: check or write the promise, then return the bytes the missing chunks need (one
    line, :class:`~utils_training.UsageError`, for a folder of another cache or of something else, or too full)."""
    record = folder / "cache.json"
    if record.is_file():
        try:
            theirs = json.loads(record.read_text())
        except (OSError, ValueError) as err:
            raise utils.UsageError(f"--teacher_cache {folder}: cache.json cannot be read ({err}); delete the folder "
                                   "to rebuild the cache") from None
        if found := differences(ours, theirs):
            raise utils.UsageError(f"--teacher_cache {folder} holds the teacher logits of another setup: "
                                   f"{'; '.join(found)}; pass another folder, or delete this one to rebuild it")
    elif folder.is_dir() and any(folder.iterdir()):
        raise utils.UsageError(f"--teacher_cache {folder} is not empty and holds no cache.json: pass a new or empty "
                               "folder for the cache")
    else:
        (folder / "chunks").mkdir(parents=True, exist_ok=True)
        utils.write_json(record, {**ours, "chunk_rows": chunk_rows(ours["rows"]), "complete": False})
    per_chunk, needed = chunk_rows(ours["rows"]), 0
    for chunk in range(-(-ours["rows"] // per_chunk)):
        if not _chunk_path(folder, chunk, index=True).is_file():
            for row in range(chunk * per_chunk, min((chunk + 1) * per_chunk, ours["rows"])):
                h, w = (math.ceil(math.ceil(n * r) / ours["stride"]) for n, r in
                        zip(_image_hw(train_hf[row][info.image_column]), cells_per_pixel))
                needed += 2 * info.num_labels * h * w
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise utils.UsageError(f"--teacher_cache {folder}: the teacher cache needs about {needed / 1e6:.1f} MB more "
                               f"there, but only {free / 1e6:.1f} MB are free; free some space or pass another folder")
    return needed


def _single(items: list[dict]) -> dict:
    return items[0]


@torch.no_grad()
def _teacher_map(accelerator: Accelerator, teacher, adapter, pixels: torch.Tensor, stride: int, what: str
                 ) -> np.ndarray:
    """(h, w, C) float16 logits of the whole (3, H, W) uint8 image, ``stride`` times coarser than the teacher's;
    channels last, so that the reader gathers whole rows and whole pixels."""
    try:
        with accelerator.autocast():
            logits = models.segmentation_logits(teacher, adapter(pixels[None].to(accelerator.device))).float()
    except (RuntimeError, ValueError) as err:
        raise data.DataError(f"{what}: the teacher cannot run on the whole {pixels.shape[1]}x{pixels.shape[2]} image "
                             f"({utils.one_line(err)[:200]}); train without --teacher_cache") from None
    if stride > 1:  # a coarser map, still spanning the whole image
        size = tuple(-(-n // stride) for n in logits.shape[-2:])
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False, antialias=True)
    return logits[0].permute(1, 2, 0).cpu().numpy().astype(np.float16)


def _build_share(accelerator: Accelerator, teacher, adapter, train_hf, info, folder: Path, stride: int,
                 num_workers: int, skip_bad_samples: bool) -> tuple[int, bool]:
    """Build this process's missing chunks; (images done, whether a stop request ended it early)."""
    rows, per_chunk = len(train_hf), chunk_rows(len(train_hf))
    mine = [c for c in range(accelerator.process_index, -(-rows // per_chunk), accelerator.num_processes)
            if not _chunk_path(folder, c, index=True).is_file()]
    order = [r for c in mine for r in range(c * per_chunk, min((c + 1) * per_chunk, rows))]
    images = data.build_eval_dataset(train_hf, info, pad_mean=(0.0, 0.0, 0.0), skip_bad_samples=skip_bad_samples)
    # A generator of its own: the loader's seed draw would otherwise move the global RNG, and with it the
    # training's dropout, so that a run building the cache would train other weights than one reusing it.
    items = iter(DataLoader(Subset(images, order), batch_size=1, collate_fn=_single, num_workers=num_workers,
                            worker_init_fn=utils.worker_init, generator=torch.Generator()))
    done, started, shown = 0, time.time(), time.time()
    for chunk in mine:
        maps, index, offset = [], [], 0
        for row in range(chunk * per_chunk, min((chunk + 1) * per_chunk, rows)):
            if utils.stop_requested():
                return done, True
            item = next(items)
            if item.get("skipped"):  # training skips it too
                index.append((offset, 0, 0, 0, 0))
                continue
            logits = _teacher_map(accelerator, teacher, adapter, item["pixel_values"], stride, f"training row {row}")
            maps.append(logits.reshape(-1))
            index.append((offset, *logits.shape[:2], *item["labels"].shape))
            offset, done = offset + logits.size, done + 1
        _save(_chunk_path(folder, chunk), np.concatenate(maps) if maps else np.zeros(0, np.float16))
        _save(_chunk_path(folder, chunk, index=True), np.asarray(index, dtype=np.int64).reshape(-1, 5))
        if time.time() - shown > 30:
            shown, elapsed = time.time(), time.time() - started
            left = utils.format_duration(elapsed / max(done, 1) * (len(order) - done))
            logger.info(f"teacher cache: {done}/{len(order)} images on this process, "
                        f"{utils.format_duration(elapsed)}, about {left} left", main_process_only=False)
    return done, False


def _everyone(accelerator: Accelerator, value: object) -> list:
    return [value] if accelerator.num_processes == 1 else gather_object([value])


def _agreed_claim(accelerator: Accelerator, folder: Path, ours: dict, train_hf, info: data.DataInfo,
                  cells_per_pixel: tuple[float, float]) -> int:
    """:func:`_claim` on the main process, its answer (bytes to build) or its refusal on every process."""
    decision = [None]
    if accelerator.is_main_process:
        try:
            decision = [("ok", _claim(folder, ours, train_hf, info, cells_per_pixel))]
        except (utils.UsageError, OSError) as err:
            decision = [("error", str(err) if isinstance(err, utils.UsageError) else
                         f"--teacher_cache {folder} cannot be used: {utils.one_line(err)}")]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision, from_process=0)
    if decision[0][0] == "error":
        raise utils.UsageError(decision[0][1])
    return decision[0][1]


def prepare(accelerator: Accelerator, teacher: torch.nn.Module, adapter: Callable, train_hf, info: data.DataInfo,
            folder: str | Path, *, crop_size: tuple[int, int], stride: int = 1, num_workers: int = 0,
            skip_bad_samples: bool = False) -> TeacherCache:
    """Reuse the cache in ``folder`` or build what it lacks (every process its share, the main process writing
    ``cache.json`` last), and return its reader for ``crop_size`` crops. Call it on every process; one-line
    errors (:class:`~utils_training.UsageError`, :class:`data.DataError`) are raised on all of them."""
    folder = Path(folder)
    with torch.no_grad():  # the size of the live teacher's logits of a crop: the size cached crops come out at
        out_size = tuple(models.segmentation_logits(teacher, torch.zeros(1, 3, *crop_size,
                                                                          device=accelerator.device)).shape[-2:])
    ours = promise(teacher, adapter, train_hf, info, stride, accelerator.mixed_precision)
    needed = _agreed_claim(accelerator, folder, ours, train_hf, info, (out_size[0] / crop_size[0],
                                                                        out_size[1] / crop_size[1]))
    if needed:
        logger.info(f"building the teacher cache in {folder}: about {needed / 1e6:.1f} MB")
    started, error, done, stopped = time.time(), None, 0, False
    try:
        done, stopped = _build_share(accelerator, teacher, adapter, train_hf, info, folder, stride, num_workers,
                                     skip_bad_samples) if needed else (0, False)
    except Exception as err:  # noqa: BLE001 - every process learns of it in after_write
        error = err
    try:
        utils.after_write(accelerator, error, "the teacher cache", folder / "chunks", needed)
    except utils.OutputError as err:
        raise utils.OutputError(str(err).replace("choose another --output_dir, then resume with "
                                                 "--resume_from_checkpoint latest", "pass another --teacher_cache "
                                                 "folder (a new run resumes the build)")) from None
    if any(_everyone(accelerator, stopped)):
        logger.warning(f"{utils.stop_cause()} while building the teacher cache: its whole chunks are kept; start the "
                       "run again to finish the build and train")
        utils.end_run(accelerator)
        raise SystemExit(0)
    if accelerator.is_main_process:
        record = json.loads((folder / "cache.json").read_text())
        if not record.get("complete"):
            utils.write_json(folder / "cache.json", {**record, "complete": True})
    accelerator.wait_for_everyone()
    if needed:
        shares = _everyone(accelerator, done)
        logger.info(f"teacher cache built in {utils.format_duration(time.time() - started)}: {sum(shares)} images"
                    + (f" ({' + '.join(map(str, shares))} by process)" if len(shares) > 1 else ""))
    else:
        logger.info(f"reusing the teacher cache in {folder} ({ours['rows']} training images)")
    return TeacherCache(folder, crop_size, out_size)


# ---- Reading: each training sample's map, cropped, scaled and flipped as its image -----------------------------
def _taps(cells: int, length: int, window: data.Window, crop: int, out: int, flip: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Along one axis: for each of the ``out`` output cells over a ``crop``-pixel crop, the indices (out, K) into
    a ``cells``-long map spanning the image's ``length`` pixels and their weights (0 outside the content).

    Each output cell's centre goes back through the crop (content at the start, at the end when ``flip``) and
    ``window`` to a fractional position in the map; the weights are torch's antialiased triangle filter, which
    is the bilinear one when enlarging, clipped to the window's cells as torch's resize of the window is."""
    step = crop / out
    position = (np.arange(out) + 0.5) * step
    sampled = np.floor(np.arange(out) * step)  # the crop pixel the losses' nearest-resized mask reads
    content = sampled >= crop - window.out if flip else sampled < window.out
    centre = (window.start + (crop - position if flip else position) * window.size / window.out) * cells / length
    support = max(1.0, step * window.size / window.out * cells / length)
    low, high = window.start * cells // length, -(-(window.start + window.size) * cells // length)
    first = np.clip(np.floor(centre - support + 0.5), low, high - 1).astype(np.int64)
    taps = first[:, None] + np.arange(math.ceil(2 * support))  # |j + 0.5 - centre| < support: at most 2 support
    weights = np.clip(1.0 - np.abs((taps + 0.5 - centre[:, None]) / support), 0.0, None) * (taps < high)
    weights[weights.sum(1) == 0, 0] = 1.0  # a centre past the window's edge: its edge cell
    weights = weights / weights.sum(1, keepdims=True) * content[:, None]
    return torch.from_numpy(np.minimum(taps, high - 1)), torch.from_numpy(weights.astype(np.float32))


def _resample_axis(x: torch.Tensor, dim: int, taps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``x`` resampled along ``dim`` by (out, K) ``taps`` and ``weights``: K gathers of whole slices."""
    shape = [1] * x.dim()
    shape[dim] = -1
    out = x.index_select(dim, taps[:, 0]).mul_(weights[:, 0].view(shape))
    for k in range(1, taps.shape[1]):
        out.addcmul_(x.index_select(dim, taps[:, k]), weights[:, k].view(shape))
    return out


def resample(cached: np.ndarray, image_hw: tuple[int, int], geometry: data.CropGeometry, crop_size: tuple[int, int],
             out_size: tuple[int, int]) -> torch.Tensor:
    """The (h, w, C) map ``cached`` of a whole (H, W) image as the (C, *out_size) float32 map of the training
    crop ``geometry`` cuts from it (``data.crop_geometry``), 0 on the padding: the teacher's logits of the
    crop, for a teacher that commutes with resampling. Separable, a few taps per output cell, float32."""
    (rows, row_w), (cols, col_w) = (_taps(n, length, window, crop, out, flip) for n, length, window, crop, out, flip in
                                    zip(cached.shape[:2], image_hw, (geometry.rows, geometry.cols), crop_size,
                                        out_size, (False, geometry.flip)))
    r0, c0 = int(rows.min()), int(cols.min())  # read only the window's cells from the memory map
    block = torch.from_numpy(np.array(cached[r0:int(rows.max()) + 1, c0:int(cols.max()) + 1])).float()
    x = _resample_axis(_resample_axis(block, 0, rows - r0, row_w), 1, cols - c0, col_w)
    return x.permute(2, 0, 1)


class TeacherCache:
    """The reader a training dataset holds (``SegmentationTrainDataset.teacher_cache``): chunks are memory-mapped
    on first use in each process (DataLoader workers open their own; pickling carries only the folder)."""

    def __init__(self, folder: str | Path, crop_size: tuple[int, int], out_size: tuple[int, int]):
        self.folder, self.crop_size, self.out_size = Path(folder), tuple(crop_size), tuple(out_size)
        record = json.loads((self.folder / "cache.json").read_text())
        self.num_labels, self.chunk_rows = len(record["classes"]), int(record["chunk_rows"])
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_chunks": {}}

    def logits(self, index: int, image_hw: tuple[int, int], geometry: data.CropGeometry) -> torch.Tensor:
        """(C, *out_size) float16: training row ``index``'s cached logits, cut as ``geometry`` cuts its image."""
        chunk = index // self.chunk_rows
        if chunk not in self._chunks:
            self._chunks[chunk] = (np.load(_chunk_path(self.folder, chunk), mmap_mode="r"),
                                   np.load(_chunk_path(self.folder, chunk, index=True)))
        values, rows = self._chunks[chunk]
        offset, h, w, height, width = (int(v) for v in rows[index - chunk * self.chunk_rows])
        if (height, width) != tuple(image_hw):
            raise data.DataError(f"training row {index} is {image_hw[1]}x{image_hw[0]} (WxH), but the teacher cache "
                                 f"in {self.folder} holds the logits of a {width}x{height} image: it was built for "
                                 "other images; delete it to rebuild it")
        cached = values[offset:offset + h * w * self.num_labels].reshape(h, w, self.num_labels)
        return resample(cached, image_hw, geometry, self.crop_size, self.out_size).half().contiguous()
