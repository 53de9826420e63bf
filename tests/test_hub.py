"""Tests for utils_hub.py: the export folder a run leaves for the Hub, its model card, pictures and push.

The end-to-end tests share one tiny CamVid run (8 training images, 2 steps, 4 validation images, a randomly
initialised config: teacher) and read what it wrote with huggingface_hub's and transformers' own readers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import CAMVID, ROOT, TINY

import data
import train_icsd
import utils_hub
import utils_training
HUB_ID = "someone/camvid-tiny-student"
FAKE_TOKEN = "hf_" + "HubExportFakeToken0123456789ab"
EXPORTED = {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "predictions.png",
            "ics.png", "all_results.json"}
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny AICSD run on CamVid with tracking, a checkpoint and a log file written inside the output folder."""
    out = tmp_path_factory.mktemp("hub") / "camvid-run"
    args = ["--dataset_name", CAMVID, "--student_model_name_or_path", TINY, "--teacher_model_name_or_path", TINY,
            "--distill", "aicsd", "--eval_teacher", "--max_train_samples", 8, "--max_eval_samples", 4,
            "--max_train_steps", 2, "--crop_size", 64, "--per_device_train_batch_size", 2,
            "--per_device_eval_batch_size", 2, "--dataloader_num_workers", 0, "--output_dir", out,
            "--with_tracking", "--report_to", "tensorboard", "--checkpointing_steps", 2,
            "--log_file", out / "log.jsonl", "--hub_model_id", HUB_ID]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_TOKEN=FAKE_TOKEN, OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, str(ROOT / "train_icsd.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# 1. Metadata the Hub reads
# ---------------------------------------------------------------------------------------------------------
@needs_camvid
def test_card_metadata_is_read_by_huggingface_hub_and_matches_the_results(export):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    meta = metadata_load(export / "README.md")
    res = results(export)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-segmentation"
    assert {"knowledge-distillation", "semantic-segmentation", "aicsd"} <= set(meta["tags"])
    # The licence comes from the dataset card (the run passed no --hub_license).
    dataset_card = metadata_load(CAMVID / "README.md")
    assert meta["license"] == dataset_card["license"] == "cc-by-nc-4.0"
    assert "datasets" not in meta  # a local folder is no Hub dataset
    assert "base_model" not in meta  # the student started from a config: preset, not a Hub model

    name, evals = model_index_to_eval_results(meta["model-index"])
    assert name == "camvid-tiny-student"
    assert {(e.task_type, e.dataset_name, e.dataset_type, e.dataset_split) for e in evals} == {
        ("image-segmentation", dataset_card["pretty_name"], "camvid", "validation")}
    assert {e.metric_type: e.metric_value for e in evals} == pytest.approx(
        {k: res[f"eval_{k}"] for k in ("mean_iou", "mean_accuracy", "overall_accuracy")}, abs=1e-6)
    card = ModelCard.load(export / "README.md")  # the full parser: the same values through ModelCardData
    assert card.data.license == "cc-by-nc-4.0" and len(card.data.eval_results) == 3
    assert card.data.eval_results[0].metric_value == pytest.approx(res["eval_mean_iou"], abs=1e-6)


def _args(**overrides) -> argparse.Namespace:
    args = train_icsd.parse_args(["--dataset", "synthetic", "--student_model_name_or_path", TINY])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _facts(name: str) -> utils_hub.ModelFacts:
    return utils_hub.ModelFacts(name=name, architecture="SegformerForSemanticSegmentation", num_parameters=3_720_000)


def _synthetic_info():
    return data.load_splits(data.DataOptions("synthetic", max_train_samples=2, max_eval_samples=2))[2]


def _results(num_labels: int, teacher: bool = False) -> dict:
    res = {"eval_mean_iou": 0.41, "eval_mean_accuracy": 0.52, "eval_overall_accuracy": 0.77,
           "eval_per_category_iou": [0.4] * num_labels, "train_steps": 5000, "num_processes": 2}
    if teacher:
        res.update(teacher_eval_mean_iou=0.6, teacher_eval_mean_accuracy=0.7, teacher_eval_overall_accuracy=0.9,
                   teacher_eval_per_category_iou=[0.6] * num_labels)
    return res


def test_card_names_hub_data_base_model_and_licence_flag_in_its_metadata():
    from huggingface_hub import ModelCard

    info = _synthetic_info()
    dataset = utils_hub.DatasetFacts(name="Road scenes", type="someone/road-scenes", hub_id="someone/road-scenes",
                                     split="validation", num_eval_images=64, card={"license": "cc-by-4.0"})
    args = _args(distill="kd", teacher_model_name_or_path="someone/big-teacher", hub_license="apache-2.0",
                 student_model_name_or_path="nvidia/mit-b0", hub_model_id=None)
    text = utils_hub.write_model_card(args, info, _results(info.num_labels), student=_facts("nvidia/mit-b0"),
                                      teacher=_facts("someone/big-teacher"), dataset=dataset)
    card = ModelCard(text)
    assert card.data.datasets == ["someone/road-scenes"] and card.data.base_model == "nvidia/mit-b0"
    assert card.data.license == "apache-2.0"  # the flag wins over the dataset card
    assert set(card.data.tags) == {"knowledge-distillation", "semantic-segmentation", "aicsd", "kd"}
    assert card.data.eval_results[0].dataset_type == "someone/road-scenes"
    # No Hub id: a descriptive title, never the output folder's name; the teacher is linked, not evaluated.
    assert text.split("\n# ")[1].splitlines()[0] == "Segformer student for Road scenes, distilled with KD"
    assert "[`someone/big-teacher`](https://huggingface.co/someone/big-teacher)" in text
    assert "| mIoU | not evaluated | 41.00 |" in text
    assert "## Limitations" in text and "very short" not in text and "randomly initialised" not in text


def test_licence_comes_from_the_flag_then_the_dataset_card_else_a_note():
    facts = utils_hub.DatasetFacts(name="D", type="d", hub_id=None, split="val", num_eval_images=1,
                                   card={"license": ["mit"]})
    assert utils_hub.resolve_license("apache-2.0", facts)[0] == "apache-2.0"
    assert utils_hub.resolve_license(None, facts)[0] == "mit"
    licence, note = utils_hub.resolve_license(None, utils_hub.DatasetFacts("D", "d", None, "val", 1, card={}))
    assert licence is None and "No licence" in note and "--hub_license" in note
    info = _synthetic_info()
    text = utils_hub.write_model_card(_args(), info, _results(info.num_labels), student=_facts(TINY), teacher=None,
                                      dataset=utils_hub.DatasetFacts("D", "d", None, "val", 1, card={}))
    assert "license:" not in text.split("\n---\n")[0] and "No licence is set" in text


# ---------------------------------------------------------------------------------------------------------
# 2. The card a person reads: no path, no token, a snippet that runs
# ---------------------------------------------------------------------------------------------------------
@needs_camvid
def test_card_text_describes_the_run_and_the_folder_holds_no_path_or_token(export):
    text = (export / "README.md").read_text()
    res = results(export)
    assert "\n# camvid-tiny-student\n" in text
    assert ("Its teacher was a randomly initialised `config:segformer-tiny` preset "
            "(SegformerForSemanticSegmentation" in text)
    assert f"scores mIoU {100 * res['teacher_eval_mean_iou']:.2f} % on the same images" in text
    assert "| metric (%) | teacher | student |" in text
    assert f"| mIoU | {100 * res['teacher_eval_mean_iou']:.2f} | {100 * res['eval_mean_iou']:.2f} |" in text
    names = json.loads((CAMVID / "id2label.json").read_text()).values()
    assert all(f"| {name} | " in text for name in names)  # per-class IoU
    assert "The teacher was randomly initialised" in text and "The run was very short (2 optimizer steps)" in text
    assert "![" in text and "(predictions.png)" in text and "(ics.png)" in text
    command = re.search(r"```bash\n(.*)\n```", text).group(1)
    assert command.startswith("accelerate launch train_icsd.py --dataset_name path/to/camvid ")
    assert "--output_dir path/to/camvid-run" in command and "--log_file path/to/log.jsonl" in command
    # Nothing in the folder names this machine's paths or the token.
    for path in sorted(p for p in export.iterdir() if p.is_file()):
        blob = path.read_bytes()
        for secret in (str(export.parent), str(ROOT), str(CAMVID), str(CAMVID.resolve()), FAKE_TOKEN):
            assert secret.encode() not in blob, (path.name, secret)


def test_redaction_masks_tokens_and_reduces_absolute_paths_to_placeholders():
    argv = ["/home/alice/aicsd/train_icsd.py", "--dataset_name", "/data/sets/camvid", "--output_dir=/tmp/x/run1",
            "--teacher_model_name_or_path", "hf_abcdefghijklmnopqrstuvwxyz123456", "--id2label", "rel/id2label.json",
            "--hub_model_id", "someone/model"]
    command = utils_hub.reproduce_command(argv)
    assert command == ("accelerate launch train_icsd.py --dataset_name path/to/camvid --output_dir=path/to/run1 "
                       "--teacher_model_name_or_path 'hf_***' "
                       "--id2label rel/id2label.json --hub_model_id someone/model")
    assert utils_hub._redact(["C:\\Users\\bob\\data", "~/models/teacher"]) == ["path/to/data", "path/to/teacher"]


@needs_camvid
def test_usage_snippet_runs_as_written(export, tmp_path):
    # from_pretrained takes a folder before a Hub id: a folder named like the repo stands in for the Hub.
    (tmp_path / "someone").mkdir()
    (tmp_path / HUB_ID).symlink_to(export, target_is_directory=True)
    snippet = re.search(r"```python\n(.*?)```", (export / "README.md").read_text(), re.S).group(1)
    assert f'model="{HUB_ID}"' in snippet
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    names = set(json.loads((CAMVID / "id2label.json").read_text()).values())
    assert lines and all(line.rsplit(" ", 2)[0] in names and line.endswith("(480, 360)") for line in lines)


# ---------------------------------------------------------------------------------------------------------
# 3. Pictures
# ---------------------------------------------------------------------------------------------------------
def _rows(teacher: bool, num_labels: int = 3) -> list:
    label = np.array([[0, 1, 2, 255]] * 4)
    pred = np.array([[2, 1, 0, 0]] * 4)
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    ics = np.eye(num_labels)[::-1].copy()
    return [utils_hub.PictureRow(index=i, image=image, label=label, student=pred, student_ics=ics,
                                 teacher=label.clip(0, 2) if teacher else None,
                                 teacher_ics=ics * 0.5 if teacher else None)
            for i in (0, 7)]


def test_predictions_picture_shows_masks_in_the_palette_and_drops_the_teacher_column_without_one():
    id2label = {0: "sky", 1: "road", 2: "car"}
    palette = [tuple(c) for c in utils_hub.class_palette(3)]
    assert len(set(palette)) == 3 and utils_hub.IGNORE_COLOUR not in palette
    with_teacher = utils_hub.draw_predictions(_rows(teacher=True), id2label, cell_width=40)
    alone = utils_hub.draw_predictions(_rows(teacher=False), id2label, cell_width=40)
    assert with_teacher.size[0] == 4 * 40 + 5 * 6 and alone.size[0] == 3 * 40 + 4 * 6
    # Ground truth cell of the first row (column 1, rows start below a 24 px header): 10 px per label column.
    x0, y0 = 6 + 40 + 6, 24
    assert [with_teacher.getpixel((x0 + 5 + 10 * k, y0 + 30)) for k in range(4)] == [*palette, utils_hub.IGNORE_COLOUR]
    # The student column is the last one in both layouts.
    for picture, columns in ((with_teacher, 4), (alone, 3)):
        xs = 6 + (columns - 1) * 46
        assert [picture.getpixel((xs + 5 + 10 * k, y0 + 30)) for k in range(3)] == [palette[2], palette[1], palette[0]]
    assert with_teacher.size[1] > 24 + 2 * (40 + 6)  # the legend below the rows


def test_ics_picture_puts_teacher_and_student_side_by_side_or_the_student_alone():
    id2label = {0: "sky", 1: "road", 2: "car"}
    both = utils_hub.draw_ics(_rows(teacher=True), id2label, temperature=1.0)
    alone = utils_hub.draw_ics(_rows(teacher=False), id2label, temperature=1.0)
    assert both.size[0] == 2 * alone.size[0] - 10  # two panels of the same width
    assert np.allclose(utils_hub.mean_ics(_rows(teacher=True), "teacher"), np.eye(3)[::-1] * 0.5)
    assert utils_hub.mean_ics(_rows(teacher=False), "teacher") is None


def test_picture_indices_are_fixed_and_spread_over_the_split():
    assert utils_hub.picture_indices(101, 4) == [0, 33, 67, 100]
    assert utils_hub.picture_indices(3, 4) == [0, 1, 2] and utils_hub.picture_indices(10, 0) == []


@needs_camvid
def test_exported_pictures_are_embedded_and_drawn_from_the_validation_images(export):
    predictions = Image.open(export / "predictions.png")
    # 4 rows of 480x360 images scaled to 320x240, four columns (the run had a teacher), legend below.
    assert predictions.size[0] == 4 * 320 + 5 * 6 and predictions.size[1] > 24 + 4 * (240 + 6)
    ground_truth = np.asarray(predictions.convert("RGB"))[24:24 + 240, 6 + 326:6 + 326 + 320].reshape(-1, 3)
    allowed = {tuple(c) for c in utils_hub.class_palette(11)} | {utils_hub.IGNORE_COLOUR}
    assert {tuple(c) for c in np.unique(ground_truth, axis=0)} <= allowed
    assert Image.open(export / "ics.png").size[0] > 600  # two panels


# ---------------------------------------------------------------------------------------------------------
# 4. The pipeline scores what the card says
# ---------------------------------------------------------------------------------------------------------
@needs_camvid
def test_transformers_pipeline_over_the_validation_images_scores_the_cards_numbers(export):
    from transformers import pipeline

    processor_config = json.loads((export / "preprocessor_config.json").read_text())
    assert processor_config["do_resize"] is False  # whole images, as evaluation fed them
    _, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(CAMVID), max_eval_samples=4))
    segmenter = pipeline("image-segmentation", model=str(export))
    cm = torch.zeros(info.num_labels, info.num_labels, dtype=torch.long)
    for i in range(len(evaluation)):
        label = data.decode_label(evaluation[i]["label"])
        pred = np.full(label.shape, -1)
        for segment in segmenter(Image.fromarray(data.decode_image(evaluation[i]["image"]))):
            pred[np.asarray(segment["mask"]) > 0] = info.label2id[segment["label"]]  # one binary mask per class
        assert (pred >= 0).all()
        cm += utils_training.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), info.num_labels, 255)
    ours, res = utils_training.metrics_from_confusion(cm), results(export)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert ours[key] == pytest.approx(res[f"eval_{key}"], abs=1e-4), key


