"""Datasets, label handling and augmentation for segmentation distillation.

``load_splits(DataOptions(...))`` turns a preset name or any ``datasets``-loadable
path/Hub id into train/eval ``datasets.Dataset`` objects plus a :class:`DataInfo`
describing the classes and every decision taken (the ``synthetic`` preset's scenes
come from ``synthetic.py``, imported only when that preset is loaded). ``build_train_dataset`` / ``build_eval_dataset``
wrap them into ``torch.utils.data.Dataset`` objects that decode each image once,
inside DataLoader workers, and apply augmentations whose randomness is a pure
function of (seed, epoch, sample index). Batches carry uint8 pixels (and uint8
labels when the classes fit in a byte): a quarter of float32's bytes cross to the
device, where ``models.make_input_adapter`` scales and normalizes them.

This module knows nothing about transformers: the caller passes the mean colour
its model expects, used for padding.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

import utils_hub

logger = logging.getLogger(__name__)

IMAGE_COLUMN_CANDIDATES = ("image", "pixel_values", "img")
LABEL_COLUMN_CANDIDATES = ("label", "mask", "annotation", "semantic_segmentation", "segmentation", "gt")
NAME_COLUMN_CANDIDATES = ("name", "filename", "file_name", "image_id", "id", "path")
VALIDATION_SPLIT_CANDIDATES = ("validation", "val", "valid", "test")

# Label mappings a preset or flag can ask for.
LABELS_IDENTITY = "identity"
LABELS_REDUCE = "reduce_labels"
LABELS_CITYSCAPES_AUTO = "cityscapes_auto"
LABELS_CITYSCAPES_LABELID = "cityscapes_labelid_to_trainid"


class DataError(ValueError):
    """The data, or how it was asked for, cannot be used as it is."""


class BadSampleError(DataError):
    """One sample cannot be decoded or is inconsistent (skippable with ``skip_bad_samples``)."""


class LabelValueError(DataError):
    """Label values outside [0, num_labels) and not the ignore index."""


# --------------------------------------------------------------------------------------
# Class tables
# --------------------------------------------------------------------------------------

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Official cityscapesScripts table: labelId -> trainId for the 19 evaluated classes;
# every other labelId (0-6, 9, 10, 14-16, 18, 29, 30, and license plate -1) is ignored.
CITYSCAPES_LABELID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}

PASCAL_VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

CAMVID_CLASSES = (
    "sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car",
    "pedestrian", "bicyclist",
)

# In the order of the label values synthetic.py paints (synthetic.SKY ... synthetic.SIGN).
SYNTHETIC_CLASSES = (
    "sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole", "traffic sign",
)


def _as_id2label(names: Sequence[str]) -> dict[int, str]:
    return dict(enumerate(names))


# --------------------------------------------------------------------------------------
# Presets and the description of a loaded dataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetPreset:
    """Everything a dataset name implies.

    Attributes:
        name: Preset key (``--dataset``).
        hub_id: Default ``datasets`` path; ``dataset_name`` overrides it. None
            when no usable Hub copy exists (pass a local folder instead).
        id2label: Class names in training-id order (used when the data has no
            ``id2label.json``).
        ignore_index: Label value excluded from loss and metrics.
        crop_size: (h, w) training crop.
        default_teacher / default_student: Model ids suggested for this data.
        label_handling: One of the ``LABELS_*`` mappings.
        eval_split: Preferred evaluation split name.
        notes: Why the Hub id and defaults were chosen.
        hub_revision / hub_data_dir / hub_config_name: passed to
            ``datasets.load_dataset`` with the default ``hub_id`` only.
    """

    name: str
    hub_id: str | None
    id2label: dict[int, str]
    ignore_index: int
    crop_size: tuple[int, int]
    default_teacher: str | None
    default_student: str | None
    label_handling: str
    eval_split: str
    notes: str
    hub_revision: str | None = None
    hub_data_dir: str | None = None
    hub_config_name: str | None = None


DATASET_PRESETS: dict[str, DatasetPreset] = {
    "cityscapes": DatasetPreset(
        name="cityscapes",
        hub_id="Chris1/cityscapes",
        id2label=_as_id2label(CITYSCAPES_CLASSES),
        ignore_index=255,
        crop_size=(512, 1024),
        default_teacher="nvidia/segformer-b5-finetuned-cityscapes-1024-1024",
        default_student="nvidia/mit-b0",
        label_handling=LABELS_CITYSCAPES_AUTO,
        eval_split="validation",
        notes=(
            "Chris1/cityscapes: a parquet copy (image + semantic_segmentation; train/validation/test) that "
            "datasets 5 loads without a script; the official data needs a login at cityscapes-dataset.com, so "
            "a local folder of your own copy is the safer choice. Masks may hold the 34 labelIds or the 19 "
            "trainIds: detected from the first training masks and mapped with the official table."
        ),
    ),
    "pascal-voc": DatasetPreset(
        name="pascal-voc",
        hub_id="nateraw/pascal-voc-2012",
        id2label=_as_id2label(PASCAL_VOC_CLASSES),
        ignore_index=255,
        crop_size=(512, 512),
        default_teacher="apple/deeplabv3-mobilevit-small",
        default_student="apple/mobilevit-xx-small",
        label_handling=LABELS_IDENTITY,
        eval_split="val",
        notes=(
            "nateraw/pascal-voc-2012: parquet (image, mask) with the official VOC2012 segmentation splits "
            "(train 1464 / val 1449), palette masks whose indices are the 21 classes and 255 on object "
            "boundaries (kept as ignore). Teacher apple/deeplabv3-mobilevit-small is a real VOC checkpoint "
            "(21 classes, same order); student apple/mobilevit-xx-small is its ImageNet-pretrained little "
            "sibling, so both share MobileViT's BGR, no-mean/std input convention."
        ),
    ),
    "ade20k": DatasetPreset(
        name="ade20k",
        hub_id="zhoubolei/scene_parse_150",
        id2label=_as_id2label(ADE20K_CLASSES),
        ignore_index=255,
        crop_size=(512, 512),
        default_teacher="nvidia/segformer-b5-finetuned-ade-640-640",
        default_student="nvidia/mit-b0",
        label_handling=LABELS_REDUCE,
        eval_split="validation",
        hub_revision="refs/convert/parquet",
        hub_data_dir="scene_parsing",
        notes=(
            "zhoubolei/scene_parse_150 is the canonical ADE20K/SceneParsing-150 repo but ships a loading "
            "script, which datasets 5 no longer runs; its Hub-made parquet export (revision "
            "refs/convert/parquet, folder scene_parsing) holds the same image/annotation data. Label 0 is "
            "'other' and is ignored; 1..150 become 0..149 (reduce labels)."
        ),
    ),
    "camvid": DatasetPreset(
        name="camvid",
        hub_id=None,
        id2label=_as_id2label(CAMVID_CLASSES),
        ignore_index=255,
        crop_size=(352, 480),
        default_teacher=None,
        default_student="nvidia/mit-b0",
        label_handling=LABELS_IDENTITY,
        eval_split="validation",
        notes=(
            "No parquet CamVid with the 11-class SegNet labels was found on the Hub (copies there are RAR "
            "archives or colour masks). No public CamVid teacher exists in transformers format: train one first "
            "(e.g. fine-tune nvidia/segformer-b2-finetuned-cityscapes-1024-1024 or nvidia/mit-b2) and pass its "
            "output folder as the teacher."
        ),
    ),
    "synthetic": DatasetPreset(
        name="synthetic",
        hub_id=None,
        id2label=_as_id2label(SYNTHETIC_CLASSES),
        ignore_index=255,
        crop_size=(128, 128),
        default_teacher="config:segformer-b0",
        default_student="config:segformer-tiny",
        label_handling=LABELS_IDENTITY,
        eval_split="validation",
        notes=(
            "Procedural road scenes rendered on the fly from (seed, index): no files, no network. "
            "512 train / 64 validation scenes of 128x128 by default (dataset_config_name 'HxW' changes the "
            "size). The default teacher is a config: preset with random weights: train it first."
        ),
    ),
}


@dataclass
class DataInfo:
    """What ``load_splits`` found and decided; passed on to the pipelines.

    Attributes:
        id2label / label2id / num_labels: the classes, in training-id order.
        ignore_index: label value excluded from loss and metrics.
        image_column / label_column: columns holding images and masks.
        name_column: column naming a sample in error messages, if any.
        crop_size: (h, w) default training crop.
        label_mapping: ``LABELS_*`` key applied to every mask.
        label_transform: human-readable description of ``label_mapping``.
        notes: every decision taken while loading (for logs and model cards).
        preset: preset name, or None for a plain ``dataset_name``.
        source: what was loaded (Hub id, folder, or "synthetic").
        default_teacher / default_student: the preset's suggestions.
    """

    id2label: dict[int, str]
    label2id: dict[str, int]
    num_labels: int
    ignore_index: int
    image_column: str
    label_column: str
    crop_size: tuple[int, int]
    label_mapping: str
    label_transform: str
    notes: list[str] = field(default_factory=list)
    preset: str | None = None
    source: str | None = None
    name_column: str | None = None
    default_teacher: str | None = None
    default_student: str | None = None


# --------------------------------------------------------------------------------------
# Label mapping
# --------------------------------------------------------------------------------------


def _describe_mapping(mapping: str, ignore_index: int) -> str:
    if mapping == LABELS_REDUCE:
        return f"reduce labels: 0 -> {ignore_index} (ignored), x -> x - 1"
    if mapping == LABELS_CITYSCAPES_LABELID:
        return f"Cityscapes labelId -> trainId (official table), other labelIds -> {ignore_index}"
    return f"identity (values used as class ids, {ignore_index} ignored)"


def map_labels(label: np.ndarray, mapping: str, ignore_index: int) -> np.ndarray:
    """Apply a ``LABELS_*`` mapping to an integer mask.

    Args:
        label: (H, W) integer array of raw mask values.
        mapping: ``LABELS_IDENTITY``, ``LABELS_REDUCE`` or ``LABELS_CITYSCAPES_LABELID``.
        ignore_index: value given to ignored pixels.

    Returns:
        (H, W) int64 array of class ids and ``ignore_index``.
    """
    label = np.asarray(label).astype(np.int64, copy=False)
    if mapping == LABELS_IDENTITY:
        return label
    if mapping == LABELS_REDUCE:
        out = label - 1
        out[(label == 0) | (label == ignore_index)] = ignore_index
        return out
    if mapping == LABELS_CITYSCAPES_LABELID:
        size = max(256, int(label.max(initial=0)) + 1)
        lut = np.full(size, ignore_index, dtype=np.int64)
        for label_id, train_id in CITYSCAPES_LABELID_TO_TRAINID.items():
            lut[label_id] = train_id
        out = np.full(label.shape, ignore_index, dtype=np.int64)
        valid = label >= 0
        out[valid] = lut[label[valid]]
        return out
    raise DataError(f"unknown label mapping {mapping!r}: use one of identity, reduce_labels, cityscapes")


def _cityscapes_format(masks: list[np.ndarray]) -> str:
    """'labelId' when any mask holds a value only labelIds use (19..254), else 'trainId'."""
    for mask in masks:
        values = np.unique(mask)
        if np.any((values >= 19) & (values != 255)):
            return "labelId"
    return "trainId"


def check_labels(labels: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    """Raise :class:`LabelValueError` if ``labels`` holds values outside [0, C) ∪ {ignore}.

    Args:
        labels: integer tensor of any shape, e.g. (B, H, W), on CPU.
        num_labels: C.
        ignore_index: the ignored value.
    """
    labels = labels.detach()
    bad = ((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)
    if bool(bad.any()):
        raise _label_value_error(torch.unique(labels[bad]).tolist(), num_labels, ignore_index)


def _label_value_error(values: list[int], num_labels: int, ignore_index: int) -> LabelValueError:
    shown = ", ".join(str(v) for v in values[:10]) + (f", ... ({len(values)} distinct)" if len(values) > 10 else "")
    return LabelValueError(
        f"label values [{shown}] are outside 0..{num_labels - 1} and not the ignore index {ignore_index}: "
        "pass --ignore_index for a void value, --do_reduce_labels if 0 means 'unlabelled' "
        "(ADE20K style), a dataset preset with the right label mapping, or an --id2label file listing "
        "every class"
    )


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def _open_pil(value: Any, what: str) -> Image.Image:
    """PIL image from a decoded image, a ``{"bytes", "path"}`` dict, or a path; fully loaded."""
    if isinstance(value, Image.Image):
        return value
    try:
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = Image.open(value["path"])
            else:
                raise BadSampleError(f"{what}: image entry has neither bytes nor path")
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            raise BadSampleError(f"{what}: cannot read an image from a {type(value).__name__}")
        image.load()  # truncated or corrupt files fail here, not later in a worker
        return image
    except BadSampleError:
        raise
    except Exception as err:
        raise BadSampleError(f"{what}: cannot decode image ({type(err).__name__}: {err})") from None


def decode_image(value: Any, what: str = "image") -> np.ndarray:
    """Decode any supported image value to RGB uint8.

    Grayscale and palette images are expanded to RGB, alpha is dropped (not
    composited), 16-bit and 32-bit integer images are scaled to 8 bits (values
    above 255 are divided by 257, i.e. 65535 -> 255), float images in [0, 1] are
    scaled by 255.

    Returns:
        (H, W, 3) uint8 array.
    """
    if isinstance(value, (np.ndarray, torch.Tensor)):
        array = np.asarray(value)
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        if array.ndim == 3 and array.shape[2] == 4:
            array = array[:, :, :3]
        if array.ndim != 3 or array.shape[2] != 3:
            raise BadSampleError(f"{what}: expected an (H, W, 3) array, got shape {array.shape}")
        return _to_uint8(array, what)
    image = _open_pil(value, what)
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        array = np.asarray(image)
        return np.repeat(_to_uint8(array, what)[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _pillow_pixels(image: Image.Image) -> np.ndarray:
    """The pixels of a loaded image, shared with Pillow rather than copied where it allows (then read-only).

    Pillow (11.2+) exports an "RGB", "L" or "P" image whose rows lie in one block (up to 16 MiB by default)
    through the Arrow C data interface: "RGB" then comes as (H, W, 4), the way Pillow stores it (the 4th byte
    is unused), "L" and "P" as (H, W). Anything else is ``np.asarray(image)``, a copy.
    """
    if image.mode in ("RGB", "L", "P") and hasattr(image, "__arrow_c_array__"):
        width, height = image.size
        try:
            exported = pa.array(image)
            if image.mode == "RGB":  # .values: the bytes under the pixels (flatten() is a slower compute call)
                return exported.values.to_numpy(zero_copy_only=True).reshape(height, width, 4)
            return exported.to_numpy(zero_copy_only=True).reshape(height, width)
        except (ValueError, TypeError, pa.ArrowException):  # e.g. rows in several blocks: copied below
            pass
    return np.asarray(image)


def _decode_pixels(value: Any, what: str) -> np.ndarray:
    """:func:`decode_image` without its copy for RGB files: (H, W, 3) or (H, W, 4) uint8 RGB (a 4th channel is
    unused), possibly read-only."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return decode_image(value, what)
    image = _open_pil(value, what)
    return _pillow_pixels(image) if image.mode == "RGB" else decode_image(image, what)


