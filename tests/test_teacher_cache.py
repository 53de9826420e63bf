"""The teacher-logit cache (teacher_cache.py, --teacher_cache): cached-and-cropped logits against the live
teacher's, the promise a cache keeps, a build killed midway, a full disk, resume and several processes."""

from __future__ import annotations

import errno
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from helpers import TINY, launch, run_inprocess, train_ok

import data
import models
import teacher_cache
import utils_training

SEGFORMER_ADAPTER = models.make_input_adapter(models.MODEL_PRESETS[TINY].make_processor())  # ImageNet mean/std
CLASSES = ("a", "b", "c", "d")


class LinearTeacher(torch.nn.Module):
    """A per-pixel linear teacher (a 1x1 convolution): it commutes with resampling, cropping and flipping."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, len(CLASSES), 1)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for parameter in self.conv.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator))

    def forward(self, pixel_values, return_dict=True):
        return SimpleNamespace(logits=self.conv(pixel_values))


def png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def split(sizes, seed: int = 0, classes=CLASSES) -> tuple[datasets.Dataset, data.DataInfo]:
    """Smooth random images of the given (H, W) sizes, labels without ignored pixels, as load_splits gives them."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for height, width in sizes:
        coarse = rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8)
        images.append(png(np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))))
        labels.append(png(rng.integers(0, len(classes), (height, width), dtype=np.uint8)))
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Image(decode=False)})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features, split="train")
    return ds, data.DataInfo(dict(enumerate(classes)), 255, "image", "label", (48, 64))


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build(accelerator, folder, teacher, ds, info, crop=(48, 64), adapter=SEGFORMER_ADAPTER, **kwargs):
    return teacher_cache.prepare(accelerator, teacher, adapter, ds, info, folder, crop_size=crop, **kwargs)


def chunk_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "chunks").iterdir())}


# ---- The cached logits are the live teacher's ------------------------------------------------------------------
@pytest.mark.filterwarnings("error:The given NumPy array is not writable")  # the memory map is read-only
def test_cached_crops_equal_the_linear_teacher_on_the_same_crop(accelerator, tmp_path):
    sizes = [(37, 50), (48, 64), (97, 130), (23, 150), (160, 41), (64, 200)]  # smaller and larger than the crop
    ds, info = split(sizes)
    teacher = LinearTeacher()
    crop = (48, 64)
    train = data.build_train_dataset(ds, info, crop_size=crop, pad_mean=(0.5, 0.5, 0.5), seed=3)
    train.teacher_cache = build(accelerator, tmp_path / "cache", teacher, ds, info, crop)
    # The uint8 crop is off the exact resampling by at most one level (torch's uint8 kernel: rounding and
    # fixed-point weights; measured 1.0), which the convolution scales by sum_c |w_kc| / (255 std_c); the
    # cached map is float16, off by at most 2**-11 of its largest value.
    std = torch.tensor(models.IMAGENET_STD)
    tolerance = float((teacher.conv.weight.detach()[:, :, 0, 0].abs() / (255 * std)).sum(1).max())
    seen = set()
    for epoch in range(6):
        train.set_epoch(epoch)
        for index in range(len(ds)):
            item = train[index]
            geometry = data.crop_geometry(3, epoch, index, sizes[index], crop)
            with torch.no_grad():
                live = teacher(SEGFORMER_ADAPTER(item["pixel_values"][None])).logits[0]
            cached = item["teacher_logits"]
            assert cached.dtype == torch.float16 and cached.shape == live.shape
            content = item["labels"] != 255
            error = (cached.float() - live).abs()[:, content].max()
            assert error <= tolerance + 2**-11 * float(live.abs().max()) + 1e-5, (epoch, index, float(error))
            assert not cached[:, ~content].any()  # padding holds zeros (its pixels are ignored)
            seen.add((geometry.flip, geometry.scale > 1, geometry.rows.out < crop[0] or geometry.cols.out < crop[1]))
    assert len(seen) >= 6, seen  # flipped or not, enlarged or shrunk, padded or not


