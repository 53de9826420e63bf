"""Datasets, label handling and augmentation for segmentation distillation.

``load_splits`` loads a preset, folder or Hub id as the Hugging Face semantic-segmentation example does;
``build_train_dataset`` / ``build_eval_dataset`` decode and check each sample once, in DataLoader workers, and
augment it in uint8 with randomness that is a pure function of (seed, epoch, index) (:func:`crop_geometry`);
batches carry uint8 pixels (labels too when the classes fit in a byte), which the models' adapters normalize."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "pixel_values", "img")
LABEL_COLUMN_CANDIDATES = ("label", "mask", "annotation", "semantic_segmentation", "segmentation", "gt")
NAME_COLUMN_CANDIDATES = ("name", "filename", "file_name", "image_id", "id", "path")
VALIDATION_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")
# Image/mask folders (README "Your own data"): the folder names, the files each holds, how a mask's name may end.
FOLDER_NAMES = (IMAGE_FOLDERS, MASK_FOLDERS) = ("images", "img_dir"), ("masks", "annotations", "ann_dir")
IMAGE_SUFFIXES, MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"), (".png", ".bmp", ".tif", ".tiff")
MASK_STEM_ENDINGS = ("", "_mask", "_label", "_gt")
SPLIT_FOLDER_NAMES = {"training": "train"}  # ADE20K's ADEChallengeData2016/images/training

# Label mappings a preset or flag can ask for.
LABELS_IDENTITY, LABELS_REDUCE = "identity", "reduce_labels"
LABELS_CITYSCAPES_AUTO, LABELS_CITYSCAPES_LABELID = "cityscapes_auto", "cityscapes_labelid_to_trainid"

_TWISTER = threading.local()  # one NumPy MT19937 per thread, re-seeded per sample (a new one costs 30 times more)
_RGB_SHIFTS = (0, 8, 16) if sys.byteorder == "little" else (24, 16, 8)  # R, G, B in an RGBX pixel read as uint32


class DataError(ValueError):
    """The data, or how it was asked for, cannot be used as it is."""


class BadSampleError(DataError):
    """One sample cannot be decoded or is inconsistent (skippable with ``skip_bad_samples``)."""


class LabelValueError(DataError):
    """Label values outside [0, num_labels) and not the ignore index: a setting to fix, never skipped."""


# ---- Class tables and presets ------------------------------------------------------------------------------------

CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle")
# cityscapesScripts' labelId -> trainId for the 19 evaluated classes; every other labelId is ignored.
CITYSCAPES_LABELID_TO_TRAINID = {label_id: train_id for train_id, label_id in enumerate(
    (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33))}
PASCAL_VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
ADE20K_CLASSES = ("wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent",
    "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag")
CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
    "bicyclist")
# In the order of the label values synthetic.py paints (synthetic.SKY ... synthetic.SIGN).
SYNTHETIC_CLASSES = ("sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole", "traffic sign")


@dataclass(frozen=True)
class DatasetPreset:
    """What a ``--dataset`` name implies; ``hub_kwargs`` go to ``load_dataset`` with the default ``hub_id`` only."""
    name: str
    hub_id: str | None  # None: no usable Hub copy, pass a folder
    classes: tuple[str, ...]
    crop_size: tuple[int, int]
    default_teacher: str | None
    default_student: str | None
    label_handling: str
    hub_kwargs: tuple[tuple[str, str], ...] = ()
    ignore_index: int = 255

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.classes))


DATASET_PRESETS: dict[str, DatasetPreset] = {preset.name: preset for preset in (
    DatasetPreset("cityscapes", "Chris1/cityscapes", CITYSCAPES_CLASSES, (512, 1024),  # the official copy needs a login
                  "nvidia/segformer-b5-finetuned-cityscapes-1024-1024", "nvidia/mit-b0", LABELS_CITYSCAPES_AUTO),
    DatasetPreset("pascal-voc", "nateraw/pascal-voc-2012", PASCAL_VOC_CLASSES, (512, 512),  # official VOC2012 splits
                  "apple/deeplabv3-mobilevit-small", "apple/mobilevit-xx-small", LABELS_IDENTITY),
    DatasetPreset("ade20k", "zhoubolei/scene_parse_150", ADE20K_CLASSES, (512, 512),  # 0 is "other": ignored
                  "nvidia/segformer-b5-finetuned-ade-640-640", "nvidia/mit-b0", LABELS_REDUCE,
                  # the Hub's parquet export of a script dataset, which datasets 5 cannot run
                  (("revision", "refs/convert/parquet"), ("data_dir", "scene_parsing"))),
    # No parquet copy with the 11 SegNet classes on the Hub, and no public teacher: train one first.
    DatasetPreset("camvid", None, CAMVID_CLASSES, (352, 480), None, "nvidia/mit-b0", LABELS_IDENTITY),
    DatasetPreset("synthetic", None, SYNTHETIC_CLASSES, (128, 128), "config:segformer-b0", "config:segformer-tiny",
                  LABELS_IDENTITY),  # procedural road scenes, no files: synthetic.py
)}


@dataclass
class DataInfo:
    """What :func:`load_splits` found and decided: classes in training-id order, the ignored value, the columns
    (``name_column`` names samples in errors), the default crop (h, w), the ``LABELS_*`` mapping applied to every
    mask, every decision taken (``notes``), what was loaded (``source``) and the preset's suggestions."""
    id2label: dict[int, str]
    ignore_index: int
    image_column: str
    label_column: str
    crop_size: tuple[int, int]
    label_mapping: str = LABELS_IDENTITY
    notes: list[str] = field(default_factory=list)
    preset: str | None = None
    source: str | None = None
    name_column: str | None = None
    default_teacher: str | None = None
    default_student: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in self.id2label.items()}


@dataclass(frozen=True)
class DataOptions:
    """One field per data flag of ``train_icsd.py``, same names; ``validation_fraction`` (``--train_val_split``)
    is the share of train carved off, with ``seed``, for a dataset without a validation split."""
    dataset: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    id2label: str | None = None
    ignore_index: int | None = None
    do_reduce_labels: bool | None = None
    train_split: str = "train"
    validation_split: str | None = None
    seed: int = 42
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    validation_fraction: float = 0.1

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> DataOptions:
        """The fields ``namespace`` has attributes for; the others keep their defaults."""
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})


