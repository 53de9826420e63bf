"""Everything that talks to, or prepares for, the Hugging Face Hub.

:func:`probe_hub_repo` asks once, with one timeout and no retries, whether the Hub can serve a repo, so a missing
repo or a dead network fails in seconds (data.py and models.py turn its :class:`HubProbeError` into their own
errors). The rest makes a finished run's output folder ready for the Hub and pushes it.

:func:`export_folder` writes, next to the model ``save_pretrained`` wrote:

- ``preprocessor_config.json``: an image processor that prepares an image the way evaluation did (whole image,
  or the ``--eval_short_side`` resize), so ``pipeline("image-segmentation", model=folder)`` scores what the
  card says;
- ``predictions.png``: a few fixed validation images as rows of image | ground truth | teacher | student;
- ``ics.png``: the teacher's and the student's inter-class similarity matrices on the same images;
- ``README.md``: the model card, whose YAML front matter the Hub reads (library, task, tags, datasets,
  base model, licence, model-index) and whose text a person reads (what the student is, its teacher, results
  side by side, per-class IoU, the configuration, a usage snippet, the command with local paths reduced to
  placeholders, limitations);

and gives every file the mode ``save_pretrained`` gives its own. :func:`push_to_hub` uploads exactly those
files: tracker logs (``runs/``) and checkpoints (``checkpoints/``) stay in the output folder, on this machine.

Imports only the standard library, numpy, torch, Pillow and huggingface_hub, never a project module: the run passes in plain facts
(:class:`ModelFacts`, :class:`DatasetFacts`, :class:`PictureRow`), the arguments and the results.
"""

from __future__ import annotations

import argparse
import colorsys
import logging
import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import huggingface_hub
import numpy as np
import torch
from huggingface_hub import errors as hf_errors
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

TRACKER_DIR = "runs"  # Accelerate's project folder: trackers write under it
CHECKPOINT_DIR = "checkpoints"  # train_icsd.py's checkpoints
CARD_FILE = "README.md"
RESULTS_FILE = "all_results.json"
PROCESSOR_FILE = "preprocessor_config.json"
PREDICTIONS_FILE = "predictions.png"
ICS_FILE = "ics.png"
# What a push uploads (the model may be sharded), and what it never does even if a pattern matched.
UPLOAD_PATTERNS = [
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "config.json",
    PROCESSOR_FILE, CARD_FILE, RESULTS_FILE, PREDICTIONS_FILE, ICS_FILE,
]
IGNORE_PATTERNS = [f"{CHECKPOINT_DIR}/*", f"{TRACKER_DIR}/*", "*.tmp*", ".*"]
DEFAULT_NUM_PICTURES = 4
SHORT_RUN_STEPS = 1000  # fewer optimizer steps than this: the card says the run was a short one
IGNORE_COLOUR = (224, 224, 192)  # ignored pixels in the pictures (Pascal VOC's boundary colour)
METRICS = (("mean_iou", "Mean IoU", "mIoU"), ("mean_accuracy", "Mean Accuracy", "mean accuracy"),
           ("overall_accuracy", "Overall Accuracy", "pixel accuracy"))
_TOKEN = re.compile(r"hf_[A-Za-z0-9]{20,}")
_ABSOLUTE = re.compile(r"^(/|~|[A-Za-z]:[\\/]|\\\\)")


# ---------------------------------------------------------------------------------------------------------
# Reachability probe
# ---------------------------------------------------------------------------------------------------------
# Seconds allowed for the single metadata request that decides whether a Hub repo is
# reachable. huggingface_hub's own loaders retry for ~20 s on network errors, which is
# what probing first, without retries, avoids.
HUB_PROBE_TIMEOUT_S = 5.0

# Why a probe failed: the ``kind`` of a HubProbeError.
BAD_ID = "bad_id"  # the Hub can never accept this id (checked first, also offline)
OFFLINE = "offline"  # HF_HUB_OFFLINE=1: nothing was asked
GATED = "gated"
NOT_FOUND = "not_found"  # no such repo, or a private one
NO_REVISION = "no_revision"
NO_FILE = "no_file"
NETWORK = "network"  # any other failure: DNS, timeout, proxy, HTTP 5xx
NO_TOKEN = "no_token"  # probe_hub_login: no token on this machine
BAD_TOKEN = "bad_token"  # probe_hub_login: the Hub refuses the token, or it may only read


