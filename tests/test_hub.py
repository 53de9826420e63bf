"""Tests for utils_hub.py and pictures.py: the export folder a run leaves for the Hub, its model card, pictures,
the checks before a push, and the push.

The end-to-end tests share two tiny runs, started together: AICSD on CamVid (4 training images, 2 steps, 2
validation images, a randomly initialised config: teacher, tracking, a checkpoint, a log file and a Hub id), and
the student alone on synthetic scenes without a Hub id or a licence. What they wrote is read back with
huggingface_hub's and transformers' own readers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from helpers import CAMVID, ROOT, TINY

import data
import pictures
import train_icsd
import utils_hub
import utils_training

HUB_ID = "someone/camvid-tiny-student"
FAKE_TOKEN = "hf_" + "HubExportFakeToken0123456789ab"
EXPORTED = {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "predictions.png",
            "ics.png", "all_results.json"}
NO_LICENCE = "the model card states no licence"
needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both runs, side by side: {"camvid": (folder, stderr), "bare": (folder, stderr)}."""
    root = tmp_path_factory.mktemp("hub")
    common = ["--max_train_steps", 2, "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 2,
              "--dataloader_num_workers", 0]
    args = {"bare": ["--dataset", "synthetic", "--student_model_name_or_path", TINY, "--distill", "none",
                     "--max_train_samples", 2, "--max_eval_samples", 1, "--crop_size", 32, "--num_pictures", 1]}
    if CAMVID.is_dir():
        out = root / "camvid-run"
        args["camvid"] = ["--dataset_name", CAMVID, "--student_model_name_or_path", TINY,
                          "--teacher_model_name_or_path", TINY, "--distill", "aicsd", "--eval_teacher",
                          "--max_train_samples", 4, "--max_eval_samples", 2, "--crop_size", 64,
                          "--with_tracking", "--report_to", "tensorboard", "--checkpointing_steps", 2,
                          "--log_file", out / "log.jsonl", "--hub_model_id", HUB_ID]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_TOKEN=FAKE_TOKEN, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(
        [sys.executable, str(ROOT / "train_icsd.py"), *map(str, a + common + ["--output_dir", root / f"{name}-run"])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name, a in args.items()}
    done = {}
    for name, proc in procs.items():
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
        done[name] = (root / f"{name}-run", stderr)
    return done


@pytest.fixture(scope="module")
def export(runs) -> Path:
    return runs["camvid"][0]


@pytest.fixture(scope="module")
def bare(runs) -> Path:
    return runs["bare"][0]


def results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def _args(**overrides) -> argparse.Namespace:
    args = train_icsd.parse_args(["--dataset", "synthetic", "--student_model_name_or_path", TINY])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def _facts(name: str, num_parameters: int = 3_720_000) -> utils_hub.ModelFacts:
    return utils_hub.ModelFacts(name=name, architecture="SegformerForSemanticSegmentation",
                                num_parameters=num_parameters)


def _dataset(card: dict | None = None, **kw) -> utils_hub.DatasetFacts:
    return utils_hub.DatasetFacts(name="D", type="d", hub_id=None, split="val", num_eval_images=1, card=card or {},
                                  **kw)


def _synthetic_info():
    return data.load_splits(data.DataOptions("synthetic", max_train_samples=2, max_eval_samples=2))[2]


def _results(num_labels: int, teacher: bool = False) -> dict:
    res = {"eval_mean_iou": 0.41, "eval_mean_accuracy": 0.52, "eval_overall_accuracy": 0.77,
           "eval_per_category_iou": [0.4] * num_labels, "train_steps": 5000, "num_processes": 2}
    if teacher:
        res.update(teacher_eval_mean_iou=0.6, teacher_eval_mean_accuracy=0.7, teacher_eval_overall_accuracy=0.9,
                   teacher_eval_per_category_iou=[0.6] * num_labels)
    return res


def _card(args=None, res=None, **facts) -> huggingface_hub.ModelCard:
    info = _synthetic_info()
    facts.setdefault("student", _facts(TINY))
    facts.setdefault("teacher", None)
    facts.setdefault("dataset", _dataset())
    return utils_hub.model_card(args or _args(), info, res or _results(info.num_labels), **facts)


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


def test_card_names_hub_data_base_model_and_licence_flag_in_its_metadata():
    dataset = utils_hub.DatasetFacts(name="Road scenes", type="someone/road-scenes", hub_id="someone/road-scenes",
                                     split="validation", num_eval_images=64, card={"license": "cc-by-4.0"})
    args = _args(distill="kd", teacher_model_name_or_path="someone/big-teacher", hub_license="apache-2.0",
                 student_model_name_or_path="nvidia/mit-b0", hub_model_id=None)
    text = str(_card(args, student=_facts("nvidia/mit-b0"), teacher=_facts("someone/big-teacher"), dataset=dataset))
    card = huggingface_hub.ModelCard(text)  # the text as the Hub reads it back
    assert card.data.datasets == ["someone/road-scenes"] and card.data.base_model == "nvidia/mit-b0"
    assert card.data.license == "apache-2.0"  # the flag wins over the dataset card
    assert set(card.data.tags) == {"knowledge-distillation", "semantic-segmentation", "aicsd", "kd"}
    assert card.data.eval_results[0].dataset_type == "someone/road-scenes"
    # No Hub id: a descriptive title, never the output folder's name; the teacher is linked, not evaluated.
    assert text.split("\n# ")[1].splitlines()[0] == "Segformer student for Road scenes, distilled with KD"
    assert "[`someone/big-teacher`](https://huggingface.co/someone/big-teacher)" in text
    assert "| mIoU | not evaluated | 41.00 |" in text and "| sky | – | 40.00 |" in text
    assert "## Limitations" in text and "very short" not in text and "randomly initialised" not in text
    assert "Licence: `apache-2.0` (set with `--hub_license`)." in text


def test_licence_comes_from_the_flag_then_the_dataset_card_else_a_note():
    carried = _card(dataset=_dataset({"license": ["mit"]}))
    assert carried.data.license == "mit" and "Licence: `mit`, carried over from the dataset card of D" in carried.text
    several = _card(dataset=_dataset({"license": ["mit", "cc-by-4.0"]}))
    assert several.data.license is None and "lists several (mit, cc-by-4.0)" in several.text
    for card in (several, _card()):
        assert "license:" not in str(card).split("\n---\n")[0] and "No licence is set" in card.text
        assert "--hub_license" in card.text


@needs_camvid
def test_the_licence_warning_is_printed_once_per_run(runs):
    assert runs["bare"][1].count(NO_LICENCE) == 1  # no --hub_license, no dataset card
    assert NO_LICENCE not in runs["camvid"][1]  # CamVid's card names one


# ---------------------------------------------------------------------------------------------------------
# 2. The card a person reads: no path, no token, a snippet that runs, the speed sentence
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
    # The speed sentence, measured by the run on this machine: both models timed on the same validation image
    # (the same size here, so either may time faster).
    speed = re.search(r"On CPU \((?:1 thread|[2-9]\d* threads|1\d+ threads)\) \((\d+)x(\d+) px images\) the student takes ([\d.]+) ms per image "
                      r"\(0\.46 M parameters\), its teacher ([\d.]+) ms \(0\.46 M parameters\): "
                      r"\*\*([\d.]+)× (faster|slower)", text)
    assert speed and float(speed.group(3)) > 0 and float(speed.group(4)) > 0, text[text.find("### Speed"):][:400]
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
    assert utils_hub.reproduce_command(["x.py", "C:\\Users\\bob\\data", "~/models/teacher"]) == (
        "accelerate launch x.py path/to/data path/to/teacher")


def _run_snippet(card_text: str, cwd: Path, monkeypatch, capsys) -> list[str]:
    """Run the card's python snippet exactly as written, from ``cwd``; its printed lines."""
    snippet = re.search(r"```python\n(.*?)```", card_text, re.DOTALL).group(1)
    monkeypatch.chdir(cwd)
    capsys.readouterr()
    exec(compile(snippet, "README.md", "exec"), {})
    return capsys.readouterr().out.strip().splitlines()


@needs_camvid
def test_usage_snippet_runs_as_written_with_the_hub_id(export, tmp_path, monkeypatch, capsys):
    # from_pretrained takes a folder before a Hub id: a folder named like the repo stands in for the Hub.
    (tmp_path / "someone").mkdir()
    (tmp_path / HUB_ID).symlink_to(export, target_is_directory=True)
    text = (export / "README.md").read_text()
    assert f'pipeline("image-segmentation", model="{HUB_ID}")' in text
    lines = _run_snippet(text, tmp_path, monkeypatch, capsys)
    names = set(json.loads((CAMVID / "id2label.json").read_text()).values())
    assert lines and all(line.rsplit(" ", 2)[0] in names and line.endswith("(480, 360)") for line in lines)


def test_usage_snippet_without_a_hub_id_says_where_the_folder_goes_and_runs_inside_it(bare, monkeypatch, capsys):
    text = (bare / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    # Never a path/to/... placeholder or a relative --output_dir, which transformers would take for a Hub id.
    assert "path/to" not in snippet and 'model=".")' in snippet
    assert "put that folder's path in its place" in snippet
    lines = _run_snippet(text, bare, monkeypatch, capsys)
    assert lines and all(line.endswith("(128, 128)") for line in lines)


def test_speed_sentence_compares_student_and_teacher_when_both_are_timed_and_scored():
    info = _synthetic_info()
    kw = {"student": _facts(TINY, 460_000), "teacher": _facts("someone/big", 27_350_000)}
    res = {**_results(info.num_labels, teacher=True), "eval_mean_iou": 0.46, "teacher_eval_mean_iou": 0.5}
    timing = utils_hub.InferenceTiming(device="NVIDIA H100 80GB HBM3", student_ms=2.0, teacher_ms=10.2,
                                       image_size=(360, 480))
    text = _card(res=res, timing=timing, **kw).text
    assert ("### Speed\n\nOn NVIDIA H100 80GB HBM3 (480x360 px images) the student takes 2.0 ms per image "
            "(0.46 M parameters), its teacher 10.2 ms (27.35 M parameters): "
            "**5.1× faster than its teacher at 92% of its mIoU**.\n") in text
    alone = _card(res=res, timing=utils_hub.InferenceTiming(device="CPU", student_ms=31.25), **kw).text
    assert "On CPU the student takes 31.2 ms per image (0.46 M parameters).\n" in alone and "faster" not in alone
    unscored = {k: v for k, v in res.items() if not k.startswith("teacher_")}
    assert "faster" not in _card(res=unscored, timing=timing, **kw).text  # the teacher's mIoU is unknown
    # A student slower than its teacher (a timing on a busy machine, or a wider student) is said so, not "0.3×".
    slower = utils_hub.InferenceTiming(device="CPU", student_ms=30.0, teacher_ms=10.0)
    assert "**3.0× slower than its teacher at 92% of its mIoU**" in _card(res=res, timing=slower, **kw).text
    assert "### Speed" not in _card(res=res, **kw).text
    with pytest.raises(ValueError, match="inference times must be > 0 ms"):
        utils_hub.InferenceTiming(device="CPU", student_ms=0.0)


# ---------------------------------------------------------------------------------------------------------
# 3. Pictures
# ---------------------------------------------------------------------------------------------------------
def _rows(teacher: bool, num_labels: int = 3) -> list:
    label = np.array([[0, 1, 2, 255]] * 4)
    pred = np.array([[2, 1, 0, 0]] * 4)
    image = np.full((4, 4, 3), 100, dtype=np.uint8)
    ics = np.eye(num_labels)[::-1].copy()
    return [pictures.PictureRow(index=i, image=image, label=label, student=pred, student_ics=ics,
                                teacher=label.clip(0, 2) if teacher else None,
                                teacher_ics=ics * 0.5 if teacher else None)
            for i in (0, 7)]


def test_predictions_picture_shows_masks_in_the_palette_and_drops_the_teacher_column_without_one():
    id2label = {0: "sky", 1: "road", 2: "car"}
    palette = [tuple(c) for c in pictures.class_palette(3)]
    assert len(set(palette)) == 3 and pictures.IGNORE_COLOUR not in palette
    with_teacher = pictures.draw_predictions(_rows(teacher=True), id2label, cell_width=40)
    alone = pictures.draw_predictions(_rows(teacher=False), id2label, cell_width=40)
    assert with_teacher.size[0] == 4 * 40 + 5 * 6 and alone.size[0] == 3 * 40 + 4 * 6
    # Ground truth cell of the first row (column 1, rows start below a 24 px header): 10 px per label column.
    x0, y0 = 6 + 40 + 6, 24
    assert [with_teacher.getpixel((x0 + 5 + 10 * k, y0 + 30)) for k in range(4)] == [*palette, pictures.IGNORE_COLOUR]
    # The student column is the last one in both layouts.
    for picture, columns in ((with_teacher, 4), (alone, 3)):
        xs = 6 + (columns - 1) * 46
        assert [picture.getpixel((xs + 5 + 10 * k, y0 + 30)) for k in range(3)] == [palette[2], palette[1], palette[0]]
    assert with_teacher.size[1] > 24 + 2 * (40 + 6)  # the legend below the rows


def test_ics_picture_puts_teacher_and_student_side_by_side_or_the_student_alone():
    id2label = {0: "sky", 1: "road", 2: "car"}

    def blue_pixels(picture: Image.Image) -> int:  # the matrices' cells above 0 (text is grey, 0 is white)
        rgb = np.asarray(picture)[: 44 + 3 * 28].astype(int)
        return int((rgb[..., 2] > rgb[..., 0] + 50).sum())

    both = pictures.draw_ics(_rows(teacher=True), id2label, temperature=1.0)
    alone = pictures.draw_ics(_rows(teacher=False), id2label, temperature=1.0)
    assert blue_pixels(both) == 2 * blue_pixels(alone) == 2 * 3 * 28 * 28  # two panels of three cells each
    assert np.allclose(pictures.mean_ics(_rows(teacher=True), "teacher"), np.eye(3)[::-1] * 0.5)
    assert pictures.mean_ics(_rows(teacher=False), "teacher") is None


@pytest.mark.parametrize("teacher, names", [(False, ["sky", "road", "car"]), (True, ["sky", "road", "car"]),
                                            (True, [f"class number {i} of a long list" for i in range(40)])])
def test_every_text_of_the_ics_picture_fits_it_and_its_words_are_spaced(monkeypatch, teacher, names):
    # Pillow's own TrueType font, not the bitmap default.
    assert isinstance(pictures.font(pictures.SMALL_SIZE), ImageFont.FreeTypeFont)
    drawn, draw_text = [], pictures.draw_text
    monkeypatch.setattr(pictures, "draw_text", lambda d, xy, text, size, **kw: (drawn.append((xy, text, size)),
                                                                                  draw_text(d, xy, text, size, **kw)))
    rows = _rows(teacher, len(names))
    picture = pictures.draw_ics(rows, dict(enumerate(names)), temperature=2.0)
    for (x, y), text, size in drawn:
        assert 0 <= x and x + pictures.text_width(text, size) <= picture.width, text
        assert 0 <= y and y + size <= picture.height, text
    bar_label_y = max(y for (_, y), text, _ in drawn if text == "0")  # the colour bar's "0"; the caption below
    caption = [text for (_, y), text, _ in drawn if y > bar_label_y]
    assert " ".join(caption).startswith("Row-normalised inter-class similarity") and "T = 2" in " ".join(caption)
    assert ("what ICSD minimises" in " ".join(caption)) == teacher
    assert all(x + pictures.text_width(t, s) <= picture.width - pictures.PAD for (x, _), t, s in drawn if t in caption)
    # Words stand apart: wider blank columns between them than the font's own space leaves ("2validation" before).
    def blank_columns_between_words(set_text) -> int:
        strip = Image.new("L", (80, 20), 255)
        set_text(ImageDraw.Draw(strip))
        inked = np.flatnonzero((np.asarray(strip) < 128).any(axis=0))
        return int(np.diff(inked).max()) - 1

    size = pictures.SMALL_SIZE
    ours = blank_columns_between_words(lambda d: pictures.draw_text(d, (2, 2), "2 validation", size))
    own = blank_columns_between_words(lambda d: d.text((2, 2), "2 validation", fill=0, font=pictures.font(size)))
    assert ours >= own + 2 and ours >= 5


def test_picture_indices_are_fixed_and_spread_over_the_split():
    assert pictures.picture_indices(101, 4) == [0, 33, 67, 100]
    assert pictures.picture_indices(3, 4) == [0, 1, 2] and pictures.picture_indices(10, 0) == []
    assert pictures.picture_indices(10, 1) == [0] and pictures.picture_indices(0, 4) == []


@needs_camvid
def test_exported_pictures_are_embedded_and_drawn_from_the_validation_images(export):
    predictions = Image.open(export / "predictions.png")
    # 2 rows of 480x360 images scaled to 320x240, four columns (the run had a teacher), legend below.
    assert predictions.size[0] == 4 * 320 + 5 * 6 and predictions.size[1] > 24 + 2 * (240 + 6)
    ground_truth = np.asarray(predictions.convert("RGB"))[24:24 + 240, 6 + 326:6 + 326 + 320].reshape(-1, 3)
    allowed = {tuple(c) for c in pictures.class_palette(11)} | {pictures.IGNORE_COLOUR}
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
    _, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(CAMVID), max_eval_samples=2))
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
# 5. A clean export folder, the checks before a push, and the push
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