def test_saved_processor_reproduces_evaluation_geometry_for_every_model_family(tmp_path):
    from transformers import AutoImageProcessor

    import models

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (360, 480, 3), dtype=np.uint8))
    for preset in ("config:segformer-tiny", "config:deeplabv3-mobilenetv2", "config:mobilevit-s"):
        original = models.load_image_processor(preset)
        for short_side, shape in ((None, (360, 480)), (240, (240, 320))):
            folder = tmp_path / f"{preset[7:]}-{short_side}"
            utils_hub.evaluation_processor(original, short_side).save_pretrained(folder)
            reloaded = AutoImageProcessor.from_pretrained(folder)
            pixels = reloaded(image, return_tensors="pt")["pixel_values"]
            assert tuple(pixels.shape[-2:]) == shape, (preset, short_side)
            # Normalisation and channel order are the model's own.
            assert models.processor_mean_std(reloaded) == models.processor_mean_std(original)
            assert models.processor_flips_channels(reloaded) == models.processor_flips_channels(original)


# ---------------------------------------------------------------------------------------------------------
# 5. A clean export folder and the push
# ---------------------------------------------------------------------------------------------------------
@needs_camvid
def test_export_folder_keeps_logs_and_checkpoints_apart_and_every_file_readable(export):
    top = {p.name for p in export.iterdir()}
    # No tracker folder among the exported files; run.json records the run that owns the folder.
    assert top == EXPORTED | {"runs", "checkpoints", "log.jsonl", "run.json"}
    assert list((export / "runs").rglob("events.out.tfevents.*"))
    umask = os.umask(0)
    os.umask(umask)
    for path in export.iterdir():
        if path.is_file():
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name  # as save_pretrained's config.json
    assert utils_hub.upload_list(export) == sorted(EXPORTED)