def _to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        top = float(np.nanmax(array)) if array.size else 0.0
        scaled = array * 255.0 if top <= 1.0 else array
        return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        wide = array.astype(np.int64)
        sixteen_bit = np.issubdtype(array.dtype, np.unsignedinteger) and array.dtype.itemsize == 2
        if sixteen_bit or int(wide.max(initial=0)) > 255:
            wide = wide // 257
        return np.clip(wide, 0, 255).astype(np.uint8)
    raise BadSampleError(f"{what}: unsupported pixel type {array.dtype}")


def pascal_voc_colormap(size: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: entry ``i`` is the colour VOC draws class index ``i`` in.

    The bits of ``i`` are dealt out in turn to red, green and blue, most significant bit first
    (0 black, 1 (128, 0, 0), 2 (0, 128, 0), ..., 255 (224, 224, 192), the boundary colour). Distinct
    indices get distinct colours.

    Returns:
        (size, 3) uint8 array.
    """
    colours = np.zeros((size, 3), dtype=np.uint8)
    for index in range(size):
        bits, rgb = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                rgb[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        colours[index] = rgb
    return colours


# 24-bit colour -> VOC index, for RGB renderings of VOC masks.
_VOC_INDEX_OF_COLOUR = {
    (int(r) << 16) | (int(g) << 8) | int(b): index for index, (r, g, b) in enumerate(pascal_voc_colormap())
}


def _voc_colours_to_indices(rgb: np.ndarray, what: str) -> np.ndarray:
    """(H, W, 3) uint8 drawn in the VOC colour map -> (H, W) int64 indices; an unknown colour raises."""
    codes = (rgb[:, :, 0].astype(np.int64) << 16) | (rgb[:, :, 1].astype(np.int64) << 8) | rgb[:, :, 2]
    unique, inverse = np.unique(codes, return_inverse=True)
    lut = np.empty(len(unique), dtype=np.int64)
    for position, code in enumerate(unique.tolist()):
        index = _VOC_INDEX_OF_COLOUR.get(code)
        if index is None:
            colour = (code >> 16, (code >> 8) & 255, code & 255)
            raise BadSampleError(
                f"{what}: the RGB mask holds the colour {colour}, which is not in the Pascal VOC colour map; "
                "convert colour-coded masks to single-channel class indices (an 'L' or 'P' PNG)"
            )
        lut[position] = index
    return lut[inverse.reshape(codes.shape)]


def decode_label(value: Any, what: str = "label") -> np.ndarray:
    """Decode a mask to an (H, W) int64 array, keeping its values.

    Palette ("P") masks keep their indices (Pascal VOC's PNGs: classes 0..20, boundary 255), 16-bit masks
    keep their values. A 3-channel mask whose channels are equal is read as one channel (a grey mask saved as
    RGB). Any other RGB mask must be drawn in the Pascal VOC colour map (:func:`pascal_voc_colormap`): each
    colour becomes its index, so VOC's boundary colour (224, 224, 192) becomes 255, the ignore index. A colour
    outside the map raises :class:`BadSampleError` naming the colour and ``what`` (and the file, when
    ``value`` is a path).

    A mask drawn in VOC colours that happens to hold only grey entries of the map (black, (128, 128, 128),
    ...) is read as grey values: real VOC masks always hold the boundary colour as well.
    """
    return _decode_label_values(value, what).astype(np.int64, copy=False)


def _decode_label_values(value: Any, what: str) -> np.ndarray:
    """:func:`decode_label` in the mask's own integer type: uint8 for "L" and "P" PNGs, 8 times smaller than int64.

    Possibly read-only (Pillow's own memory, see :func:`_pillow_pixels`).
    """
    if isinstance(value, (str, os.PathLike)):
        what = f"{what} (file {value})"
    elif isinstance(value, dict) and value.get("path") and str(value["path"]) not in what:
        what = f"{what} (file {value['path']})"
    if isinstance(value, (np.ndarray, torch.Tensor, list)):
        array = np.asarray(value)
    else:
        image = _open_pil(value, what)  # "P" keeps indices, "I;16"/"I" keep values
        array = _pillow_pixels(image) if image.mode in ("L", "P") else np.asarray(image)
    if array.ndim == 3:
        if array.shape[2] in (2, 4):  # drop alpha
            array = array[:, :, : array.shape[2] - 1]
        if array.shape[2] == 1 or bool(np.all(array == array[:, :, :1])):
            array = array[:, :, 0]
        elif array.shape[2] == 3 and array.dtype == np.uint8:
            array = _voc_colours_to_indices(array, what)
        else:
            raise BadSampleError(
                f"{what}: the mask is colour-coded ({array.dtype}, {array.shape[2]} channels); convert it to a "
                "single-channel mask of class indices (one value per class, e.g. an 'L' or 'P' PNG)"
            )
    if array.ndim != 2:
        raise BadSampleError(f"{what}: expected an (H, W) mask, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != np.bool_:
        if np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0):
            array = array.astype(np.int64)
        else:
            raise BadSampleError(f"{what}: mask values must be integers, got {array.dtype}")
    return array


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    """What :func:`load_splits` loads and how: one field per data flag of ``train_icsd.py``, same names.

    Attributes:
        dataset: A preset name (``cityscapes``, ``pascal-voc``, ``ade20k``,
            ``camvid``, ``synthetic``) supplying classes, label mapping, crop and
            default models.
        dataset_name: Hub id or local folder for ``datasets.load_dataset``;
            overrides the preset's Hub id. Alone (no preset) it loads any
            dataset whose classes come from its ``id2label.json`` or ``id2label``.
        dataset_config_name: ``datasets`` config name; for ``synthetic``, the
            scene size as ``"HxW"``.
        image_column / label_column: column names; auto-detected when None.
        id2label: path of a JSON file ``{"0": "name", ...}`` overriding every
            other class source.
        ignore_index: ignored label value (default: the preset's, else 255).
        do_reduce_labels: force (True) or forbid (False) the ADE20K-style
            reduction; None lets the preset decide.
        train_split: training split name.
        validation_split: evaluation split; None looks for validation, val,
            valid, test in that order, then carves ``validation_fraction`` of
            train with ``seed``.
        seed: seed of that carve.
        max_train_samples / max_eval_samples: keep only the first N rows.
        trust_remote_code: accepted for symmetry with the model loaders; datasets 5
            runs no loading scripts, so it only adds a warning and a note.
        validation_fraction: share of train carved off as the evaluation split
            when the dataset has none (no command-line flag).
    """

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
    trust_remote_code: bool = False
    validation_fraction: float = 0.1

    @classmethod
    def from_args(cls, namespace: argparse.Namespace) -> DataOptions:
        """The options an argparse ``Namespace`` holds, taken by field name.

        Fields the namespace has no attribute for keep their defaults, so a
        tool's parser may define only the flags it uses.
        """
        return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)})


@dataclass(frozen=True)
class _Source:
    """Where ``datasets.load_dataset`` reads: a folder or Hub id, plus the preset's Hub extras."""

    path: str
    revision: str | None = None
    data_dir: str | None = None
    config_name: str | None = None


def load_splits(options: DataOptions) -> tuple[datasets.Dataset, datasets.Dataset, DataInfo]:
    """Load train and evaluation splits and describe them.

    Args:
        options: what to load and how (see :class:`DataOptions`).

    Returns:
        (train, eval, info). Image/label columns are left undecoded (raw
        bytes/paths); the pipelines decode each sample once, in workers.

    Raises:
        DataError: the options or the data cannot be used; the message names
            the problem and the flag that fixes it.
    """
    preset = _preset_for(options)
    if not 0.0 < options.validation_fraction < 1.0:
        raise DataError(f"validation_fraction must be in (0, 1), got {options.validation_fraction}")
    if preset is not None and preset.name == "synthetic":
        return _load_synthetic(options)

    source = _source_for(options, preset)
    notes = _source_notes(options, preset, source)
    splits = _load_dataset_dict(source)
    train, evaluation = _pick_splits(splits, options, preset, source.path, notes)
    image_column, label_column, name_column = _pick_columns(train, evaluation, options)
    id2label = _pick_classes(options, preset, source, notes)
    ignore_index = options.ignore_index
    if ignore_index is None:
        ignore_index = preset.ignore_index if preset else 255
    mapping = _pick_mapping(options, preset, notes)
    train = _cast_undecoded(train, (image_column, label_column))
    evaluation = _cast_undecoded(evaluation, (image_column, label_column))
    if mapping == LABELS_CITYSCAPES_AUTO:
        mapping = _detect_cityscapes_mapping(train, label_column, options.train_split, notes)
    if 0 <= ignore_index < len(id2label):
        raise DataError(
            f"ignore_index {ignore_index} is a class id (0..{len(id2label) - 1}): pick a value outside the classes"
        )
    train, evaluation = _keep_first(train, evaluation, options, notes)
    return train, evaluation, _data_info(
        id2label, ignore_index, mapping, image_column=image_column, label_column=label_column,
        crop_size=preset.crop_size if preset else (512, 512), notes=notes,
        preset=preset.name if preset else None, source=source.path, name_column=name_column,
        default_teacher=preset.default_teacher if preset else None,
        default_student=preset.default_student if preset else None,
    )


def _preset_for(options: DataOptions) -> DatasetPreset | None:
    """The preset ``options.dataset`` names (None for a plain ``dataset_name``); refuses options naming nothing."""
    preset: DatasetPreset | None = None
    if options.dataset is not None:
        preset = DATASET_PRESETS.get(options.dataset)
        if preset is None:
            raise DataError(f"unknown dataset preset {options.dataset!r}: choose one of {', '.join(DATASET_PRESETS)}")
    if preset is None and options.dataset_name is None:
        raise DataError(
            f"no dataset given: pass --dataset PRESET ({', '.join(DATASET_PRESETS)}) or --dataset_name PATH_OR_HUB_ID"
        )
    return preset


def _source_for(options: DataOptions, preset: DatasetPreset | None) -> _Source:
    """``dataset_name`` if given, else the preset's Hub copy with its revision, folder and config."""
    path = options.dataset_name or (preset.hub_id if preset else None)
    if path is None:
        assert preset is not None
        raise DataError(
            f"preset {preset.name!r} has no default Hub copy: pass --dataset_name with a local folder "
            f"(e.g. ../shared/data/{preset.name}). {preset.notes}"
        )
    if preset is None or options.dataset_name is not None:  # the Hub extras belong to the preset's own copy
        return _Source(path, config_name=options.dataset_config_name)
    return _Source(path, revision=preset.hub_revision, data_dir=preset.hub_data_dir,
                   config_name=options.dataset_config_name or preset.hub_config_name)


def _source_notes(options: DataOptions, preset: DatasetPreset | None, source: _Source) -> list[str]:
    """The first notes of a load: the preset, what is read, and an ignored ``trust_remote_code``."""
    notes: list[str] = []
    if preset is not None:
        notes.append(f"preset {preset.name}: {preset.notes}")
    notes.append(f"loaded {source.path!r}" + (f" at revision {source.revision}" if source.revision else "")
                 + (f", folder {source.data_dir}" if source.data_dir else "")
                 + (f", config {source.config_name}" if source.config_name else ""))
    if options.trust_remote_code:
        # datasets 5 runs no loading scripts, so the flag cannot do anything here.
        logger.warning("trust_remote_code has no effect on datasets %s (no loading scripts)", datasets.__version__)
        notes.append(
            f"trust_remote_code ignored for the dataset: datasets {datasets.__version__} runs no loading scripts"
        )
    return notes


def _hub_unreachable(source: str, reason: str) -> DataError:
    return DataError(
        f"dataset {source!r} is not a local folder and could not be fetched from the Hub ({reason}): check the "
        "id, log in with `hf auth login` for private or gated datasets, pass a local folder with "
        f"--dataset_name, or use a preset ({', '.join(DATASET_PRESETS)})"
    )


def _probe_hub_dataset(path: str, revision: str | None) -> None:
    """Raise :class:`DataError` at once for a missing folder, or a Hub dataset the Hub cannot serve."""
    if path.startswith((".", "/", "~")) or Path(path).exists():
        raise DataError(f"dataset folder {path!r} does not exist (or is a file): check the path")
    try:
        utils_hub.probe_hub_repo(path, repo_type="dataset", revision=revision)
    except utils_hub.HubProbeError as err:
        if err.kind == utils_hub.OFFLINE:
            return  # datasets serves its cache, or says it cannot
        reason = str(err)
        if err.kind == utils_hub.GATED:
            reason = "gated: accept its terms on the Hub and log in"
        elif err.kind == utils_hub.NETWORK:
            reason += "; if it is cached, set HF_HUB_OFFLINE=1 to use the cache"
        raise _hub_unreachable(path, reason) from None


def _load_dataset_dict(source: _Source) -> datasets.DatasetDict:
    """``datasets.load_dataset`` after a quick reachability probe, so a missing Hub repo fails at once."""
    if not Path(source.path).expanduser().is_dir():
        _probe_hub_dataset(source.path, source.revision)
    kwargs: dict[str, Any] = {}
    if source.revision is not None:
        kwargs["revision"] = source.revision
    if source.data_dir is not None:
        kwargs["data_dir"] = source.data_dir
    try:
        loaded = datasets.load_dataset(source.path, source.config_name, **kwargs)
    except ConnectionError as err:
        raise _hub_unreachable(source.path, f"offline and not cached: {err}") from None
    except ValueError as err:
        if "corresponds to no data" in str(err):  # datasets' words for a split whose files hold no rows
            raise DataError(f"dataset {source.path!r} has an empty split ({err}): fix its data files, or pick other "
                            "splits with --train_split / --validation_split") from None
        raise
    except RuntimeError as err:
        if "scripts are no longer supported" in str(err):
            raise DataError(
                f"dataset {source.path!r} is a loading script, which datasets {datasets.__version__} cannot run: "
                "use a parquet copy (many script datasets have one at revision 'refs/convert/parquet') or a local "
                "folder"
            ) from None
        raise
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise DataError(
            f"dataset {source.path!r} loaded as {type(loaded).__name__}; streaming datasets are not supported"
        )
    return loaded


def _pick_splits(splits: datasets.DatasetDict, options: DataOptions, preset: DatasetPreset | None, source: str,
                 notes: list[str]) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, evaluation): the named splits, else the first validation-like split, else a carve of train."""
    train_split, validation_split = options.train_split, options.validation_split
    if train_split not in splits:
        raise DataError(f"split {train_split!r} not found; {source!r} has splits {list(splits)}: pass --train_split")
    train = splits[train_split]
    if validation_split is not None:
        if validation_split not in splits:
            raise DataError(
                f"split {validation_split!r} not found; {source!r} has splits {list(splits)}: pass --validation_split"
            )
        return train, splits[validation_split]
    preferred = ([preset.eval_split] if preset else []) + list(VALIDATION_SPLIT_CANDIDATES)
    found = next((name for name in preferred if name in splits and name != train_split), None)
    if found is not None:
        notes.append(f"evaluating on split {found!r}")
        return train, splits[found]
    if len(train) < 2:
        raise DataError(f"split {train_split!r} has {len(train)} rows: too few to carve a validation split")
    fraction, seed = options.validation_fraction, options.seed
    carved = train.train_test_split(test_size=fraction, seed=seed, shuffle=True)
    train, evaluation = carved["train"], carved["test"]
    notes.append(
        f"no validation split: carved {fraction:.0%} of {train_split!r} with seed {seed} "
        f"({len(train)} train / {len(evaluation)} eval)"
    )
    return train, evaluation


def _pick_columns(train: datasets.Dataset, evaluation: datasets.Dataset, options: DataOptions
                  ) -> tuple[str, str, str | None]:
    """(image, label, name) columns: the options' names, else the first known candidate names."""
    columns = list(train.column_names)
    image_column = _find_column(columns, options.image_column, IMAGE_COLUMN_CANDIDATES, "image", "--image_column")
    label_column = _find_column(columns, options.label_column, LABEL_COLUMN_CANDIDATES, "label", "--label_column")
    if label_column == image_column:
        raise DataError(f"image and label column are both {image_column!r}: pass --image_column/--label_column")
    missing = [col for col in (image_column, label_column) if col not in evaluation.column_names]
    if missing:
        raise DataError(f"evaluation split lacks columns {missing}; it has {evaluation.column_names}")
    name_column = next((col for col in NAME_COLUMN_CANDIDATES if col in columns), None)
    return image_column, label_column, name_column


def _find_column(columns: list[str], explicit: str | None, candidates: Sequence[str], what: str, flag: str) -> str:
    if explicit is not None:
        if explicit not in columns:
            raise DataError(f"{what} column {explicit!r} not found; the dataset has columns {columns}: pass {flag}")
        return explicit
    for name in candidates:
        if name in columns:
            return name
    raise DataError(
        f"no {what} column found among {list(candidates)}; the dataset has columns {columns}: pass {flag} NAME"
    )


def _pick_classes(options: DataOptions, preset: DatasetPreset | None, source: _Source,
                  notes: list[str]) -> dict[int, str]:
    """Class names: the ``id2label`` file > the dataset's own id2label.json > the preset's table."""
    if options.id2label is not None:
        id2label = _read_id2label_file(options.id2label)
        notes.append(f"classes from {options.id2label}")
        return id2label
    found_file = _dataset_id2label_file(source.path, source.revision)
    if found_file is not None:
        id2label = _read_id2label_file(found_file)
        notes.append(f"classes from the dataset's id2label.json ({len(id2label)} classes)")
        preset_names = [n.lower() for n in preset.id2label.values()] if preset is not None else None
        if preset_names is not None and [n.lower() for n in id2label.values()] != preset_names:
            notes.append(f"the dataset's id2label.json differs from the {preset.name} preset's classes; using the file")
        return id2label
    if preset is not None:
        notes.append(f"classes from the {preset.name} preset ({len(preset.id2label)} classes)")
        return dict(preset.id2label)
    raise DataError(
        f"no class names for {source.path!r}: it has no id2label.json; pass --id2label FILE with "
        "{\"0\": \"name\", ...} or a --dataset preset"
    )


def _read_id2label_file(path: str | Path) -> dict[int, str]:
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"id2label file {str(path)!r} does not exist: check the --id2label path") from None
    except json.JSONDecodeError as err:
        raise DataError(
            f"id2label file {str(path)!r} is not valid JSON ({err}): write it as {{\"0\": \"name\", ...}}"
        ) from None
    if isinstance(raw, list):
        raw = dict(enumerate(raw))
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"id2label file {str(path)!r} must be a non-empty JSON object {{\"0\": \"name\", ...}} or list")
    try:
        items = sorted((int(k), str(v)) for k, v in raw.items())
    except ValueError:
        raise DataError(f"id2label file {str(path)!r} has non-integer keys: use class ids as keys") from None
    keys = [k for k, _ in items]
    if keys != list(range(len(keys))):
        raise DataError(f"id2label file {str(path)!r} keys must be 0..{len(keys) - 1} without gaps, got {keys[:20]}")
    return dict(items)


def _dataset_id2label_file(source: str, revision: str | None) -> str | None:
    """Path to the dataset's own id2label.json (local folder or Hub repo), or None."""
    local = Path(source).expanduser()
    if local.is_dir():
        candidate = local / "id2label.json"
        return str(candidate) if candidate.is_file() else None
    try:
        return huggingface_hub.hf_hub_download(source, "id2label.json", repo_type="dataset", revision=revision,
                                               etag_timeout=utils_hub.HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # absent file, offline, or network trouble: all mean "not available"
        logger.debug("no id2label.json for %s: %s", source, err)
        return None


def _pick_mapping(options: DataOptions, preset: DatasetPreset | None, notes: list[str]) -> str:
    """The preset's ``LABELS_*`` mapping, with reduce labels forced or disabled by ``do_reduce_labels``."""
    mapping = preset.label_handling if preset else LABELS_IDENTITY
    if options.do_reduce_labels is True:
        if mapping != LABELS_REDUCE:
            notes.append(f"reduce labels forced by do_reduce_labels=True (instead of {mapping})")
        return LABELS_REDUCE
    if options.do_reduce_labels is False and mapping == LABELS_REDUCE:
        notes.append("reduce labels disabled by do_reduce_labels=False")
        return LABELS_IDENTITY
    return mapping


def _detect_cityscapes_mapping(train: datasets.Dataset, label_column: str, train_split: str,
                               notes: list[str]) -> str:
    """``LABELS_CITYSCAPES_LABELID`` or ``LABELS_IDENTITY``, judged from the first training masks."""
    probe = [decode_label(train[i][label_column], f"{train_split} row {i}") for i in range(min(8, len(train)))]
    kind = _cityscapes_format(probe)
    notes.append(f"Cityscapes masks hold {kind}s (judged from {len(probe)} training masks)"
                 + ("; mapping labelId -> trainId" if kind == "labelId" else "; used as they are"))
    return LABELS_CITYSCAPES_LABELID if kind == "labelId" else LABELS_IDENTITY


def _keep_first(train: datasets.Dataset, evaluation: datasets.Dataset, options: DataOptions,
                notes: list[str]) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Apply ``max_train_samples`` / ``max_eval_samples``: the first N rows of each split."""
    if options.max_train_samples is not None:
        train = train.select(range(min(options.max_train_samples, len(train))))
        notes.append(f"kept the first {len(train)} training rows (max_train_samples)")
    if options.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(options.max_eval_samples, len(evaluation))))
        notes.append(f"kept the first {len(evaluation)} evaluation rows (max_eval_samples)")
    return train, evaluation


def _data_info(id2label: dict[int, str], ignore_index: int, mapping: str, **described: Any) -> DataInfo:
    """A :class:`DataInfo` whose label2id, num_labels and label_transform follow from the classes and mapping."""
    return DataInfo(
        id2label=id2label,
        label2id={name: idx for idx, name in id2label.items()},
        num_labels=len(id2label),
        ignore_index=int(ignore_index),
        label_mapping=mapping,
        label_transform=_describe_mapping(mapping, int(ignore_index)),
        **described,
    )


def _cast_undecoded(ds: datasets.Dataset, columns: Sequence[str]) -> datasets.Dataset:
    # Decoding is left to the pipelines so it happens once, in workers, and a
    # corrupt file becomes an error naming the sample instead of a crash deep in Arrow.
    for column in columns:
        feature = ds.features.get(column)
        if isinstance(feature, datasets.Image) and feature.decode:
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise DataError(f"synthetic dataset_config_name must be 'HxW' such as '128x128', got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _load_synthetic(options: DataOptions) -> tuple[datasets.Dataset, datasets.Dataset, DataInfo]:
    """The ``synthetic`` preset: scenes rendered on access by :mod:`synthetic`, the only user of that module."""
    from synthetic import make_synthetic_splits

    unused = {
        "--dataset_name": options.dataset_name is not None, "--image_column": options.image_column is not None,
        "--label_column": options.label_column is not None, "--id2label": options.id2label is not None,
        "--do_reduce_labels": bool(options.do_reduce_labels),
        "--validation_split": options.validation_split is not None,
        "--train_split": options.train_split != "train", "--ignore_index": options.ignore_index not in (None, 255),
    }
    given = [flag for flag, used in unused.items() if used]
    if given:
        raise DataError(f"the synthetic preset generates its own data and classes: drop {', '.join(given)}")
    preset = DATASET_PRESETS["synthetic"]
    height, width = _parse_size(options.dataset_config_name) if options.dataset_config_name else (128, 128)
    num_train = 512 if options.max_train_samples is None else max(1, min(options.max_train_samples, 512))
    num_eval = 64 if options.max_eval_samples is None else max(1, min(options.max_eval_samples, 64))
    try:
        train, evaluation = make_synthetic_splits(num_train, num_eval, height=height, width=width, seed=0)
    except ValueError as err:  # the renderer's own argument checks: a data problem like any other here
        raise DataError(str(err)) from None
    notes = [
        f"preset synthetic: {preset.notes}",
        f"{num_train} train / {num_eval} eval scenes of {height}x{width}, scene seed 0",
    ]
    return train, evaluation, _data_info(
        dict(preset.id2label), 255, LABELS_IDENTITY, image_column="image", label_column="label",
        crop_size=(min(preset.crop_size[0], height), min(preset.crop_size[1], width)), notes=notes,
        preset="synthetic", source="synthetic", name_column="index",
        default_teacher=preset.default_teacher, default_student=preset.default_student,
    )


def check_split_sizes(train: Sequence | datasets.Dataset, evaluation: Sequence | datasets.Dataset,
                      train_batch_size: int, world_size: int = 1) -> None:
    """Raise :class:`DataError` if a split is empty or train cannot fill one batch per process."""
    if train_batch_size < 1 or world_size < 1:
        raise DataError(f"batch size and world size must be positive, got {train_batch_size} and {world_size}")
    if len(train) == 0:
        raise DataError("the training split is empty: check --train_split and --max_train_samples")
    if len(evaluation) == 0:
        raise DataError("the evaluation split is empty: check --validation_split and --max_eval_samples")
    needed = train_batch_size * world_size
    if len(train) < needed:
        raise DataError(
            f"the training split has {len(train)} samples, fewer than one batch ({train_batch_size} per device x "
            f"{world_size} processes = {needed}): lower the batch size or use more training data"
        )


# --------------------------------------------------------------------------------------
# Torch datasets: decoding, augmentation, collation
# --------------------------------------------------------------------------------------


def _writable(array: np.ndarray) -> np.ndarray:
    # PIL-backed arrays are read-only; torch warns on those, so copy only when needed.
    return np.require(array, requirements=["C", "W"])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A ``torch.Generator`` seeded from (seed, epoch, index) alone.

    Independent of worker count, process count, and of which batches were
    skipped when resuming, so every run sees the same augmentation per sample.
    The training augmentation uses its first outputs (see :func:`sample_draws`).
    """
    generator = torch.Generator()
    generator.manual_seed(_sample_seed(seed, epoch, index))
    return generator


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    if seed < 0 or epoch < 0 or index < 0:
        raise ValueError(f"seed, epoch and index must be non-negative, got {seed}, {epoch}, {index}")
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class _Twister(threading.local):
    """One NumPy MT19937 per thread, re-seeded for every sample."""

    def __init__(self) -> None:
        self.bits = np.random.MT19937()
        self.seeder = np.random.RandomState(self.bits)  # its seed() is the classic MT19937 seeding


_TWISTER = _Twister()


def sample_draws(seed: int, epoch: int, index: int, count: int = 4) -> list[int]:
    """The first ``count`` raw 32-bit outputs of :func:`sample_generator` (seed, epoch, index).

    torch's CPU generator is the standard Mersenne Twister (MT19937) seeded with the low 32 bits of its seed,
    as NumPy's legacy seeding is; ``torch.rand`` of a float32 takes the low 24 bits of one output and
    ``torch.randint(0, n)`` takes one output modulo n. NumPy hands out the outputs in one call, a third of
    what making a ``torch.Generator`` and drawing four tensors from it costs in a worker.
    """
    _TWISTER.seeder.seed(_sample_seed(seed, epoch, index) & 0xFFFFFFFF)
    return _TWISTER.bits.random_raw(count).tolist()


def _unit_float32(bits: int) -> float:
    """``torch.rand`` (float32) from one raw output: its low 24 bits over 2**24."""
    return (bits & 0xFFFFFF) / 16777216


def _label_dtype(num_labels: int, ignore_index: int) -> torch.dtype:
    # One byte per label pixel whenever every class id and the ignore index fit (every preset does).
    return torch.uint8 if 0 <= ignore_index <= 255 and num_labels <= 256 else torch.int64


def _pad_rgb(pad_mean: Sequence[float]) -> tuple[int, int, int]:
    """The uint8 RGB colour of padded pixels: ``pad_mean`` (RGB in [0, 1]) rounded to the nearest level."""
    values = [float(v) for v in pad_mean]
    if len(values) != 3:
        raise ValueError(f"pad_mean needs 3 values (RGB in [0, 1]), got {values}")
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"pad_mean values must be in [0, 1] (a model's input mean for [0, 1] RGB), got {values}")
    return tuple(int(round(v * 255)) for v in values)  # type: ignore[return-value]


def _source_window(length: int, scaled: int, crop: int, offset: int) -> tuple[int, int, int]:
    """Which source pixels a crop of the image scaled to ``scaled`` pixels needs, along one axis.

    The crop holds scaled pixels [offset, offset + out) with out = min(crop, scaled - offset) (the rest
    is padding); mapped back by length / scaled that is a source window, rounded to whole pixels.

    Returns:
        (start, size, out): the source window [start, start + size) is resized to out pixels.
    """
    out = min(crop, scaled - offset)
    size = min(length, max(1, round(out * length / scaled)))
    start = min(max(0, round(offset * length / scaled)), length - size)
    return start, size, out


def _nearest_index(size: int, out: int) -> np.ndarray:
    """(out,) indices of the source pixels whose centres are nearest to ``out`` evenly spaced centres.

    The same centres bilinear resampling with align_corners=False uses, so a resized mask stays on its image.
    """
    # Centres 0.5, 1.5, ... (exact) times size / out stay below size (by far more than the rounding), so the
    # truncated indices need no clipping.
    return (np.arange(0.5, out) * (size / out)).astype(np.int64)


def _cyclic_range(valid: np.ndarray) -> tuple[int, int] | None:
    """(shift, top) with: raw uint8 value v is valid iff (v + shift) mod 256 <= top; None if no such pair.

    ``valid`` is (256,) bool. Every mapping here has one such range (identity: 255 and 0..C-1; reduce
    labels: 255 and 0..C; Cityscapes labelIds: everything), which turns the check into one max() pass.
    """
    if valid.all():
        return 0, 255
    starts = [v for v in range(256) if valid[v] and not valid[v - 1]]  # valid[-1] is 255: the ring wraps
    if len(starts) != 1:
        return None
    return (256 - starts[0]) % 256, int(valid.sum()) - 1


class _SegmentationSource(torch.utils.data.Dataset):
    """Shared decoding: a row of the HF dataset -> (image uint8 (3, H, W), checked label (H, W))."""

    def __init__(self, hf_ds: datasets.Dataset, info: DataInfo, pad_mean: Sequence[float], skip_bad_samples: bool):
        self.hf_ds = hf_ds
        self.info = info
        self.pad_rgb = _pad_rgb(pad_mean)
        self.label_dtype = _label_dtype(info.num_labels, info.ignore_index)
        self.skip_bad_samples = skip_bad_samples
        split = getattr(hf_ds, "split", None)
        self.split_name = str(split) if split is not None else "dataset"
        # uint8 masks ("L"/"P" PNGs, nearly every dataset) go through 256-entry tables: checking one is a
        # single max() pass over the mask (values are counted only to name wrong ones), and the mapping is
        # applied only to the pixels a sample keeps.
        raw = np.arange(256, dtype=np.int64)
        mapped = map_labels(raw, info.label_mapping, info.ignore_index)
        valid = ((mapped >= 0) & (mapped < info.num_labels)) | (mapped == info.ignore_index)
        self._u8_mapped = mapped
        self._u8_valid = valid
        self._u8_range = _cyclic_range(valid)
        identity = np.array_equal(mapped, raw) and self.label_dtype == torch.uint8
        self._label_np_dtype = np.uint8 if self.label_dtype == torch.uint8 else np.int64
        self._u8_lut = None if identity else np.where(valid, mapped, 0).astype(self._label_np_dtype)
        self._arrow_columns: dict[str, Any] | None = None  # see _row
        self._label_fill = np.full((1, 1), info.ignore_index, dtype=self._label_np_dtype)  # padding, for _padded

    def __len__(self) -> int:
        return len(self.hf_ds)

    def __getstate__(self) -> dict:
        # Workers started by pickling rebuild the column handles: pickled, they would carry the data itself.
        return {**self.__dict__, "_arrow_columns": None}

    def _row(self, index: int) -> dict:
        """Row ``index`` as ``hf_ds[index]`` gives it, read straight from the Arrow columns where that is the same.

        ``hf_ds[index]`` runs the ``datasets`` formatting machinery, which after an image decode costs a tenth
        of a small JPEG's decode; rows of undecoded ``Image`` and plain value columns, with no indices mapping
        (``select``/``shuffle``) and no format or transform set, are just the columns' Python values.
        """
        if self._arrow_columns is None:
            self._arrow_columns = {}
            features = self.hf_ds.features
            names = [n for n in (self.info.image_column, self.info.label_column, self.info.name_column)
                     if n is not None and n in features]
            plain = all(isinstance(features[n], datasets.Value)
                        or (isinstance(features[n], datasets.Image) and not features[n].decode) for n in names)
            if plain and getattr(self.hf_ds, "_indices", "unknown") is None and self.hf_ds.format["type"] is None:
                table = self.hf_ds.data
                self._arrow_columns = {name: table.column(name) for name in names}
        if not self._arrow_columns:
            return self.hf_ds[index]
        return {name: column[index].as_py() for name, column in self._arrow_columns.items()}

    def _describe(self, index: int, row: dict | None) -> str:
        text = f"{self.split_name} row {index}"
        if row is not None:
            name_column = self.info.name_column
            if name_column and name_column in row and not isinstance(row[name_column], (dict, bytes)):
                text += f" ({name_column}={row[name_column]!r})"
            image_value = row.get(self.info.image_column)
            if isinstance(image_value, dict) and image_value.get("path"):
                text += f" file {image_value['path']}"
            label_value = row.get(self.info.label_column)  # the mask may be the file at fault
            if isinstance(label_value, dict) and label_value.get("path"):
                text += f" (label file {label_value['path']})"
        return text

    def _decode(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Decode and check one sample.

        Returns:
            image (H, W, 3) or (H, W, 4) uint8 RGB (a 4th channel is unused); label (H, W), raw uint8 values or
            final values of ``label_dtype``; and the 256-entry table still to apply to raw values
            (``table[label]``), or None when the label is final. Both arrays may be read-only views of Pillow's
            memory (see :func:`_pillow_pixels`): copy before writing.
        """
        row = None
        try:
            row = self._row(int(index))
            what = self._describe(index, row)
            image = _decode_pixels(row[self.info.image_column], f"{what} image")
            label = _decode_label_values(row[self.info.label_column], f"{what} label")
            if image.shape[:2] != label.shape:
                raise BadSampleError(
                    f"{what}: image is {image.shape[1]}x{image.shape[0]} but its label is "
                    f"{label.shape[1]}x{label.shape[0]} (WxH); image and mask must have the same size"
                )
        except BadSampleError:
            raise
        except Exception as err:  # anything else while reading a row is also about that sample
            raise BadSampleError(f"{self._describe(index, row)}: {type(err).__name__}: {err}") from err
        # Checked here, per sample and on CPU (in a worker), for evaluation as well as training: the error can
        # name the file, and no out-of-range value ever reaches a GPU kernel (a device-side assert there).
        # Not a BadSampleError: wrong label values are a dataset-wide setting to fix, not a sample to skip.
        try:
            if label.dtype == np.uint8:
                if not self._u8_in_range(label):  # then count the values, to name the wrong ones
                    bad = (np.bincount(label.reshape(-1), minlength=256) > 0) & ~self._u8_valid
                    if bad.any():
                        shown = sorted(set(self._u8_mapped[bad].tolist()))
                        raise _label_value_error(shown, self.info.num_labels, self.info.ignore_index)
                return image, label, self._u8_lut
            mapped = map_labels(label, self.info.label_mapping, self.info.ignore_index)
            check_labels(torch.from_numpy(_writable(mapped)), self.info.num_labels, self.info.ignore_index)
        except LabelValueError as err:
            raise LabelValueError(f"{self._describe(index, row)}: {err}") from None
        return image, mapped.astype(self._label_np_dtype, copy=False), None  # checked, so every value fits

    def _u8_in_range(self, label: np.ndarray) -> bool:
        if self._u8_range is None:
            return False
        shift, top = self._u8_range
        if top >= 255:
            return True
        shifted = label + np.uint8(shift) if shift else label  # uint8 arithmetic wraps around, as intended
        return int(shifted.max(initial=0)) <= top

    def _skipped(self, index: int, err: BadSampleError) -> dict:
        if not self.skip_bad_samples:
            raise err
        logger.warning("skipping bad sample: %s", err)
        return {"skipped": True, "index": index, "reason": str(err)}


def _rgbx_window(image: np.ndarray, y0: int, height: int, x0: int, width: int, flip: bool) -> np.ndarray:
    """``image[y0:y0 + height, x0:x0 + width]``, mirrored left-right if ``flip``, copied to a new array.

    Args:
        image: (H, W, 3) or (H, W, 4) uint8 RGB, a 4th channel unused.

    Returns:
        (height, width, 4) uint8, contiguous; the 4th channel is unused (zero when added here). Four bytes a
        pixel is how Pillow holds RGB and what torch's uint8 resampling works in, and whole pixels copy (and
        mirror) as uint32 several times faster than byte by byte.
    """
    window = image[y0:y0 + height, x0:x0 + width]
    if flip:
        window = window[:, ::-1]
    if window.shape[2] == 4:
        return np.array(window.view(np.uint32)).view(np.uint8)
    copy = np.zeros((height, width, 4), dtype=np.uint8)
    copy[:, :, :3] = window
    return copy


def _resize_rgbx(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 4) uint8 contiguous resized to ``size`` bilinearly, antialiased when shrinking: (*size, 4) contiguous."""
    # Batch dimension added before the permute: only on such a contiguous channels-last input (strides
    # (h*w*4, 1, w*4, 4)) does torch's uint8 bilinear kernel take its fast path, 2-3 times faster than on a
    # strided view; its output is channels-last too, so the final contiguous() copies nothing.
    shrink = size[0] < pixels.shape[0] or size[1] < pixels.shape[1]
    resized = F.interpolate(torch.from_numpy(pixels)[None].permute(0, 3, 1, 2), size=size, mode="bilinear",
                            align_corners=False, antialias=shrink)
    return resized[0].permute(1, 2, 0).contiguous().numpy()


def _padded(fill: np.ndarray, size: tuple[int, int], inner: tuple[int, int], mirrored: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    """A new array of ``fill.shape[:-2] + size`` holding ``fill`` (broadcast) except in an ``inner`` (h, w)
    window at the top left, or top right when ``mirrored``; and that window, a view to write the content into.
    """
    canvas = np.empty(fill.shape[:-2] + tuple(size), dtype=fill.dtype)
    (height, width), left = inner, (size[1] - inner[1] if mirrored else 0)
    if tuple(inner) != tuple(size):
        canvas[..., height:, :] = fill
        canvas[..., :height, :left] = fill
        canvas[..., :height, left + width:] = fill
    return canvas, canvas[..., :height, left:left + width]


# Where R, G and B sit in a 4-byte RGBX pixel read as one native uint32.
_RGB_SHIFTS = (0, 8, 16) if sys.byteorder == "little" else (24, 16, 8)


def _planes(pixels: np.ndarray, size: tuple[int, int], fill: Sequence[int], mirrored: bool) -> torch.Tensor:
    """(h, w, C) uint8 RGB(X) pixels as a new (3, *size) tensor of planes, padded with the ``fill`` colour below
    and on the right (on the left when ``mirrored``: the pixels already are).

    The one copy that turns pixels into the planes a batch holds. Whole 4-byte pixels are shifted and
    truncated as uint32, a plane at a time: twice as fast as moving single bytes (torch's strided copy).
    """
    canvas, window = _padded(np.asarray(fill, dtype=np.uint8).reshape(3, 1, 1), size, pixels.shape[:2], mirrored)
    if pixels.shape[2] == 4 and pixels.strides[1:] == (4, 1):
        words = pixels.view(np.uint32)[:, :, 0]
        for plane, shift in zip(window, _RGB_SHIFTS):  # cast to uint8 in the ufunc's buffer: no uint32 temporary
            np.right_shift(words, shift, out=plane, casting="unsafe")
    else:
        np.copyto(window, pixels[:, :, :3].transpose(2, 0, 1))
    return torch.from_numpy(canvas)


def _nearest_label(label: np.ndarray, out: np.ndarray, table: np.ndarray | None, flip: bool) -> None:
    """Write ``label`` (h, w) resized to ``out``'s size by nearest neighbour, mirrored left-right if ``flip``, and
    mapped through ``table`` (if given), into ``out``."""
    (height, width), (out_h, out_w) = label.shape, out.shape
    if table is not None and label.size <= out.size:  # map whichever of input and output is smaller
        label, table = np.take(table, label), None
    rows = _nearest_index(height, out_h) if out_h != height else None
    cols = _nearest_index(width, out_w) if out_w != width else None
    if flip and cols is None:
        label = label[:, ::-1]
    elif flip:
        cols = cols[::-1]  # mirrored by the gather itself, at no cost
    # Rows are copied whole, columns value by value (np.take; several times faster than torch's index_select):
    # gather the columns on whichever of the input and the output has fewer rows. The last step writes out.
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


class SegmentationTrainDataset(_SegmentationSource):
    """Random scale, crop, pad and flip in uint8; deterministic per (seed, epoch, index).

    Items: ``{"pixel_values": uint8 (3, h, w) RGB, "labels": (h, w)}`` with (h, w) = ``crop_size`` and labels
    uint8 when the classes and ignore index fit in a byte (else int64), or ``{"skipped": True, ...}`` for a bad
    sample when ``skip_bad_samples`` (dropped and counted by :func:`train_collate`). Padding is the
    ``pad_mean`` colour with ignored labels. Normalization happens on the device
    (``models.make_input_adapter``).
    """

    def __init__(self, hf_ds: datasets.Dataset, info: DataInfo, *, crop_size: tuple[int, int],
                 pad_mean: Sequence[float], seed: int, scale_range: tuple[float, float] = (0.5, 2.0),
                 skip_bad_samples: bool = False):
        super().__init__(hf_ds, info, pad_mean, skip_bad_samples)
        crop_h, crop_w = (int(v) for v in crop_size)
        if crop_h < 1 or crop_w < 1:
            raise ValueError(f"crop_size must be positive (h, w), got {crop_size}")
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.crop_size = (crop_h, crop_w)
        self.scale_range = (low, high)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws.

        Call before creating each epoch's DataLoader iterator; non-persistent
        workers copy the dataset, epoch included, when the iterator starts.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        try:
            image, label, table = self._decode(index)
        except BadSampleError as err:
            return self._skipped(index, err)
        image, label = self._augment(image, label, sample_draws(self.seed, self.epoch, int(index)), table)
        return {"pixel_values": image, "labels": label}

    def _augment(self, image: np.ndarray, label: np.ndarray, draws: Sequence[int],
                 table: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale by s, crop, pad and flip ``image`` uint8 (H, W, 3 or 4) and ``label`` (H, W) together.

        Draws s uniform in ``scale_range``, then the crop's top and left in the image scaled by s (and padded
        bottom/right to at least the crop), then a flip with probability 1/2, from ``draws`` (four outputs of
        :func:`sample_draws`) as ``torch.rand`` and ``torch.randint`` would. Only the source region under
        the crop is resized (image bilinear, antialiased when shrinking; label nearest, at the same pixel
        centres): the same as cropping the whole scaled image, up to half a source pixel of rounding.
        ``table`` maps raw label values (applied to the kept pixels only). A 4th image channel is dropped.

        Returns:
            pixel_values uint8 (3, *crop_size) and labels (*crop_size).
        """
        low, high = self.scale_range
        scale = low + (high - low) * _unit_float32(draws[0])
        height, width = label.shape
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        crop_h, crop_w = self.crop_size
        top = draws[1] % (max(new_h, crop_h) - crop_h + 1)
        left = draws[2] % (max(new_w, crop_w) - crop_w + 1)
        flip = _unit_float32(draws[3]) < 0.5

        y0, src_h, out_h = _source_window(height, new_h, crop_h, top)
        x0, src_w, out_w = _source_window(width, new_w, crop_w, left)
        # Mirrored before resampling, which commutes with mirroring (bit for bit with torch's kernel here): the
        # copy of the window that the kernel's fast path needs anyway does it.
        pixels = _rgbx_window(image, y0, src_h, x0, src_w, flip)
        if (out_h, out_w) != (src_h, src_w):
            pixels = _resize_rgbx(pixels, (out_h, out_w))
        # Bottom/right padding (left once mirrored): the model's mean colour (its adapter maps it to about 0),
        # labels ignored.
        pixels = _planes(pixels, self.crop_size, self.pad_rgb, flip)
        labels, window = _padded(self._label_fill, self.crop_size, (out_h, out_w), flip)
        _nearest_label(label[y0:y0 + src_h, x0:x0 + src_w], window, table, flip)
        return pixels, torch.from_numpy(labels)


class SegmentationEvalDataset(_SegmentationSource):
    """Whole images (optionally resized so the short side is ``short_side``), labels at full resolution.

    Items: ``{"pixel_values": uint8 (3, h, w) RGB, "labels": (H, W), "ignore_index": int, "pad_rgb":
    (r, g, b), "min_size": int}``; :func:`eval_collate` pads and batches them, images to at least ``min_size``
    per side (the smallest input the models run on).
    """

    def __init__(self, hf_ds: datasets.Dataset, info: DataInfo, *, pad_mean: Sequence[float],
                 short_side: int | None = None, skip_bad_samples: bool = False, min_size: int = 1):
        super().__init__(hf_ds, info, pad_mean, skip_bad_samples)
        if short_side is not None and short_side < 1:
            raise ValueError(f"short_side must be positive, got {short_side}")
        self.short_side = short_side
        self.min_size = min_size

    def __getitem__(self, index: int) -> dict:
        try:
            image, label, table = self._decode(index)
        except BadSampleError as err:
            return self._skipped(index, err)
        height, width = label.shape
        size = (height, width)
        if self.short_side is not None:
            factor = self.short_side / min(height, width)
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
        if size != (height, width):
            image = _resize_rgbx(_rgbx_window(image, 0, height, 0, width, False), size)
        labels = np.empty((height, width), dtype=self._label_fill.dtype)
        _nearest_label(label, labels, table, False)  # a copy (Pillow's memory is read-only), mapped if need be
        return {
            "pixel_values": _planes(image, size, self.pad_rgb, False),  # straight from Pillow's memory if no resize
            "labels": torch.from_numpy(labels),
            "ignore_index": self.info.ignore_index,
            "pad_rgb": self.pad_rgb,
            "min_size": self.min_size,
        }


def build_train_dataset(hf_ds: datasets.Dataset, info: DataInfo, *, crop_size: tuple[int, int],
                        pad_mean: Sequence[float], seed: int, scale_range: tuple[float, float] = (0.5, 2.0),
                        skip_bad_samples: bool = False) -> SegmentationTrainDataset:
    """Training pipeline over ``hf_ds`` (see :class:`SegmentationTrainDataset`).

    Args:
        hf_ds: a split from :func:`load_splits`.
        info: its :class:`DataInfo`.
        crop_size: (h, w) of every training sample.
        pad_mean: RGB in [0, 1], the input mean of the model the batches are for (the student): padded
            pixels get this colour as uint8, which that model's adapter normalizes to about 0. A teacher
            with another mean sees the same colour, normalized its own way.
        seed: base seed; sample randomness = f(seed, epoch, index).
        scale_range: random rescale factor range.
        skip_bad_samples: drop undecodable samples (counted in batches) instead of raising.
    """
    return SegmentationTrainDataset(hf_ds, info, crop_size=crop_size, pad_mean=pad_mean, seed=seed,
                                    scale_range=scale_range, skip_bad_samples=skip_bad_samples)


def build_eval_dataset(hf_ds: datasets.Dataset, info: DataInfo, *, pad_mean: Sequence[float],
                       short_side: int | None = None, skip_bad_samples: bool = False,
                       min_size: int = 1) -> SegmentationEvalDataset:
    """Evaluation pipeline over ``hf_ds`` (see :class:`SegmentationEvalDataset`; ``pad_mean`` as for training);
    batches pad images smaller than ``min_size`` px per side up to it."""
    return SegmentationEvalDataset(hf_ds, info, pad_mean=pad_mean, short_side=short_side,
                                   skip_bad_samples=skip_bad_samples, min_size=min_size)


def _split_skipped(samples: Sequence[dict]) -> tuple[list[dict], int]:
    kept = [s for s in samples if not s.get("skipped")]
    return kept, len(samples) - len(kept)


def train_collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack training samples, dropping skipped ones.

    Returns:
        ``pixel_values`` (B, 3, h, w) uint8, ``labels`` (B, h, w) (uint8, or int64 for classes or an ignore
        index beyond 255), ``num_skipped`` (0-dim long). B may be 0 when every sample was skipped; the loop
        should then add ``num_skipped`` to its tally and move on.
    """
    kept, skipped = _split_skipped(samples)
    if not kept:
        return {"pixel_values": torch.empty(0, 3, 0, 0, dtype=torch.uint8),
                "labels": torch.empty(0, 0, 0, dtype=torch.uint8), "num_skipped": torch.tensor(skipped)}
    return {
        "pixel_values": torch.stack([s["pixel_values"] for s in kept]),
        "labels": torch.stack([s["labels"] for s in kept]),
        "num_skipped": torch.tensor(skipped),
    }


def eval_collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Pad evaluation samples to the batch's largest image and label.

    Images are padded bottom/right with the samples' ``pad_rgb`` (the model's mean colour; 0 for samples
    without one), labels with their ignore index; images also to the samples' ``min_size`` per side (a 1x1
    image would make the model fail; predictions are cut back to ``image_sizes``).

    Returns:
        ``pixel_values`` (B, 3, H, W) (uint8 from the pipelines), ``labels`` (B, Hl, Wl), ``image_sizes``
        (B, 2) long (h, w before padding), ``label_sizes`` (B, 2) long, ``num_skipped`` (0-dim long).
    """
    kept, skipped = _split_skipped(samples)
    if not kept:
        return {
            "pixel_values": torch.empty(0, 3, 0, 0, dtype=torch.uint8),
            "labels": torch.empty(0, 0, 0, dtype=torch.uint8),
            "image_sizes": torch.empty(0, 2, dtype=torch.long), "label_sizes": torch.empty(0, 2, dtype=torch.long),
            "num_skipped": torch.tensor(skipped),
        }
    ignore_index = int(kept[0].get("ignore_index", 255))
    image_sizes = torch.tensor([tuple(s["pixel_values"].shape[1:]) for s in kept], dtype=torch.long)
    label_sizes = torch.tensor([tuple(s["labels"].shape) for s in kept], dtype=torch.long)
    min_size = max(int(s.get("min_size", 1)) for s in kept)
    max_h, max_w = (max(int(v), min_size) for v in image_sizes.max(0).values)
    max_lh, max_lw = (int(v) for v in label_sizes.max(0).values)
    pixel_dtype = kept[0]["pixel_values"].dtype
    fill = torch.tensor(kept[0].get("pad_rgb", (0, 0, 0)), dtype=pixel_dtype).view(1, 3, 1, 1)
    pixel_values = fill.expand(len(kept), 3, max_h, max_w).contiguous()
    labels = torch.full((len(kept), max_lh, max_lw), ignore_index, dtype=kept[0]["labels"].dtype)
    for i, sample in enumerate(kept):
        h, w = sample["pixel_values"].shape[1:]
        pixel_values[i, :, :h, :w] = sample["pixel_values"]
        lh, lw = sample["labels"].shape
        labels[i, :lh, :lw] = sample["labels"]
    return {"pixel_values": pixel_values, "labels": labels, "image_sizes": image_sizes,
            "label_sizes": label_sizes, "num_skipped": torch.tensor(skipped)}