class HubProbeError(Exception):
    """The Hub cannot serve a repo (or a file in it).

    Attributes:
        kind: one of ``BAD_ID``, ``OFFLINE``, ``GATED``, ``NOT_FOUND``,
            ``NO_REVISION``, ``NO_FILE``, ``NETWORK``.

    ``str(err)`` is a short reason, without advice, to put into an error message.
    """

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def probe_hub_repo(repo_id: str, *, repo_type: str = "model", revision: str | None = None,
                   filename: str | None = None) -> None:
    """Check with one quick request that the Hub serves ``repo_id`` (and ``filename`` in it).

    Args:
        repo_id: ``"namespace/name"`` or ``"name"``.
        repo_type: ``"model"`` or ``"dataset"``.
        revision: branch, tag or commit; None for the default branch.
        filename: a file that must exist in the repo; its metadata is fetched
            instead of the repo's.

    Raises:
        HubProbeError: ``BAD_ID`` for a malformed id (even offline), ``OFFLINE``
            when ``HF_HUB_OFFLINE=1`` (no request made), else ``GATED``,
            ``NOT_FOUND``, ``NO_REVISION``, ``NO_FILE`` or ``NETWORK``.
        ValueError: ``repo_type`` is neither "model" nor "dataset".
    """
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"repo_type must be 'model' or 'dataset', got {repo_type!r}")
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except hf_errors.HFValidationError as err:
        raise HubProbeError(BAD_ID, f"not a valid Hub id: {err}") from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubProbeError(OFFLINE, "HF_HUB_OFFLINE=1")
    try:
        if filename is None:
            huggingface_hub.HfApi().repo_info(repo_id, repo_type=repo_type, revision=revision,
                                              timeout=HUB_PROBE_TIMEOUT_S)
        else:
            url = huggingface_hub.hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision)
            huggingface_hub.get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
    # GatedRepoError is a RepositoryNotFoundError, so it comes first.
    except hf_errors.GatedRepoError:
        raise HubProbeError(GATED, "the repo is gated: accept its terms on the Hub and log in") from None
    except hf_errors.RepositoryNotFoundError:
        what = "dataset repo" if repo_type == "dataset" else "repo"
        raise HubProbeError(NOT_FOUND, f"no such {what}, or it is private") from None
    except hf_errors.RevisionNotFoundError:
        raise HubProbeError(NO_REVISION, f"revision {revision!r} does not exist") from None
    except hf_errors.EntryNotFoundError as err:
        if filename is None:  # only a file request can miss an entry; anything else is unexpected
            raise HubProbeError(NETWORK, f"{type(err).__name__}: {err}") from None
        raise HubProbeError(NO_FILE, f"the repo has no {filename}") from None
    except hf_errors.HFValidationError as err:
        raise HubProbeError(BAD_ID, f"not a valid Hub id: {err}") from None
    except Exception as err:  # connection failures surface from several HTTP stacks
        raise HubProbeError(NETWORK, f"{type(err).__name__}: {err}") from None


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` can never name a Hub repo, or None when it can.

    The id reaches trackers (hparams), the model card and error messages: a Hub token pasted in its place is
    described, never quoted back.
    """
    if _TOKEN.search(repo_id):
        return ("holds what looks like a Hub access token (not shown): pass a repo id such as 'user/name'; the "
                "token belongs in `hf auth login` or HF_TOKEN")
    try:
        huggingface_hub.utils.validate_repo_id(repo_id)
    except hf_errors.HFValidationError as err:
        return f"is not a valid repo id ({' '.join(str(err).split())})"
    return None


def probe_hub_login() -> str:
    """Check with one quick request (no retries) that a Hub token is set and may write; return the user name.

    Raises:
        HubProbeError: ``OFFLINE`` when ``HF_HUB_OFFLINE=1`` (no request made), ``NO_TOKEN``, ``BAD_TOKEN``
            (refused, or read-only) or ``NETWORK``. The token itself is never part of the message.
    """
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise HubProbeError(OFFLINE, "HF_HUB_OFFLINE=1 is set")
    token = huggingface_hub.get_token()
    if token is None:
        raise HubProbeError(NO_TOKEN, "no Hub token on this machine: run `hf auth login` or set HF_TOKEN")
    try:
        response = huggingface_hub.utils.get_session().get(
            f"{huggingface_hub.constants.ENDPOINT}/api/whoami-v2",
            headers=huggingface_hub.utils.build_hf_headers(token=token), timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as err:  # connection failures surface from several HTTP stacks
        raise HubProbeError(NETWORK, f"cannot reach {huggingface_hub.constants.ENDPOINT} "
                                     f"({type(err).__name__})") from None
    if response.status_code == 401:
        raise HubProbeError(BAD_TOKEN, "the Hub refuses the token (HTTP 401): run `hf auth login --force` or "
                                       "set HF_TOKEN") from None
    if response.status_code >= 400:
        raise HubProbeError(NETWORK, f"{huggingface_hub.constants.ENDPOINT} answered HTTP {response.status_code}")
    facts = response.json()
    if facts.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise HubProbeError(BAD_TOKEN, "the token may only read: create one with write access")
    return str(facts.get("name", ""))


# ---------------------------------------------------------------------------------------------------------
# Facts about the run, in plain data
# ---------------------------------------------------------------------------------------------------------
def source_kind(name: str | None) -> str:
    """Where a model or dataset came from: ``"config"`` (a random-init preset), ``"local"`` (a folder on this
    machine), ``"hub"`` (a Hub id) or ``"none"``."""
    if not name:
        return "none"
    if name.startswith("config:"):
        return "config"
    if Path(name).expanduser().exists() or _ABSOLUTE.match(name) or name.startswith(".") or name.count("/") > 1:
        return "local"
    return "hub"


@dataclass(frozen=True)
class ModelFacts:
    """A model as the card describes it.

    Attributes:
        name: as given on the command line (Hub id, folder or ``config:`` preset).
        architecture: the model class, e.g. ``SegformerForSemanticSegmentation``.
        num_parameters: all parameters.
    """

    name: str
    architecture: str
    num_parameters: int

    @property
    def kind(self) -> str:
        return source_kind(self.name)

    def phrase(self) -> str:
        """How the card names it: a Hub link, "a local model" (never its path), or the preset."""
        size = f"{self.architecture}, {self.num_parameters / 1e6:.2f} M parameters"
        if self.kind == "hub":
            return f"[`{self.name}`](https://huggingface.co/{self.name}) ({size})"
        if self.kind == "config":
            return f"a randomly initialised `{self.name}` preset ({size})"
        return f"a local model ({size})"


def describe_model(name: str, model: torch.nn.Module) -> ModelFacts:
    """:class:`ModelFacts` of ``model``, loaded from ``name``."""
    return ModelFacts(name=name, architecture=type(model).__name__,
                      num_parameters=sum(p.numel() for p in model.parameters()))


@dataclass(frozen=True)
class DatasetFacts:
    """The evaluation data as the card describes it.

    Attributes:
        name: a readable name (the dataset card's ``pretty_name``, else the Hub id or folder name).
        type: the model-index dataset type: the Hub id, else the folder's name (never its path).
        hub_id: the Hub id when the data came from the Hub, else None.
        split: the evaluated split.
        num_eval_images: how many images were evaluated.
        subset: True when ``--max_eval_samples`` kept only the first ``num_eval_images``.
        card: the dataset card's YAML front matter ({} when there is none or it cannot be read).
    """

    name: str
    type: str
    hub_id: str | None
    split: str
    num_eval_images: int
    subset: bool = False
    card: dict = field(default_factory=dict)


def read_dataset_card(source: str | None) -> dict:
    """The YAML front matter of a dataset's card: ``README.md`` in a local folder, or the Hub repo's card.

    Returns {} when there is none or it cannot be read (offline and not cached, for a Hub id).
    """
    from huggingface_hub import DatasetCard, metadata_load

    kind = source_kind(source)
    try:
        if kind == "local":
            readme = Path(source).expanduser() / CARD_FILE
            return (metadata_load(readme) or {}) if readme.is_file() else {}
        if kind == "hub":
            return DatasetCard.load(source).data.to_dict()
    except Exception as err:  # the card only adds a licence and a name: never fail the export for it
        logger.warning("could not read the dataset card of %s (%s: %s)", source, type(err).__name__, err)
    return {}


def describe_dataset(info: Any, split: str, num_eval_images: int, subset: bool) -> DatasetFacts:
    """:class:`DatasetFacts` of the evaluated data.

    Args:
        info: the run's ``data.DataInfo`` (``source``, ``preset`` and ``notes`` are read).
        split: the evaluated split's name.
        num_eval_images: how many images were evaluated.
        subset: whether ``--max_eval_samples`` cut the split.
    """
    if getattr(info, "preset", None) == "synthetic":
        return DatasetFacts(name="synthetic road scenes", type="synthetic", hub_id=None, split=split,
                            num_eval_images=num_eval_images, subset=subset)
    source = info.source
    if any(note.startswith("no validation split: carved") for note in getattr(info, "notes", [])):
        split = f"{split} (held-out part)"
    card = read_dataset_card(source)
    kind = source_kind(source)
    hub_id = source if kind == "hub" else None
    type_ = hub_id or Path(str(source)).expanduser().resolve().name
    name = str(card.get("pretty_name") or hub_id or type_)
    return DatasetFacts(name=name, type=type_, hub_id=hub_id, split=split, num_eval_images=num_eval_images,
                        subset=subset, card=card)


def resolve_license(flag: str | None, dataset: DatasetFacts) -> tuple[str | None, str]:
    """The model's licence and the card's sentence about it.

    ``--hub_license`` wins; else the dataset card's ``license:`` (the model is derived from that data);
    else none, and the sentence says so.
    """
    if flag:
        return flag, f"Licence: `{flag}` (set with `--hub_license`)."
    found = dataset.card.get("license")
    if isinstance(found, list) and len(found) == 1:
        found = found[0]
    if isinstance(found, str) and found:
        return found, (f"Licence: `{found}`, carried over from the dataset card of {dataset.name}: the model is "
                       "derived from that data, so its terms apply (`--hub_license` sets another).")
    if found:
        return None, (f"No licence is set: the dataset card of {dataset.name} lists several ({', '.join(found)}). "
                      "Choose one with `--hub_license` before sharing this model.")
    return None, ("No licence is set: `--hub_license` was not given and the dataset card states none. Set one "
                  "(the training data's terms apply) before sharing this model.")


# ---------------------------------------------------------------------------------------------------------
# The command line, as published: no token, no path of this machine
# ---------------------------------------------------------------------------------------------------------
def _redact(argv: Sequence[str]) -> list[str]:
    """``argv`` with Hub tokens masked and absolute paths reduced to ``path/to/<name>`` placeholders."""
    out = []
    for arg in argv:
        arg = _TOKEN.sub("hf_***", arg)  # no flag takes a token, but one may be pasted into a path or id
        prefix, value = "", arg
        if arg.startswith("--") and "=" in arg:
            prefix, value = arg.split("=", 1)
            prefix += "="
        if _ABSOLUTE.match(value):
            name = re.split(r"[\\/]", value.rstrip("\\/"))[-1].lstrip("~") or "folder"
            value = f"path/to/{name}"
        out.append(prefix + value)
    return out


def reproduce_command(argv: Sequence[str]) -> str:
    """The training command for the card: ``accelerate launch train_icsd.py ...``, redacted."""
    args = _redact(argv[1:])
    return " ".join(["accelerate launch", Path(argv[0]).name if argv else "train_icsd.py", *map(shlex.quote, args)])


# ---------------------------------------------------------------------------------------------------------
# The image processor: the preprocessing evaluation used
# ---------------------------------------------------------------------------------------------------------
def evaluation_processor(processor: Any, short_side: int | None) -> Any:
    """A copy of ``processor`` that prepares an image as evaluation does.

    Evaluation feeds whole images (no resize, no crop), or images resized so the short side is
    ``short_side`` (bilinear); mean, std and channel order stay the processor's. The checkpoint's own
    processor usually resizes to a fixed square (SegFormer: 512x512), which scores differently.
    """
    config = processor.to_dict()
    config["do_resize"] = short_side is not None
    if short_side is not None:
        config["size"] = {"shortest_edge": int(short_side)}
        config["resample"] = 2  # PIL bilinear, as evaluation's resize
    for flag in ("do_center_crop", "do_pad"):
        if flag in config:
            config[flag] = False
    config.pop("image_processor_type", None)
    return type(processor).from_dict(config)


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------
@dataclass
class PictureRow:
    """One validation image for the pictures.

    Attributes:
        index: its index in the evaluation set.
        image: (H, W, 3) uint8 RGB.
        label: (H, W) int class ids (ignore index allowed).
        student / teacher: (H, W) int predictions at the label's size (teacher None without a teacher).
        student_ics / teacher_ics: (C, C) row-normalised inter-class similarity matrices on this image.
    """

    index: int
    image: np.ndarray
    label: np.ndarray
    student: np.ndarray
    teacher: np.ndarray | None = None
    student_ics: np.ndarray | None = None
    teacher_ics: np.ndarray | None = None


def picture_indices(num_images: int, count: int = DEFAULT_NUM_PICTURES) -> list[int]:
    """``count`` fixed indices spread evenly over ``range(num_images)``, first and last included."""
    if num_images <= 0 or count <= 0:
        return []
    if count >= num_images:
        return list(range(num_images))
    if count == 1:
        return [0]
    return sorted({round(i * (num_images - 1) / (count - 1)) for i in range(count)})


def class_palette(num_labels: int) -> np.ndarray:
    """One fixed colour per class: ``num_labels`` hues evenly spaced round the colour wheel, visited with a
    stride of about 3/8 of a turn so that neighbouring class ids differ clearly; saturation and brightness
    alternate along the wheel so that neighbouring hues differ too. No class is black, white or the ignore
    colour.

    Returns:
        (num_labels, 3) uint8.
    """
    stride = max(1, round(0.38 * num_labels))
    while math.gcd(stride, num_labels) != 1:  # a stride sharing a factor with C would repeat hues
        stride += 1
    colours = np.zeros((num_labels, 3), dtype=np.uint8)
    for c in range(num_labels):
        slot = c * stride % num_labels  # position on the wheel: neighbouring slots differ in saturation too
        hue = (0.02 + slot / num_labels) % 1.0
        saturation = (0.85, 0.55)[slot % 2]
        value = (0.95, 0.7)[(slot // 2) % 2]
        colours[c] = [round(255 * v) for v in colorsys.hsv_to_rgb(hue, saturation, value)]
    return colours


def colourize(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8; ids outside the palette (the ignore index) get IGNORE_COLOUR."""
    label = np.asarray(label).astype(np.int64)
    known = (label >= 0) & (label < len(palette))
    out = np.empty(label.shape + (3,), dtype=np.uint8)
    out[:] = IGNORE_COLOUR
    out[known] = palette[label[known]]
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed bitmap size
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _legend(names: Sequence[str], palette: np.ndarray, width: int, font: ImageFont.ImageFont,
            with_ignored: bool) -> Image.Image:
    entries = [(name, tuple(int(v) for v in colour)) for name, colour in zip(names, palette)]
    if with_ignored:
        entries.append(("ignored", IGNORE_COLOUR))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, pad = 14, 8
    entry_w = max(_text_width(probe, name, font) for name, _ in entries) + swatch + 3 * pad
    per_row = max(1, (width - pad) // entry_w)
    rows = -(-len(entries) // per_row)
    legend = Image.new("RGB", (width, rows * (swatch + pad) + pad), "white")
    draw = ImageDraw.Draw(legend)
    for i, (name, colour) in enumerate(entries):
        x, y = pad + (i % per_row) * entry_w, pad + (i // per_row) * (swatch + pad)
        draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=(90, 90, 90))
        draw.text((x + swatch + pad // 2, y), name, fill="black", font=font)
    return legend


def draw_predictions(rows: Sequence[PictureRow], id2label: dict[int, str], cell_width: int = 320) -> Image.Image:
    """Rows of image | ground truth | teacher | student (no teacher column without a teacher), every mask in
    :func:`class_palette`'s colours, a legend of class names below."""
    if not rows:
        raise ValueError("draw_predictions needs at least one row")
    names = [id2label[i] for i in range(len(id2label))]
    palette = class_palette(len(names))
    with_teacher = any(row.teacher is not None for row in rows)
    titles = ["image", "ground truth", *(["teacher"] if with_teacher else []), "student"]
    font, gap, header = _font(14), 6, 24
    cells = []
    for row in rows:
        height, width = row.label.shape
        size = (cell_width, max(1, round(height * cell_width / width)))
        masks = [row.label, *([row.teacher] if with_teacher else []), row.student]
        images = [Image.fromarray(row.image).resize(size, Image.BILINEAR)]
        for mask in masks:
            if mask is None:  # a teacher missing for this row only: leave the cell blank
                images.append(Image.new("RGB", size, "white"))
            else:
                images.append(Image.fromarray(colourize(mask, palette)).resize(size, Image.NEAREST))
        cells.append(images)
    total_w = len(titles) * cell_width + (len(titles) + 1) * gap
    grid_h = header + sum(images[0].height + gap for images in cells) + gap
    has_ignored = any(bool(((row.label < 0) | (row.label >= len(names))).any()) for row in rows)
    legend = _legend(names, palette, total_w, font, has_ignored)
    canvas = Image.new("RGB", (total_w, grid_h + legend.height), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        x = gap + c * (cell_width + gap)
        draw.text((x + (cell_width - _text_width(draw, title, font)) // 2, 5), title, fill="black", font=font)
    y = header
    for row, images in zip(rows, cells):
        for c, image in enumerate(images):
            canvas.paste(image, (gap + c * (cell_width + gap), y))
        tag = f"#{row.index}"
        draw.rectangle([gap, y, gap + _text_width(draw, tag, font) + 8, y + 18], fill="black")
        draw.text((gap + 4, y + 1), tag, fill="white", font=font)
        y += images[0].height + gap
    canvas.paste(legend, (0, grid_h))
    return canvas


def _heat(values: np.ndarray, vmax: float) -> np.ndarray:
    """[0, vmax] -> white through mid blue to deep navy, (..., 3) uint8."""
    anchors = np.array([(255, 255, 255), (110, 170, 215), (10, 45, 110)], dtype=np.float64)
    t = np.clip(values / vmax if vmax > 0 else values * 0, 0.0, 1.0) * (len(anchors) - 1)
    low = np.minimum(t.astype(np.int64), len(anchors) - 2)
    frac = (t - low)[..., None]
    return np.round(anchors[low] * (1 - frac) + anchors[low + 1] * frac).astype(np.uint8)


def mean_ics(rows: Sequence[PictureRow], role: str) -> np.ndarray | None:
    """The mean over ``rows`` of their ``{role}_ics`` matrices (C, C), or None when none has one."""
    found = [getattr(row, f"{role}_ics") for row in rows if getattr(row, f"{role}_ics") is not None]
    # An image without a valid pixel may give NaN rows: they are drawn as 0, not allowed to poison the mean.
    return np.nan_to_num(np.mean(np.stack(found), axis=0)) if found else None


def draw_ics(rows: Sequence[PictureRow], id2label: dict[int, str], temperature: float) -> Image.Image:
    """The teacher's and the student's inter-class similarity matrices side by side (student alone without a
    teacher), averaged over ``rows``, on one colour scale."""
    panels = [(role, m) for role in ("teacher", "student") if (m := mean_ics(rows, role)) is not None]
    if not panels:
        raise ValueError("draw_ics needs rows with ICS matrices")
    names = [id2label[i] for i in range(len(id2label))]
    num = len(names)
    cell = int(min(28, max(3, 420 // num)))
    labelled = num <= 40
    font, small, pad = _font(14), _font(11), 10
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_labels = [f"{i}: {name}" for i, name in enumerate(names)]
    left = (max(_text_width(probe, t, small) for t in row_labels) + 8) if labelled else 0
    side, top = num * cell, 44
    panel_w = left + side + pad
    vmax = float(max(m.max() for _, m in panels)) or 1.0
    caption = [
        f"Row-normalised inter-class similarity (KL between the classes' spatial distributions, T = {temperature:g}),",
        f"mean over {len(rows)} validation images; row i, column j: how class i's map differs from class j's.",
    ]
    if len(panels) == 2:
        diff = float(np.mean((panels[0][1] - panels[1][1]) ** 2))
        caption.append(f"Mean squared difference teacher - student: {diff:.5f} (what ICSD minimises).")
    bar_h, caption_h = 14, 18 * len(caption)
    width = pad + len(panels) * panel_w
    height = top + side + pad + bar_h + 20 + caption_h + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for p, (role, matrix) in enumerate(panels):
        x0 = pad + p * panel_w + left
        draw.text((x0 + (side - _text_width(draw, role, font)) // 2, 4), role, fill="black", font=font)
        heat = Image.fromarray(_heat(matrix, vmax)).resize((side, side), Image.NEAREST)
        canvas.paste(heat, (x0, top))
        draw.rectangle([x0 - 1, top - 1, x0 + side, top + side], outline=(120, 120, 120))
        if labelled:
            for i, text in enumerate(row_labels):
                y = top + i * cell + (cell - 11) // 2
                draw.text((x0 - 4 - _text_width(draw, text, small), y), text, fill="black", font=small)
                column = str(i)
                draw.text((x0 + i * cell + (cell - _text_width(draw, column, small)) // 2, top - 14), column,
                          fill="black", font=small)
    y = top + side + pad
    bar = Image.fromarray(_heat(np.tile(np.linspace(0, vmax, 256), (bar_h, 1)), vmax)).resize((256, bar_h))
    canvas.paste(bar, (pad + left, y))
    draw.text((pad + left, y + bar_h + 2), "0", fill="black", font=small)
    draw.text((pad + left + 256 - _text_width(draw, f"{vmax:.3f}", small), y + bar_h + 2), f"{vmax:.3f}",
              fill="black", font=small)
    y += bar_h + 20
    for line in caption:
        draw.text((pad, y), line, fill="black", font=small)
        y += 18
    return canvas


# ---------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _objective(args: argparse.Namespace) -> str:
    return {
        "none": "cross-entropy alone (no distillation)",
        "kd": f"cross-entropy plus pixel-wise KD (λ_kd={args.lambda_kd}, T={args.temperature})",
        "cwd": f"cross-entropy plus channel-wise distillation (λ={args.lambda_cwd}, T={args.temperature})",
        "ickd": f"cross-entropy plus inter-channel correlation distillation (λ={args.lambda_ickd})",
        "icsd": (f"cross-entropy plus ICSD and KD with fixed weights (λ_ics={args.lambda_ics}, "
                 f"λ_kd={args.lambda_kd}, T={args.temperature})"),
        "aicsd": (f"AICSD: ICSD + KD under adaptive loss weighting, {args.alw_granularity} granularity "
                  f"(λ_ics={args.lambda_ics}, λ_kd={args.lambda_kd}, T={args.temperature})"),
    }[args.distill]


def card_title(args: argparse.Namespace, student: ModelFacts, dataset: DatasetFacts) -> str:
    """The repo's name when a Hub id is known, else a description (never the output folder's name)."""
    if getattr(args, "hub_model_id", None):
        return args.hub_model_id.split("/")[-1]
    family = student.architecture.replace("ForSemanticSegmentation", "")
    how = "trained alone" if args.distill == "none" else f"distilled with {args.distill.upper()}"
    return f"{family} student for {dataset.name}, {how}"


def _usage_id(args: argparse.Namespace) -> str:
    if getattr(args, "hub_model_id", None):
        return args.hub_model_id
    out = str(args.output_dir)
    return out if not _ABSOLUTE.match(out) else f"path/to/{Path(out).name}"


def write_model_card(
    args: argparse.Namespace,
    info: Any,
    results: dict,
    *,
    student: ModelFacts,
    teacher: ModelFacts | None,
    dataset: DatasetFacts,
    pictures: Sequence[str] = (),
    argv: Sequence[str] = (),
    example_size: tuple[int, int] = (512, 512),
) -> str:
    """The model card (README.md) text: YAML front matter for the Hub, then the card a person reads.

    Args:
        args: the run's arguments (distill, weights, optimisation, hub_model_id, hub_license, ...).
        info: the run's ``data.DataInfo`` (id2label, num_labels, ignore_index, crop_size).
        results: what all_results.json holds (``eval_*``, ``teacher_eval_*``, ``train_steps``, ...).
        student / teacher: the models (teacher None when the run had none).
        dataset: the evaluated data.
        pictures: file names of the pictures written next to the card (embedded when listed).
        argv: the command line (``sys.argv``), published redacted.
        example_size: (width, height) of the image in the usage snippet.
    """
    title = card_title(args, student, dataset)
    license_id, license_text = resolve_license(getattr(args, "hub_license", None), dataset)
    columns = (["teacher"] if teacher is not None else []) + ["student"]
    where = (f"the first {dataset.num_eval_images} images of the {dataset.split} split of {dataset.name}"
             if dataset.subset else f"the {dataset.split} split of {dataset.name} ({dataset.num_eval_images} images)")
    preprocessing = (f"short side resized to {args.eval_short_side} px" if args.eval_short_side
                     else "whole images, no resize")
    parts = [
        f"---\n{_card_metadata(args, results, title, license_id, student, dataset).to_yaml()}\n---\n",
        f"# {title}\n",
        _card_paragraph(args, info, results, title, student, teacher, dataset, where) + "\n",
    ]
    if PREDICTIONS_FILE in pictures:
        parts.append(f"![Validation images, ground truth, {' and '.join(columns)} predictions]({PREDICTIONS_FILE})\n\n"
                     f"*Fixed validation images: image, ground truth, {', '.join(columns)}; one colour per class, "
                     "legend below the rows.*\n")
    parts += [
        "## Results\n",
        f"On {where}; {preprocessing}, labels at full resolution. A class absent from both labels and "
        "predictions counts as n/a and is left out of the means.\n",
        *_card_result_tables(info, results, teacher, columns),
    ]
    if ICS_FILE in pictures:
        parts += ["### Inter-class similarity\n",
                  f"![Inter-class similarity matrices of {' and '.join(columns)}]({ICS_FILE})\n\n"
                  "*The row-normalised inter-class similarity matrices that ICSD matches, averaged over the "
                  "pictured images.*\n"]
    parts += [
        "## Training configuration\n",
        _card_configuration(args, info, results, student, teacher, dataset, f"{where}; {preprocessing}") + "\n",
        "## Usage\n",
        *_card_usage(args, example_size),
        "## Reproduce\n",
        "```bash\n" + reproduce_command(argv or ["train_icsd.py"]) + "\n```\n",
        "Paths of the training machine are shown as `path/to/<name>` placeholders.\n",
        "## Limitations\n",
        "\n".join(f"- {line}" for line in _card_limitations(args, results, teacher, dataset)) + "\n",
        "## Licence\n",
        license_text + "\n",
    ]
    return "\n".join(parts)


def _card_metadata(args: argparse.Namespace, results: dict, title: str, license_id: str | None,
                   student: ModelFacts, dataset: DatasetFacts) -> Any:
    """The YAML front matter the Hub reads: library, task, tags, data, base model, licence and model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["semantic-segmentation", "aicsd"]
    if args.distill != "none":
        tags = ["knowledge-distillation", *tags] + ([args.distill] if args.distill != "aicsd" else [])
    eval_results = [
        EvalResult(task_type="image-segmentation", task_name="Semantic Segmentation", dataset_type=dataset.type,
                   dataset_name=dataset.name, dataset_split=dataset.split, metric_type=key, metric_name=name,
                   metric_value=round(float(results[f"eval_{key}"]), 6))
        for key, name, _ in METRICS if results.get(f"eval_{key}") is not None
    ]
    return ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", tags=tags, license=license_id,
        datasets=[dataset.hub_id] if dataset.hub_id else None,
        base_model=student.name if student.kind == "hub" else None,
        model_name=title, eval_results=eval_results or None,
    )


def _card_paragraph(args: argparse.Namespace, info: Any, results: dict, title: str, student: ModelFacts,
                    teacher: ModelFacts | None, dataset: DatasetFacts, where: str) -> str:
    """What the student is, who taught it and how, and its score."""
    evaluated_teacher = teacher is not None and "teacher_eval_mean_iou" in results
    init = {"hub": f"starting from {student.phrase()}",
            "config": f"starting from random weights (`{student.name}`)",
            "local": "starting from a local model"}.get(student.kind, "")
    subject = f"**{title}**" if getattr(args, "hub_model_id", None) else "This model"
    paragraph = (f"{subject} is a {student.architecture} semantic-segmentation model "
                 f"({student.num_parameters / 1e6:.2f} M parameters) for the {info.num_labels} classes of "
                 f"{dataset.name}, {init}, trained for {results.get('train_steps')} optimizer steps with "
                 f"{_objective(args)}.")
    if teacher is not None and args.distill != "none":
        paragraph += f" Its teacher was {teacher.phrase()}"
    elif teacher is not None:
        paragraph += f" It is compared with {teacher.phrase()}"
    if teacher is not None:
        paragraph += (f", which scores mIoU {_pct(results['teacher_eval_mean_iou'])} % on the same images."
                      if evaluated_teacher else " (not evaluated: pass `--eval_teacher`).")
    if args.distill != "none":
        paragraph += (" The losses are those of [AICSD](https://arxiv.org/abs/2308.04243) (Mansourian et al.) "
                      "and its baselines.")
    return paragraph + f" On {where} the student scores mIoU {_pct(results.get('eval_mean_iou'))} %."


def _card_result_tables(info: Any, results: dict, teacher: ModelFacts | None, columns: list[str]) -> list[str]:
    """The metrics, then the per-class IoU, teacher and student side by side."""
    evaluated_teacher = teacher is not None and "teacher_eval_mean_iou" in results
    names = [info.id2label[i] for i in range(info.num_labels)]
    lines = ["| metric (%) | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, _, label in METRICS:
        cells = ([_pct(results.get(f"teacher_eval_{key}")) if evaluated_teacher else "not evaluated"]
                 if teacher is not None else []) + [_pct(results.get(f"eval_{key}"))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    results_table = "\n".join(lines)
    student_iou = results.get("eval_per_category_iou") or [None] * len(names)
    teacher_iou = results.get("teacher_eval_per_category_iou") or [None] * len(names)
    lines = ["| class | " + " | ".join(f"{c} IoU (%)" for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for i, name in enumerate(names):
        cells = ([_pct(teacher_iou[i]) if evaluated_teacher else "–"] if teacher is not None else [])
        lines.append(f"| {name} | " + " | ".join(cells + [_pct(student_iou[i])]) + " |")
    return [results_table + "\n", "### Per-class IoU\n", "\n".join(lines) + "\n"]


def _card_configuration(args: argparse.Namespace, info: Any, results: dict, student: ModelFacts,
                        teacher: ModelFacts | None, dataset: DatasetFacts, evaluation: str) -> str:
    """The training configuration as a two-column table."""
    crop = tuple(args.crop_size or info.crop_size)
    batch = args.per_device_train_batch_size * results.get("num_processes", 1) * args.gradient_accumulation_steps
    config_rows = [
        ("objective", _objective(args)),
        ("student initialisation", student.phrase() if student.kind != "local" else "a local model"),
        ("teacher", teacher.phrase() if teacher is not None else "none"),
        ("data", f"{dataset.name}, {info.num_labels} classes, ignore index {info.ignore_index}"),
        ("optimizer steps", f"{results.get('train_steps')} (global batch {batch}, "
                            f"{results.get('num_processes', 1)} process(es))"),
        ("training crop", f"{crop[0]}x{crop[1]}, random scale 0.5-2.0 and horizontal flip"),
        ("optimiser", f"AdamW, learning rate {args.learning_rate}, weight decay {args.weight_decay}, "
                      f"{args.lr_scheduler_type} schedule, {args.num_warmup_steps} warm-up steps"),
        ("mixed precision", str(args.mixed_precision or "as configured in Accelerate")),
        ("seed", str(args.seed)),
        ("evaluation", f"{evaluation} (the saved image processor does the same)"),
    ]
    return "\n".join(["| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in config_rows)])


def _card_usage(args: argparse.Namespace, example_size: tuple[int, int]) -> list[str]:
    """How the pipeline reproduces the numbers, and a snippet with the Hub id that runs as written."""
    width, height = example_size
    return [
        ("The saved image processor feeds the whole image, as the evaluation above did, so the pipeline "
         "reproduces these numbers.\n" if not args.eval_short_side else
         f"The saved image processor resizes the short side to {args.eval_short_side} px, as the evaluation above "
         "did (with PIL's bilinear filter where evaluation used torch's, so the pipeline's numbers can differ "
         "in the last digits).\n"),
        "```python\n"
        "from PIL import Image\n"
        "from transformers import pipeline\n\n"
        f'segmenter = pipeline("image-segmentation", model="{_usage_id(args)}")\n'
        f'image = Image.new("RGB", ({width}, {height}), "gray")'
        '  # your photo: Image.open("street.jpg").convert("RGB")\n'
        "for segment in segmenter(image):  # one binary mask (PIL, mode L) per class the model predicts\n"
        '    print(segment["label"], segment["mask"].size)\n'
        "```\n",
    ]


