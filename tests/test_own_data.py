"""A user's own data: image/mask folders in the layouts people have, and damaged or ambiguous inputs, each a
one-line DataError naming the file or the problem. The folders are written from a few CamVid rows."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import CAMVID, TINY, run_inprocess, train_ok

import data

pytestmark = pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid is not here")
CLASSES = json.loads((CAMVID / "id2label.json").read_text()) if CAMVID.is_dir() else {}
MEAN = (0.485, 0.456, 0.406)


@pytest.fixture(scope="module")
def camvid_rows() -> list[tuple[str, Image.Image, Image.Image]]:
    """(name, RGB image, "L" mask) of 10 CamVid validation frames at a quarter of their size (90x120)."""
    table = pq.read_table(CAMVID / "data" / "validation-00000-of-00001.parquet").slice(0, 10).to_pylist()
    return [(row["name"], Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").resize((120, 90)),
             Image.open(io.BytesIO(row["label"]["bytes"])).resize((120, 90), Image.Resampling.NEAREST))
            for row in table]


def write_pairs(rows, image_dir: Path, mask_dir: Path, image_ext: str = ".png", mask_stem: str = "") -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    for name, image, mask in rows:
        image.save(image_dir / f"{name}{image_ext}")
        mask.save(mask_dir / f"{name}{mask_stem}.png")


# layout -> how it writes the 10 frames under a root: 6 train / 4 evaluation where it has split folders, with
# mmsegmentation's training files one folder deeper and JPEG images and `_mask` names in some.
LAYOUTS = {
    "images_masks": lambda root, rows: write_pairs(rows, root / "images", root / "masks", ".jpg", "_mask"),
    "mmsegmentation": lambda root, rows: [write_pairs(part, root / "img_dir" / split, root / "ann_dir" / split)
                                          for split, part in (("train/seq", rows[:6]), ("val", rows[6:]))],
    "ade20k": lambda root, rows: [write_pairs(part, root / "images" / split, root / "annotations" / split, ".jpg")
                                  for split, part in (("training", rows[:6]), ("validation", rows[6:]))],
    "split_folders": lambda root, rows: [write_pairs(part, root / split / "images", root / split / "masks")
                                         for split, part in (("train", rows[:6]), ("test", rows[6:]))],
}


def own_folder(tmp_path: Path, rows, layout: str) -> Path:
    root = tmp_path / layout
    LAYOUTS[layout](root, rows)
    (root / "id2label.json").write_text(json.dumps(CLASSES))
    return root


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_loads_its_pairs_and_splits(tmp_path, camvid_rows, layout):
    root = own_folder(tmp_path, camvid_rows, layout)
    train, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(root), validation_fraction=0.4))
    assert (len(train), len(evaluation)) == (6, 4)
    assert info.id2label == {int(k): v for k, v in CLASSES.items()} and info.name_column == "name"
    frames = {name: (np.asarray(image), np.asarray(mask)) for name, image, mask in camvid_rows}
    if layout != "images_masks":  # the folders' own splits, not a carve
        assert sorted(evaluation["name"]) == sorted(name for name, _, _ in camvid_rows[6:])
    assert len(set(train["name"]) | set(evaluation["name"])) == 10
    for split in (train, evaluation):  # each image comes with its own mask, decoded as for a Hub dataset
        samples = data.build_eval_dataset(split, info, pad_mean=MEAN)
        for index, (key, file) in enumerate(zip(split["name"], split["image"])):
            pixels, name = samples[index]["pixel_values"].permute(1, 2, 0).numpy(), Path(file["path"]).stem
            assert key == (f"seq/{name}" if "seq" in file["path"] else name)  # the path below the split folder
            assert np.array_equal(pixels, np.asarray(Image.open(file["path"]).convert("RGB")))
            if file["path"].endswith(".png"):  # lossless: the frame itself
                assert np.array_equal(pixels, frames[name][0])
            assert np.array_equal(samples[index]["labels"].numpy(), frames[name][1])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_trains_and_evaluates_on_its_own_splits(tmp_path, camvid_rows, layout):
    root = own_folder(tmp_path, camvid_rows, layout)
    ran = train_ok(["--dataset_name", root, "--student_model_name_or_path", TINY, "--distill", "none",
                    "--max_train_steps", 1, "--per_device_train_batch_size", 2, "--per_device_eval_batch_size", 4,
                    "--crop_size", 64, "--train_val_split", 0.4,
                    "--dataloader_num_workers", 1 if layout == "mmsegmentation" else 0,
                    "--output_dir", tmp_path / "out"])
    assert "***** none: 6 training images" in ran.stderr and "eval: 4 images on this process" in ran.stderr
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert len(results["eval_per_category_iou"]) == 11


def test_unpaired_images_and_masks_are_one_line_naming_the_first_few_and_the_count(tmp_path, camvid_rows):
    root = own_folder(tmp_path, camvid_rows, "split_folders")
    for name, _, _ in camvid_rows[:5]:
        (root / "train" / "masks" / f"{name}.png").unlink()
    with pytest.raises(data.DataError) as err:
        data.load_splits(data.DataOptions(dataset_name=str(root)))
    message = str(err.value)
    assert "\n" not in message and "images without a mask" in message and ": 5 (" in message
    assert str(root / "train" / "images") in message
    assert all(f"{name}.png" in message for name, _, _ in camvid_rows[:3]), message
    assert f"{camvid_rows[4][0]}.png" not in message  # the first few only

    shutil.rmtree(root)
    root = own_folder(tmp_path, camvid_rows, "mmsegmentation")
    (root / "img_dir" / "val" / f"{camvid_rows[7][0]}.png").unlink()
    with pytest.raises(data.DataError) as err:
        data.load_splits(data.DataOptions(dataset_name=str(root)))
    message = str(err.value)
    assert "\n" not in message and "masks without an image" in message, message
    assert f": 1 ({camvid_rows[7][0]}.png)" in message
    assert str(root / "ann_dir" / "val") in message


def test_two_images_for_one_mask_leave_one_unpaired(tmp_path, camvid_rows):
    root = own_folder(tmp_path, camvid_rows, "images_masks")
    camvid_rows[0][1].save(root / "images" / f"{camvid_rows[0][0]}.png")  # beside its .jpg
    with pytest.raises(data.DataError, match=rf"images without a mask.*: 1 \({camvid_rows[0][0]}\.(png|jpg)\)"):
        data.load_splits(data.DataOptions(dataset_name=str(root)))


@pytest.mark.parametrize("folders", [("images", "labels"), ("cats", "dogs")])
def test_a_folder_datasets_reads_as_classification_is_one_line_pointing_at_the_layouts(tmp_path, camvid_rows,
                                                                                       folders):
    root = tmp_path / "classes"
    write_pairs(camvid_rows[:4], root / folders[0], root / folders[1])
    (root / "id2label.json").write_text(json.dumps(CLASSES))
    with pytest.raises(data.DataError) as err:
        data.load_splits(data.DataOptions(dataset_name=str(root)))
    message = str(err.value)
    assert "\n" not in message and "image classification" in message and "ClassLabel" in message, message
    assert all(layout in message for layout in ("images/ + masks/", "img_dir/ + ann_dir/", "{train,val}/"))


@pytest.mark.parametrize("broken", ["image", "mask"])
def test_a_corrupt_file_in_a_folder_is_named_by_its_path(tmp_path, camvid_rows, broken):
    root = own_folder(tmp_path, camvid_rows, "split_folders")
    name = camvid_rows[0][0]
    bad = root / "train" / ("images" if broken == "image" else "masks") / f"{name}.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated PNG
    train, _, info = data.load_splits(data.DataOptions(dataset_name=str(root)))
    with pytest.raises(data.BadSampleError) as err:
        data.build_eval_dataset(train, info, pad_mean=MEAN)[train["name"].index(name)]
    assert str(bad) in str(err.value) and "cannot decode" in str(err.value)
    # The script stops before training, in one line naming the file.
    ran = run_inprocess(["--dataset_name", root, "--student_model_name_or_path", TINY, "--distill", "none",
                         "--per_device_train_batch_size", 2, "--output_dir", tmp_path / "out"])
    error = [line for line in ran.stderr.splitlines() if "error:" in line]
    assert ran.returncode == 2 and len(error) == 1 and str(bad) in error[0], ran.stderr[-2000:]


def test_folder_layouts_refuse_a_config_name(tmp_path, camvid_rows):
    root = own_folder(tmp_path, camvid_rows, "images_masks")
    with pytest.raises(data.DataError, match="--dataset_config_name"):
        data.load_splits(data.DataOptions(dataset_name=str(root), dataset_config_name="fine"))


def test_an_empty_split_folder_is_named(tmp_path, camvid_rows):
    root = own_folder(tmp_path, camvid_rows, "mmsegmentation")
    for folder in ("img_dir", "ann_dir"):
        shutil.rmtree(root / folder / "val")
        (root / folder / "val").mkdir()
    with pytest.raises(data.DataError, match=rf"{root / 'img_dir' / 'val'}.* no images"):
        data.load_splits(data.DataOptions(dataset_name=str(root)))


# ---- Class names --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("id2label, fragments", [
    ({"0": "sky", "1": "sky", "2": "road"}, ["'sky'", "more than once"]),
    ({"0": {"name": "sky"}, "1": "road"}, ["{'name': 'sky'}", "must be strings"]),
])
def test_duplicate_or_non_string_class_names_are_one_line(tmp_path, camvid_rows, id2label, fragments):
    root = own_folder(tmp_path, camvid_rows, "split_folders")
    (root / "id2label.json").write_text(json.dumps(id2label))
    with pytest.raises(data.DataError) as err:
        data.load_splits(data.DataOptions(dataset_name=str(root)))
    message = str(err.value)
    assert "\n" not in message and str(root / "id2label.json") in message
    assert all(fragment in message for fragment in fragments), message


# ---- Damaged parquet folders --------------------------------------------------------------------------------------
def parquet_folder(root: Path, case: str) -> tuple[Path, Path]:
    """A Hub-style folder whose validation file is damaged; (folder, that file)."""
    (root / "data").mkdir(parents=True)
    real = CAMVID / "data" / "validation-00000-of-00001.parquet"
    good = pq.read_table(real).slice(0, 3)
    pq.write_table(good, root / "data" / "train-00000-of-00001.parquet")
    bad = root / "data" / "validation-00000-of-00001.parquet"
    if case == "truncated":
        bad.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    elif case == "random_bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    else:  # no rows, with the real schema
        pq.write_table(good.slice(0, 0), bad)
    (root / "id2label.json").write_text(json.dumps(CLASSES))
    return root, bad


@pytest.mark.parametrize("case, fragment", [("truncated", "cannot be read as parquet"),
                                            ("random_bytes", "cannot be read as parquet"),
                                            ("empty", "no rows")])
def test_a_damaged_parquet_file_is_one_line_naming_it(tmp_path, case, fragment):
    root, bad = parquet_folder(tmp_path / case, case)
    with pytest.raises(data.DataError) as err:
        data.load_splits(data.DataOptions(dataset_name=str(root)))
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and fragment in message, message
