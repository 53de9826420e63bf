"""Teacher and student segmentation models for AICSD distillation: ``AutoModelForSemanticSegmentation`` from a
``config:`` preset (random weights, offline), a local folder or a Hub id; class lists are plain ``id2label`` dicts
(this module knows transformers, not datasets). :func:`make_input_adapter` turns the data pipeline's uint8 RGB
batches into each model's input on the device, with its own mean/std and channel order (BGR for MobileViT)."""

from __future__ import annotations

import re
import textwrap
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from safetensors import SafetensorError
from torch import nn
from transformers import (AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, ConvNextConfig,
                          MobileNetV2Config, MobileViTConfig, PreTrainedConfig, PreTrainedModel, SegformerConfig,
                          UperNetConfig)

try:  # transformers >= 5 names the PIL/numpy processors *Pil; its plain names may need torchvision
    from transformers import MobileNetV2ImageProcessorPil, MobileViTImageProcessorPil, SegformerImageProcessorPil
except ImportError:  # earlier releases: the plain names are the PIL/numpy processors
    from transformers import MobileNetV2ImageProcessor as MobileNetV2ImageProcessorPil
    from transformers import MobileViTImageProcessor as MobileViTImageProcessorPil
    from transformers import SegformerImageProcessor as SegformerImageProcessorPil

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ClassMismatchError(ValueError):
    """Two class lists (teacher, student, dataset) that must agree do not."""


class ModelSourceError(ValueError):
    """A model name is neither a preset, a usable local folder, nor a Hub id that can be loaded."""


# ---------- Presets: offline random-init models shaped like the real checkpoints ----------
class ModelPreset(NamedTuple):
    make_config: Callable[[], PreTrainedConfig]  # without class information
    make_processor: Callable[[], object]  # the image processor the matching real checkpoint ships


# As the real checkpoints ship them: nvidia/segformer-* (ImageNet mean/std, UperNet's too),
# google/deeplabv3_mobilenet_v2_1.0_513, and Apple's MobileViT (trained on BGR in [0, 1]: a flip, no mean/std).
_segformer_processor = partial(SegformerImageProcessorPil, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
_mobilenet_v2_processor = partial(MobileNetV2ImageProcessorPil, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  size={"shortest_edge": 545}, crop_size={"height": 513, "width": 513})
_mobilevit_processor = partial(MobileViTImageProcessorPil, do_flip_channel_order=True, size={"shortest_edge": 544},
                               crop_size={"height": 512, "width": 512})
# SegFormer (paper, Table 6): b1..b5 share the widths, not the depths; the other settings (heads, reduction and
# MLP ratios, ignore index 255) are SegformerConfig's defaults, the paper's.
_MIT_WIDE = (64, 128, 320, 512)
MODEL_PRESETS: dict[str, ModelPreset] = {
    "config:segformer-tiny": ModelPreset(  # ~0.3M parameters: tests and the CPU demo
        partial(SegformerConfig, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_attention_heads=(1, 1, 2, 4),
                decoder_hidden_size=64), _segformer_processor),
    **{f"config:segformer-{variant}": ModelPreset(
        partial(SegformerConfig, hidden_sizes=widths, depths=depths, decoder_hidden_size=decoder), _segformer_processor)
       for variant, (widths, depths, decoder) in {
           "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256), "b1": (_MIT_WIDE, (2, 2, 2, 2), 256),
           "b2": (_MIT_WIDE, (3, 4, 6, 3), 768), "b3": (_MIT_WIDE, (3, 4, 18, 3), 768),
           "b4": (_MIT_WIDE, (3, 8, 27, 3), 768), "b5": (_MIT_WIDE, (3, 6, 40, 3), 768)}.items()},
    "config:deeplabv3-mobilenetv2": ModelPreset(  # google/deeplabv3_mobilenet_v2_1.0_513
        partial(MobileNetV2Config, depth_multiplier=1.0, image_size=513, output_stride=8, layer_norm_eps=0.001,
                semantic_loss_ignore_index=255), _mobilenet_v2_processor),
    "config:mobilevit-s": ModelPreset(  # apple/deeplabv3-mobilevit-small
        partial(MobileViTConfig, hidden_sizes=[144, 192, 240], neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640],
                image_size=512, output_stride=16, attention_probs_dropout_prob=0.0, aspp_out_channels=256,
                atrous_rates=[6, 12, 18], semantic_loss_ignore_index=255), _mobilevit_processor),
    "config:upernet-convnext-tiny": ModelPreset(  # openmmlab/upernet-convnext-tiny (transformers wants lists)
        lambda: UperNetConfig(
            backbone_config=ConvNextConfig(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], drop_path_rate=0.3,
                                           out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=512, pool_scales=[1, 2, 3, 6], use_auxiliary_head=True, auxiliary_in_channels=384,
            loss_ignore_index=255), _segformer_processor),
}
# A folder saved without its image processor gets its family's, by model type: never by preset name.
_FAMILY_PROCESSORS: dict[str, Callable[[], object]] = {
    "segformer": _segformer_processor, "upernet": _segformer_processor, "mobilenet_v2": _mobilenet_v2_processor,
    "mobilevit": _mobilevit_processor, "mobilevitv2": _mobilevit_processor}


