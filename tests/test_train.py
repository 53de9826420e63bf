"""End-to-end tests of train_icsd.py through `accelerate launch`, plus its metric and schedule code."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import CAMVID, ENV, ROOT, TINY, launch, numpy_metrics, script_cmd, train_ok

import data
import train_icsd


def synthetic_args(out: Path, distill: str = "none", steps: int = 3, **extra) -> list:
    args = ["--dataset", "synthetic", "--student_model_name_or_path", TINY, "--distill", distill,
            "--max_train_steps", steps, "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 2,
            "--crop_size", 64, "--max_eval_samples", 5, "--max_train_samples", 32, "--learning_rate", 1e-3,
            "--dataloader_num_workers", 0, "--output_dir", out, "--logging_steps", 1]
    if distill != "none":
        args += ["--teacher_model_name_or_path", TINY]
    for k, v in extra.items():
        args += [f"--{k}"] + ([] if v is True else [v])
    return args


def results(out: Path) -> dict:
    return json.loads((out / "all_results.json").read_text())


def weights(path: Path) -> dict:
    """Parameters of an exported model (through the Auto class) or of a checkpoint folder (raw state dict)."""
    if (path / "config.json").is_file():
        from transformers import AutoModelForSemanticSegmentation

        return AutoModelForSemanticSegmentation.from_pretrained(path).state_dict()
    return load_file(str(path / "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distill", train_icsd.DISTILL_MODES)
def test_every_mode_on_synthetic_and_reload(tmp_path, distill):
    out = tmp_path / distill
    train_ok(synthetic_args(out, distill, steps=3, checkpointing_steps=3))
    res = results(out)
    assert res["train_steps"] == 3 and res["distill"] == distill and res["num_processes"] == 1
    assert 0.0 <= res["eval_mean_iou"] <= 1.0 and len(res["eval_per_category_iou"]) == 9
    card = (out / "README.md").read_text()
    assert f"`{TINY}`" in card and "mIoU" in card
    # The exported student is the trained one: its weights equal the final checkpoint's, and it reloads
    # through the Auto class to the same logits.
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    ckpt = weights(out / "checkpoints" / "step_00000003")
    model = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    reloaded = model.state_dict()
    assert reloaded.keys() == ckpt.keys()
    assert all(torch.equal(reloaded[k], ckpt[k]) for k in ckpt)
    fresh = AutoModelForSemanticSegmentation.from_config(model.config).eval()
    fresh.load_state_dict(ckpt)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, fresh(pixel_values=x).logits)
    assert model.config.id2label[0] == data.DATASET_PRESETS["synthetic"].id2label[0]
    AutoImageProcessor.from_pretrained(out)


def _recompute_miou(out: Path, eval_hf, info) -> dict:
    """Evaluate the exported model independently: numpy metrics on full-resolution labels."""
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    import models

    model = AutoModelForSemanticSegmentation.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    adapter = models.make_input_adapter(processor)
    ds = data.build_eval_dataset(eval_hf, info, pad_mean=models.processor_mean_std(processor)[0])
    preds, labels = [], []
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            logits = model(pixel_values=adapter(item["pixel_values"][None])).logits
            logits = torch.nn.functional.interpolate(logits, size=item["labels"].shape, mode="bilinear",
                                                     align_corners=False)
            preds.append(logits.argmax(1)[0].numpy())
            labels.append(item["labels"].numpy())
    return numpy_metrics(preds, labels, info.num_labels, info.ignore_index)


@pytest.mark.skipif(not CAMVID.is_dir(), reason="needs ../shared/data/camvid")
@pytest.mark.parametrize("distill", train_icsd.DISTILL_MODES)
def test_every_mode_on_camvid(tmp_path, distill):
    out = tmp_path / distill
    args = ["--dataset_name", CAMVID, "--student_model_name_or_path", TINY, "--distill", distill,
            "--max_train_steps", 2, "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 2,
            "--crop_size", 64, 96, "--max_train_samples", 8, "--max_eval_samples", 3, "--dataloader_num_workers", 1,
            "--output_dir", out]
    if distill != "none":
        args += ["--teacher_model_name_or_path", TINY]
    # One mode under `accelerate launch` (with a DataLoader worker), as a user runs it; the others in-process.
    launch(args) if distill == "aicsd" else train_ok(args)
    res = results(out)
    assert res["train_steps"] == 2 and len(res["eval_per_category_iou"]) == 11
    if distill == "aicsd":
        # The metrics the script reports are those of the exported model on the full-resolution labels.
        _, eval_hf, info = data.load_splits(data.DataOptions(dataset_name=str(CAMVID), max_eval_samples=3))
        ref = _recompute_miou(out, eval_hf, info)
        assert res["eval_mean_iou"] == pytest.approx(ref["mean_iou"], abs=1e-6)
        assert res["eval_overall_accuracy"] == pytest.approx(ref["overall_accuracy"], abs=1e-6)


def test_two_processes_give_the_same_eval_metrics(tmp_path):
    one = tmp_path / "one"
    train_ok(synthetic_args(one, "none", steps=2, checkpointing_steps=2, max_eval_samples=7))
    two = tmp_path / "two"
    # Same checkpoint, evaluated by two processes: 7 images over 2 processes and batches of 2 is uneven.
    launch(synthetic_args(two, "none", steps=2, max_eval_samples=7, per_device_train_batch_size=1,  # same global batch
                          resume_from_checkpoint=one / "checkpoints" / "step_00000002"), nproc=2)
    r1, r2 = results(one), results(two)
    assert r1["num_processes"] == 1 and r2["num_processes"] == 2
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou"):
        assert r1[key] == r2[key], key


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    straight = tmp_path / "straight"
    train_ok(synthetic_args(straight, "aicsd", steps=6, checkpointing_steps=3, alw_granularity="step",
                            dataloader_num_workers=1, max_train_samples=8))  # 4 steps per epoch: resume mid-epoch 2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = straight / "checkpoints" / "step_00000003"
    subprocess.run(["cp", "-r", str(src), str(resumed / "checkpoints")], check=True)
    train_ok(synthetic_args(resumed, "aicsd", steps=6, checkpointing_steps=3, alw_granularity="step",
                            dataloader_num_workers=1, max_train_samples=8, resume_from_checkpoint="latest"))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], weights(src)[k]) for k in a)  # training went on after the checkpoint


def run_script(args, timeout: int = 120) -> subprocess.CompletedProcess:
    """train_icsd.py as a plain `python` process (what `accelerate launch` runs in each worker)."""
    return subprocess.run(script_cmd(args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_bad_flags_fail_with_one_line(tmp_path):
    proc = run_script(["--dataset", "no-such-preset", "--output_dir", tmp_path])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("train_icsd.py: error: unknown --dataset 'no-such-preset'")
    assert "Traceback" not in proc.stderr
    # Under `accelerate launch` the same line reaches the user (the launcher then reports the exit status).
    proc = launch(["--dataset", "no-such-preset", "--output_dir", tmp_path], check=False)
    assert proc.returncode != 0
    assert "train_icsd.py: error: unknown --dataset 'no-such-preset'; presets:" in proc.stderr


def test_tracking_logs_every_term_alpha_and_lr_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="requirements-dev.txt installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    train_ok(synthetic_args(out, "aicsd", steps=4, with_tracking=True, report_to="tensorboard", logging_steps=2,
                            alw_granularity="step"))
    events = sorted(out.rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for path in events:
        acc = EventAccumulator(str(path.parent))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/ce", "train/ics", "train/kd", "train/raw_ics", "train/raw_kd", "train/alpha",
                "train/lr", "eval/mean_iou", "eval/overall_accuracy"}
    assert expected <= tags, expected - tags
    acc = EventAccumulator(str(next(p for p in events if p.parent.name == "aicsd").parent))
    acc.Reload()
    alphas = [e.value for e in acc.Scalars("train/alpha")]
    assert alphas == pytest.approx([1 / 4, 3 / 4])  # logged after steps 2 and 4: alpha of steps 1 and 3 (0-based)


# ---------------------------------------------------------------------------------------------------------
# Defaults that keep the method, and logs a person can read
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples, batch, steps", [(367, 8, 30), (16, 2, 3), (64, 8, 15), (100, 4, 40), (9, 4, 1)])
def test_default_alw_keeps_ce_and_icsd_in_most_steps_of_a_short_run(num_samples, batch, steps):
    """A run shorter than two epochs: under the default granularity alpha > 0 for most of its steps."""
    args = train_icsd.parse_args(["--dataset", "synthetic", "--teacher_model_name_or_path", TINY,
                                  "--max_train_steps", str(steps), "--per_device_train_batch_size", str(batch)])
    plan = train_icsd.plan_schedule(args, num_samples // batch)
    assert plan.max_train_steps == steps and plan.num_epochs <= 2
    alphas = [train_icsd.alw_alpha_at(args, plan, step // plan.steps_per_epoch, step) for step in range(steps)]
    assert sum(a > 0 for a in alphas) >= steps / 2 if steps > 1 else alphas == [0.0]
    assert alphas == sorted(alphas) and max(alphas) < 1.0


def test_epoch_granularity_that_would_keep_alpha_at_zero_is_refused():
    args = train_icsd.parse_args(["--dataset", "synthetic", "--teacher_model_name_or_path", TINY,
                                  "--max_train_steps", "30", "--alw_granularity", "epoch"])
    with pytest.raises(train_icsd.UsageError, match="alpha at 0 throughout"):
        train_icsd.plan_schedule(args, 45)
    args.alw_granularity = "step"
    assert train_icsd.plan_schedule(args, 45).alw_total == 30


def test_help_shows_every_default_once(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as done:
        train_icsd.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    # One entry per option: its lines from "  --flag" up to the next option.
    entries = re.split(r"\n(?=  -)", text[text.index("options:"):])
    options = [e for e in entries if e.lstrip().startswith("--")]
    assert len(options) >= 50
    for entry in options:
        text = " ".join(entry.split())
        assert text.count("default") == 1, text


def test_a_log_file_reads_like_a_log(tmp_path):
    """Not a terminal: no progress-bar frames; one line per logging step with the terms, alpha and lr; % metrics."""
    out = tmp_path / "run"
    proc = train_ok(synthetic_args(out, "aicsd", steps=4, logging_steps=2))
    log = proc.stdout + proc.stderr
    assert "\r" not in log and "\x1b[" not in log
    lines = [line for line in log.splitlines() if "step 2/4:" in line or "step 4/4:" in line]
    assert len(lines) == 2 and all(re.search(r"loss [\d.]+, ce [\d.]+, ics [\d.]+, kd [\d.]+, alpha 0\.\d{3}, lr ", l)
                                   for l in lines), lines
    final = next(line for line in log.splitlines() if "final:" in line)
    assert re.search(r"final: mIoU \d+\.\d\d %, mean acc \d+\.\d\d %, pixel acc \d+\.\d\d %$", final), final
    assert "teacher None" not in log and "1 epochs" not in log and "Repo card metadata" not in log


def test_the_transformers_examples_flag_names_work(tmp_path):
    args = train_icsd.parse_args(["--dataset", "synthetic", "--model_name_or_path", "config:segformer-b0",
                                  "--lr_scheduler_type", "polynomial", "--train_val_split", "0.25"])
    assert args.student_model_name_or_path == "config:segformer-b0" and args.lr_scheduler_type == "polynomial"
    assert train_icsd.parse_args(["--dataset", "synthetic"]).lr_scheduler_type == "polynomial"  # poly, power 0.9
    with pytest.raises(train_icsd.UsageError, match="--train_val_split must be between 0 and 1; got 1.5"):
        train_icsd.parse_args(["--dataset", "synthetic", "--train_val_split", "1.5"])
    # A dataset without an evaluation split: the carved share follows the flag.
    folder = tmp_path / "data"
    (folder / "data").mkdir(parents=True)
    _, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(CAMVID), max_eval_samples=None))
    evaluation.select(range(20)).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    (folder / "id2label.json").write_text((CAMVID / "id2label.json").read_text())
    train, held_out, _ = data.load_splits(data.DataOptions(dataset_name=str(folder), validation_fraction=0.25))
    assert (len(train), len(held_out)) == (15, 5)


def test_a_long_evaluation_logs_its_progress_without_a_terminal(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 31))  # every reading of the clock is 31 s after the last
    monkeypatch.setattr(train_icsd.time, "time", lambda: float(next(clock)))
    proc = train_ok(synthetic_args(tmp_path / "run", "none", steps=1, max_eval_samples=6))
    lines = [line for line in proc.stderr.splitlines() if re.search(r"eval: batch \d/3, ", line)]
    assert lines and all(re.search(r"eval: batch \d/3, \d+m\d\ds, about \d+(s|m\d\ds) left$", l) for l in lines), lines