@pytest.mark.parametrize("flip", [False, True])
def test_resample_of_an_aligned_window_is_torchs_antialiased_resize(flip):
    """A window on whole map cells, filling the crop: the result is F.interpolate (antialiased triangle filter)
    of those cells to the output size, for maps 1-4 times coarser than the image, enlarged or shrunk."""
    rng = np.random.default_rng(1)
    for _ in range(40):
        ratio, (h, w), (t_h, t_w) = int(rng.integers(1, 5)), rng.integers(4, 40, 2), rng.integers(2, 60, 2)
        cached = rng.standard_normal((3, h, w)).astype(np.float16)
        a, b = rng.integers(0, h - 1), rng.integers(0, w - 1)
        m, n = rng.integers(1, h - a + 1), rng.integers(1, w - b + 1)
        crop = (int(rng.integers(m * ratio, 3 * m * ratio + 1)), int(rng.integers(n * ratio, 3 * n * ratio + 1)))
        geometry = data.CropGeometry(1.0, data.Window(a * ratio, m * ratio, crop[0]),
                                     data.Window(b * ratio, n * ratio, crop[1]), flip)
        got = teacher_cache.resample(cached.transpose(1, 2, 0), (h * ratio, w * ratio), geometry, crop, (t_h, t_w))
        window = torch.from_numpy(cached[:, a:a + m, b:b + n].astype(np.float32))[None]
        want = F.interpolate(window, size=(t_h, t_w), mode="bilinear", align_corners=False, antialias=True)[0]
        assert torch.allclose(got, want.flip(-1) if flip else want, atol=1e-5)


def test_a_real_teachers_cached_whole_image_logits_are_its_live_ones(accelerator, tmp_path):
    torch.manual_seed(0)
    teacher = models.load_teacher(TINY, dict(enumerate(CLASSES)))
    sizes = [(70, 90), (64, 64), (45, 123)]
    ds, info = split(sizes)
    build(accelerator, tmp_path / "cache", teacher, ds, info, crop=(64, 64))
    images = data.build_eval_dataset(ds, info, pad_mean=(0.0, 0.0, 0.0))
    for index, (height, width) in enumerate(sizes):
        with torch.no_grad():
            live = models.segmentation_logits(teacher, SEGFORMER_ADAPTER(images[index]["pixel_values"][None]))[0]
        whole = data.CropGeometry(1.0, data.Window(0, height, height), data.Window(0, width, width), False)
        reader = teacher_cache.TeacherCache(tmp_path / "cache", (height, width), tuple(live.shape[-2:]))
        cached = reader.logits(index, (height, width), whole).float()
        assert torch.allclose(cached, live, rtol=2**-11, atol=1e-6)


# ---- The promise: another teacher, dataset, class list or preprocessing is refused; the same is reused ----------
def test_a_cache_is_refused_for_another_setup_and_reused_for_the_same(accelerator, tmp_path, caplog):
    ds, info = split([(40, 60)] * 5)
    folder = tmp_path / "cache"
    build(accelerator, folder, LinearTeacher(), ds, info)
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "chunks").iterdir()}
    caplog.set_level("INFO")
    build(accelerator, folder, LinearTeacher(), ds, info)
    assert f"reusing the teacher cache in {folder}" in caplog.text
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "chunks").iterdir()} == before  # nothing rewritten
    other_classes = data.DataInfo(dict(enumerate(("a", "b", "c", "e"))), 255, "image", "label", (48, 64))
    bgr = models.make_input_adapter(models.MODEL_PRESETS["config:mobilevit-s"].make_processor())
    other_images = split([(40, 60)] * 5, seed=1)[0]
    for why, changed in [("the teacher's weights", dict(teacher=LinearTeacher(1))),
                         ("the training split", dict(ds=other_images)),
                         ("the training rows 4 here, 5 there", dict(ds=ds.select(range(4)))),
                         ("the class list", dict(info=other_classes)),
                         ("the teacher's input preprocessing", dict(adapter=bgr)),
                         ("--teacher_cache_stride 2 here, 1 there", dict(stride=2))]:
        call = {"teacher": LinearTeacher(), "ds": ds, "info": info, **changed}
        with pytest.raises(utils_training.UsageError) as refused:
            build(accelerator, folder, **call)
        message = str(refused.value)
        assert "\n" not in message and why in message and f"--teacher_cache {folder}" in message, message
        assert message.count(" here, ") == 1 + ("rows" in why), message  # only what differs (a subset: both)
    assert {p.name: p.stat().st_mtime_ns for p in (folder / "chunks").iterdir()} == before
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "model.safetensors").write_bytes(b"x")
    with pytest.raises(utils_training.UsageError, match="is not empty and holds no cache.json"):
        build(accelerator, stranger, LinearTeacher(), ds, info)


def test_a_cache_read_for_other_images_is_one_line(accelerator, tmp_path):
    ds, info = split([(40, 60)] * 2)
    reader = build(accelerator, tmp_path / "cache", LinearTeacher(), ds, info)
    with pytest.raises(data.DataError, match=r"training row 1 is 61x40 \(WxH\), but the teacher cache .* 60x40 image"):
        reader.logits(1, (40, 61), data.crop_geometry(0, 0, 1, (40, 61), (48, 64)))