def _preset(name: str) -> ModelPreset:
    if name not in MODEL_PRESETS:
        raise ModelSourceError(f"unknown model preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]


# ---------- Class lists ----------
def normalize_id2label(id2label: dict) -> dict[int, str]:
    """``id2label`` with int keys 0..C-1 in order (JSON gives str keys), or ``ValueError``."""
    if not id2label:
        raise ValueError("id2label is empty: pass the dataset's classes as {0: 'name', 1: ...}")
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError) as err:
        raise ValueError(f"id2label keys must be integers, got {list(id2label)[:5]}...: {err}") from None
    if [k for k, _ in items] != list(range(len(items))):
        raise ValueError(f"id2label keys must be 0..{len(items) - 1} without gaps, got {[k for k, _ in items][:20]}: "
                         "renumber the classes")
    return dict(items)


def _require_same_classes(teacher: dict[int, str], other: dict[int, str], whose: str, advice: str) -> None:
    # Checkpoints and label files disagree on case and separators ("traffic_light", ADE's "bed "), which is no
    # real difference; placeholder names (LABEL_0, ...) say nothing, so only their count must agree.
    canonical = [[re.sub(r"[\s_\-]+", " ", n).strip().lower() for n in d.values()] for d in (teacher, other)]
    placeholders = any(all(re.fullmatch(r"label \d+", n) for n in names) for names in canonical)
    if len(teacher) != len(other) or not (placeholders or canonical[0] == canonical[1]):
        shown = [f"[{', '.join(map(repr, list(d.values())[:40]))}{f', ... ({len(d)} in all)' if len(d) > 40 else ''}]"
                 for d in (teacher, other)]
        raise ClassMismatchError(f"teacher classes {shown[0]} differ from the {whose} {shown[1]}: {advice}")


