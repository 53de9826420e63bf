"""Teacher and student segmentation models for AICSD distillation.

Everything model-side lives here: building a model from a ``config:`` preset, a
local folder or a Hub id; freezing the teacher; checking that teacher, student
and dataset agree on their classes; getting raw logits out of any
``AutoModelForSemanticSegmentation`` architecture; and describing the input
normalization a model expects.

This module deliberately knows nothing about datasets: class lists come in as
plain ``id2label`` dicts and pixel tensors as plain tensors.

Input convention used across the toolkit: the data pipeline produces uint8 RGB
batches; on the device, :func:`make_input_adapter` scales and normalizes them for
each model with that model's own mean/std (see :func:`processor_mean_std`) and
channel order (BGR for Apple's MobileViT checkpoints).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import huggingface_hub
import torch
from safetensors import SafetensorError
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForSemanticSegmentation,
    ConvNextConfig,
    MobileNetV2Config,
    MobileViTConfig,
    PreTrainedConfig,
    PreTrainedModel,
    SegformerConfig,
    UperNetConfig,
)

try:  # transformers >= 5.x names the PIL/numpy processors *Pil; the plain names may need torchvision
    from transformers import MobileNetV2ImageProcessorPil, MobileViTImageProcessorPil, SegformerImageProcessorPil
except ImportError:  # earlier releases: the plain names are the PIL/numpy processors
    from transformers import MobileNetV2ImageProcessor as MobileNetV2ImageProcessorPil
    from transformers import MobileViTImageProcessor as MobileViTImageProcessorPil
    from transformers import SegformerImageProcessor as SegformerImageProcessorPil

import utils_hub

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_IDENTITY_MEAN = (0.0, 0.0, 0.0)
_IDENTITY_STD = (1.0, 1.0, 1.0)


class ClassMismatchError(ValueError):
    """Two class lists (teacher, student, dataset) that must agree do not."""


class ModelSourceError(ValueError):
    """A model name is neither a preset, a usable local folder, nor reachable on the Hub."""


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPreset:
    """An offline, random-init model recipe usable wherever a model id is.

    Attributes:
        name: The ``config:...`` name.
        description: One line for ``--help`` and error messages.
        make_config: Returns a fresh config without class information.
        make_processor: Returns the image processor the matching real checkpoint uses.
    """

    name: str
    description: str
    make_config: Callable[[], PreTrainedConfig]
    make_processor: Callable[[], object]


# MiT encoder shapes from the SegFormer paper (Table 6); b1..b5 share widths.
_MIT_WIDE = [64, 128, 320, 512]
_MIT_SHAPES: dict[str, tuple[list[int], list[int], int]] = {
    "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
    "b1": (_MIT_WIDE, [2, 2, 2, 2], 256),
    "b2": (_MIT_WIDE, [3, 4, 6, 3], 768),
    "b3": (_MIT_WIDE, [3, 4, 18, 3], 768),
    "b4": (_MIT_WIDE, [3, 8, 27, 3], 768),
    "b5": (_MIT_WIDE, [3, 6, 40, 3], 768),
}


def _segformer_config(hidden_sizes: list[int], depths: list[int], decoder_hidden_size: int,
                      num_attention_heads: list[int] | None = None) -> SegformerConfig:
    return SegformerConfig(
        hidden_sizes=list(hidden_sizes),
        depths=list(depths),
        num_attention_heads=list(num_attention_heads or [1, 2, 5, 8]),
        sr_ratios=[8, 4, 2, 1],
        mlp_ratios=[4, 4, 4, 4],
        decoder_hidden_size=decoder_hidden_size,
        semantic_loss_ignore_index=255,
    )


def _segformer_processor() -> SegformerImageProcessorPil:
    # The nvidia/segformer-* checkpoints: ImageNet mean/std, 512x512 resize.
    return SegformerImageProcessorPil(image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def _tiny_segformer_config() -> SegformerConfig:
    return _segformer_config([16, 32, 64, 128], [1, 1, 1, 1], 64, num_attention_heads=[1, 1, 2, 4])


def _deeplabv3_mobilenet_v2_config() -> MobileNetV2Config:
    # google/deeplabv3_mobilenet_v2_1.0_513: width 1.0, 513 input, output stride 8.
    return MobileNetV2Config(depth_multiplier=1.0, image_size=513, output_stride=8, layer_norm_eps=0.001,
                             semantic_loss_ignore_index=255)


def _mobilenet_v2_processor() -> MobileNetV2ImageProcessorPil:
    # Matches that checkpoint's preprocessor_config.json: mean = std = 0.5, 545 -> 513 crop.
    return MobileNetV2ImageProcessorPil(
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 545}, crop_size={"height": 513, "width": 513},
    )


def _deeplabv3_mobilevit_small_config() -> MobileViTConfig:
    # apple/deeplabv3-mobilevit-small: MobileViT-S widths, 512 input, output stride 16.
    return MobileViTConfig(
        hidden_sizes=[144, 192, 240], neck_hidden_sizes=[16, 32, 64, 96, 128, 160, 640],
        image_size=512, output_stride=16, attention_probs_dropout_prob=0.0,
        aspp_out_channels=256, atrous_rates=[6, 12, 18], semantic_loss_ignore_index=255,
    )


def _mobilevit_processor() -> MobileViTImageProcessorPil:
    # Apple's checkpoints take BGR in [0, 1] with no mean/std (their preprocessor_config
    # sets do_flip_channel_order and no normalization); 544 -> 512 crop.
    return MobileViTImageProcessorPil(
        do_flip_channel_order=True, size={"shortest_edge": 544}, crop_size={"height": 512, "width": 512},
    )


def _upernet_convnext_tiny_config() -> UperNetConfig:
    # openmmlab/upernet-convnext-tiny. transformers 5.24 needs lists here, not tuples.
    backbone = ConvNextConfig(
        hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], drop_path_rate=0.3,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return UperNetConfig(
        backbone_config=backbone, hidden_size=512, pool_scales=[1, 2, 3, 6],
        use_auxiliary_head=True, auxiliary_in_channels=384, loss_ignore_index=255,
    )


def _build_presets() -> dict[str, ModelPreset]:
    presets = {
        "config:segformer-tiny": ModelPreset(
            "config:segformer-tiny",
            "SegFormer with widths 16/32/64/128, one block per stage, 64-d decoder (~0.3M params; tests, CPU demo)",
            _tiny_segformer_config, _segformer_processor,
        ),
    }
    for variant, (widths, depths, decoder) in _MIT_SHAPES.items():
        name = f"config:segformer-{variant}"
        presets[name] = ModelPreset(
            name,
            f"SegFormer-{variant.upper()} (MiT-{variant} encoder, {decoder}-d all-MLP decoder), random weights",
            lambda w=widths, d=depths, h=decoder: _segformer_config(w, d, h),
            _segformer_processor,
        )
    presets["config:deeplabv3-mobilenetv2"] = ModelPreset(
        "config:deeplabv3-mobilenetv2",
        "DeepLabV3 + MobileNetV2 1.0 (as google/deeplabv3_mobilenet_v2_1.0_513), random weights",
        _deeplabv3_mobilenet_v2_config, _mobilenet_v2_processor,
    )
    presets["config:mobilevit-s"] = ModelPreset(
        "config:mobilevit-s",
        "DeepLabV3 + MobileViT-S (as apple/deeplabv3-mobilevit-small; BGR input, no mean/std), random weights",
        _deeplabv3_mobilevit_small_config, _mobilevit_processor,
    )
    presets["config:upernet-convnext-tiny"] = ModelPreset(
        "config:upernet-convnext-tiny",
        "UperNet + ConvNeXt-T (as openmmlab/upernet-convnext-tiny), random weights",
        _upernet_convnext_tiny_config, _segformer_processor,
    )
    return presets


MODEL_PRESETS: dict[str, ModelPreset] = _build_presets()


def _unknown_preset(name: str) -> ModelSourceError:
    return ModelSourceError(
        f"unknown model preset {name!r}: choose one of {', '.join(MODEL_PRESETS)}"
    )


# --------------------------------------------------------------------------------------
# Class lists
# --------------------------------------------------------------------------------------


def normalize_id2label(id2label: dict) -> dict[int, str]:
    """Return ``id2label`` with int keys 0..C-1 in order, or raise ``ValueError``.

    Accepts str or int keys (JSON files give str keys).
    """
    if not id2label:
        raise ValueError("id2label is empty: pass the dataset's classes as {0: 'name', 1: ...}")
    try:
        items = sorted((int(k), str(v)) for k, v in id2label.items())
    except (TypeError, ValueError) as err:
        raise ValueError(f"id2label keys must be integers, got {list(id2label)[:5]}...: {err}") from None
    keys = [k for k, _ in items]
    if keys != list(range(len(keys))):
        raise ValueError(
            f"id2label keys must be 0..{len(keys) - 1} without gaps, got {keys[:20]}: renumber the classes"
        )
    return dict(items)


def _canonical_name(name: str) -> str:
    # Checkpoints and label files disagree on spacing/case ("traffic light" vs
    # "traffic_light", ADE's "bed "), which is not a real class difference.
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def _is_placeholder(names: list[str]) -> bool:
    return all(re.fullmatch(r"label_\d+", n.strip().lower()) for n in names)


def _class_lists_differ(a: dict[int, str], b: dict[int, str]) -> bool:
    if len(a) != len(b):
        return True
    names_a = [a[i] for i in range(len(a))]
    names_b = [b[i] for i in range(len(b))]
    if _is_placeholder(names_a) or _is_placeholder(names_b):
        return False
    return [_canonical_name(n) for n in names_a] != [_canonical_name(n) for n in names_b]


def _format_classes(id2label: dict[int, str], limit: int = 40) -> str:
    names = [id2label[i] for i in range(len(id2label))]
    shown = ", ".join(repr(n) for n in names[:limit])
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return f"[{shown}{more}]"


def _model_id2label(model_or_config: PreTrainedModel | PreTrainedConfig) -> dict[int, str]:
    config = getattr(model_or_config, "config", model_or_config)
    return normalize_id2label(dict(config.id2label))


def check_same_classes(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Raise :class:`ClassMismatchError` unless teacher and student predict the same classes.

    Names are compared case-, space- and underscore-insensitively; placeholder
    names (``LABEL_0``...) only need matching counts.
    """
    t, s = _model_id2label(teacher), _model_id2label(student)
    if _class_lists_differ(t, s):
        raise ClassMismatchError(
            f"teacher classes {_format_classes(t)} differ from the student's {_format_classes(s)}: "
            "distillation needs both models to predict the dataset's classes in the same order"
        )