# ---- A build killed midway resumes at the first missing chunk ---------------------------------------------------
def test_a_killed_build_resumes_and_never_reads_a_half_written_chunk(accelerator, tmp_path, monkeypatch):
    sizes = [(30 + 3 * i, 50) for i in range(130)]  # 130 rows: chunks of 2 rows
    ds, info = split(sizes)
    clean = tmp_path / "clean"
    build(accelerator, clean, LinearTeacher(), ds, info)
    assert len(chunk_bytes(clean)) == 2 * 65

    folder, saves, save = tmp_path / "killed", [], teacher_cache._save

    def killed_on_the_25th_save(path, array):
        saves.append(path.name)
        if len(saves) == 25:  # half of a file written under its temporary name, then the process dies
            path.with_name(f".tmp-{path.name}").write_bytes(b"\x93NUMPY half")
            raise KeyboardInterrupt
        save(path, array)

    monkeypatch.setattr(teacher_cache, "_save", killed_on_the_25th_save)
    with pytest.raises(KeyboardInterrupt):
        build(accelerator, folder, LinearTeacher(), ds, info)
    assert saves[24] == "00012.npy" and (folder / "chunks" / ".tmp-00012.npy").exists()
    monkeypatch.setattr(teacher_cache, "_save", save)
    (folder / "chunks" / "00011.index.npy").unlink()  # as if killed between a chunk's data and its index
    assert not json.loads((folder / "cache.json").read_text())["complete"]
    rows = []
    teacher_map = teacher_cache._teacher_map
    monkeypatch.setattr(teacher_cache, "_teacher_map", lambda *a: rows.append(a[-1]) or teacher_map(*a))
    reader = build(accelerator, folder, LinearTeacher(), ds, info)
    assert rows[0] == "training row 22" and len(rows) == 130 - 22  # from chunk 11, the first one not whole, on
    assert chunk_bytes(folder) == chunk_bytes(clean)  # no temporary file left, every chunk as a clean build's
    assert json.loads((folder / "cache.json").read_text())["complete"]
    assert reader.logits(23, sizes[23], data.crop_geometry(0, 0, 23, sizes[23], (48, 64))).shape == (4, 48, 64)


def test_a_stop_request_while_building_keeps_the_whole_chunks_and_exits_0(accelerator, tmp_path, monkeypatch):
    ds, info = split([(40, 60)] * 5)
    asked = iter([False] * 3 + [True])
    monkeypatch.setattr(utils_training, "stop_requested", lambda: next(asked))
    with pytest.raises(SystemExit) as stopped:
        build(accelerator, tmp_path / "cache", LinearTeacher(), ds, info)
    assert stopped.value.code == 0
    whole = sorted(f"0000{i}{kind}.npy" for i in range(3) for kind in ("", ".index"))
    assert sorted(chunk_bytes(tmp_path / "cache")) == whole


# ---- A full disk is one line, before training -------------------------------------------------------------------
def test_a_full_disk_is_one_line_before_training(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(teacher_cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=100_000))
    ran = run_inprocess(synthetic(tmp_path / "out", folder))
    assert ran.returncode == 2
    line = ran.stderr.strip().splitlines()[-1]
    assert line.startswith(f"train_icsd.py: error: --teacher_cache {folder}: the teacher cache needs about 0.3 MB "
                           "more there, but only 0.1 MB are free"), line
    assert "step 1/" not in ran.stderr and not list((folder / "chunks").iterdir())


