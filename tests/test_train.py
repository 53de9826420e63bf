"""End-to-end tests of train_icsd.py through `accelerate launch`, plus its metric and schedule code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CAMVID = ROOT.parent / "shared" / "data" / "camvid"
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import train_icsd  # noqa: E402

TINY = "config:segformer-tiny"


def launch(args, *, nproc: int = 1, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train_icsd.py under `accelerate launch` on the CPU, as a user would."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", ACCELERATE_USE_CPU="1",
               OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"), PYTHONUNBUFFERED="1")
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
    if nproc > 1:
        # `--cpu --num_processes 2` silently starts one process; --multi_gpu with ACCELERATE_USE_CPU starts two.
        launcher += ["--multi_gpu", "--num_processes", str(nproc), "--main_process_port", str(29500 + os.getpid() % 500)]
    else:
        launcher += ["--num_processes", "1"]
    proc = subprocess.run(launcher + [str(ROOT / "train_icsd.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_icsd.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


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
# Metrics against an independent numpy implementation
# ---------------------------------------------------------------------------------------------------------
def numpy_metrics(preds, labels, num_labels, ignore_index):
    inter = np.zeros(num_labels)
    area_pred = np.zeros(num_labels)
    area_label = np.zeros(num_labels)
    for p, l in zip(preds, labels):
        keep = l != ignore_index
        p, l = p[keep], l[keep]
        for c in range(num_labels):
            inter[c] += np.sum((p == c) & (l == c))
            area_pred[c] += np.sum(p == c)
            area_label[c] += np.sum(l == c)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
        acc = inter / area_label
    return {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": inter.sum() / area_label.sum(), "per_category_iou": iou}


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
    cm = sum(train_icsd.confusion_matrix(torch.from_numpy(p), torch.from_numpy(l), C, ignore)
             for p, l in zip(preds, labels))
    ours = train_icsd.metrics_from_confusion(cm)
    ref = numpy_metrics(preds, labels, C, ignore)
    assert ours["mean_iou"] == pytest.approx(ref["mean_iou"], rel=1e-12)
    assert ours["mean_accuracy"] == pytest.approx(ref["mean_accuracy"], rel=1e-12)
    assert ours["overall_accuracy"] == pytest.approx(ref["overall_accuracy"], rel=1e-12)
    assert ours["per_category_iou"][4] == 0.0  # predicted, never true
    assert ours["per_category_iou"][5] is None  # neither: left out of the mean
    np.testing.assert_allclose([v for v in ours["per_category_iou"][:5]], ref["per_category_iou"][:5], rtol=1e-12)


def test_lr_schedule_and_sampler_are_pure_functions_of_counters():
    assert train_icsd.lr_factor(0, 100, "poly") == 1.0
    assert train_icsd.lr_factor(100, 100, "poly") == 0.0
    assert train_icsd.lr_factor(50, 100, "poly") == pytest.approx(0.5**0.9)
    assert train_icsd.lr_factor(0, 100, "linear", warmup=10) == pytest.approx(0.1)
    assert train_icsd.lr_factor(10, 110, "cosine", warmup=10) == pytest.approx(1.0)
    s = train_icsd.EpochShuffleSampler(50, seed=3)
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
# The script end to end
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distill", train_icsd.DISTILL_MODES)
def test_every_mode_on_synthetic_and_reload(tmp_path, distill):
    out = tmp_path / distill
    launch(synthetic_args(out, distill, steps=3, checkpointing_steps=3))
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
    launch(args)
    res = results(out)
    assert res["train_steps"] == 2 and len(res["eval_per_category_iou"]) == 11
    if distill == "aicsd":
        # The metrics the script reports are those of the exported model on the full-resolution labels.
        _, eval_hf, info = data.load_splits(dataset_name=str(CAMVID), max_eval_samples=3)
        ref = _recompute_miou(out, eval_hf, info)
        assert res["eval_mean_iou"] == pytest.approx(ref["mean_iou"], abs=1e-6)
        assert res["eval_overall_accuracy"] == pytest.approx(ref["overall_accuracy"], abs=1e-6)


def test_two_processes_give_the_same_eval_metrics(tmp_path):
    one = tmp_path / "one"
    launch(synthetic_args(one, "none", steps=2, checkpointing_steps=2, max_eval_samples=7))
    two = tmp_path / "two"
    # Same checkpoint, evaluated by two processes: 7 images over 2 processes and batches of 2 is uneven.
    launch(synthetic_args(two, "none", steps=2, max_eval_samples=7,
                          resume_from_checkpoint=one / "checkpoints" / "step_00000002"), nproc=2)
    r1, r2 = results(one), results(two)
    assert r1["num_processes"] == 1 and r2["num_processes"] == 2
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou"):
        assert r1[key] == r2[key], key


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    straight = tmp_path / "straight"
    launch(synthetic_args(straight, "aicsd", steps=6, checkpointing_steps=3, alw_granularity="step",
                          dataloader_num_workers=1, max_train_samples=8))  # 4 steps per epoch: resume mid-epoch 2
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    src = straight / "checkpoints" / "step_00000003"
    subprocess.run(["cp", "-r", str(src), str(resumed / "checkpoints")], check=True)
    launch(synthetic_args(resumed, "aicsd", steps=6, checkpointing_steps=3, alw_granularity="step",
                          dataloader_num_workers=1, max_train_samples=8, resume_from_checkpoint="latest"))
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], weights(src)[k]) for k in a)  # training went on after the checkpoint


def run_script(args, timeout: int = 120) -> subprocess.CompletedProcess:
    """train_icsd.py as a plain `python` process (what `accelerate launch` runs in each worker)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "train_icsd.py"), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bad_flags_fail_with_one_line(tmp_path):
    proc = run_script(["--dataset", "no-such-preset", "--output_dir", tmp_path])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("train_icsd.py: error: unknown --dataset 'no-such-preset'")
    assert "Traceback" not in proc.stderr
    # Under `accelerate launch` the same line reaches the user (the launcher then reports the exit status).
    proc = launch(["--dataset", "no-such-preset", "--output_dir", tmp_path], check=False)
    assert proc.returncode != 0
    assert "train_icsd.py: error: unknown --dataset 'no-such-preset'; presets:" in proc.stderr


