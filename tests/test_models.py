"""Tests for models.py: presets, loading rules, damaged folders, freezing, logits, processors. Offline, CPU, small
inputs; the big presets are built on the meta device (shapes and parameter counts without the random init)."""

import json
import random
import shutil
import time
import types
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, SegformerConfig, SegformerForImageClassification

import models

CLASSES_5 = {0: "road", 1: "sidewalk", 2: "traffic_light", 3: "car", 4: "sky"}
CLASSES_7 = {i: f"class {i}" for i in range(7)}

# (input side, output stride, parameter count in millions or None) per preset. The SegFormer counts are those
# of the real nvidia/segformer-b* models with a 5-class head. The presets over 20M parameters are built on the
# meta device; SegFormer-B2..B5 differ from B0/B1 only in widths and depths, so their (slow) forward pass on it
# would show nothing the others do not.
PRESET_EXPECTATIONS = {
    "config:segformer-tiny": (64, 4, None),
    "config:segformer-b0": (64, 4, 3.7),
    "config:segformer-b1": (64, 4, 13.7),
    "config:segformer-b2": (32, 4, 27.4),
    "config:segformer-b3": (32, 4, 47.2),
    "config:segformer-b4": (32, 4, 64.0),
    "config:segformer-b5": (32, 4, 84.6),
    "config:deeplabv3-mobilenetv2": (64, 8, None),
    "config:mobilevit-s": (64, 16, None),
    "config:upernet-convnext-tiny": (32, 1, 60.1),
}