def check_same_classes(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Raise :class:`ClassMismatchError` unless teacher and student predict the same classes, in order."""
    t, s = (normalize_id2label(dict(m.config.id2label)) for m in (teacher, student))
    _require_same_classes(t, s, "student's", "distillation needs both models to predict the dataset's classes "
                          "in the same order")


# ---------- Loading: each failure is one line naming the role, the model and what is wrong ----------
def _check_local(role: str, name: str) -> None:
    # transformers reads a missing path as a malformed Hub id, a folder without config.json as a config without
    # `model_type`, and a file as a pickle: say what is wrong instead.
    path = Path(name).expanduser()
    if path.is_file():
        raise ModelSourceError(f"the {role} {name!r} is a file: pass the folder that holds config.json and the weights")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelSourceError(f"the {role} {name!r} has no config.json: pass a folder written by save_pretrained")
    if not path.exists() and (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1):
        raise ModelSourceError(f"the {role} {name!r} looks like a path but no such folder exists: check the path, or "
                               f"use a config: preset ({', '.join(MODEL_PRESETS)})")


@contextmanager
def _one_line_errors(role: str, name: str, file: str = "config.json") -> Iterator[None]:
    """What transformers and huggingface_hub raise for ``name`` (reading ``file``) as a :class:`ModelSourceError`."""
    try:
        yield
    except (SafetensorError, OSError, ValueError) as err:
        detail = textwrap.shorten((str(err).strip() or type(err).__name__).splitlines()[0], 200)  # some list all models
        if isinstance(err, SafetensorError):
            what = f"has a damaged or incomplete model.safetensors ({detail})"
        elif Path(name).expanduser().is_dir():
            what = ("holds no weights (model.safetensors or pytorch_model.bin)" if "no file named" in str(err)
                    else f"has a damaged or incomplete {file} ({detail})")
        else:  # a Hub id. Offline, huggingface_hub fails at once; with no network, after its retries (about 25 s)
            cause = err.__cause__ or err.__context__  # huggingface_hub's own error, under transformers' OSError
            offline = hub_constants.HF_HUB_OFFLINE and not isinstance(cause, HFValidationError)
            reason = "HF_HUB_OFFLINE=1 and it is not in the local cache" if offline else detail
            raise ModelSourceError(
                f"the {role} {name!r} is not a local folder and could not be fetched from the Hub ({reason}): check "
                "the id, log in with `hf auth login` for private repos, pass a local path, or use a config: preset "
                f"({', '.join(MODEL_PRESETS)})") from None
        raise ModelSourceError(f"the {role} {name!r} {what}: pass a folder written by save_pretrained, or download "
                               "the model again") from None


def _check_teacher(name: str, model: PreTrainedModel, missing: set[str], id2label: dict[int, str]) -> None:
    # Converted checkpoints often lack BatchNorm's step counters, which eval mode never reads.
    missing = {key for key in missing if not key.endswith("num_batches_tracked")}
    if missing:  # e.g. nvidia/mit-b0, an encoder saved as an image classifier: its decode head would be random
        raise ClassMismatchError(f"teacher {name!r} has no segmentation head ({len(missing)} weights such as "
                                 f"{min(missing)} are not in it): a teacher must be a segmentation checkpoint "
                                 "trained on the dataset's classes")
    _require_same_classes(normalize_id2label(dict(model.config.id2label)), id2label, "dataset's",
                          "pass a teacher fine-tuned on this dataset, or check the dataset's id2label / label mapping")


def load_model(name_or_path: str, id2label: dict[int, str], *, role: str = "student", trust_remote_code: bool = False,
               revision: str | None = None) -> PreTrainedModel:
    """A semantic-segmentation model predicting ``id2label``'s classes, in training mode.

    Args:
        name_or_path: a ``config:`` preset (random weights), a folder written by ``save_pretrained``, or a Hub id
            ``AutoModelForSemanticSegmentation`` knows (``nvidia/segformer-*``, encoder-only ``nvidia/mit-b*``, ...).
        id2label: the dataset's classes, ``{0: "road", ...}``; the model's config carries them (and label2id).
        role: ``"student"``: a head with another class count is re-initialised (with a warning), an encoder-only
            checkpoint gets a fresh one. ``"teacher"``: its head must already predict these classes, in order;
            otherwise :class:`ClassMismatchError`. Any other failure is a one-line :class:`ModelSourceError`.
    """
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    id2label = normalize_id2label(id2label)
    labels = {"id2label": id2label, "label2id": {name: i for i, name in id2label.items()}}
    if name_or_path.startswith("config:"):
        config = _preset(name_or_path).make_config()
        config.update(labels)
        if role == "teacher":
            warnings.warn(f"teacher {name_or_path} has random weights: train it first (or pass a fine-tuned "
                          "checkpoint), otherwise distillation only transfers noise", stacklevel=2)
        return AutoModelForSemanticSegmentation.from_config(config, trust_remote_code=trust_remote_code)
    _check_local(role, name_or_path)
    # A teacher loads with its own classes, which must be the dataset's; a student's head takes the dataset's.
    student_kwargs = {} if role == "teacher" else dict(ignore_mismatched_sizes=True, **labels)
    with _one_line_errors(role, name_or_path):
        model, info = AutoModelForSemanticSegmentation.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, output_loading_info=True,
            **student_kwargs)
    if role == "teacher":
        _check_teacher(name_or_path, model, info["missing_keys"], id2label)
        model.config.update(labels)
    elif info["mismatched_keys"]:
        warnings.warn(f"{name_or_path}: {', '.join(sorted(k for k, *_ in info['mismatched_keys']))} do not fit the "
                      f"dataset's {len(id2label)} classes and are re-initialised with random weights", stacklevel=2)
    return model


def load_teacher(name_or_path: str, id2label: dict[int, str], *, trust_remote_code: bool = False,
                 revision: str | None = None) -> PreTrainedModel:
    """:func:`load_model` with ``role="teacher"``, frozen: eval mode (no dropout, fixed BatchNorm statistics; the
    training loop must not call ``train()`` on it) and no gradients."""
    model = load_model(name_or_path, id2label, role="teacher", trust_remote_code=trust_remote_code, revision=revision)
    return model.eval().requires_grad_(False)


def load_student(name_or_path: str, id2label: dict[int, str], *, trust_remote_code: bool = False,
                 revision: str | None = None) -> PreTrainedModel:
    """:func:`load_model` with ``role="student"``. A MobileNetV2's BatchNorm momentum is set to 0.1, torchvision's:
    transformers ports TensorFlow's decay 0.997 as PyTorch's momentum, the weight of the *new* batch, so its running
    statistics (and evaluation) would follow the last training batch alone."""
    model = load_model(name_or_path, id2label, role="student", trust_remote_code=trust_remote_code, revision=revision)
    for module in model.modules() if model.config.model_type == "mobilenet_v2" else ():
        if isinstance(module, nn.BatchNorm2d) and module.momentum == 0.997:
            module.momentum = 0.1
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, trainable and frozen."""
    return sum(p.numel() for p in model.parameters())


# ---------- Running a model: logits, the smallest input, batch-1 training ----------
def segmentation_logits(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) logits of any ``*ForSemanticSegmentation`` model for (B, 3, H, W) float ``pixel_values`` in
    its input convention (:func:`make_input_adapter`); h = H/4 for SegFormer, H/8..H/32 for DeepLabV3, H for
    UperNet. No labels go in, so no loss is computed (transformers' is NaN when all pixels are ignored)."""
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
    logits = model(pixel_values=pixel_values, return_dict=True).logits
    if logits.dim() != 4:
        raise ValueError(f"{type(model).__name__} returned logits of shape {tuple(logits.shape)}, "
                         "expected (B, C, h, w)")
    return logits


@torch.no_grad()
def smallest_input_side(model: nn.Module, limit: int = 1024) -> int:
    """The smallest side S such that ``model`` runs on a (1, 3, S, S) input, found by dry forward passes.

    Strided convolutions make a model fail below some size: 29 px for the SegFormer presets, 32 for UperNet-
    ConvNeXt, 1 for DeepLabV3. About 2 log2(S) passes of zeros in eval mode, assuming every larger size works;
    the model goes back to its mode. One that fails even at ``limit`` px raises its own error."""
    device = next(model.parameters()).device

    def runs(side: int) -> bool:
        try:
            segmentation_logits(model, torch.zeros(1, 3, side, side, device=device))
            return True
        except (RuntimeError, ValueError):
            if side >= limit:
                raise
            return False

    was_training = model.training
    model.eval()
    try:
        fails, side = 0, 1  # `fails` fails (0 always does); double `side` until it runs, then bisect
        while not runs(side):
            fails, side = side, min(2 * side, limit)
        while side - fails > 1:
            mid = (fails + side) // 2
            fails, side = (fails, mid) if runs(mid) else (mid, side)
        return side
    finally:
        model.train(was_training)


def one_sample_training_error(model: nn.Module, side: int) -> str | None:
    """Why ``model`` cannot train on batches of one ``(1, 3, side, side)`` sample, or None when it can.

    BatchNorm after a global pooling (DeepLabV3's image pooling) sees one value per channel at batch 1 and raises
    at the first step. One train-mode pass without gradients finds out; the buffers (running statistics) and
    the random state (dropout) are put back, so training starts as if unchecked. Without BatchNorm: no pass."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    device = next(model.parameters()).device
    saved = [b.detach().clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            segmentation_logits(model, torch.zeros(1, 3, side, side, device=device))
        return None
    except (RuntimeError, ValueError) as err:
        return " ".join(str(err).split())
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved):
                buffer.copy_(value)
        model.train(was_training)


# ---------- Image processors and input normalization ----------
def load_image_processor(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
                         role: str = "student") -> object:
    """The image processor of a model: a preset's is the one its real checkpoint ships; others come from
    ``AutoImageProcessor``, except that a folder without ``preprocessor_config.json`` (a bare ``save_pretrained``
    of a model) gets its model type's default, with a warning. Failures are one line naming ``role``."""
    if name_or_path.startswith("config:"):
        return _preset(name_or_path).make_processor()
    folder = Path(name_or_path).expanduser()
    if not (folder / "preprocessor_config.json").is_file():
        _check_local(role, name_or_path)
        if folder.is_dir():
            with _one_line_errors(role, name_or_path):
                model_type = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).model_type
            if model_type not in _FAMILY_PROCESSORS:
                raise ModelSourceError(f"the {role} {name_or_path!r} has no preprocessor_config.json and no default "
                                       f"is known for model type {model_type!r}: save the image processor with it")
            warnings.warn(f"{name_or_path} has no preprocessor_config.json; using the {model_type} default "
                          "processor", stacklevel=2)
            return _FAMILY_PROCESSORS[model_type]()
    with _one_line_errors(role, name_or_path, "preprocessor_config.json"):
        return AutoImageProcessor.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)


