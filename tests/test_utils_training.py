"""Tests of utils_training.py: metrics, sampler, the loss tracker, the output folder, checkpoints and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import utils_training as utils
from helpers import numpy_metrics


# ---------------------------------------------------------------------------------------------------------
# Metrics against an independent numpy implementation; data order as a pure function of counters
# ---------------------------------------------------------------------------------------------------------
def test_metrics_match_numpy_with_ignore_and_absent_classes():
    rng = np.random.default_rng(0)
    C, ignore = 6, 255
    preds, labels = [], []
    for h, w in [(7, 9), (5, 5), (11, 4)]:
        lab = rng.integers(0, 4, size=(h, w))  # classes 4, 5 never appear in the labels
        lab[rng.random((h, w)) < 0.2] = ignore
        pred = rng.integers(0, 5, size=(h, w))  # class 4 predicted but absent; class 5 absent everywhere
        preds.append(pred)
        labels.append(lab)
    cm = sum(utils.confusion_matrix(torch.from_numpy(p), torch.from_numpy(l), C, ignore)
             for p, l in zip(preds, labels))
    ours = utils.metrics_from_confusion(cm)
    ref = numpy_metrics(preds, labels, C, ignore)
    assert ours["mean_iou"] == pytest.approx(ref["mean_iou"], rel=1e-12)
    assert ours["mean_accuracy"] == pytest.approx(ref["mean_accuracy"], rel=1e-12)
    assert ours["overall_accuracy"] == pytest.approx(ref["overall_accuracy"], rel=1e-12)
    assert ours["per_category_iou"][4] == 0.0  # predicted, never true
    assert ours["per_category_iou"][5] is None  # neither: left out of the mean
    np.testing.assert_allclose([v for v in ours["per_category_iou"][:5]], ref["per_category_iou"][:5], rtol=1e-12)


def test_sampler_is_a_pure_function_of_seed_and_epoch_cut_to_whole_steps():
    s = utils.EpochShuffleSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert sorted(first) == list(range(50))
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(2)
    state = torch.random.get_rng_state()
    assert list(s) == first
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    cut = utils.EpochShuffleSampler(50, seed=3, multiple=12)  # optimizer steps of 12 samples: 4 whole ones
    cut.set_epoch(2)
    assert len(cut) == 48 and list(cut) == first[:48]


def test_train_log_line_says_how_long_is_left():
    logs = {"train/loss": 1.23456, "train/ce": 0.5, "train/raw_kd": 9.0, "train/alpha": 0.0625, "train/lr": 9.4e-4,
            "train/epoch": 0}
    line = utils.format_train_log(20, 300, logs, elapsed=62.0, steps_timed=20)
    assert line == "step 20/300: loss 1.2346, ce 0.5000, alpha 0.062, lr 9.40e-04; 1m02s, 3.10 s/step, 14m28s left"
    assert utils.format_duration(7300) == "2h01m" and utils.format_duration(4.4) == "4s"


# ---------------------------------------------------------------------------------------------------------
# The loss tracker and the command line
# ---------------------------------------------------------------------------------------------------------
def test_loss_tracker_averages_and_names_the_first_nonfinite_term():
    acc = Accelerator(cpu=True)
    tracker = utils.LossTracker(["loss", "ce", "kd"], acc.device)
    tracker.add(torch.tensor(3.0), {"ce": torch.tensor(1.0), "kd": torch.tensor(2.0)})
    tracker.add(torch.tensor(5.0), {"ce": torch.tensor(2.0), "kd": torch.tensor(3.0)})
    tracker.add(torch.tensor(0.0), {})  # a batch whose samples were all skipped: not counted
    tracker.pending_skipped = 2
    outcome = tracker.end_step(acc, stop=False)
    assert outcome == utils.StepOutcome(nonfinite_term=None, stop=False, skipped_samples=2)
    assert tracker.averages(acc) == {"train/loss": 4.0, "train/ce": 1.5, "train/kd": 2.5}
    assert tracker.averages(acc) == {"train/loss": 0.0, "train/ce": 0.0, "train/kd": 0.0}  # reset
    tracker.add(torch.tensor(float("nan")), {"ce": torch.tensor(1.0), "kd": torch.tensor(float("inf"))})
    outcome = tracker.end_step(acc, stop=True)
    assert outcome.nonfinite_term == "kd" and outcome.stop and outcome.skipped_samples == 0
    assert tracker.end_step(acc, stop=False).nonfinite_term is None  # the flags were reset


def test_run_cli_prints_one_line_and_returns_2(capsys):
    def failing():
        raise utils.UsageError("--crop_size takes S or H W\n(positive)")

    assert utils.run_cli(failing, (utils.UsageError,), "prog") == 2
    assert capsys.readouterr().err == "prog: error: --crop_size takes S or H W (positive)\n"
    assert utils.run_cli(lambda: None, (utils.UsageError,), "prog") == 0
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File ...\ndata.DataError: row 3: bad label")
    assert utils.one_line(wrapped) == "row 3: bad label"


def test_a_failure_after_the_model_is_saved_says_where_the_model_is():
    with pytest.raises(utils.AfterTrainingError) as caught:
        with utils.report_saved_model("runs/x"):
            raise RuntimeError("out of memory\nwhile evaluating")
    assert str(caught.value) == ("after training, the final evaluation or export failed (RuntimeError: out of memory "
                                 "while evaluating); the trained model is saved in runs/x (from_pretrained loads it)")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------
def _run(acc: Accelerator, out: Path, settings: dict | None = None, resume: str | None = None) -> utils.Run:
    return utils.claim_output_dir(acc, str(out), settings or {"seed": 1}, {}, resume, False, None)


def test_checkpoints_rotate_and_latest_skips_incomplete_ones(tmp_path):
    acc = Accelerator(cpu=True)
    model, optimizer = acc.prepare(torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()))
    run = _run(acc, tmp_path)
    run.run_id = "r1"
    for step in (1, 2, 3):
        state = utils.TrainState(completed_steps=step, epoch=0, samples_in_epoch=4 * step)
        utils.save_checkpoint(acc, model, run, state, {"distill": "kd"}, total_limit=2)
    assert [p.name for p in utils.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # no training_state.json: never taken
    saved = json.loads((tmp_path / "checkpoints" / "step_00000003" / utils.STATE_FILE).read_text())
    assert saved["distill"] == "kd" and saved["run"] == {"run_id": "r1", "settings": {"seed": 1}}
    with pytest.raises(utils.UsageError, match="not a complete checkpoint folder"):
        utils.resume_or_start(acc, run, str(tmp_path / "checkpoints" / "step_00000009"), {})
    assert utils.checkpoint_problem(tmp_path / "checkpoints" / "step_00000003", acc) is None
    state = utils.resume_or_start(acc, run, "latest", {})
    assert (state.completed_steps, state.epoch, state.samples_in_epoch) == (3, 0, 12)
    assert json.loads((tmp_path / utils.RUN_FILE).read_text()) == {"run_id": "r1", "settings": {"seed": 1}}
    utils.release_locks()


def test_a_rotation_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    run = _run(acc, tmp_path)

    def save(step: int) -> None:
        utils.save_checkpoint(acc, model, run, utils.TrainState(completed_steps=step), {}, 1)

    save(1)
    real_rmtree = utils.shutil.rmtree

    def killed_midway(path, ignore_errors=False):  # deletes one file of the folder, then the process "dies"
        if Path(path).is_dir() and any(Path(path).iterdir()):
            next(Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(utils.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save(2)  # rotation deletes step 1
    monkeypatch.setattr(utils.shutil, "rmtree", real_rmtree)
    assert [p.name for p in utils.list_checkpoints(tmp_path)] == ["step_00000002"]
    save(3)  # the next save finishes the interrupted deletion off
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]
    utils.release_locks()


def test_a_nonfinite_model_is_never_saved_buffers_included(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert utils.first_nonfinite(model) is None
    model[1].running_var[1] = float("inf")
    assert utils.first_nonfinite(model) == "1.running_var"
    with pytest.raises(FloatingPointError, match=r"refusing to save the final model: .*first in 1\.running_var"):
        utils.check_finite_model(model, "the final model")
    run = _run(acc, tmp_path)
    with pytest.raises(FloatingPointError, match="first in 1.running_var"):
        utils.save_checkpoint(acc, model, run, utils.TrainState(), {}, None)
    assert not utils.list_checkpoints(tmp_path)
    utils.release_locks()


# ---------------------------------------------------------------------------------------------------------
# The output folder: locked, all-or-nothing exports, interrupted writes finished
# ---------------------------------------------------------------------------------------------------------
LOCKED = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
          "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)")


def test_the_folder_is_locked_until_release_and_a_forked_child_does_not_keep_it(tmp_path):
    import multiprocessing

    acc = Accelerator(cpu=True)
    out = tmp_path / "out"
    _run(acc, out)
    assert subprocess.run([sys.executable, "-c", LOCKED, str(out)]).returncode == 3
    with pytest.raises(utils.OutputError, match=r"is in use by another run \(a live process holds its lock\)"):
        _run(acc, out)
    child = multiprocessing.get_context("fork").Process(target=__import__("time").sleep, args=(30,), daemon=True)
    child.start()  # a DataLoader worker, say: it outlives the lock's owner here
    utils.release_locks()
    try:
        assert subprocess.run([sys.executable, "-c", LOCKED, str(out)]).returncode == 0
        assert sorted(p.name for p in out.iterdir()) == []  # no lock file, no probe left behind
    finally:
        child.kill()


def test_an_export_lands_weights_last(tmp_path, monkeypatch):
    acc = Accelerator(cpu=True)
    out = tmp_path / "out"
    _run(acc, out)
    for name, text in (("config.json", "old"), ("model.safetensors", "old"), ("ics.png", "old")):
        (out / name).write_text(text)  # a previous export
    moves = []

    def replace(src, dst):  # record what the folder holds as each file lands
        moves.append((Path(dst).name, (out / "model.safetensors").exists()))
        real_replace(src, dst)

    real_replace = utils.os.replace
    monkeypatch.setattr(utils.os, "replace", replace)
    with utils.ExportWriter(acc, out, needed_bytes=10) as staging:
        for name in ("model.safetensors", "config.json", "README.md"):
            (staging / name).write_text("new")
    monkeypatch.setattr(utils.os, "replace", real_replace)
    landed = [m for m in moves if m[0] != utils.EXPORT_READY]
    assert [name for name, _ in landed][-1] == "model.safetensors"  # the weights come last...
    assert not any(weights_there for _, weights_there in landed)  # ...after the old ones were deleted
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md"}  # ics.png was stale
    assert all((out / n).read_text() == "new" for n in ("config.json", "model.safetensors", "README.md"))
    assert subprocess.run([sys.executable, "-c", LOCKED, str(out)]).returncode == 3  # still locked throughout
    utils.release_locks()


def test_a_start_finishes_what_a_killed_run_left_half_done(tmp_path):
    acc = Accelerator(cpu=True)
    out = tmp_path / "out"
    (out / utils.EXPORT_READY).mkdir(parents=True)  # a complete export, killed while moving in...
    (out / utils.EXPORT_READY / "model.safetensors").write_text("new")
    (out / "config.json").write_text("new")  # ...after its config.json, before its weights
    (out / "model.safetensors").write_text("old")
    for leftover in (utils.EXPORT_STAGING, "checkpoints/.tmp-step_00000003", "checkpoints/.del-step_00000001"):
        (out / leftover).mkdir(parents=True)
        (out / leftover / "model.safetensors").write_text("partial")
    (out / utils.RUN_FILE).write_text(json.dumps({"run_id": "r1", "settings": {"seed": 1}}))
    run = _run(acc, out, resume="latest")
    assert run.run_id == "r1"  # the same settings: the run continues
    assert (out / "model.safetensors").read_text() == "new" and (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "config.json", "model.safetensors",
                                                      utils.RUN_FILE]
    utils.release_locks()


def test_check_log_file_refuses_folders_and_unwritable_paths_and_leaves_no_file(tmp_path):
    with pytest.raises(utils.OutputError, match=r"^--log_file .* is a folder: pass a file path such as "):
        utils.check_log_file(str(tmp_path))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(utils.OutputError, match=r"^--log_file .*a_file/log.jsonl: cannot write there \(.+\); "):
        utils.check_log_file(str(blocker / "log.jsonl"))
    # A new nested folder is created; the file is not, nor is the probe left behind.
    nested = tmp_path / "logs" / "run1" / "log.jsonl"
    utils.check_log_file(str(nested))
    assert nested.parent.is_dir() and list(nested.parent.iterdir()) == []
    existing = tmp_path / "old.jsonl"
    existing.write_text('{"step": 1}\n')
    utils.check_log_file(str(existing))
    assert existing.read_text() == '{"step": 1}\n'