@pytest.fixture
def fake_hub(monkeypatch):
    """Route huggingface_hub's HTTP client to ``fake_hub.answer(request) -> httpx2.Response``; record requests."""
    from huggingface_hub.utils import _http

    class Hub:
        requests: list[httpx2.Request]
        answer = staticmethod(lambda request: httpx2.Response(200, json={}))

    Hub.requests = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        Hub.requests.append(request)
        return Hub.answer(request)

    factory = _http._GLOBAL_CLIENT_FACTORY
    # timeout=None, as huggingface_hub's own client: the checks must bound their request themselves.
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler), timeout=None))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # Else the first request of a process (once a day) also fetches the Hub's list of AI agents, for the user agent.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    yield Hub
    huggingface_hub.set_client_factory(factory)


def _whoami(role: str) -> dict:
    return {"name": "someone", "auth": {"accessToken": {"role": role}}}


@pytest.mark.parametrize("answer, kind, message", [
    (httpx2.Response(401, json={"error": "Invalid credentials"}), utils_hub.BAD_TOKEN, "refuses the token (HTTP 401)"),
    (httpx2.Response(200, json=_whoami("read")), utils_hub.BAD_TOKEN, "may only read"),
    (httpx2.Response(503), utils_hub.NETWORK, "answered HTTP 503"),
    (httpx2.ConnectError("refused"), utils_hub.NETWORK, "cannot reach"),
])
def test_push_login_check_fails_in_one_request_with_one_line(fake_hub, answer, kind, message):
    def reply(request):
        if isinstance(answer, Exception):
            raise answer
        return answer
    fake_hub.answer = staticmethod(reply)
    with pytest.raises(utils_hub.HubProbeError) as caught:
        utils_hub.probe_hub_login()
    assert caught.value.kind == kind and message in str(caught.value) and "\n" not in str(caught.value)
    assert FAKE_TOKEN not in str(caught.value)
    assert len(fake_hub.requests) == 1  # no retries
    assert fake_hub.requests[0].extensions["timeout"]["connect"] == utils_hub.HUB_PROBE_TIMEOUT_S