def _set_labels(config: PreTrainedConfig, id2label: dict[int, str]) -> None:
    config.num_labels = len(id2label)
    config.id2label = dict(id2label)
    config.label2id = {name: idx for idx, name in id2label.items()}


# --------------------------------------------------------------------------------------
# Resolving names: preset, local folder, or Hub id (fast failure)
# --------------------------------------------------------------------------------------


def _presets_hint() -> str:
    return ", ".join(MODEL_PRESETS)


def _unreachable(name: str, reason: str) -> ModelSourceError:
    return ModelSourceError(
        f"{name!r} is not a local folder and could not be fetched from the Hub ({reason}): check the id, "
        "log in with `hf auth login` for private repos, pass a local path, or use a config: preset "
        f"({_presets_hint()})"
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def _resolve_pretrained(name: str, revision: str | None, filename: str = "config.json") -> dict:
    """Decide how to load ``name`` without hanging on an unreachable Hub.

    Returns kwargs for ``from_pretrained`` (``local_files_only`` when only the
    cache can serve it). Raises :class:`ModelSourceError` in well under a second
    when neither a folder, the cache, nor the Hub can.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / filename).is_file():
            raise ModelSourceError(
                f"local folder {str(path)!r} has no {filename}: pass a folder written by save_pretrained"
            )
        return {}
    if path.exists():
        raise ModelSourceError(f"{name!r} is a file: pass the folder that holds config.json and the weights")
    if _looks_like_path(name):
        raise ModelSourceError(
            f"{name!r} looks like a path but no such folder exists: check the path, or use a config: preset "
            f"({_presets_hint()})"
        )
    try:
        utils_hub.probe_hub_repo(name, revision=revision, filename=filename)
        return {}
    except utils_hub.HubProbeError as err:
        failure = err
    if failure.kind in (utils_hub.OFFLINE, utils_hub.NETWORK):  # the local cache may still serve it
        if isinstance(huggingface_hub.try_to_load_from_cache(name, filename, revision=revision), str):
            if failure.kind == utils_hub.NETWORK:
                logger.warning("Hub unreachable (%s); loading %s from the local cache", failure, name)
            return {"local_files_only": True}
    if failure.kind == utils_hub.OFFLINE:
        raise _unreachable(name, "HF_HUB_OFFLINE=1 and it is not in the local cache")
    raise _unreachable(name, str(failure))


def _is_segmentation_checkpoint(config: PreTrainedConfig) -> bool | None:
    """True/False when ``architectures`` says whether a segmentation head was saved; None if unknown.

    Early nvidia/segformer-* configs name the class ``SegformerForImageSegmentation``
    (or ``SegFormer...``), so any "Segmentation" counts; encoder-only checkpoints
    such as nvidia/mit-b0 say ``...ForImageClassification``.
    """
    architectures = getattr(config, "architectures", None) or []
    if any("Segmentation" in arch for arch in architectures):
        return True
    if any(arch.endswith(("ForImageClassification", "Model", "Backbone")) for arch in architectures):
        return False
    return None


def load_model(
    name_or_path: str,
    id2label: dict[int, str],
    *,
    role: str = "student",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """Build or load a semantic-segmentation model predicting ``id2label``'s classes.

    Args:
        name_or_path: A ``config:`` preset (random weights), a local folder
            written by ``save_pretrained``, or a Hub id known to
            ``AutoModelForSemanticSegmentation`` (SegFormer ``nvidia/segformer-*``,
            encoder-only ``nvidia/mit-b*``, ``google/deeplabv3_mobilenet_v2_1.0_513``,
            ``apple/deeplabv3-mobilevit-*``, UperNet, ...).
        id2label: The dataset's classes, ``{0: "road", ...}``.
        role: ``"student"``: a head with another class count is re-initialised
            (with a warning) and an encoder-only checkpoint gets a fresh head.
            ``"teacher"``: the checkpoint must already predict exactly the
            dataset's classes, otherwise :class:`ClassMismatchError`.
        trust_remote_code: Passed through to transformers.
        revision: Hub branch, tag or commit.

    Returns:
        The model, in training mode (use :func:`freeze` / :func:`load_teacher`
        for a teacher). Its config carries the dataset's id2label/label2id.

    Raises:
        ModelSourceError: unknown preset, bad path, or a Hub id that is not
            reachable (fails fast; no retry loop).
        ClassMismatchError: teacher classes differ from the dataset's.
    """
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    id2label = normalize_id2label(id2label)
    num_labels = len(id2label)

    if name_or_path.startswith("config:"):
        preset = MODEL_PRESETS.get(name_or_path)
        if preset is None:
            raise _unknown_preset(name_or_path)
        config = preset.make_config()
        _set_labels(config, id2label)
        if role == "teacher":
            warnings.warn(
                f"teacher {name_or_path} has random weights: train it first (or pass a fine-tuned checkpoint), "
                "otherwise distillation only transfers noise",
                stacklevel=2,
            )
        return AutoModelForSemanticSegmentation.from_config(config, trust_remote_code=trust_remote_code)

    load_kwargs = _resolve_pretrained(name_or_path, revision)
    load_kwargs.update(revision=revision, trust_remote_code=trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(name_or_path, **load_kwargs)
    except (OSError, ValueError) as err:  # not JSON, no model_type, unreadable
        raise _damaged(role, name_or_path, "config.json", err) from None
    has_head = _is_segmentation_checkpoint(config)
    ckpt_labels = normalize_id2label(dict(config.id2label)) if getattr(config, "id2label", None) else {}

    if role == "teacher":
        if has_head is False:
            raise ClassMismatchError(
                f"teacher {name_or_path!r} has no segmentation head (architectures={config.architectures}): "
                "a teacher must be a segmentation checkpoint trained on the dataset's classes"
            )
        if _class_lists_differ(ckpt_labels, id2label):
            raise ClassMismatchError(
                f"teacher classes {_format_classes(ckpt_labels)} differ from the dataset's "
                f"{_format_classes(id2label)}: pass a teacher fine-tuned on this dataset, or check the "
                "dataset's id2label / label mapping"
            )
    elif has_head is False:
        logger.info("%s is an encoder-only checkpoint: a fresh %d-class head is initialised", name_or_path, num_labels)
    elif len(ckpt_labels) != num_labels:
        warnings.warn(
            f"{name_or_path}: its head predicts {len(ckpt_labels)} classes, the dataset has {num_labels}; "
            "the head is re-initialised with random weights",
            stacklevel=2,
        )

    _set_labels(config, id2label)
    try:
        return AutoModelForSemanticSegmentation.from_pretrained(
            name_or_path,
            config=config,
            ignore_mismatched_sizes=(role == "student"),
            **load_kwargs,
        )
    except (OSError, SafetensorError) as err:  # no weights file, a truncated or garbage one
        raise _damaged(role, name_or_path, _weights_file(name_or_path), err) from None


def _weights_file(name_or_path: str) -> str:
    """The weights file ``from_pretrained`` reads in a folder (for error messages): safetensors first."""
    folder = Path(name_or_path).expanduser()
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return name
    return "model.safetensors"


def _damaged(role: str, name_or_path: str, file: str, err: BaseException) -> ModelSourceError:
    """A one-line error naming the model's role, its ``file`` and what is wrong with it."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = lines[0] if lines else type(err).__name__
    if len(detail) > 200:  # transformers appends every known model type to some messages
        detail = detail[:200].rsplit(" ", 1)[0] + " ..."
    if "no file named" in detail:
        what = "holds no weights (model.safetensors or pytorch_model.bin)"
    else:
        what = f"has a damaged or incomplete {file} ({detail})"
    return ModelSourceError(f"the {role} {name_or_path!r} {what}: pass a folder written by save_pretrained, or "
                            "download the model again")


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put ``model`` in eval mode and stop all gradients; returns the same object.

    Eval mode keeps dropout off and batch-norm statistics fixed. Nothing stops a
    later ``model.train()``: the training loop must leave the teacher in eval mode.
    """
    model.eval()
    model.requires_grad_(False)
    return model


def load_teacher(name_or_path: str, id2label: dict[int, str], *, trust_remote_code: bool = False,
                 revision: str | None = None) -> PreTrainedModel:
    """:func:`load_model` with ``role="teacher"``, then :func:`freeze`."""
    model = load_model(name_or_path, id2label, role="teacher", trust_remote_code=trust_remote_code,
                       revision=revision)
    return freeze(model)


def load_student(name_or_path: str, id2label: dict[int, str], *, trust_remote_code: bool = False,
                 revision: str | None = None) -> PreTrainedModel:
    """:func:`load_model` with ``role="student"``."""
    return load_model(name_or_path, id2label, role="student", trust_remote_code=trust_remote_code,
                      revision=revision)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters, trainable and frozen."""
    return sum(p.numel() for p in model.parameters())


def segmentation_logits(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Raw class logits of a segmentation model.

    Args:
        model: Any ``*ForSemanticSegmentation`` model.
        pixel_values: (B, 3, H, W) float, already in the model's input
            convention (see :func:`make_input_adapter`).

    Returns:
        (B, C, h, w) logits at the model's native output stride: H/4 for
        SegFormer, H/8..H/32 for MobileNetV2/MobileViT DeepLabV3, H for UperNet.
        Labels are never passed, so no loss is computed (transformers' built-in
        cross-entropy returns NaN on a batch whose pixels are all ignored).
    """
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must be (B, 3, H, W), got {tuple(pixel_values.shape)}")
    logits = model(pixel_values=pixel_values, return_dict=True).logits
    if logits.dim() != 4:
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)}, expected (B, C, h, w)"
        )
    return logits


@torch.no_grad()
def smallest_input_side(model: nn.Module, limit: int = 1024) -> int:
    """The smallest side S such that ``model`` runs on a (1, 3, S, S) input, found by dry forward passes.

    Strided convolutions (SegFormer's spatial-reduction convolutions, ConvNeXt's patchify stem) make a model
    fail below some input size: 29 px for the SegFormer presets, 32 for UperNet-ConvNeXt, 1 for DeepLabV3 with
    MobileNetV2 or MobileViT. The search runs zeros through the model in eval mode (no statistics change)
    on its device, about 2 log2(S) passes, and assumes that every size from the minimum up works (true of
    every preset). The model goes back to its mode.

    Raises:
        The model's own error when it fails even at ``limit`` px (then size is not the problem).
    """
    device = next(model.parameters()).device

    def forward(side: int) -> None:
        segmentation_logits(model, torch.zeros(1, 3, side, side, device=device))

    def runs(side: int) -> bool:
        try:
            forward(side)
            return True
        except (RuntimeError, ValueError):
            return False

    was_training = model.training
    model.eval()
    try:
        fails, side = 0, 1  # invariant: `fails` fails (0 always does); search upwards by doubling
        while not runs(side):
            if side >= limit:
                forward(limit)  # not a size problem: let the model's error through
            fails, side = side, min(2 * side, limit)
        while side - fails > 1:
            mid = (fails + side) // 2
            fails, side = (fails, mid) if runs(mid) else (mid, side)
        return side
    finally:
        model.train(was_training)


def one_sample_training_error(model: nn.Module, side: int) -> str | None:
    """Why ``model`` cannot train on batches of one ``(1, 3, side, side)`` sample, or None when it can.

    BatchNorm after a global pooling (DeepLabV3's image-pooling branch) sees one value per channel at batch 1
    and raises at the first training step. This runs one train-mode forward pass without gradients, then
    puts back every buffer (running statistics) and the random state (dropout), so training starts as if the
    check had not run. Models without BatchNorm are not run at all.
    """
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


# --------------------------------------------------------------------------------------
# Image processors and input normalization
# --------------------------------------------------------------------------------------


_FAMILY_PROCESSORS: dict[str, Callable[[], object]] = {
    "segformer": _segformer_processor,
    "upernet": _segformer_processor,
    "mobilenet_v2": _mobilenet_v2_processor,
    "mobilevit": _mobilevit_processor,
    "mobilevitv2": _mobilevit_processor,
}


def load_image_processor(name_or_path: str, *, revision: str | None = None,
                         trust_remote_code: bool = False, role: str = "student") -> object:
    """The image processor matching a model name.

    ``config:`` presets get the processor their real checkpoint ships (ImageNet
    mean/std for SegFormer and UperNet, mean = std = 0.5 for DeepLabV3-MobileNetV2,
    BGR with no mean/std for MobileViT). Folders and Hub ids go through
    ``AutoImageProcessor``; a folder with no ``preprocessor_config.json`` (e.g. a
    bare ``save_pretrained`` of a model) falls back to its family default with a
    warning. The result can be saved with ``save_pretrained`` and reloaded with
    ``AutoImageProcessor.from_pretrained`` offline. A folder whose
    ``preprocessor_config.json`` cannot be read is a one-line error naming ``role``.
    """
    if name_or_path.startswith("config:"):
        preset = MODEL_PRESETS.get(name_or_path)
        if preset is None:
            raise _unknown_preset(name_or_path)
        return preset.make_processor()
    path = Path(name_or_path).expanduser()
    if path.is_dir() and not (path / "preprocessor_config.json").is_file():
        load_kwargs = _resolve_pretrained(name_or_path, revision)
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **load_kwargs)
        factory = _FAMILY_PROCESSORS.get(config.model_type)
        if factory is None:
            raise ModelSourceError(
                f"{name_or_path!r} has no preprocessor_config.json and no default is known for model type "
                f"{config.model_type!r}: save the image processor next to the model"
            )
        warnings.warn(
            f"{name_or_path} has no preprocessor_config.json; using the {config.model_type} default processor",
            stacklevel=2,
        )
        return factory()
    load_kwargs = _resolve_pretrained(name_or_path, revision, filename="preprocessor_config.json")
    try:
        return AutoImageProcessor.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, **load_kwargs
        )
    except (OSError, ValueError) as err:  # not JSON, unknown processor type, unreadable
        if not path.is_dir():
            raise
        raise _damaged(role, name_or_path, "preprocessor_config.json", err) from None


def processor_flips_channels(processor: object) -> bool:
    """True when the processor feeds the model BGR instead of RGB.

    Apple's MobileViT/MobileViTV2 processors do (``do_flip_channel_order``): those
    checkpoints were trained on BGR input.
    """
    return bool(getattr(processor, "do_flip_channel_order", False))


def _never_normalizes(processor: object) -> bool:
    # MobileViT's processors skip the normalize step whatever do_normalize says.
    return type(processor).__name__.startswith("MobileViTImageProcessor")


def processor_mean_std(processor: object) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """The (mean, std) to apply to [0, 1] RGB input so it matches what ``processor`` produces.

    Folds the processor's rescale factor in: a processor that rescales by
    ``f`` and normalizes with (m, s) is equivalent to normalizing [0, 1] input
    with (m / (255 f), s / (255 f)). A processor that does not normalize gives
    the identity ((0, 0, 0), (1, 1, 1)).

    Channel order is not expressible as mean/std: the values returned are in
    RGB order of the *input*, and when :func:`processor_flips_channels` is true
    the model additionally wants the channels reversed — use
    :func:`make_input_adapter`, which does both.
    """
    rescale = 1.0
    if getattr(processor, "do_rescale", True):
        rescale = float(getattr(processor, "rescale_factor", 1 / 255) or 1 / 255)
    scale = 255.0 * rescale
    if _never_normalizes(processor) or not getattr(processor, "do_normalize", False):
        if abs(scale - 1.0) < 1e-6:
            return _IDENTITY_MEAN, _IDENTITY_STD
        return _IDENTITY_MEAN, tuple(1.0 / scale for _ in range(3))  # type: ignore[return-value]
    mean = getattr(processor, "image_mean", None)
    std = getattr(processor, "image_std", None)
    if mean is None or std is None:
        return _IDENTITY_MEAN, _IDENTITY_STD
    mean3 = _as_triplet(mean, "image_mean")
    std3 = _as_triplet(std, "image_std")
    return (
        tuple(m / scale for m in mean3),  # type: ignore[return-value]
        tuple(s / scale for s in std3),  # type: ignore[return-value]
    )


def _as_triplet(values: object, what: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3  # type: ignore[return-value]
    seq = [float(v) for v in values]  # type: ignore[union-attr]
    if len(seq) == 1:
        seq = seq * 3
    if len(seq) != 3:
        raise ValueError(f"processor {what} must have 3 values for RGB, got {seq}")
    return tuple(seq)  # type: ignore[return-value]


def make_input_adapter(processor: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """Scale and normalize a uint8 batch on its device the way ``processor`` would, for that processor's model.

    The data pipeline hands over uint8 RGB (a quarter of float32's bytes to copy to the device); each model,
    student or teacher, gets ``adapter(pixel_values)``: x / 255 normalized with its own mean/std
    (:func:`processor_mean_std`), channels reversed for BGR models such as MobileViT.

    Args:
        processor: the model's image processor.

    Returns:
        A function (B, 3, H, W) uint8 RGB -> (B, 3, H, W) float32 on the same device.
    """
    mean, std = processor_mean_std(processor)
    flip = processor_flips_channels(processor)
    # y = (x / 255 - mean) / std = x * gain + bias, in the model's channel order.
    gain = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(1, 3, 1, 1)
    bias = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(1, 3, 1, 1)
    if flip:
        gain, bias = gain.flip(1), bias.flip(1)
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # copied to each device once

    def adapt(pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8 or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"pixel_values must be uint8 (B, 3, H, W) RGB as the data pipeline makes them, got "
                f"{pixel_values.dtype} {tuple(pixel_values.shape)}"
            )
        device = pixel_values.device
        if device not in on_device:
            on_device[device] = (gain.to(device), bias.to(device))
        g, b = on_device[device]
        x = pixel_values.flip(1) if flip else pixel_values
        return torch.addcmul(b, x.float(), g)

    return adapt
