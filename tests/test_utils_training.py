"""Tests of utils_training.py: metrics, schedule, sampler, the loss tracker, checkpoints and the one-line CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator

import utils_training as utils
from helpers import numpy_metrics


# ---------------------------------------------------------------------------------------------------------
# Metrics against an independent numpy implementation
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


def test_lr_schedule_and_sampler_are_pure_functions_of_counters():
    assert utils.lr_factor(0, 100, "poly") == 1.0
    assert utils.lr_factor(100, 100, "poly") == 0.0
    assert utils.lr_factor(50, 100, "poly") == pytest.approx(0.5**0.9)
    assert utils.lr_factor(0, 100, "linear", warmup=10) == pytest.approx(0.1)
    assert utils.lr_factor(10, 110, "cosine", warmup=10) == pytest.approx(1.0)
    s = utils.EpochShuffleSampler(50, seed=3)
    s.set_epoch(2)
    first = list(s)
    assert sorted(first) == list(range(50))
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(2)
    assert list(s) == first
    state = torch.random.get_rng_state()
    list(s)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched



# ---------------------------------------------------------------------------------------------------------
# The loss tracker, checkpoints and the command line
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


def test_checkpoints_rotate_and_latest_skips_incomplete_ones(tmp_path):
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))
    for step in (1, 2, 3):
        state = utils.TrainState(completed_steps=step, epoch=0, batches_in_epoch=step).to_json(distill="kd")
        utils.save_checkpoint(acc, model, str(tmp_path), state, total_limit=2)
    assert [p.name for p in utils.list_checkpoints(str(tmp_path))] == ["step_00000002", "step_00000003"]
    (tmp_path / "checkpoints" / "step_00000009").mkdir()  # no training_state.json: never taken
    latest = utils.checkpoint_candidates("latest", str(tmp_path))
    assert [p.name for p in latest] == ["step_00000003", "step_00000002"]  # newest first: the order to try them
    assert json.loads((tmp_path / "checkpoints" / "step_00000003" / utils.STATE_FILE).read_text())["distill"] == "kd"
    with pytest.raises(utils.UsageError, match="not a complete checkpoint folder"):
        utils.checkpoint_candidates(str(tmp_path / "checkpoints" / "step_00000009"), str(tmp_path))
    assert utils.checkpoint_problem(latest[0], acc) is None
    state = utils.load_checkpoint(acc, latest[0], batches_per_epoch=3)
    assert (state.completed_steps, state.epoch, state.batches_in_epoch) == (3, 1, 0)  # the epoch was complete


def test_a_rotation_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    acc = Accelerator(cpu=True)
    model = acc.prepare(torch.nn.Linear(2, 2))

    def save(step: int) -> None:
        utils.save_checkpoint(acc, model, str(tmp_path), utils.TrainState(completed_steps=step).to_json(), 1)

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
    assert [p.name for p in utils.list_checkpoints(str(tmp_path))] == ["step_00000002"]
    save(3)  # the next save finishes the interrupted deletion off
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]


def test_checkpoint_of_a_nonfinite_model_is_refused(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="first in weight"):
        utils.save_checkpoint(acc, model, str(tmp_path), utils.TrainState().to_json(), None)
    assert not utils.list_checkpoints(str(tmp_path))


def test_run_cli_prints_one_line_and_returns_2(capsys):
    def failing():
        raise utils.UsageError("--crop_size takes S or H W\n(positive)")

    assert utils.run_cli(failing, (utils.UsageError,), "prog") == 2
    assert capsys.readouterr().err == "prog: error: --crop_size takes S or H W (positive)\n"
    assert utils.run_cli(lambda: None, (utils.UsageError,), "prog") == 0
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                           "last):\n  File ...\ndata.DataError: row 3: bad label")
    assert utils.one_line(wrapped) == "row 3: bad label"


def test_buffer_snapshot_gives_a_skipped_step_its_batchnorm_statistics_back():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = utils.BufferSnapshot(model)
    for micro_batch in (torch.randn(2, 3, 4, 4), torch.full((2, 3, 4, 4), float("nan"))):  # one step, 2 micro-batches
        buffers.start_step()
        model(micro_batch)
    assert torch.isnan(model[1].running_mean).all() and int(model[1].num_batches_tracked) == 2
    buffers.end_step(skipped=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # NaN gone, count too
    buffers.start_step()
    model(torch.randn(2, 3, 4, 4))
    buffers.end_step(skipped=False)  # an applied step keeps what its forward passes did
    assert int(model[1].num_batches_tracked) == 1 and not torch.equal(before["1.running_mean"], model[1].running_mean)
    off = utils.BufferSnapshot(model, enabled=False)
    off.start_step()
    model(torch.full((2, 3, 4, 4), float("nan")))
    off.end_step(skipped=True)
    assert torch.isnan(model[1].running_mean).all()  # disabled: a non-finite step ends the run instead


def test_finite_model_check_covers_buffers(tmp_path):
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert utils.first_nonfinite(model) is None
    model[1].running_var[1] = float("inf")
    assert utils.first_nonfinite(model) == "1.running_var"
    with pytest.raises(FloatingPointError, match=r"refusing to save the final model: .*first in 1\.running_var"):
        utils.check_finite_model(model, "the final model")
    with pytest.raises(FloatingPointError, match="first in 1.running_var"):
        utils.save_checkpoint(acc, model, str(tmp_path), utils.TrainState().to_json(), None)


def test_a_failure_after_the_model_is_saved_says_where_the_model_is():
    with pytest.raises(utils.AfterTrainingError) as caught:
        with utils.report_saved_model("runs/x"):
            raise RuntimeError("out of memory\nwhile evaluating")
    assert str(caught.value) == ("after training, the final evaluation or export failed (RuntimeError: out of memory "
                                 "while evaluating); the trained model is saved in runs/x (from_pretrained loads it)")
    with utils.report_saved_model("runs/x"):  # no failure: nothing happens
        pass


def test_an_export_lands_weights_last_and_the_folder_stays_locked(tmp_path, monkeypatch):
    import subprocess
    import sys

    import train_icsd

    acc = Accelerator(cpu=True)
    out = tmp_path / "out"
    args = train_icsd.parse_args(["--dataset", "synthetic", "--output_dir", str(out)])
    run = utils.claim_output_dir(acc, args)
    assert run.run_id and (out / utils.LOCK_FILE).is_file()
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
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "README.md", utils.LOCK_FILE}
    assert all((out / n).read_text() == "new" for n in ("config.json", "model.safetensors", "README.md"))
    # Moving the files in did not drop this process's POSIX lock (closing any descriptor of run.lock would).
    probe = ("import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)")
    assert subprocess.run([sys.executable, "-c", probe, str(out / utils.LOCK_FILE)]).returncode == 3
    utils.release_locks()
    assert not (out / utils.LOCK_FILE).exists()


def test_a_dead_processs_lock_is_taken_over_and_another_hosts_is_not(tmp_path, caplog):
    import os
    import socket

    import train_icsd

    acc = Accelerator(cpu=True)
    out = tmp_path / "out"
    out.mkdir()
    args = train_icsd.parse_args(["--dataset", "synthetic", "--output_dir", str(out)])
    lock = out / utils.LOCK_FILE
    lock.write_text(json.dumps({"pid": 999_999_999, "host": "elsewhere", "started": "yesterday"}))
    with pytest.raises(utils.OutputError, match="names pid 999999999 on host elsewhere, which cannot be checked"):
        utils.claim_output_dir(acc, args)
    assert json.loads(lock.read_text())["host"] == "elsewhere"  # left as it was
    lock.write_text(json.dumps({"pid": 999_999_999, "host": socket.gethostname(), "started": "yesterday"}))
    with caplog.at_level("WARNING"):
        utils.claim_output_dir(acc, args)
    assert "taking over the lock of pid 999999999 (since yesterday), which is no longer running" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    utils.release_locks()


def test_a_start_finishes_what_a_killed_run_left_half_done(tmp_path):
    import train_icsd

    acc = Accelerator(cpu=True)
    out = tmp_path / "out"
    args = train_icsd.parse_args(["--dataset", "synthetic", "--output_dir", str(out), "--resume_from_checkpoint",
                                  "latest"])
    (out / utils.EXPORT_READY).mkdir(parents=True)  # a complete export, killed while moving in...
    (out / utils.EXPORT_READY / "model.safetensors").write_text("new")
    (out / "config.json").write_text("new")  # ...after its config.json, before its weights
    (out / "model.safetensors").write_text("old")
    for leftover in (utils.EXPORT_STAGING, "checkpoints/.tmp-step_00000003", "checkpoints/.del-step_00000001"):
        (out / leftover).mkdir(parents=True)
        (out / leftover / "model.safetensors").write_text("partial")
    (out / utils.RUN_FILE).write_text(json.dumps({"run_id": "r1", "settings": utils.run_settings(args)}))
    run = utils.claim_output_dir(acc, args)
    assert run.run_id == "r1"  # the same settings: the run continues
    assert (out / "model.safetensors").read_text() == "new" and (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in out.rglob("*")) == ["checkpoints", "config.json", "model.safetensors",
                                                      utils.RUN_FILE, utils.LOCK_FILE]
    utils.release_locks()


# ---------------------------------------------------------------------------------------------------------
# --log_file is checked at the start, not at the first logging step
# ---------------------------------------------------------------------------------------------------------
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
    utils.check_log_file(None)