def processor_flips_channels(processor: object) -> bool:
    """True when the processor feeds its model BGR (Apple's MobileViT checkpoints were trained on BGR)."""
    return bool(getattr(processor, "do_flip_channel_order", False))


def processor_mean_std(processor: object) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) to apply to [0, 1] RGB input so that it matches what ``processor`` produces.

    Rescaling by ``f`` then normalizing with (m, s) equals normalizing [0, 1] input with (m, s) / (255 f); no
    normalizing is (0, 1) / (255 f). In the input's RGB order: :func:`make_input_adapter` also flips channels."""
    factor = (getattr(processor, "rescale_factor", None) or 1 / 255) if getattr(processor, "do_rescale", True) else 1
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    # MobileViT's processors skip normalizing whatever do_normalize says.
    normalizes = getattr(processor, "do_normalize", False) and not type(processor).__name__.startswith("MobileViT")
    if not normalizes or mean is None or std is None:
        mean, std = 0.0, 1.0
    try:  # one value per channel, or one for all three
        return tuple(tuple(float(v) / (255.0 * float(factor)) for v in np.broadcast_to(np.asarray(x, float), 3))
                     for x in (mean, std))
    except ValueError:
        raise ValueError(f"processor image_mean {mean} and image_std {std} must have 3 values for RGB") from None