# ---- Labels ------------------------------------------------------------------------------------------------------
def map_labels(label: np.ndarray, mapping: str, ignore_index: int) -> np.ndarray:
    """(H, W) integer mask values -> (H, W) int64 class ids and ``ignore_index``, by a ``LABELS_*`` mapping."""
    label = np.asarray(label).astype(np.int64, copy=False)
    if mapping == LABELS_IDENTITY:
        return label
    if mapping == LABELS_REDUCE:
        return np.where((label == 0) | (label == ignore_index), ignore_index, label - 1)
    if mapping == LABELS_CITYSCAPES_LABELID:
        lut = np.full(max(256, int(label.max(initial=0)) + 1), ignore_index, dtype=np.int64)
        lut[list(CITYSCAPES_LABELID_TO_TRAINID)] = list(CITYSCAPES_LABELID_TO_TRAINID.values())
        return np.where(label >= 0, lut[label.clip(0)], ignore_index)
    raise DataError(f"unknown label mapping {mapping!r}: use one of identity, reduce_labels, cityscapes")


def check_labels(labels: torch.Tensor | np.ndarray, num_labels: int, ignore_index: int) -> None:
    """Raise :class:`LabelValueError` naming the values of ``labels`` (any shape, CPU) outside [0, C) ∪ {ignore}."""
    bad = ((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)
    if not bool(bad.any()):
        return
    values = np.unique(np.asarray(labels[bad])).tolist()
    shown = ", ".join(str(v) for v in values[:10]) + (f", ... ({len(values)} distinct)" if len(values) > 10 else "")
    raise LabelValueError(f"label values [{shown}] are outside 0..{num_labels - 1} and not the ignore index "
                          f"{ignore_index}: pass --ignore_index for a void value, --do_reduce_labels if 0 means "
                          "'unlabelled' (ADE20K style), a dataset preset with the right label mapping, or an "
                          "--id2label file listing every class")


# ---- Decoding ----------------------------------------------------------------------------------------------------
def _open_pil(value: Any, what: str) -> Image.Image:
    """A loaded PIL image from an image, a ``{"bytes", "path"}`` dict, a path or bytes."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, (str, os.PathLike, bytes, bytearray)):
        raise BadSampleError(f"{what}: no image bytes or path, but a {type(value).__name__}")
    try:
        (image := Image.open(io.BytesIO(value) if isinstance(value, (bytes, bytearray)) else value)).load()
        return image  # truncated or corrupt files fail in load(), not later
    except Exception as err:
        raise BadSampleError(f"{what}: cannot decode image ({type(err).__name__}: {err})") from None


def _pillow_pixels(image: Image.Image) -> np.ndarray:
    """A loaded "RGB" image's pixels as (H, W, 4) (the 4th byte unused, as Pillow stores them), "L"/"P" as (H, W):
    shared with Pillow through the Arrow C data interface (11.2+, rows in one block), then read-only; else a copy."""
    if hasattr(image, "__arrow_c_array__"):
        try:
            exported = pa.array(image)
            if image.mode == "RGB":  # .values: the bytes under the pixels (flatten() is a slower compute call)
                return exported.values.to_numpy(zero_copy_only=True).reshape(image.height, image.width, 4)
            return exported.to_numpy(zero_copy_only=True).reshape(image.height, image.width)
        except (ValueError, TypeError, pa.ArrowException):  # e.g. rows in several blocks
            pass
    return np.asarray(image)


def decode_image(value: Any, what: str = "image", rgbx: bool = False) -> np.ndarray:
    """An image (PIL image, path, ``{"bytes", "path"}`` or array) as (H, W, 3) uint8 RGB; with ``rgbx`` as the
    pipelines take it, (H, W, 3|4) (a 4th channel unused) and possibly read-only. Grey and palette images become
    RGB, alpha is dropped (not composited), 16- and 32-bit images are scaled to 8 bits, [0, 1] floats times 255."""
    if not rgbx:
        return np.ascontiguousarray(decode_image(value, what, rgbx=True)[:, :, :3])
    if not isinstance(value, (np.ndarray, torch.Tensor)):
        image = _open_pil(value, what)
        if not image.mode.startswith("I") and image.mode != "F":  # 8-bit modes: as Pillow holds RGB, else converted
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return _pillow_pixels(image if image.mode == "RGB" else image.convert("RGB"))
        value = image  # 16- and 32-bit grey: scaled below, like an array
    array = np.asarray(value)
    array = np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise BadSampleError(f"{what}: expected an (H, W, 3) array, got shape {array.shape}")
    array = array[:, :, :3]
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        scaled = array * 255.0 if (float(np.nanmax(array)) if array.size else 0.0) <= 1.0 else array
        return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise BadSampleError(f"{what}: unsupported pixel type {array.dtype}")
    wide = array.astype(np.int64)  # 16-bit (or > 255) values divided by 257
    return np.clip(wide // 257 if array.dtype == np.uint16 or int(wide.max(initial=0)) > 255 else wide, 0, 255
                   ).astype(np.uint8)


def pascal_voc_colormap(size: int = 256) -> np.ndarray:
    """(size, 3) uint8: the colour Pascal VOC draws index ``i`` in (the bits of ``i`` dealt to R, G, B, most
    significant first: 0 black, 1 (128, 0, 0), ..., 255 (224, 224, 192), the boundary colour)."""
    index, colours = np.arange(size), np.zeros((size, 3), dtype=np.int64)
    for bit, channel in ((bit, channel) for bit in range(8) for channel in range(3)):
        colours[:, channel] |= ((index >> (3 * bit + channel)) & 1) << (7 - bit)
    return colours.astype(np.uint8)


_VOC_INDEX_OF_COLOUR = {(int(r) << 16) | (int(g) << 8) | int(b): i for i, (r, g, b) in enumerate(pascal_voc_colormap())}


def decode_label(value: Any, what: str = "label", dtype: type | None = np.int64) -> np.ndarray:
    """A mask as (H, W) ``dtype``, values kept (``dtype=None``: the mask's own integer type, possibly read-only).
    Palette ("P") masks keep their indices, 16-bit masks their values; a 3-channel mask with equal channels is one
    channel (a grey mask saved as RGB); any other RGB mask must be drawn in the Pascal VOC colour map, each colour
    becoming its index (the boundary colour 255, ignored); another colour is an error naming it and the file."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, (str, os.PathLike)) else None
    what += f" (file {path})" if path and str(path) not in what else ""
    array = value if isinstance(value, (np.ndarray, torch.Tensor, list)) else _open_pil(value, what)
    array = _pillow_pixels(array) if isinstance(array, Image.Image) and array.mode in ("L", "P") else np.asarray(array)
    if array.ndim == 3:
        array = array[:, :, :-1] if array.shape[2] in (2, 4) else array  # drop alpha
        if array.shape[2] == 1 or bool(np.all(array == array[:, :, :1])):
            array = array[:, :, 0]
        elif array.shape[2] == 3 and array.dtype == np.uint8:
            codes = (array[:, :, 0].astype(np.int64) << 16) | (array[:, :, 1].astype(np.int64) << 8) | array[:, :, 2]
            unique, inverse = np.unique(codes, return_inverse=True)
            unknown = [(c >> 16, (c >> 8) & 255, c & 255) for c in unique.tolist() if c not in _VOC_INDEX_OF_COLOUR]
            if unknown:
                raise BadSampleError(
                    f"{what}: the RGB mask holds the colour {unknown[0]}, which is not in the Pascal VOC colour map; "
                    "convert colour-coded masks to single-channel class indices (an 'L' or 'P' PNG)")
            array = np.array([_VOC_INDEX_OF_COLOUR[c] for c in unique.tolist()])[inverse.reshape(codes.shape)]
        else:
            raise BadSampleError(f"{what}: the mask is colour-coded ({array.dtype}, {array.shape[2]} channels); "
                                 "convert it to a single-channel mask of class indices (e.g. an 'L' or 'P' PNG)")
    if array.ndim != 2:
        raise BadSampleError(f"{what}: expected an (H, W) mask, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        raise BadSampleError(f"{what}: mask values must be integers, got {array.dtype}")
    return array if dtype is None else array.astype(dtype, copy=False)


# ---- Loading -----------------------------------------------------------------------------------------------------
def load_splits(options: DataOptions) -> tuple[datasets.Dataset, datasets.Dataset, DataInfo]:
    """(train, eval, info): the splits, with the image/label (and name) columns only, left undecoded for the
    pipelines, and what was found and decided. :class:`DataError` names any problem and the flag to fix it."""
    if options.dataset is not None and options.dataset not in DATASET_PRESETS:
        raise DataError(f"unknown dataset preset {options.dataset!r}: choose one of {', '.join(DATASET_PRESETS)}")
    preset = DATASET_PRESETS.get(options.dataset)
    path = options.dataset_name or (preset.hub_id if preset else None)
    if preset is not None and preset.name == "synthetic":
        return _load_synthetic(options)
    if path is None:
        raise DataError(f"no dataset given: pass --dataset PRESET ({', '.join(DATASET_PRESETS)}) or --dataset_name "
                        "PATH_OR_HUB_ID" if preset is None else f"preset {preset.name!r} has no default Hub copy: pass "
                        f"--dataset_name with a local folder (e.g. ../shared/data/{preset.name})")
    hub_kwargs = dict(preset.hub_kwargs) if preset and not options.dataset_name else {}  # for its own copy only
    notes: list[str] = []
    train, evaluation = _pick_splits(_load_dataset(path, options.dataset_config_name, hub_kwargs), options, path, notes)
    image_column, label_column, name_column = columns = _pick_columns(train, evaluation, options)
    train, evaluation = (split.select_columns([c for c in columns if c]) for split in (train, evaluation))
    for column in (image_column, label_column):  # decoded by the pipelines: once, in workers, errors naming the row
        train, evaluation = (split.cast_column(column, datasets.Image(decode=False)) if isinstance(
            split.features[column], datasets.Image) else split for split in (train, evaluation))
    id2label = _pick_classes(options, preset, path, hub_kwargs.get("revision"), notes)
    ignore_index = (preset.ignore_index if preset else 255) if options.ignore_index is None else options.ignore_index
    if 0 <= ignore_index < len(id2label):
        raise DataError(f"ignore_index {ignore_index} is a class id (0..{len(id2label) - 1}): pick a value "
                        "outside the classes")
    mapping = _pick_mapping(options, preset, train, label_column, notes)
    train, evaluation = (split if limit is None else split.select(range(min(limit, len(split)))) for split, limit in
                         ((train, options.max_train_samples), (evaluation, options.max_eval_samples)))
    return train, evaluation, DataInfo(id2label, ignore_index, image_column, label_column, preset.crop_size if preset
                                       else (512, 512), mapping, notes, preset and preset.name, path, name_column,
                                       preset and preset.default_teacher, preset and preset.default_student)


def _load_dataset(path: str, config_name: str | None, hub_kwargs: dict[str, str]) -> datasets.DatasetDict:
    """``datasets.load_dataset``, its failures (datasets' own error classes) turned into one-line DataErrors."""
    local = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or local.exists():  # else datasets would look "./folder" up on the Hub
        if not local.is_dir():
            raise DataError(f"dataset folder {path!r} does not exist (or is a file): check the path")
        path = str(local)
        if (folders := _image_mask_splits(local)) is not None:
            if config_name is not None:
                raise DataError(f"{path!r} is a folder of images and masks, which has no configurations: drop "
                                "--dataset_config_name")
            return folders
        _check_parquet_files(local)
    try:
        return datasets.load_dataset(path, config_name, **hub_kwargs)
    except (ConnectionError, datasets.exceptions.DatasetNotFoundError) as err:  # offline and not cached, no network,
        online = isinstance(err, ConnectionError) and not datasets.config.HF_HUB_OFFLINE  # no such repo, gated, ...
        raise DataError(f"dataset {path!r} is not a local folder and could not be fetched from the Hub ({err}"
                        + ("; if it is cached, set HF_HUB_OFFLINE=1 to use the cache" if online else "") + "): check "
                        "the id, log in with `hf auth login` for private or gated datasets, pass a local folder with "
                        f"--dataset_name, or use a preset ({', '.join(DATASET_PRESETS)})") from None
    except FileNotFoundError as err:  # datasets' EmptyDatasetError and DataFilesNotFoundError among them
        raise DataError(f"dataset {path!r} holds no data files that datasets can read ({err})") from None
    except (ValueError, RuntimeError) as err:  # two failures datasets has no error class for: its words, then
        if "corresponds to no data" in str(err):
            raise DataError(f"dataset {path!r} has an empty split ({err}): fix its data files, or pick other splits "
                            "with --train_split / --validation_split") from None
        if "scripts are no longer supported" not in str(err):
            raise
        raise DataError(f"dataset {path!r} is a loading script, which datasets {datasets.__version__} cannot run: "
                        "use a parquet copy (many script datasets have one at revision 'refs/convert/parquet') or "
                        "a local folder") from None


def _check_parquet_files(folder: Path) -> None:
    """A :class:`DataError` naming the first parquet file in ``folder`` that pyarrow cannot open (truncated, not
    parquet) or that has no rows: datasets fails on each in a traceback that does not name the file."""
    for file in sorted(folder.rglob("*.parquet")):
        if any(part.startswith(".") for part in file.relative_to(folder).parts):  # datasets skips hidden paths too
            continue
        try:
            rows = pq.ParquetFile(file).metadata.num_rows
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"dataset file {file} cannot be read as parquet ({err}): write or download it "
                            "again") from None
        if rows == 0:
            raise DataError(f"dataset {str(folder)!r} has an empty split or file: {file} has no rows; fill or remove "
                            "it, or pick other splits with --train_split / --validation_split")


def _image_mask_splits(root: Path) -> datasets.DatasetDict | None:
    """The splits of an image/mask folder in a layout README "Your own data" lists, as undecoded as a Hub dataset's
    (``image``/``label`` file paths, ``name`` the path below the split without its suffix); None for another folder."""
    def pair_in(folder: Path) -> tuple[Path, Path] | None:
        found = [next((folder / n for n in names if (folder / n).is_dir()), None) for names in FOLDER_NAMES]
        return (found[0], found[1]) if all(found) else None

    if (pair := pair_in(root)) is None:
        splits = {p.name: pair_in(p) for p in sorted(root.iterdir()) if p.is_dir() and pair_in(p)}
    else:  # split folders inside the image folder, unless it holds images itself
        inner = sorted(p.name for p in pair[0].iterdir() if p.is_dir() and not p.name.startswith("."))
        flat = not inner or any(p.suffix.lower() in IMAGE_SUFFIXES for p in pair[0].iterdir())
        splits = {"train": pair} if flat else {name: (pair[0] / name, pair[1] / name) for name in inner}
    features = datasets.Features(image=datasets.Image(), label=datasets.Image(), name=datasets.Value("string"))
    return datasets.DatasetDict({SPLIT_FOLDER_NAMES.get(name, name): datasets.Dataset.from_dict(
        _pair_files(*folders), features=features, split=SPLIT_FOLDER_NAMES.get(name, name))
        for name, folders in splits.items()}) if splits else None


def _pair_files(image_dir: Path, mask_dir: Path) -> dict[str, list[str]]:
    """``{"image", "label", "name"}``: images and masks paired by their path below their folder without the suffix
    (a mask's may end in one of ``MASK_STEM_ENDINGS``); a file left without a partner is a :class:`DataError`."""
    def files(folder: Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
        return [(p.relative_to(folder).with_suffix("").as_posix(), p) for p in sorted(folder.rglob("*"))
                if p.suffix.lower() in suffixes and not any(s.startswith(".") for s in p.relative_to(folder).parts)]

    masks: dict[str, list[Path]] = {}
    for key, path in files(mask_dir, MASK_SUFFIXES):
        masks.setdefault(key, []).append(path)
    pairs, lonely = [], []
    for key, image in files(image_dir, IMAGE_SUFFIXES):
        if (mask := next((masks[key + end].pop(0) for end in MASK_STEM_ENDINGS if masks.get(key + end)), None)):
            pairs.append((str(image), str(mask), key))
        else:
            lonely.append(image)
    for unpaired, folder, other, what in ((lonely, image_dir, mask_dir, "images without a mask"),
                                          (sum(masks.values(), []), mask_dir, image_dir, "masks without an image")):
        if unpaired:
            shown = ", ".join(str(p.relative_to(folder)) for p in unpaired[:3]) + ", ..." * (len(unpaired) > 3)
            raise DataError(f"{folder} holds {what} in {other}: {len(unpaired)} ({shown}); images and masks pair by "
                            f"name (a mask's may end in {', '.join(MASK_STEM_ENDINGS[1:])}), masks as "
                            f"{', '.join(MASK_SUFFIXES)}")
    if not pairs:
        raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}) with masks in {mask_dir}")
    return dict(zip(("image", "label", "name"), map(list, zip(*pairs))))


def _pick_splits(splits: datasets.DatasetDict, options: DataOptions, path: str, notes: list[str]
                 ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, evaluation): the named splits, else the first validation-like split, else a seeded carve of train."""
    for name, flag in ((options.train_split, "--train_split"), (options.validation_split, "--validation_split")):
        if name is not None and name not in splits:
            raise DataError(f"split {name!r} not found; {path!r} has splits {list(splits)}: pass {flag}")
    train = splits[options.train_split]
    if options.validation_split is not None:
        return train, splits[options.validation_split]
    if (found := next((n for n in VALIDATION_SPLIT_CANDIDATES if n in splits and n != options.train_split), None)):
        notes.append(f"evaluating on split {found!r}")
        return train, splits[found]
    if len(train) < 2:
        raise DataError(f"split {options.train_split!r} has {len(train)} rows: too few to carve a validation split")
    if not 0.0 < options.validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {options.validation_fraction}")
    carved = train.train_test_split(test_size=options.validation_fraction, seed=options.seed, shuffle=True)
    notes.append(f"no validation split: carved {options.validation_fraction:.0%} of {options.train_split!r} with "
                 f"seed {options.seed} ({len(carved['train'])} train / {len(carved['test'])} eval)")
    return carved["train"], carved["test"]


def _pick_columns(train: datasets.Dataset, evaluation: datasets.Dataset, options: DataOptions
                  ) -> tuple[str, str, str | None]:
    """(image, label, name) columns: the options' names, else the first known candidates."""
    columns, picked = list(train.column_names), []
    for explicit, candidates, what in ((options.image_column, IMAGE_COLUMN_CANDIDATES, "image"),
                                       (options.label_column, LABEL_COLUMN_CANDIDATES, "label")):
        if explicit is not None and explicit not in columns:
            raise DataError(f"{what} column {explicit!r} not found; the dataset has columns {columns}: pass "
                            f"--{what}_column")
        if (found := explicit or next((c for c in candidates if c in columns), None)) is None:
            raise DataError(f"no {what} column found among {list(candidates)}; the dataset has columns {columns}: "
                            f"pass --{what}_column NAME")
        picked.append(found)
    if picked[0] == picked[1]:
        raise DataError(f"image and label column are both {picked[0]!r}: pass --image_column/--label_column")
    if isinstance(train.features[picked[1]], datasets.ClassLabel):  # what datasets makes of most image folders
        raise DataError(f"the dataset reads as image classification: its {picked[1]!r} column is a ClassLabel "
                        f"{train.features[picked[1]].names[:5]} (folder names), not masks; lay a folder out as "
                        "images/ + masks/, img_dir/ + ann_dir/ or images/ + annotations/ (each with or without "
                        "{train,val}/ inside), or {train,val}/{images,masks} (README: Your own data)")
    if missing := [c for c in picked if c not in evaluation.column_names]:
        raise DataError(f"evaluation split lacks columns {missing}; it has {evaluation.column_names}")
    name = next((c for c in NAME_COLUMN_CANDIDATES if c in columns and c in evaluation.column_names), None)
    return picked[0], picked[1], name


def _pick_classes(options: DataOptions, preset: DatasetPreset | None, path: str, revision: str | None,
                  notes: list[str]) -> dict[int, str]:
    """Class names: the ``--id2label`` file, else the dataset's own id2label.json, else the preset's table."""
    source = options.id2label or (Path(path).expanduser() / "id2label.json")
    if options.id2label is None and not Path(path).expanduser().is_dir():  # a Hub repo: as the HF example reads it
        try:
            source = huggingface_hub.hf_hub_download(path, "id2label.json", repo_type="dataset", revision=revision)
        except (huggingface_hub.errors.EntryNotFoundError, OSError) as err:  # no such file, or not cached offline
            logger.debug("no id2label.json for %s: %s", path, err)
            source = None
    if options.id2label is None and (source is None or not Path(source).is_file()):
        if preset is None:
            raise DataError(f"no class names for {path!r}: it has no id2label.json; pass --id2label FILE with "
                            "{\"0\": \"name\", ...} or a --dataset preset")
        notes.append(f"classes from the {preset.name} preset")
        return preset.id2label
    try:
        id2label = {int(k): v for k, v in json.loads(Path(source).read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, AttributeError) as err:  # missing, not JSON, not an object, keys not integers
        raise DataError(f"id2label file {str(source)!r} cannot be read as {{\"0\": \"name\", ...}} "
                        f"({type(err).__name__}: {err}): check the --id2label path and file") from None
    names = list(id2label.values())
    if not all(isinstance(name, str) for name in names):  # e.g. {"name": "sky"}, which would become a name
        raise DataError(f"id2label file {str(source)!r}: class names must be strings, got "
                        f"{next(n for n in names if not isinstance(n, str))!r}")
    if len(set(names)) < len(names):  # label2id would lose classes
        raise DataError(f"id2label file {str(source)!r} names {sorted({n for n in names if names.count(n) > 1})} "
                        "more than once: each class needs its own name")
    if not id2label or sorted(id2label) != list(range(len(id2label))):
        raise DataError(f"id2label file {str(source)!r} keys must be 0..{len(id2label) - 1} without gaps, got "
                        f"{sorted(id2label)[:20]}")
    notes.append(f"classes from {source}")
    return dict(sorted(id2label.items()))


def _pick_mapping(options: DataOptions, preset: DatasetPreset | None, train: datasets.Dataset, label_column: str,
                  notes: list[str]) -> str:
    """The preset's ``LABELS_*`` mapping, reduce labels forced or disabled by ``do_reduce_labels``, and Cityscapes
    labelId -> trainId if any of the first training masks holds a value only labelIds use (19..254)."""
    mapping = preset.label_handling if preset else LABELS_IDENTITY
    if options.do_reduce_labels is not None and options.do_reduce_labels != (mapping == LABELS_REDUCE):
        notes.append(f"reduce labels {'forced' if options.do_reduce_labels else 'disabled'} by do_reduce_labels")
        return LABELS_REDUCE if options.do_reduce_labels else LABELS_IDENTITY
    if mapping != LABELS_CITYSCAPES_AUTO:
        return mapping
    probe = [decode_label(train[i][label_column], f"{options.train_split} row {i}") for i in range(min(8, len(train)))]
    label_ids = any(np.any((values >= 19) & (values != 255)) for values in map(np.unique, probe))
    notes.append(f"Cityscapes masks hold {'labelId' if label_ids else 'trainId'}s (judged from {len(probe)} "
                 "training masks)" + ("; mapping labelId -> trainId" if label_ids else "; used as they are"))
    return LABELS_CITYSCAPES_LABELID if label_ids else LABELS_IDENTITY


def _load_synthetic(options: DataOptions) -> tuple[datasets.Dataset, datasets.Dataset, DataInfo]:
    """The ``synthetic`` preset: scenes rendered on access by :mod:`synthetic`, imported only here."""
    from synthetic import make_synthetic_splits

    harmless = {"do_reduce_labels": False, "ignore_index": 255}
    if given := [f"--{name}" for name in ("dataset_name", "image_column", "label_column", "id2label",
                                          "do_reduce_labels", "validation_split", "train_split", "ignore_index")
                 if getattr(options, name) not in (getattr(DataOptions, name), harmless.get(name))]:
        raise DataError(f"the synthetic preset generates its own data and classes: drop {', '.join(given)}")
    try:
        height, width = (int(side) for side in (options.dataset_config_name or "128x128").lower().split("x"))
    except ValueError:
        raise DataError(f"synthetic dataset_config_name must be 'HxW', e.g. '128x128', not "
                        f"{options.dataset_config_name!r}") from None
    num_train = 512 if options.max_train_samples is None else max(1, min(options.max_train_samples, 512))
    num_eval = 64 if options.max_eval_samples is None else max(1, min(options.max_eval_samples, 64))
    try:
        train, evaluation = make_synthetic_splits(num_train, num_eval, height=height, width=width, seed=0)
    except ValueError as err:  # the renderer's own argument checks: a data problem like any other here
        raise DataError(str(err)) from None
    preset, note = DATASET_PRESETS["synthetic"], f"{num_train} train / {num_eval} eval scenes of {height}x{width}"
    return train, evaluation, DataInfo(preset.id2label, 255, "image", "label", (min(128, height), min(128, width)),
                                       LABELS_IDENTITY, [note], "synthetic", "synthetic", "index",
                                       preset.default_teacher, preset.default_student)


def check_split_sizes(train: Sequence, evaluation: Sequence, train_batch_size: int, world_size: int = 1) -> None:
    """Raise :class:`DataError` if a split is empty or train cannot fill one batch on every process."""
    if len(train) == 0:
        raise DataError("the training split is empty: check --train_split and --max_train_samples")
    if len(evaluation) == 0:
        raise DataError("the evaluation split is empty: check --validation_split and --max_eval_samples")
    if len(train) < train_batch_size * world_size:
        raise DataError(f"the training split has {len(train)} samples, fewer than one batch ({train_batch_size} per "
                        f"device x {world_size} processes = {train_batch_size * world_size}): lower the batch size or "
                        "use more training data")


# ---- Augmentation geometry: a pure function of (seed, epoch, index), for everything cropped alike ----------------
class Window(NamedTuple):
    """Along one axis: source pixels [start, start + size) are resized to the first ``out`` pixels of the crop
    (the last ``out`` columns when flipped); the rest of the crop is padding."""
    start: int
    size: int
    out: int


class CropGeometry(NamedTuple):
    """A training sample's random scale, its source :class:`Window` per axis and its horizontal flip."""
    scale: float
    rows: Window
    cols: Window
    flip: bool


def crop_geometry(seed: int, epoch: int, index: int, image_hw: tuple[int, int], crop_size: tuple[int, int],
                  scale_range: tuple[float, float] = (0.5, 2.0)) -> CropGeometry:
    """The random scale, crop window and flip of training sample ``index`` in ``epoch``, from these alone.

    The scale s is uniform in ``scale_range``, the crop's top-left uniform over the positions in the image of
    ``image_hw`` (H, W) scaled by s (and padded bottom/right to at least ``crop_size`` (h, w)), the flip has
    probability 1/2. Each axis is mapped back to the unscaled image as a :class:`Window`: resizing only that
    region gives the crop of the whole scaled image, up to half a source pixel of rounding; a (C, h', w') logit map
    laid over the image is cropped alike with the windows scaled by h'/H, w'/W."""
    if not hasattr(_TWISTER, "bits"):
        _TWISTER.bits = np.random.MT19937()
        _TWISTER.seeder = np.random.RandomState(_TWISTER.bits)  # its seed() is the classic MT19937 seeding
    # The numbers torch.rand / torch.randint drew from a torch.Generator seeded alike, at a third of the cost;
    # a uniform float32 is the low 24 bits of one output over 2**24.
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)  # >= 0
    _TWISTER.seeder.seed(((int(state[0]) << 31) ^ int(state[1])) & 0xFFFFFFFF)
    draws = _TWISTER.bits.random_raw(4).tolist()
    unit_scale, unit_flip = ((bits & 0xFFFFFF) / 16777216 for bits in (draws[0], draws[3]))
    scale = scale_range[0] + (scale_range[1] - scale_range[0]) * unit_scale
    windows = []
    for length, crop, draw in zip(image_hw, crop_size, draws[1:3]):
        scaled = max(1, round(length * scale))
        offset = draw % (max(scaled, crop) - crop + 1)
        out = min(crop, scaled - offset)
        size = min(length, max(1, round(out * length / scaled)))
        windows.append(Window(min(max(0, round(offset * length / scaled)), length - size), size, out))
    return CropGeometry(scale, windows[0], windows[1], unit_flip < 0.5)


# ---- Torch datasets: decoding and checks in workers, augmentation, collation -------------------------------------
def _byte_label_tables(info: DataInfo, dtype: type) -> tuple[np.ndarray, tuple[int, int], np.ndarray | None]:
    """For uint8 masks: each raw value's mapped value (256,), the ring range (shift, top), the table (None: as is)."""
    # uint8 masks ("L"/"P" PNGs, nearly every dataset) go through 256-entry tables: mapped only on the pixels kept,
    # and checked in one max() pass when the valid raw values v are one ring range, (v + shift) % 256 <= top
    # (identity: 255, 0..C-1; reduce labels: 255, 0..C); the values are counted only to name wrong ones.
    mapped = map_labels(np.arange(256), info.label_mapping, info.ignore_index)
    valid = ((mapped >= 0) & (mapped < info.num_labels)) | (mapped == info.ignore_index)
    starts = [v for v in range(256) if valid[v] and not valid[v - 1]]  # valid[-1] is 255: the ring wraps
    # All valid: nothing to check; no ring range, (0, -1): count the values of every mask.
    ring = (0, 255) if valid.all() else ((256 - starts[0]) % 256, int(valid.sum()) - 1) if len(starts) == 1 else (0, -1)
    identity = dtype == np.uint8 and np.array_equal(mapped, np.arange(256))
    return mapped, ring, None if identity else np.where(valid, mapped, 0).astype(dtype)


class SegmentationSamples(torch.utils.data.Dataset):
    """Rows of a split decoded and checked on the CPU (in DataLoader workers): what both pipelines share."""

    def __init__(self, hf_ds: datasets.Dataset, info: DataInfo, pad_mean: Sequence[float], skip_bad_samples: bool):
        self.hf_ds, self.info, self.skip_bad_samples = hf_ds, info, skip_bad_samples
        if len(pad_mean) != 3 or not all(0.0 <= v <= 1.0 for v in pad_mean):
            raise ValueError(f"pad_mean needs 3 values in [0, 1] (a model's input mean for [0, 1] RGB), got {pad_mean}")
        self.pad_rgb = tuple(int(round(float(v) * 255)) for v in pad_mean)
        self.split_name = str(hf_ds.split) if getattr(hf_ds, "split", None) is not None else "dataset"
        self.label_dtype = np.uint8 if 0 <= info.ignore_index <= 255 and info.num_labels <= 256 else np.int64
        self._label_fill = np.full((1, 1), info.ignore_index, dtype=self.label_dtype)
        self._u8_mapped, self._u8_range, self._u8_table = _byte_label_tables(info, self.label_dtype)
        self._columns: dict | None = None  # see _row

    def __len__(self) -> int:
        return len(self.hf_ds)

    def __getstate__(self) -> dict:  # workers started by pickling rebuild the column handles, which hold the data
        return {**self.__dict__, "_columns": None}

    def _row(self, index: int) -> dict:
        """``hf_ds[index]``, read straight from the Arrow columns where that is the same row: datasets' formatting
        costs 0.1-0.25 ms an item (2-6% of a VOC or ADE20K item, BENCHMARKS.md) and has no public way to tell a split
        without an indices mapping (select, shuffle): tests/test_data.py checks the private attribute read here."""
        if self._columns is None:
            names = [n for n in (self.info.image_column, self.info.label_column, self.info.name_column) if n]
            plain = all(isinstance(f, datasets.Value) or (isinstance(f, datasets.Image) and not f.decode)
                        for n, f in self.hf_ds.features.items() if n in names)
            plain = plain and getattr(self.hf_ds, "_indices", "") is None and self.hf_ds.format["type"] is None
            self._columns = {n: self.hf_ds.data.column(n) for n in names if n in self.hf_ds.features} if plain else {}
        if not self._columns:
            return self.hf_ds[index]
        return {name: column[index].as_py() for name, column in self._columns.items()}

    def _describe(self, index: int, row: dict | None) -> str:
        row, text = row or {}, f"{self.split_name} row {index}"
        name = row.get(self.info.name_column) if self.info.name_column else None
        if name is not None and not isinstance(name, (dict, bytes)):
            text += f" ({self.info.name_column}={name!r})"
        for column, form in ((self.info.image_column, " file {}"), (self.info.label_column, " (label file {})")):
            value = row.get(column)  # the mask may be the file at fault
            text += form.format(value["path"]) if isinstance(value, dict) and value.get("path") else ""
        return text

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Image (H, W, 3|4) uint8; label (H, W), raw uint8 or final; the table still to apply to raw labels."""
        row = None
        try:
            row = self._row(int(index))
            what = self._describe(index, row)
            image = decode_image(row[self.info.image_column], f"{what} image", rgbx=True)
            label = decode_label(row[self.info.label_column], f"{what} label", dtype=None)
            if image.shape[:2] != label.shape:
                raise BadSampleError(f"{what}: image is {image.shape[1]}x{image.shape[0]} but its label is "
                                     f"{label.shape[1]}x{label.shape[0]} (WxH); image and mask must have the same size")
        except BadSampleError:
            raise
        except Exception as err:  # anything else while reading a row is also about that sample
            raise BadSampleError(f"{self._describe(index, row)}: {type(err).__name__}: {err}") from err
        # Checked here, per sample, on the CPU, for evaluation as well as training: the error names the file, and
        # no out-of-range value reaches a GPU kernel as a device-side assert.
        try:
            if label.dtype != np.uint8:
                mapped = map_labels(label, self.info.label_mapping, self.info.ignore_index)
                check_labels(mapped, self.info.num_labels, self.info.ignore_index)
                return image, mapped.astype(self.label_dtype, copy=False), None
            shift, top = self._u8_range
            if top < 255 and int((label + np.uint8(shift) if shift else label).max(initial=0)) > top:  # uint8 wraps
                present = np.bincount(label.reshape(-1), minlength=256) > 0
                check_labels(self._u8_mapped[present], self.info.num_labels, self.info.ignore_index)
            return image, label, self._u8_table
        except LabelValueError as err:
            raise LabelValueError(f"{self._describe(index, row)}: {err}") from None

    def __getitem__(self, index: int) -> dict:
        try:
            image, label, table = self._decode(index)
        except BadSampleError as err:
            if not self.skip_bad_samples:
                raise
            logger.warning("skipping bad sample: %s", err)
            return {"skipped": True, "index": index, "reason": str(err)}
        return self._item(int(index), image, label, table)


class SegmentationTrainDataset(SegmentationSamples):
    """Random scale, crop, pad and flip in uint8 (:func:`crop_geometry`), deterministic per (seed, epoch, index):
    items ``{"pixel_values": uint8 (3, h, w) RGB, "labels": (h, w)}``, (h, w) = ``crop_size``, labels uint8 when the
    classes fit in a byte (else int64), or ``{"skipped": True, ...}`` (``skip_bad_samples``). Padding: the
    ``pad_mean`` colour (the student's input mean, RGB in [0, 1]: about 0 once normalized), labels ignored."""

    def __init__(self, hf_ds: datasets.Dataset, info: DataInfo, *, crop_size: tuple[int, int],
                 pad_mean: Sequence[float], seed: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 skip_bad_samples: bool = False):
        super().__init__(hf_ds, info, pad_mean, skip_bad_samples)
        self.crop_size, self.scale_range = (int(crop_size[0]), int(crop_size[1])), tuple(map(float, scale_range))
        if min(self.crop_size) < 1 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"need a positive crop_size, 0 < low <= high scale_range: got {crop_size}, {scale_range}")
        self.seed, self.epoch = int(seed), 0
        self.teacher_cache = None  # a teacher_cache.TeacherCache: items then carry their crop's teacher logits

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations items draw (before each epoch's DataLoader iterator starts)."""
        self.epoch = int(epoch)

    def _item(self, index: int, image: np.ndarray, label: np.ndarray, table: np.ndarray | None) -> dict:
        geometry = crop_geometry(self.seed, self.epoch, index, label.shape, self.crop_size, self.scale_range)
        _, (y0, src_h, out_h), (x0, src_w, out_w), flip = geometry
        # Mirrored before resampling, which commutes with mirroring (bit for bit with torch's kernel): the copy
        # of the window that the kernel's fast path needs anyway does it.
        pixels = _rgbx_window(image[y0:y0 + src_h, x0:x0 + src_w], flip)
        if (out_h, out_w) != (src_h, src_w):
            pixels = _resize_rgbx(pixels, (out_h, out_w))
        planes = _planes(pixels, self.crop_size, self.pad_rgb, flip)  # while the resized pixels are in the cache
        labels, window = _padded(self._label_fill, self.crop_size, (out_h, out_w), flip)
        _nearest_label(label[y0:y0 + src_h, x0:x0 + src_w], window, table, flip)
        item = {"pixel_values": planes, "labels": torch.from_numpy(labels)}
        if self.teacher_cache is not None:  # (C, ht, wt) float16, cut from the whole image's as the image was
            item["teacher_logits"] = self.teacher_cache.logits(index, label.shape, geometry)
        return item


class SegmentationEvalDataset(SegmentationSamples):
    """Whole images (resized so the short side is ``short_side``, if given), labels at full resolution: items
    ``{"pixel_values": uint8 (3, h, w) RGB, "labels": (H, W), "ignore_index", "pad_rgb", "min_size"}``, which
    :func:`eval_collate` pads to at least ``min_size`` per side (the smallest input the models run on)."""

    def __init__(self, hf_ds: datasets.Dataset, info: DataInfo, *, pad_mean: Sequence[float],
                 short_side: int | None = None, skip_bad_samples: bool = False, min_size: int = 1):
        super().__init__(hf_ds, info, pad_mean, skip_bad_samples)
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be positive, got {short_side}")
        self.short_side, self.min_size = short_side, min_size

    def _item(self, index: int, image: np.ndarray, label: np.ndarray, table: np.ndarray | None) -> dict:
        size = height, width = label.shape
        if self.short_side is not None:
            factor = self.short_side / min(height, width)
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
        if size != (height, width):
            image = _resize_rgbx(_rgbx_window(image, False), size)
        labels = np.empty((height, width), dtype=self.label_dtype)
        _nearest_label(label, labels, table, False)  # a copy (Pillow's memory is read-only), mapped if need be
        return {"pixel_values": _planes(image, size, self.pad_rgb, False), "labels": torch.from_numpy(labels),
                "ignore_index": self.info.ignore_index, "pad_rgb": self.pad_rgb, "min_size": self.min_size}


build_train_dataset = SegmentationTrainDataset  # the names train_icsd.py and the tools build them by
build_eval_dataset = SegmentationEvalDataset


def _rgbx_window(window: np.ndarray, flip: bool) -> np.ndarray:
    """(h, w, 3|4) uint8 RGB, mirrored if ``flip``, as a new contiguous (h, w, 4): as Pillow holds RGB and torch
    resamples uint8; whole pixels copy (and mirror) as uint32 several times faster than byte by byte."""
    window = window[:, ::-1] if flip else window
    if window.shape[2] == 4:
        return np.array(window.view(np.uint32)).view(np.uint8)
    copy = np.zeros(window.shape[:2] + (4,), dtype=np.uint8)
    copy[:, :, :3] = window
    return copy


def _resize_rgbx(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 4) uint8 contiguous -> (*size, 4), bilinear, antialiased when shrinking."""
    # Only on a contiguous channels-last input (batch dimension added before the permute) does torch's uint8
    # bilinear kernel take its fast path, 2-3 times faster; its output is channels-last: contiguous() is free.
    resized = F.interpolate(torch.from_numpy(pixels)[None].permute(0, 3, 1, 2), size=size, mode="bilinear",
                            align_corners=False, antialias=size[0] < pixels.shape[0] or size[1] < pixels.shape[1])
    return resized[0].permute(1, 2, 0).contiguous().numpy()


def _padded(fill: np.ndarray, size: tuple[int, int], inner: tuple[int, int], mirrored: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """A new (..., *size) array of ``fill`` (broadcast) outside an ``inner`` (h, w) window at the top left (top
    right when ``mirrored``), and that window, a view to write the content into."""
    canvas = np.empty(fill.shape[:-2] + tuple(size), dtype=fill.dtype)
    (height, width), left = inner, (size[1] - inner[1] if mirrored else 0)
    if tuple(inner) != tuple(size):
        canvas[..., height:, :] = fill
        canvas[..., :height, :left] = fill
        canvas[..., :height, left + width:] = fill
    return canvas, canvas[..., :height, left:left + width]


def _planes(pixels: np.ndarray, size: tuple[int, int], fill: Sequence[int], mirrored: bool) -> torch.Tensor:
    """(h, w, 3|4) uint8 RGB(X) as a new (3, *size) tensor, padded with ``fill`` as :func:`_padded` does. Whole
    4-byte pixels are shifted and truncated as uint32, a plane at a time: twice as fast as torch's byte copy."""
    canvas, window = _padded(np.asarray(fill, dtype=np.uint8).reshape(3, 1, 1), size, pixels.shape[:2], mirrored)
    if pixels.shape[2] == 4 and pixels.strides[1:] == (4, 1):
        words = pixels.view(np.uint32)[:, :, 0]
        for plane, shift in zip(window, _RGB_SHIFTS):  # cast to uint8 in the ufunc's buffer: no uint32 temporary
            np.right_shift(words, shift, out=plane, casting="unsafe")
    else:
        np.copyto(window, pixels[:, :, :3].transpose(2, 0, 1))
    return torch.from_numpy(canvas)


def _nearest_label(label: np.ndarray, out: np.ndarray, table: np.ndarray | None, flip: bool) -> None:
    """Write ``label`` (h, w) resized to ``out``'s size by nearest neighbour (at the pixel centres bilinear
    resampling uses, so the mask stays on its image), mirrored if ``flip`` and mapped through ``table``."""
    (height, width), (out_h, out_w) = label.shape, out.shape
    if table is not None and label.size <= out.size:  # map whichever of input and output is smaller
        label, table = np.take(table, label), None
    # Centres 0.5, 1.5, ... times size / out stay below size by far more than the rounding: no clipping.
    rows = (np.arange(0.5, out_h) * (height / out_h)).astype(np.int64) if out_h != height else None
    cols = (np.arange(0.5, out_w) * (width / out_w)).astype(np.int64) if out_w != width else None
    if flip and cols is None:
        label = label[:, ::-1]
    elif flip:
        cols = cols[::-1]  # mirrored by the gather itself, at no cost
    # Rows are copied whole, columns value by value (np.take, faster than torch): gather the columns on whichever
    # of the input and the output has fewer rows. The last step writes out.
    steps = [(index, axis) for index, axis in ((rows, 0), (cols, 1)) if index is not None]
    if len(steps) == 2 and height < out_h:
        steps.reverse()
    if table is None and not steps:
        np.copyto(out, label)
    for position, (index, axis) in enumerate(steps):
        last = table is None and position == len(steps) - 1
        label = np.take(label, index, axis=axis, out=out if last else None, mode="clip")
    if table is not None:
        np.take(table, label, out=out, mode="clip")


def train_collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack training samples, dropping skipped ones: ``pixel_values`` (B, 3, h, w) uint8, ``labels`` (B, h, w),
    ``num_skipped`` (0-dim long) and, from a cache, ``teacher_logits`` (B, C, ht, wt); B is 0 when every sample
    was skipped."""
    kept = [s for s in samples if not s.get("skipped")]
    if not kept:
        return {"pixel_values": torch.empty(0, 3, 0, 0, dtype=torch.uint8),
                "labels": torch.empty(0, 0, 0, dtype=torch.uint8), "num_skipped": torch.tensor(len(samples))}
    keys = ("pixel_values", "labels", "teacher_logits") if "teacher_logits" in kept[0] else ("pixel_values", "labels")
    return {**{key: torch.stack([s[key] for s in kept]) for key in keys},
            "num_skipped": torch.tensor(len(samples) - len(kept))}


def eval_collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Pad evaluation samples bottom/right to the batch's largest image (and ``min_size``), with their ``pad_rgb``,
    and label, with their ignore index: ``pixel_values`` (B, 3, H, W), ``labels`` (B, Hl, Wl), ``image_sizes`` and
    ``label_sizes`` (B, 2) long (before padding: predictions are cut back to them), ``num_skipped`` (0-dim long)."""
    kept = [s for s in samples if not s.get("skipped")]
    image_sizes, label_sizes = (torch.tensor([tuple(s[key].shape[-2:]) for s in kept], dtype=torch.long).view(-1, 2)
                                for key in ("pixel_values", "labels"))
    batch = {"image_sizes": image_sizes, "label_sizes": label_sizes,
             "num_skipped": torch.tensor(len(samples) - len(kept))}
    if not kept:
        return {**train_collate(samples), **batch}
    min_size = max(int(s.get("min_size", 1)) for s in kept)
    height, width = (max(int(v), min_size) for v in image_sizes.max(0).values)
    fill = torch.tensor(kept[0].get("pad_rgb", (0, 0, 0)), dtype=kept[0]["pixel_values"].dtype).view(1, 3, 1, 1)
    pixel_values = fill.expand(len(kept), 3, height, width).contiguous()
    labels = torch.full((len(kept), *label_sizes.max(0).values.tolist()), int(kept[0].get("ignore_index", 255)),
                        dtype=kept[0]["labels"].dtype)
    for i, sample in enumerate(kept):  # bottom/right padding: the top-left corner holds the sample
        pixel_values[i, :, :image_sizes[i, 0], :image_sizes[i, 1]] = sample["pixel_values"]
        labels[i, :label_sizes[i, 0], :label_sizes[i, 1]] = sample["labels"]
    return {"pixel_values": pixel_values, "labels": labels, **batch}