def test_push_login_check_passes_a_write_token_and_refuses_none_or_offline(fake_hub, monkeypatch, tmp_path):
    fake_hub.answer = staticmethod(lambda request: httpx2.Response(200, json=_whoami("write")))
    assert utils_hub.probe_hub_login() == "someone"
    assert fake_hub.requests[0].headers["authorization"] == f"Bearer {FAKE_TOKEN}"
    assert huggingface_hub.utils.get_session().timeout.connect is None  # the shared client's default, restored
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(utils_hub.HubProbeError, match="no Hub token on this machine: run `hf auth login`"):
        utils_hub.probe_hub_login()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(utils_hub.HubProbeError, match="HF_HUB_OFFLINE=1"):
        utils_hub.probe_hub_login()
    assert len(fake_hub.requests) == 1


def test_repo_ids_are_validated_by_huggingface_hub_and_a_pasted_token_is_never_echoed():
    assert utils_hub.repo_id_problem("someone/model") is None and utils_hub.repo_id_problem("model") is None
    assert "is not a valid repo id" in utils_hub.repo_id_problem("my model!") and "'my model!'" in (
        utils_hub.repo_id_problem("my model!"))
    for pasted in (FAKE_TOKEN, f"someone/{FAKE_TOKEN}"):  # validate_repo_id itself accepts both
        problem = utils_hub.repo_id_problem(pasted)
        assert "looks like a Hub access token (not shown)" in problem and FAKE_TOKEN not in problem


@needs_camvid
def test_push_uploads_the_model_processor_card_pictures_and_results_only(export, monkeypatch):
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
    assert calls["upload"] == (HUB_ID, sorted(EXPORTED))  # not runs/, checkpoints/, log.jsonl or run.json


def test_push_to_a_bare_name_rewrites_the_snippet_with_the_namespace_the_hub_gives(tmp_path, monkeypatch):
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