def test_push_to_hub_uploads_the_output_folder_without_checkpoints(tmp_path, monkeypatch):
    import huggingface_hub
    from accelerate import PartialState

    PartialState()  # the script's logger needs it, as under `accelerate launch`
    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, exist_ok, private):
            calls["create"] = (repo_id, exist_ok, private)
            return type("Repo", (), {"repo_id": f"someone/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            calls["upload"] = (repo_id, folder_path, ignore_patterns)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = train_icsd.parse_args(["--dataset", "synthetic", "--output_dir", str(tmp_path / "my-student"),
                                  "--push_to_hub", "--distill", "none"])
    assert args.hub_model_id == "my-student"  # defaults to the output folder's name
    train_icsd.push_to_hub(args)
    assert calls["create"] == ("my-student", True, False)
    repo_id, folder, ignore = calls["upload"]
    assert repo_id == "someone/my-student" and folder == str(tmp_path / "my-student")
    assert "checkpoints/*" in ignore


def test_model_card_redacts_tokens_and_names_the_method(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train_icsd.py", "--dataset_name", "hf_abcdefghijklmnopqrstuvwxyz123456"])
    args = train_icsd.parse_args(["--dataset", "synthetic", "--distill", "aicsd", "--lambda_ics", "7"])
    _, _, info = data.load_splits("synthetic", max_train_samples=2, max_eval_samples=2)
    card = train_icsd.write_model_card(args, info, {"eval_mean_iou": 0.5, "eval_per_category_iou": [0.5] * 9}, 10)
    assert "hf_abcdefghijklmnopqrstuvwxyz123456" not in card and "hf_***" in card
    assert "λ_ics=7.0" in card and "AICSD" in card and "| mIoU | 50.00 |" in card


def test_tracking_logs_every_term_alpha_and_lr_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard", reason="requirements-dev.txt installs it")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    launch(synthetic_args(out, "aicsd", steps=4, with_tracking=True, report_to="tensorboard", logging_steps=2,
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