def make_input_adapter(processor: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scale and normalize a uint8 batch on its device the way ``processor`` would, for that processor's model.

    Returns a function (B, 3, H, W) uint8 RGB -> (B, 3, H, W) float32 on the same device: x / 255 normalized
    with the model's mean/std (:func:`processor_mean_std`), channels reversed for BGR models such as MobileViT.
    The data pipeline hands over uint8, a quarter of float32's bytes to copy to the device."""
    mean, std = processor_mean_std(processor)
    flip = processor_flips_channels(processor)
    order = (2, 1, 0) if flip else (0, 1, 2)  # y = (x / 255 - mean) / std = x * gain + bias, in the model's order
    gain = torch.tensor([1.0 / (255.0 * std[c]) for c in order], dtype=torch.float32).view(1, 3, 1, 1)
    bias = torch.tensor([-mean[c] / std[c] for c in order], dtype=torch.float32).view(1, 3, 1, 1)
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copied to each device once

    def adapt(pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8 or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be uint8 (B, 3, H, W) RGB as the data pipeline makes them, got "
                             f"{pixel_values.dtype} {tuple(pixel_values.shape)}")
        if pixel_values.device not in on_device:
            on_device[pixel_values.device] = (gain.to(pixel_values.device), bias.to(pixel_values.device))
        g, b = on_device[pixel_values.device]
        return torch.addcmul(b, (pixel_values.flip(1) if flip else pixel_values).float(), g)

    return adapt
