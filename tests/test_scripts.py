"""Smoke tests of the user-facing scripts: the offline demo, tools/study.py (--quick), tools/loss_scales.py,
tools/compare.py and tools/bench_inference.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")


def test_demo_chains_teacher_baseline_and_aicsd(tmp_path):
    env = dict(ENV, OUT=str(tmp_path / "demo"), STEPS="2", TEACHER_STEPS="2", WORKERS="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{ENV['PATH']}")
    proc = subprocess.run(["bash", str(ROOT / "demo.sh")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| model |"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[1].strip() for r in rows] == ["teacher", "student alone", "student + AICSD"]
    aicsd = json.loads((tmp_path / "demo" / "aicsd" / "all_results.json").read_text())
    teacher = json.loads((tmp_path / "demo" / "teacher" / "all_results.json").read_text())
    # The AICSD run was taught by the teacher trained in step 1: its --eval_teacher metrics are that model's.
    assert aicsd["teacher_eval_mean_iou"] == pytest.approx(teacher["eval_mean_iou"], abs=1e-9)
    assert f"{100 * teacher['eval_mean_iou']:.2f}" in rows[0]


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
def test_study_quick_runs_every_stage(tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, str(ROOT / "tools" / "study.py"), "--quick", "--output_dir", str(out), "--data", str(CAMVID),
           "--methods", "none", "kd", "aicsd"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"none", "kd", "aicsd"}
    for name in ("results.md", "miou.png", "ics.png", "overlays.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| + AICSD (ICSD + KD, ALW) |" in md and "| AICSD − KD | " in md and "Teacher per-class IoU" in md
    runs = res["runs"]
    assert res["paired"]["aicsd-kd"]["values"] == pytest.approx(
        [100 * (runs["aicsd"][0]["eval_mean_iou"] - runs["kd"][0]["eval_mean_iou"])])
    assert res["verdict"].startswith("AICSD > KD > student alone (mean_iou) held ")
    # A second call finds every run done and only rebuilds the tables and figures.
    again = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count("(done before:") == 4


def _load_study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "tools" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_pairs_runs_by_seed_and_states_the_ordering():
    study = _load_study()
    miou = {"none": [0.30, 0.31, 0.29], "kd": [0.32, 0.30, 0.33], "aicsd": [0.35, 0.33, 0.32]}
    runs = {m: [{"eval_mean_iou": v} for v in values] for m, values in miou.items()}
    paired = study.paired_differences(runs, [0, 1, 2])
    assert set(paired) == {"aicsd-kd", "kd-none", "aicsd-none"}
    assert paired["aicsd-kd"]["values"] == pytest.approx([3.0, 3.0, -1.0])
    assert paired["aicsd-kd"]["mean"] == pytest.approx(5 / 3)
    assert paired["aicsd-kd"]["std"] == pytest.approx(((2 * (4 / 3) ** 2 + (8 / 3) ** 2) / 2) ** 0.5)
    assert paired["kd-none"]["wins"] == 2 and paired["aicsd-none"]["wins"] == 3
    # Seed 1 breaks KD > alone, seed 2 breaks AICSD > KD; the means keep the order.
    assert study.ordering_verdict(runs, [0, 1, 2]) == (
        "AICSD > KD > student alone (mean_iou) held in 1 of 3 seeds; on average it held "
        "(AICSD − KD +1.67, KD − alone +1.67 points).")
    with pytest.raises(ValueError, match="one run per seed"):
        study.paired_differences({"kd": runs["kd"], "none": runs["none"][:2]}, [0, 1, 2])
    assert study.ordering_verdict({"kd": runs["kd"], "none": runs["none"]}, [0, 1, 2]) is None


def test_loss_scales_prints_one_row_per_student():
    cmd = [sys.executable, str(ROOT / "tools" / "loss_scales.py"), "--dataset", "synthetic", "--teacher",
           "config:segformer-tiny", "--student", "config:segformer-tiny", "config:segformer-tiny",
           "--batch_size", "2", "--crop", "32", "32"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| config:")]
    assert len(rows) == 2 and all(len(r.split("|")) == 8 for r in rows)


def test_bench_inference_times_each_model_against_the_first(tmp_path):
    # A saved folder (read with its own classes) and a config: preset, each timed; the first is the reference.
    import models

    folder = tmp_path / "small"
    models.load_model("config:segformer-tiny", {0: "a", 1: "b", 2: "c"}).save_pretrained(folder)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_inference.py"), str(folder), "config:segformer-tiny",
           "--size", "64", "64", "--repeats", "3", "--threads", "1"]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|")[1:4] for line in proc.stdout.splitlines() if line.startswith(("| /", "| config:"))]
    assert [r[0].strip() for r in rows] == [str(folder), "config:segformer-tiny"], proc.stdout
    assert rows[0][2].strip() == "1.00×" and all(float(r[1]) > 0 for r in rows)


def test_compare_prints_one_row_per_run(tmp_path):
    for name, miou in (("teacher", 0.4175), ("alone", 0.3989)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "all_results.json").write_text(json.dumps(
            {"eval_mean_iou": miou, "eval_mean_accuracy": 0.5, "eval_overall_accuracy": None, "distill": "none",
             "train_steps": 7}))
    cmd = [sys.executable, str(ROOT / "tools" / "compare.py"), str(tmp_path / "teacher"), str(tmp_path / "alone")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2:] == ["| teacher | none | 7 | 41.75 | 50.00 | n/a |",
                                            "| alone | none | 7 | 39.89 | 50.00 | n/a |"]
    proc = subprocess.run(cmd + [str(tmp_path / "missing")], env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("compare.py: error: no all_results.json in ")


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
def test_study_carves_a_held_out_part_of_train_once_and_names_variants(tmp_path):
    import argparse

    study = _load_study()
    args = argparse.Namespace(data=str(CAMVID), carve=0.15, carve_seed=0)
    folder = study.carve_dataset(args, tmp_path)
    carve = json.loads((folder / "carve.json").read_text())
    assert carve["train_rows"] + len(carve["carve_rows"]) == 367 and len(carve["carve_rows"]) == 56
    import datasets

    splits = datasets.load_dataset(str(folder))
    assert {k: len(v) for k, v in splits.items()} == {"train": 311, "carve": 56, "validation": 101}
    assert not set(splits["train"]["source_row"]) & set(splits["carve"]["source_row"])  # disjoint, from train
    assert (folder / "id2label.json").read_text() == (CAMVID / "id2label.json").read_text()
    (folder / "carve.json").write_text(json.dumps({**carve, "seed": "kept"}))
    assert study.carve_dataset(args, tmp_path) == folder and "kept" in (folder / "carve.json").read_text()  # once
    assert study.parse_variant("kd_t4=kd:--temperature 4 --lambda_kd 3") == ("kd_t4", ("kd", [
        "--temperature", "4", "--lambda_kd", "3"]))
    assert study.parse_variant("aicsd") == ("aicsd", ("aicsd", []))
    with pytest.raises(SystemExit, match="want NAME=METHOD"):
        study.parse_variant("x=distill")
    table = {m: {"eval_mean_iou": {"mean": v}} for m, v in (("none", 40.0), ("kd", 42.0), ("aicsd", 45.0))}
    assert study.gap_closed(table, {"eval_mean_iou": 0.60}) == pytest.approx({"kd": 0.1, "aicsd": 0.25})