@needs_camvid
def test_push_uploads_the_model_processor_card_pictures_and_results_only(export, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            calls["create"] = (repo_id, exist_ok, private)
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, *, repo_id, folder_path, commit_message, allow_patterns, ignore_patterns):
            files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            calls["upload"] = (repo_id, sorted(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                                     ignore_patterns=ignore_patterns)))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert utils_hub.push_to_hub(export, HUB_ID, private=True) == HUB_ID
    assert calls["create"] == (HUB_ID, True, True)
    assert calls["upload"] == (HUB_ID, sorted(EXPORTED))


def test_push_to_a_bare_name_rewrites_the_snippet_with_the_namespace_the_hub_gives(tmp_path, monkeypatch):
    import huggingface_hub

    snippet = 'pipeline("image-segmentation", model="my-student")'
    (tmp_path / "README.md").write_text(f"# my-student\n\n```python\n{snippet}\n```\n")

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            return type("Repo", (), {"repo_id": f"someone/{repo_id}"})()

        def upload_folder(self, **kwargs):
            pass

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert utils_hub.push_to_hub(tmp_path, "my-student") == "someone/my-student"
    assert 'model="someone/my-student"' in (tmp_path / "README.md").read_text()
    assert "# my-student" in (tmp_path / "README.md").read_text()