def _card_limitations(args: argparse.Namespace, results: dict, teacher: ModelFacts | None,
                      dataset: DatasetFacts) -> list[str]:
    """What a reader must know before using the model: random teacher, short run, few images, one dataset."""
    steps = results.get("train_steps")
    limitations = []
    if teacher is not None and teacher.kind == "config" and args.distill != "none":
        limitations.append(f"The teacher was randomly initialised (`{teacher.name}`) and never trained: the student "
                           "learned to imitate noise. This model only demonstrates the toolkit; do not use it.")
    if steps is not None and steps < SHORT_RUN_STEPS:
        limitations.append(f"The run was very short ({steps} optimizer steps): the model is far from converged.")
    if dataset.subset:
        limitations.append(f"The metrics come from {dataset.num_eval_images} validation images only.")
    limitations.append(f"Trained and evaluated on {dataset.name} only: expect lower accuracy on other cameras, "
                       "places and class definitions.")
    return limitations


# ---------------------------------------------------------------------------------------------------------
# The export folder and the push
# ---------------------------------------------------------------------------------------------------------
def make_readable(folder: str | Path) -> None:
    """Give every file directly in ``folder`` the mode ``save_pretrained`` gives its JSON files (0644 under the
    usual umask 022): safetensors 0.8 writes the weights with mode 0600 whatever the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def export_folder(
    output_dir: str | Path,
    *,
    args: argparse.Namespace,
    info: Any,
    results: dict,
    processor: Any,
    student: ModelFacts,
    teacher: ModelFacts | None,
    dataset: DatasetFacts,
    rows: Sequence[PictureRow] = (),
    argv: Sequence[str] = (),
) -> list[str]:
    """Write the processor, the pictures and the card next to the saved model; make every file readable.

    Returns:
        The names of the files a push uploads, sorted.
    """
    out = Path(output_dir)
    evaluation_processor(processor, getattr(args, "eval_short_side", None)).save_pretrained(out)
    pictures = []
    for stale in (PREDICTIONS_FILE, ICS_FILE):  # a rerun into the same folder must not keep old pictures
        (out / stale).unlink(missing_ok=True)
    if rows:
        draw_predictions(rows, info.id2label).save(out / PREDICTIONS_FILE)
        pictures.append(PREDICTIONS_FILE)
        if any(row.student_ics is not None for row in rows):
            draw_ics(rows, info.id2label, args.temperature).save(out / ICS_FILE)
            pictures.append(ICS_FILE)
    height, width = rows[0].label.shape if rows else (512, 512)
    card = write_model_card(args, info, results, student=student, teacher=teacher, dataset=dataset,
                            pictures=pictures, argv=argv, example_size=(width, height))
    (out / CARD_FILE).write_text(card)
    if resolve_license(getattr(args, "hub_license", None), dataset)[0] is None:
        logger.warning("the model card states no licence: pass --hub_license (the training data's terms apply)")
    make_readable(out)
    return upload_list(out)


def upload_list(output_dir: str | Path) -> list[str]:
    """The files of ``output_dir`` (relative paths, sorted) that :func:`push_to_hub` uploads."""
    from huggingface_hub.utils import filter_repo_objects

    root = Path(output_dir)
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, allow_patterns=UPLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS))


def push_to_hub(output_dir: str | Path, repo_id: str, *, private: bool = False,
                commit_message: str = "AICSD student") -> str:
    """Create (or reuse) the model repo and upload the export: model, config, processor, card, pictures and
    results, nothing else (no tracker logs, checkpoints or other files the folder may hold).

    A ``repo_id`` without a namespace gets the user's; the card's usage snippet is then rewritten with the
    full id before the upload. The token comes from ``hf auth login`` or ``HF_TOKEN`` and is never printed.

    Returns:
        The repo id the Hub assigned.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, exist_ok=True, private=private)
    card = Path(output_dir) / CARD_FILE
    if repo.repo_id != repo_id and card.is_file():
        card.write_text(card.read_text().replace(f'"{repo_id}"', f'"{repo.repo_id}"'))
    api.upload_folder(repo_id=repo.repo_id, folder_path=str(output_dir), commit_message=commit_message,
                      allow_patterns=UPLOAD_PATTERNS, ignore_patterns=IGNORE_PATTERNS)
    logger.info("pushed %s to https://huggingface.co/%s", output_dir, repo.repo_id)
    return repo.repo_id