def test_a_write_that_fails_is_one_line_naming_the_folder(accelerator, tmp_path, monkeypatch):
    ds, info = split([(40, 60)] * 3)

    def no_space(file, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(teacher_cache.np, "save", no_space)
    with pytest.raises(utils_training.OutputError) as failed:
        build(accelerator, tmp_path / "cache", LinearTeacher(), ds, info)
    assert str(failed.value).startswith(f"cannot write the teacher cache to {tmp_path / 'cache' / 'chunks'}: No space "
                                        "left on device (it needs about 0.1 MB")
    assert "another --teacher_cache folder" in str(failed.value) and "--output_dir" not in str(failed.value)


# ---- The script: flags, resume, several processes ---------------------------------------------------------------
def synthetic(out: Path, cache: Path, distill: str = "aicsd", steps: int = 3, **extra) -> list:
    args = ["--dataset", "synthetic", "--student_model_name_or_path", TINY, "--teacher_model_name_or_path", TINY,
            "--distill", distill, "--max_train_steps", steps, "--per_device_train_batch_size", 2, "--crop_size", 64,
            "--max_eval_samples", 4, "--max_train_samples", 16, "--learning_rate", 1e-3, "--dataloader_num_workers",
            0, "--output_dir", out, "--teacher_cache", cache, "--num_pictures", 0]
    for k, v in extra.items():
        args += [f"--{k}", v]
    return args


def test_the_flag_needs_a_teacher_and_a_positive_stride(tmp_path):
    for extra, message in [(dict(distill="none"), "--teacher_cache keeps a teacher's logits, but --distill none"),
                           (dict(teacher_cache_stride=0), "--teacher_cache_stride must be >= 1; got 0")]:
        args = synthetic(tmp_path / "out", tmp_path / "cache", **{"distill": "kd", **extra})
        ran = run_inprocess(args)
        assert ran.returncode == 2, ran.stderr[-500:]
        assert ran.stderr.strip().splitlines()[-1].startswith(f"train_icsd.py: error: {message}")


@pytest.mark.parametrize("distill", ["cwd", "ickd", "icsd"])  # kd and aicsd: the tests below
def test_every_distilling_objective_trains_from_the_cache(tmp_path, distill):
    ran = train_ok(synthetic(tmp_path / "out", tmp_path / "cache", distill, steps=2, max_train_samples=4))
    assert "teacher cache built" in ran.stderr
    assert json.loads((tmp_path / "out" / "all_results.json").read_text())["train_steps"] == 2


def test_non_finite_cached_logits_stop_the_first_step_in_one_line(tmp_path):
    cache = tmp_path / "cache"
    train_ok(synthetic(tmp_path / "first", cache, "kd", steps=1, max_train_samples=4))
    for path in (cache / "chunks").glob("?????.npy"):
        values = np.load(path, mmap_mode="r+")
        values[::7] = np.inf
        values.flush()
    ran = run_inprocess(synthetic(tmp_path / "second", cache, "kd", steps=1, max_train_samples=4))
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1].startswith(f"train_icsd.py: error: the teacher {TINY} gives NaN/Inf "
                                                          "logits on the first training batch"), ran.stderr[-800:]
    assert f"delete --teacher_cache {cache} to rebuild it" in ran.stderr


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_with_the_cache_ends_bit_identical_and_differs_from_the_live_teacher(tmp_path):
    cache = tmp_path / "cache"
    straight, again, resumed, live = (tmp_path / name for name in ("straight", "again", "resumed", "live"))
    common = dict(steps=6, checkpointing_steps=3, dataloader_num_workers=1, max_train_samples=8)
    train_ok(synthetic(straight, cache, **common))
    train_ok(synthetic(again, cache, **common))  # reusing the cache trains what building it did
    assert all(torch.equal(v, weights(again)[k]) for k, v in weights(straight).items())
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_00000003", resumed / "checkpoints" / "step_00000003")
    ran = train_ok(synthetic(resumed, cache, **common, resume_from_checkpoint="latest"))
    assert f"reusing the teacher cache in {cache}" in ran.stderr
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The cache did stand in for the teacher: the same run with the live teacher trains other weights, and a
    # run without the cache cannot resume a cached run's checkpoint.
    args = [v for v in synthetic(live, cache, **common) if v not in ("--teacher_cache", cache)]
    train_ok(args)
    assert not all(torch.equal(a[k], weights(live)[k]) for k in a)
    ran = run_inprocess([v for v in synthetic(resumed, cache, **common, resume_from_checkpoint="latest")
                         if v not in ("--teacher_cache", cache)])
    assert ran.returncode == 2 and "--teacher_cache False here, True there" in ran.stderr


def test_one_and_two_processes_build_the_same_cache_and_train_alike(tmp_path):
    """1 process x 2 accumulated micro-batches against 2 processes x 1 (the same samples in each BatchNorm batch):
    the same cache, byte for byte, and training that agrees as with the live teacher; not to the bit, for each
    process draws the dropout masks of its seed, and DDP keeps rank 0's BatchNorm running statistics. One thread
    per process in both, for the thread count changes the float summation order and so, now and then, the last
    bit of a float16 logit."""
    runs = {}
    for nproc in (1, 2):
        out, cache, log = tmp_path / f"out{nproc}", tmp_path / f"cache{nproc}", tmp_path / f"log{nproc}.jsonl"
        proc = launch(synthetic(out, cache, "kd", steps=3, gradient_accumulation_steps=3 - nproc, log_file=log,
                                logging_steps=1), nproc=nproc, threads=1)
        assert ": 16 images" + (" (8 + 8 by process)" if nproc == 2 else "\n") in proc.stderr, proc.stderr[-3000:]
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        runs[nproc] = (json.loads((out / "all_results.json").read_text()), chunk_bytes(cache),
                       [line["train/loss"] for line in lines if "train/loss" in line])
    (one, one_chunks, one_losses), (two, two_chunks, two_losses) = runs[1], runs[2]
    assert two["num_processes"] == 2 and one_chunks == two_chunks and len(one_chunks) == 32
    assert len(one_losses) == 3 and np.allclose(one_losses, two_losses, rtol=0.01), (one_losses, two_losses)
    assert two["eval_mean_iou"] == pytest.approx(one["eval_mean_iou"], abs=0.02)