def _tiny_student(id2label=CLASSES_5):
    torch.manual_seed(0)
    return models.load_model("config:segformer-tiny", id2label)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny 5-class student and the folder it was saved to (no image processor). Tests only read it."""
    student = _tiny_student().eval()
    folder = tmp_path_factory.mktemp("saved")
    student.save_pretrained(folder)
    return student, folder


def _assert_same_weights(source, target, prefix, skip):
    target_state = target.state_dict()
    compared = 0
    for key, value in source.state_dict().items():
        if key.startswith(prefix) and not key.startswith(skip):
            assert torch.equal(value, target_state[key]), key
            compared += 1
    assert compared > 10


def test_preset_names_are_exactly_the_documented_ones():
    assert set(models.MODEL_PRESETS) == set(PRESET_EXPECTATIONS)


@pytest.mark.parametrize("name", list(PRESET_EXPECTATIONS))
def test_preset_builds_and_gives_logits_per_class(name):
    side, stride, millions = PRESET_EXPECTATIONS[name]
    device = torch.device("meta" if (millions or 0) > 20 else "cpu")
    with device:
        model = models.load_model(name, CLASSES_5).eval()
    assert model.config.id2label == CLASSES_5
    assert model.config.label2id == {v: k for k, v in CLASSES_5.items()}
    if device.type == "cpu" or "segformer" not in name:
        with torch.no_grad():
            logits = models.segmentation_logits(model, torch.randn(1, 3, side, side, device=device))
        assert logits.shape == (1, 5, side // stride, side // stride)
        assert device.type == "meta" or torch.isfinite(logits).all()
    if millions is not None:
        assert models.count_parameters(model) == pytest.approx(millions * 1e6, rel=0.02)


def test_tiny_preset_is_small_and_b5_is_the_real_architecture():
    assert models.count_parameters(_tiny_student()) < 1_000_000
    config = models.MODEL_PRESETS["config:segformer-b5"].make_config()
    assert list(config.depths) == [3, 6, 40, 3]
    assert list(config.hidden_sizes) == [64, 128, 320, 512]
    assert config.decoder_hidden_size == 768
    assert models.MODEL_PRESETS["config:segformer-b0"].make_config().decoder_hidden_size == 256


def test_unknown_preset_lists_the_presets():
    with pytest.raises(models.ModelSourceError) as info:
        models.load_model("config:segformer-b9", CLASSES_5)
    assert "config:segformer-tiny" in str(info.value) and "config:upernet-convnext-tiny" in str(info.value)


def test_role_must_be_student_or_teacher():
    with pytest.raises(ValueError, match="role must be"):
        models.load_model("config:segformer-tiny", CLASSES_5, role="assistant")


def test_id2label_must_be_contiguous():
    with pytest.raises(ValueError, match="without gaps"):
        models.load_model("config:segformer-tiny", {0: "a", 2: "b"})


def test_load_teacher_is_frozen_in_eval_mode_and_keeps_its_batch_norm_statistics():
    with pytest.warns(UserWarning, match="random weights"):
        teacher = models.load_teacher("config:segformer-tiny", CLASSES_5)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    norms = [m for m in teacher.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(models.segmentation_logits(teacher, x), models.segmentation_logits(teacher, x))
    for norm, state in zip(norms, before):
        assert all(torch.equal(norm.state_dict()[k], v) for k, v in state.items())


def test_student_reload_same_classes_gives_identical_logits(saved):
    student, folder = saved
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same classes: no re-init warning
        reloaded = models.load_model(str(folder), CLASSES_5).eval()
    with torch.no_grad():
        assert torch.equal(models.segmentation_logits(student, x), models.segmentation_logits(reloaded, x))


def test_student_reload_with_other_class_count_warns_and_reinitialises_head(saved):
    student, folder = saved
    with pytest.warns(UserWarning, match="decode_head.classifier.weight do not fit .* re-initialised"):
        reloaded = models.load_model(str(folder), CLASSES_7).eval()
    assert reloaded.config.num_labels == 7 and reloaded.config.id2label == CLASSES_7
    with torch.no_grad():
        logits = models.segmentation_logits(reloaded, torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 7, 16, 16)
    # Everything but the classifier came from the checkpoint.
    _assert_same_weights(student, reloaded, prefix="", skip="decode_head.classifier")


def test_teacher_with_other_classes_is_rejected_naming_both_lists(saved):
    folder = str(saved[1])
    with pytest.raises(models.ClassMismatchError) as info:
        models.load_model(folder, CLASSES_7, role="teacher")
    message = str(info.value)
    assert "teacher classes" in message and "'traffic_light'" in message and "'class 6'" in message
    renamed = {**CLASSES_5, 4: "vegetation"}
    with pytest.raises(models.ClassMismatchError, match="'vegetation'"):
        models.load_model(folder, renamed, role="teacher")
    swapped = {**CLASSES_5, 0: "sidewalk", 1: "road"}  # the same names in another order
    with pytest.raises(models.ClassMismatchError, match="differ from the dataset's"):
        models.load_model(folder, swapped, role="teacher")


def test_teacher_class_names_compare_ignoring_case_and_separators(saved):
    spelled = {**CLASSES_5, 2: "Traffic Light"}
    teacher = models.load_teacher(str(saved[1]), spelled)
    assert teacher.config.id2label[2] == "Traffic Light"
    assert teacher.config.label2id["Traffic Light"] == 2
    assert not any(p.requires_grad for p in teacher.parameters())


def test_teacher_saved_under_the_old_segformer_class_name_is_accepted(saved, tmp_path):
    # nvidia/segformer-b*-finetuned-* configs list "SegformerForImageSegmentation"
    # and ADE names with stray spaces ("bed "); converted checkpoints often lack BatchNorm's step counters.
    shutil.copytree(saved[1], tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    assert any(key.endswith("num_batches_tracked") for key in weights)
    save_file({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")},
              tmp_path / "model.safetensors", metadata={"format": "pt"})
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["SegformerForImageSegmentation"]
    config["id2label"]["1"] = "sidewalk "
    config_file.write_text(json.dumps(config))
    teacher = models.load_teacher(str(tmp_path), CLASSES_5)
    assert teacher.config.id2label == CLASSES_5


def test_check_same_classes():
    models.check_same_classes(_tiny_student(), _tiny_student())
    with pytest.raises(models.ClassMismatchError) as info:
        models.check_same_classes(_tiny_student(), _tiny_student(CLASSES_7))
    assert "'sky'" in str(info.value) and "'class 6'" in str(info.value)
    # Placeholder names (a config saved without id2label) only need the same count.
    placeholders = {i: f"LABEL_{i}" for i in range(5)}
    models.check_same_classes(_tiny_student(placeholders), _tiny_student())
    with pytest.raises(models.ClassMismatchError):
        models.check_same_classes(_tiny_student(placeholders), _tiny_student(CLASSES_7))


def test_encoder_only_checkpoint_gets_a_fresh_head_and_cannot_be_a_teacher(tmp_path):
    # Stands in for nvidia/mit-b0: saved as an image classifier, no decode head.
    config = SegformerConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                             num_attention_heads=[1, 1, 2, 4], decoder_hidden_size=64, num_labels=3)
    torch.manual_seed(0)
    encoder = SegformerForImageClassification(config)
    encoder.save_pretrained(tmp_path)
    student = models.load_model(str(tmp_path), CLASSES_5)
    assert type(student).__name__ == "SegformerForSemanticSegmentation"
    assert models.segmentation_logits(student.eval(), torch.randn(1, 3, 64, 64)).shape == (1, 5, 16, 16)
    _assert_same_weights(encoder, student, prefix="segformer.", skip="decode_head")
    with pytest.raises(models.ClassMismatchError, match="no segmentation head"):
        models.load_model(str(tmp_path), CLASSES_5, role="teacher")


def _assert_fails_fast_with_advice(call, role="student"):
    start = time.monotonic()
    with pytest.raises(models.ModelSourceError) as info:
        call()
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    for advice in (f"the {role} ", "not a local folder", "hf auth login", "local path", "config:segformer-tiny"):
        assert advice in message
    assert "\n" not in message
    return message


def test_hub_id_fails_fast_offline():
    message = _assert_fails_fast_with_advice(
        lambda: models.load_model("nvidia/segformer-b0-finetuned-ade-512-512", CLASSES_5, role="teacher"), "teacher")
    assert "HF_HUB_OFFLINE" in message
    _assert_fails_fast_with_advice(lambda: models.load_image_processor("nvidia/mit-b0"))
    # An id the Hub could never hold says so, offline too.
    message = _assert_fails_fast_with_advice(lambda: models.load_model("bad id!", CLASSES_5))
    assert "Repo id must use alphanumeric chars" in message and "HF_HUB_OFFLINE" not in message


def test_a_hub_failure_other_than_offline_mode_passes_on_the_libraries_reason(monkeypatch):
    # Only the wording is checked here: huggingface_hub is still offline underneath, so it answers at once
    # (with no network it answers after its own retries, about 25 s).
    monkeypatch.setattr(models, "hub_constants", types.SimpleNamespace(HF_HUB_OFFLINE=False))
    message = _assert_fails_fast_with_advice(lambda: models.load_model("nvidia/mit-b0", CLASSES_5))
    assert "couldn't connect" in message and "HF_HUB_OFFLINE" not in message


def test_bad_local_paths_are_explained(saved, tmp_path):
    with pytest.raises(models.ModelSourceError, match="the student './no/such/checkpoint' looks like a path but no "
                                                      "such folder exists"):
        models.load_model("./no/such/checkpoint", CLASSES_5)
    with pytest.raises(models.ModelSourceError, match="no config.json"):
        models.load_model(str(tmp_path), CLASSES_5)
    with pytest.raises(models.ModelSourceError, match="is a file: pass the folder"):
        models.load_model(str(saved[1] / "config.json"), CLASSES_5)
    with pytest.raises(models.ModelSourceError, match="the teacher .* no config.json"):
        models.load_image_processor(str(tmp_path), role="teacher")


# What each damage does to a saved folder, and the words the one-line error must hold.
DAMAGE = {
    "truncated_weights": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    "garbage_weights": ("model.safetensors", lambda p: p.write_bytes(random.Random(0).randbytes(p.stat().st_size))),
    "malformed_config": ("config.json", lambda p: p.write_text('{"model_type": "segformer", ')),
    "no_weights": ("model.safetensors", lambda p: p.unlink()),
    "malformed_processor": ("preprocessor_config.json", lambda p: p.write_text('{"image_processor_type": ')),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_damaged_folder_is_one_line_naming_the_role_the_folder_and_the_file(saved, tmp_path, case, role):
    folder = shutil.copytree(saved[1], tmp_path / case)
    models.load_image_processor("config:segformer-tiny").save_pretrained(folder)
    file, damage = DAMAGE[case]
    damage(folder / file)
    with pytest.raises(models.ModelSourceError) as info:
        models.load_model(str(folder), CLASSES_5, role=role)
        models.load_image_processor(str(folder), role=role)  # the model loads: then its processor is damaged
    message = str(info.value)
    assert message.startswith(f"the {role} '{folder}' ") and "save_pretrained" in message and "\n" not in message
    assert ("holds no weights" if case == "no_weights" else f"damaged or incomplete {file}") in message


def test_segmentation_logits_rejects_non_image_batches():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        models.segmentation_logits(_tiny_student(), torch.randn(3, 64, 64))


@pytest.mark.parametrize(
    "name, mean, std, flips",
    [
        ("config:segformer-b0", models.IMAGENET_MEAN, models.IMAGENET_STD, False),
        ("config:upernet-convnext-tiny", models.IMAGENET_MEAN, models.IMAGENET_STD, False),
        ("config:deeplabv3-mobilenetv2", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
        ("config:mobilevit-s", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), True),
    ],
)
def test_processor_round_trip_and_mean_std(tmp_path, name, mean, std, flips):
    processor = models.load_image_processor(name)
    processor.save_pretrained(tmp_path)
    reloaded = AutoImageProcessor.from_pretrained(tmp_path)
    for proc in (processor, reloaded):
        got_mean, got_std = models.processor_mean_std(proc)
        assert got_mean == pytest.approx(mean) and got_std == pytest.approx(std)
        assert models.processor_flips_channels(proc) is flips

    # What the real processor produces equals the documented recipe on [0, 1] RGB input.
    rgb = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
    produced = reloaded(images=rgb, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
    x01 = torch.from_numpy(rgb).permute(2, 0, 1).float()[None] / 255
    expected = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if flips:
        expected = expected.flip(1)
    assert torch.allclose(produced.float(), expected, atol=1e-4)
    # The adapter does the same on the device from the uint8 batch the data pipeline makes.
    adapted = models.make_input_adapter(reloaded)(torch.from_numpy(rgb).permute(2, 0, 1)[None])
    assert adapted.dtype == torch.float32 and torch.allclose(adapted, produced.float(), atol=1e-4)


def test_folder_without_processor_falls_back_to_family_default(saved):
    with pytest.warns(UserWarning, match="default processor"):
        processor = models.load_image_processor(str(saved[1]))
    assert models.processor_mean_std(processor)[0] == pytest.approx(models.IMAGENET_MEAN)


def test_input_adapter_normalizes_uint8_for_each_model_and_refuses_floats():
    segformer = models.load_image_processor("config:segformer-b0")
    mobilevit = models.load_image_processor("config:mobilevit-s")
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    x01 = batch.float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in models.processor_mean_std(segformer))
    # Student and teacher each get their own convention from the same uint8 batch.
    assert torch.allclose(models.make_input_adapter(segformer)(batch), (x01 - mean) / std, atol=1e-5)
    assert torch.allclose(models.make_input_adapter(mobilevit)(batch), x01.flip(1), atol=1e-6)
    with pytest.raises(ValueError, match=r"must be uint8 \(B, 3, H, W\).*float32"):
        models.make_input_adapter(segformer)(x01)


def test_smallest_input_side_is_found_by_dry_forward_passes():
    segformer = models.load_student("config:segformer-tiny", {0: "a", 1: "b"}).train()
    assert models.smallest_input_side(segformer) == 29  # its 8x8 spatial-reduction convolution, at 1/4 scale
    assert segformer.training  # given back in its mode
    models.segmentation_logits(segformer.eval(), torch.zeros(1, 3, 29, 29))
    with pytest.raises(RuntimeError):
        models.segmentation_logits(segformer, torch.zeros(1, 3, 28, 28))
    assert models.smallest_input_side(models.load_student("config:deeplabv3-mobilenetv2", {0: "a", 1: "b"})) == 1


def test_one_sample_training_error_names_batchnorm_after_pooling_and_changes_nothing():
    deeplab = models.load_model("config:deeplabv3-mobilenetv2", CLASSES_5, role="student").eval()
    buffers = [b.clone() for b in deeplab.buffers()]
    rng = torch.get_rng_state()
    problem = models.one_sample_training_error(deeplab, 32)
    assert problem is not None and "more than 1 value per channel" in problem and "\n" not in problem
    # Running statistics, the random stream and the mode are as before: training starts as if unchecked.
    assert all(torch.equal(a, b) for a, b in zip(buffers, deeplab.buffers()))
    assert torch.equal(rng, torch.get_rng_state()) and not deeplab.training
    # No BatchNorm (SegFormer uses LayerNorm; its decode head's BatchNorm sees many pixels): trains at batch 1.
    assert models.one_sample_training_error(models.load_model("config:segformer-tiny", CLASSES_5, role="student"),
                                            32) is None


def test_a_mobilenet_v2_students_batchnorm_keeps_its_running_statistics():
    # transformers' MobileNetV2 sets momentum 0.997 (TensorFlow's decay, PyTorch's new-batch weight): one training
    # batch would replace the running statistics. The student's BatchNorms weigh the new batch 0.1, as torchvision.
    student = models.load_student("config:deeplabv3-mobilenetv2", {0: "a", 1: "b", 2: "c"})
    norms = [m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.momentum == 0.1 for m in norms)
    first, seen = norms[0], []
    first.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].mean(dim=(0, 2, 3))))
    before = first.running_mean.clone()
    student.train()
    with torch.no_grad():
        models.segmentation_logits(student, torch.randn(2, 3, 33, 33) * 5)
    assert torch.allclose(first.running_mean, 0.9 * before + 0.1 * seen[0], atol=1e-6)
    segformer = models.load_student("config:segformer-tiny", {0: "a", 1: "b"})  # other models are left as they are
    assert all(m.momentum == 0.1 for m in segformer.modules() if isinstance(m, torch.nn.BatchNorm2d))
