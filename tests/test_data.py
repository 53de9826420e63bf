"""Tests for data.py: loading, label mappings, decoding, augmentation, collation. Offline, tiny images."""

import argparse
import ast
import io
import json
import time
from copy import deepcopy
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import data

CAMVID = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "camvid"
MEAN = (0.485, 0.456, 0.406)
MEAN_RGB = (124, 116, 104)  # MEAN as uint8: the padding colour


# ----------------------------------------------------------------------------- helpers


def png_bytes(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def write_dataset(root: Path, splits: dict[str, dict[str, list]], id2label: dict | None = None) -> Path:
    """A Hub-style folder (data/<split>-00000-of-00001.parquet [+ id2label.json]) that load_dataset reads."""
    (root / "data").mkdir(parents=True)
    for split, columns in splits.items():
        features = datasets.Features({
            name: datasets.Image() if isinstance(values[0], dict) else datasets.Value("string")
            for name, values in columns.items()
        })
        datasets.Dataset.from_dict(columns, features=features).to_parquet(
            str(root / "data" / f"{split}-00000-of-00001.parquet"))
    if id2label is not None:
        (root / "id2label.json").write_text(json.dumps({str(k): v for k, v in id2label.items()}))
    return root


def rgb(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask(values: np.ndarray, mode: str = "L") -> Image.Image:
    if mode == "I;16":
        return Image.fromarray(values.astype(np.uint16))
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette(list(np.random.default_rng(1).integers(0, 256, 768, dtype=np.uint8)))
    return image


def simple_dataset(root: Path, labels: list[np.ndarray], mode: str = "L", **extra_splits) -> Path:
    h, w = labels[0].shape
    columns = {
        "image": [png_bytes(rgb(h, w, i)) for i in range(len(labels))],
        "label": [png_bytes(mask(lab, mode)) for lab in labels],
        "name": [f"frame_{i:03d}" for i in range(len(labels))],
    }
    return write_dataset(root, {"train": columns, **extra_splits})


def first_eval_label(train_or_eval: datasets.Dataset, info: data.DataInfo, index: int = 0) -> np.ndarray:
    sample = data.build_eval_dataset(train_or_eval, info, pad_mean=MEAN)[index]
    return sample["labels"].numpy()


# ----------------------------------------------------------------------------- options


def test_options_come_from_argparse_flags_of_the_same_name():
    parser = argparse.ArgumentParser()
    for flag in ("--dataset_name", "--id2label", "--learning_rate"):
        parser.add_argument(flag)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(["--dataset_name", "folder", "--id2label", "classes.json", "--seed", "7"])
    # Flags the parser lacks keep their defaults; flags DataOptions lacks are left alone.
    assert data.DataOptions.from_args(args) == data.DataOptions(dataset_name="folder", id2label="classes.json", seed=7)


def test_data_imports_datasets_libraries_only_and_the_scene_renderer_lazily():
    # DESIGN.md: data.py knows datasets, not the models or the Hub helpers; synthetic.py is imported only by the
    # synthetic preset (inside a function), so other datasets never load it.
    tree = ast.parse(Path(data.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
           for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert top <= {"__future__", "argparse", "io", "json", "logging", "os", "re", "sys", "threading", "dataclasses",
                   "pathlib", "typing", "datasets", "huggingface_hub", "numpy", "pyarrow", "torch", "PIL"}, top
    nested = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} - {
        node.module for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert nested == {"synthetic"}


# ----------------------------------------------------------------------------- real data


needs_camvid = pytest.mark.skipif(not CAMVID.is_dir(), reason="../shared/data/camvid is not here")


@needs_camvid
def test_camvid_loads_with_its_classes_and_splits():
    train, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(CAMVID)))
    assert (len(train), len(evaluation)) == (367, 101)
    assert info.num_labels == 11
    assert info.id2label == {int(k): v for k, v in json.loads((CAMVID / "id2label.json").read_text()).items()}
    assert info.label2id["car"] == 8
    assert (info.image_column, info.label_column, info.name_column) == ("image", "label", "name")
    assert info.ignore_index == 255 and info.label_mapping == data.LABELS_IDENTITY
    assert any("evaluating on split 'validation'" in note for note in info.notes)


@needs_camvid
def test_camvid_batches_are_aligned_through_workers():
    train, evaluation, info = data.load_splits(data.DataOptions(dataset="camvid", dataset_name=str(CAMVID),
                                                                max_train_samples=4, max_eval_samples=2))
    raw = [(np.asarray(Image.open(io.BytesIO(train[i]["image"]["bytes"])).convert("RGB")),
            np.asarray(Image.open(io.BytesIO(train[i]["label"]["bytes"])))) for i in range(4)]
    # Scale 1 and a full-size crop leave only the flip random: each sample must be raw or
    # flipped, image and label together.
    train_ds = data.build_train_dataset(train, info, crop_size=(360, 480), pad_mean=MEAN, seed=3,
                                        scale_range=(1.0, 1.0))
    loader = torch.utils.data.DataLoader(train_ds, batch_size=2, num_workers=2, collate_fn=data.train_collate)
    batches = list(loader)
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 360, 480)] * 2
    assert [(b["pixel_values"].dtype, b["labels"].dtype) for b in batches] == [(torch.uint8, torch.uint8)] * 2
    flips = set()
    for i, (image, label) in enumerate(raw):
        batch = batches[i // 2]
        got_image = batch["pixel_values"][i % 2].permute(1, 2, 0).numpy()
        got_label = batch["labels"][i % 2].numpy()
        flipped = not np.array_equal(got_label, label)
        flips.add(flipped)
        expected_image, expected_label = (image[:, ::-1], label[:, ::-1]) if flipped else (image, label)
        assert np.array_equal(got_label, expected_label)
        assert np.array_equal(got_image, expected_image)  # uint8 all the way: no rounding
        assert int(batch["num_skipped"]) == 0

    eval_ds = data.build_eval_dataset(evaluation, info, pad_mean=MEAN, short_side=180)
    batch = data.eval_collate([eval_ds[0], eval_ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 180, 240)
    assert batch["labels"].shape == (2, 360, 480)  # labels stay at full resolution
    assert batch["image_sizes"].tolist() == [[180, 240]] * 2 and batch["label_sizes"].tolist() == [[360, 480]] * 2
    values = set(torch.unique(batch["labels"]).tolist())
    assert values <= set(range(11)) | {255} and len(values) > 3
    data.check_labels(batch["labels"], info.num_labels, info.ignore_index)


# ----------------------------------------------------------------------------- label mappings


def test_cityscapes_label_ids_map_to_train_ids():
    label_ids = np.array([[0, 1, 7, 8, 11], [12, 13, 17, 19, 20], [21, 22, 23, 24, 25],
                          [26, 27, 28, 29, 31], [32, 33, 9, 255, 3]])
    expected = np.array([[255, 255, 0, 1, 2], [3, 4, 5, 6, 7], [8, 9, 10, 11, 12],
                         [13, 14, 15, 255, 16], [17, 18, 255, 255, 255]])
    assert np.array_equal(data.map_labels(label_ids, data.LABELS_CITYSCAPES_LABELID, 255), expected)


def test_cityscapes_preset_detects_label_ids_and_leaves_train_ids(tmp_path):
    label_id_mask = np.full((6, 8), 7)
    label_id_mask[:2] = 23  # sky
    label_id_mask[4:, :3] = 26  # car
    label_id_mask[0, 0] = 0  # unlabeled
    folder = simple_dataset(tmp_path / "ids", [label_id_mask] * 3)
    options = data.DataOptions(dataset="cityscapes", dataset_name=str(folder))
    train, _, info = data.load_splits(options)
    assert info.label_mapping == data.LABELS_CITYSCAPES_LABELID and info.num_labels == 19
    label = first_eval_label(train, info)
    assert set(np.unique(label)) == {0, 10, 13, 255}
    assert label[0, 0] == 255 and label[0, 5] == 10 and label[5, 0] == 13

    train_id_mask = np.where(label_id_mask == 7, 0, np.where(label_id_mask == 23, 10, 13))
    train_id_mask[0, 0] = 255
    folder = simple_dataset(tmp_path / "train_ids", [train_id_mask] * 3)
    options = data.DataOptions(dataset="cityscapes", dataset_name=str(folder))
    train, _, info = data.load_splits(options)
    assert info.label_mapping == data.LABELS_IDENTITY
    assert np.array_equal(first_eval_label(train, info), train_id_mask)
    assert any("trainIds" in note for note in info.notes)


def test_ade20k_reduces_labels(tmp_path):
    assert data.map_labels(np.array([[0, 1, 2, 150, 255]]), data.LABELS_REDUCE, 255).tolist() == [[255, 0, 1, 149, 255]]
    values = np.array([[0, 1, 2], [150, 3, 0]])
    folder = simple_dataset(tmp_path / "ade", [values] * 2, validation={
        "image": [png_bytes(rgb(2, 3))], "label": [png_bytes(mask(values))], "name": ["v"]})
    train, _, info = data.load_splits(data.DataOptions(dataset="ade20k", dataset_name=str(folder)))
    assert info.num_labels == 150 and info.label_mapping == data.LABELS_REDUCE
    assert first_eval_label(train, info).tolist() == [[255, 0, 1], [149, 2, 255]]
    _, _, plain = data.load_splits(data.DataOptions(dataset="ade20k", dataset_name=str(folder), do_reduce_labels=False))
    assert plain.label_mapping == data.LABELS_IDENTITY


def test_pascal_voc_keeps_palette_indices_and_255_boundaries(tmp_path):
    values = np.zeros((8, 8), dtype=np.uint8)
    values[2:6, 2:6] = 15  # person
    values[1, 1:7] = 255  # boundary
    folder = simple_dataset(tmp_path / "voc", [values] * 2, mode="P", val={
        "image": [png_bytes(rgb(8, 8))], "label": [png_bytes(mask(values, "P"))], "name": ["v"]})
    train, evaluation, info = data.load_splits(data.DataOptions(dataset="pascal-voc", dataset_name=str(folder)))
    assert info.num_labels == 21 and info.ignore_index == 255
    assert len(evaluation) == 1 and any("'val'" in note for note in info.notes)
    assert np.array_equal(first_eval_label(train, info), values)


def test_check_labels_names_bad_values_and_fixes():
    data.check_labels(torch.tensor([[0, 10, 255]]), 11, 255)
    with pytest.raises(data.LabelValueError) as info:
        data.check_labels(torch.tensor([[0, 3, 12, 255, 40, -1]]), 11, 255)
    message = str(info.value)
    assert "-1, 12, 40" in message and "--ignore_index" in message and "--do_reduce_labels" in message
    with pytest.raises(data.LabelValueError, match=r"\.\.\. \(20 distinct\)"):
        data.check_labels(torch.arange(100, 120), 11, 255)


# ----------------------------------------------------------------------------- decoding


def test_unusual_image_modes_are_converted(tmp_path):
    base = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    grey = base[:, :, 0]
    rgba = np.dstack([base, np.full((5, 6), 7, dtype=np.uint8)])
    palette_image = Image.fromarray(base).quantize(colors=16)
    sixteen = (grey.astype(np.uint16) * 257)
    images = [Image.fromarray(grey, mode="L"), Image.fromarray(rgba, mode="RGBA"), palette_image,
              Image.fromarray(sixteen)]
    label_values = np.arange(30).reshape(5, 6) % 4
    labels = [mask(label_values, "L"), mask(label_values, "P"), mask(label_values + 300, "I;16"),
              Image.fromarray(np.dstack([label_values.astype(np.uint8)] * 3))]  # grey RGB mask
    folder = write_dataset(tmp_path / "modes", {"train": {
        "image": [png_bytes(im) for im in images], "label": [png_bytes(lb) for lb in labels],
        "name": ["L", "RGBA", "P", "I16"]}}, id2label={i: f"c{i}" for i in range(400)})
    options = data.DataOptions(dataset_name=str(folder), ignore_index=1000)
    train, evaluation, _ = data.load_splits(options)
    full = datasets.concatenate_datasets([train, evaluation])
    decoded = {}
    for i in range(len(full)):
        row = full[i]
        decoded[row["name"]] = (data.decode_image(row["image"]), data.decode_label(row["label"]))
    assert all(image.shape == (5, 6, 3) and image.dtype == np.uint8 for image, _ in decoded.values())
    assert np.array_equal(decoded["L"][0], np.dstack([grey] * 3))
    assert np.array_equal(decoded["RGBA"][0], base)
    assert np.array_equal(decoded["P"][0], np.asarray(palette_image.convert("RGB")))
    assert np.array_equal(decoded["I16"][0], np.dstack([grey] * 3))
    assert np.array_equal(decoded["L"][1], label_values)
    assert np.array_equal(decoded["RGBA"][1], label_values)  # the "P" mask kept its indices
    assert np.array_equal(decoded["P"][1], label_values + 300)  # 16-bit labels keep their values
    assert np.array_equal(decoded["I16"][1], label_values)


def voc_label(h: int = 12, w: int = 16) -> np.ndarray:
    """Class indices as in a Pascal VOC mask: background, two objects, 255 on their boundaries."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[2:7, 2:8], label[6:11, 9:15] = 15, 7  # person; car, whose VOC colour is grey (128, 128, 128)
    label[1, 1:9], label[7, 1:9], label[1:8, 1], label[1:8, 8] = 255, 255, 255, 255
    label[5:12, 8] = 255
    return label


def test_voc_palette_and_rgb_masks_decode_to_the_same_class_indices(tmp_path):
    label = voc_label()
    palette_mask = Image.fromarray(label, mode="L").convert("P")
    palette_mask.putpalette(data.pascal_voc_colormap().flatten().tolist())
    palette_mask.save(tmp_path / "voc_p.png")
    palette_mask.convert("RGB").save(tmp_path / "voc_rgb.png")  # the same mask drawn in VOC colours
    assert Image.open(tmp_path / "voc_rgb.png").getpixel((1, 1)) == (224, 224, 192)  # the boundary colour
    assert Image.open(tmp_path / "voc_rgb.png").getpixel((3, 3)) == (192, 128, 128)  # person
    for name in ("voc_p.png", "voc_rgb.png"):
        decoded = data.decode_label(str(tmp_path / name))
        assert decoded.dtype == np.int64 and np.array_equal(decoded, label), name
    grey_rgb = np.dstack([label] * 3)  # a grey mask saved with three equal channels (Cityscapes exports)
    assert np.array_equal(data.decode_label(grey_rgb), label)

    # Through the pascal-voc preset, both forms give the same training ids, the boundary ignored.
    folder = write_dataset(tmp_path / "voc", {split: {
        "image": [png_bytes(rgb(12, 16, seed)) for seed in range(2)],
        "mask": [png_bytes(palette_mask), png_bytes(palette_mask.convert("RGB"))],
    } for split in ("train", "val")})
    _, evaluation, info = data.load_splits(data.DataOptions("pascal-voc", str(folder)))
    assert info.ignore_index == 255 and info.num_labels == 21
    ds = data.build_eval_dataset(evaluation, info, pad_mean=MEAN)
    for i in range(2):
        assert torch.equal(ds[i]["labels"], torch.from_numpy(label.astype(np.int64)))


def test_rgb_mask_with_a_colour_outside_the_voc_map_is_one_line_naming_colour_and_file(tmp_path):
    colour = np.zeros((4, 4, 3), dtype=np.uint8)
    colour[:2] = (244, 35, 232)  # Cityscapes' sidewalk colour
    path = tmp_path / "frankfurt_000000_gtFine_color.png"
    Image.fromarray(colour).save(path)
    with pytest.raises(data.BadSampleError) as err:
        data.decode_label(str(path), "val row 3 label")
    message = str(err.value)
    assert "\n" not in message and "(244, 35, 232)" in message and str(path) in message
    assert "not in the Pascal VOC colour map" in message and message.startswith("val row 3 label")


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
    labels = [np.zeros((4, 4), dtype=np.uint8)] * 4
    columns = {
        "image": [png_bytes(rgb(4, 4)), {"bytes": b"definitely not a png", "path": None},
                  png_bytes(rgb(4, 4)), png_bytes(rgb(4, 4))],
        "label": [png_bytes(mask(lab)) for lab in labels],
        "name": ["frame_000", "frame_001", "frame_002", "frame_003"],
    }
    folder = write_dataset(tmp_path / "corrupt", {"train": columns, "validation": columns},
                           id2label={0: "a", 1: "b"})
    _, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(folder)))
    strict = data.build_train_dataset(evaluation, info, crop_size=(4, 4), pad_mean=MEAN, seed=0)
    with pytest.raises(data.BadSampleError, match=r"row 1 \(name='frame_001'\).*cannot decode"):
        strict[1]
    lenient = data.build_train_dataset(evaluation, info, crop_size=(4, 4), pad_mean=MEAN, seed=0,
                                       skip_bad_samples=True)
    batches = list(torch.utils.data.DataLoader(lenient, batch_size=2, collate_fn=data.train_collate))
    assert [int(b["num_skipped"]) for b in batches] == [1, 0]
    assert [b["pixel_values"].shape[0] for b in batches] == [1, 2]
    eval_ds = data.build_eval_dataset(evaluation, info, pad_mean=MEAN, skip_bad_samples=True)
    batch = data.eval_collate([eval_ds[1]])
    assert int(batch["num_skipped"]) == 1 and batch["pixel_values"].shape[0] == 0


def test_image_and_label_of_different_sizes_name_the_sample(tmp_path):
    columns = {"image": [png_bytes(rgb(4, 6))] * 2, "label": [png_bytes(mask(np.zeros((4, 5))))] * 2,
               "name": ["a", "b"]}
    folder = write_dataset(tmp_path / "sizes", {"train": columns}, id2label={0: "x"})
    train, _, info = data.load_splits(data.DataOptions(dataset_name=str(folder)))
    with pytest.raises(data.BadSampleError, match=r"row 0 \(name='.'\).*6x4 but its label is 5x4"):
        data.build_eval_dataset(train, info, pad_mean=MEAN)[0]


# ----------------------------------------------------------------------------- loading errors and notes


def test_missing_column_lists_the_columns(tmp_path):
    folder = write_dataset(tmp_path / "cols", {"train": {
        "picture": [png_bytes(rgb(4, 4))] * 2, "target": [png_bytes(mask(np.zeros((4, 4))))] * 2}},
        id2label={0: "x"})
    with pytest.raises(data.DataError) as info:
        data.load_splits(data.DataOptions(dataset_name=str(folder)))
    assert "['picture', 'target']" in str(info.value) and "--image_column" in str(info.value)
    with pytest.raises(data.DataError, match="label column 'gt' not found.*'picture', 'target'"):
        data.load_splits(data.DataOptions(dataset_name=str(folder), image_column="picture", label_column="gt"))
    options = data.DataOptions(dataset_name=str(folder), image_column="picture", label_column="target")
    train, _, info = data.load_splits(options)
    assert (info.image_column, info.label_column) == ("picture", "target")


def test_unknown_preset_lists_presets():
    with pytest.raises(data.DataError) as info:
        data.load_splits(data.DataOptions(dataset="kitti"))
    for name in ("cityscapes", "pascal-voc", "ade20k", "camvid", "synthetic"):
        assert name in str(info.value)


def test_missing_class_names_ask_for_id2label(tmp_path):
    folder = simple_dataset(tmp_path / "nolabels", [np.zeros((4, 4))] * 2)
    with pytest.raises(data.DataError, match="--id2label FILE"):
        data.load_splits(data.DataOptions(dataset_name=str(folder)))
    names = tmp_path / "classes.json"
    names.write_text(json.dumps({"0": "background", "1": "thing"}))
    _, _, info = data.load_splits(data.DataOptions(dataset_name=str(folder), id2label=str(names)))
    assert info.id2label == {0: "background", 1: "thing"}


def test_no_validation_split_is_carved_reproducibly_with_a_note(tmp_path):
    folder = simple_dataset(tmp_path / "trainonly", [np.zeros((4, 4))] * 20)
    (folder / "id2label.json").write_text(json.dumps({"0": "x"}))
    train, evaluation, info = data.load_splits(data.DataOptions(dataset_name=str(folder), seed=5))
    assert (len(train), len(evaluation)) == (18, 2)
    assert any("no validation split: carved 10%" in note and "seed 5" in note for note in info.notes)
    half, other_half, _ = data.load_splits(data.DataOptions(dataset_name=str(folder), seed=5, validation_fraction=0.5))
    assert (len(half), len(other_half)) == (10, 10)  # the script's --train_val_split
    _, again, _ = data.load_splits(data.DataOptions(dataset_name=str(folder), seed=5))
    assert evaluation["name"] == again["name"]
    assert not set(evaluation["name"]) & set(train["name"])


def unloadable_folder(root: Path, case: str) -> Path:
    """A folder that datasets 5 cannot load: a loading script, a split without rows, or no data files."""
    folder = root / case
    if case == "empty_split":
        row = {"image": [png_bytes(rgb(4, 4))], "label": [png_bytes(mask(np.zeros((4, 4))))]}
        write_dataset(folder, {"train": row})
        empty = datasets.Dataset.from_dict({"image": [], "label": []}, features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Image()}))
        empty.to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    else:
        folder.mkdir()
    if case == "script":
        (folder / "script.py").write_text("import datasets\n")  # a loading script, as old Hub datasets shipped
    return folder


@pytest.mark.parametrize("case, fragments", [
    ("missing_folder", ["dataset folder", "does not exist"]),
    ("hub_offline", ["'someone/some-segmentation-set'", "could not be fetched from the Hub", "hf auth login"]),
    ("ade20k_offline", ["'zhoubolei/scene_parse_150'", "could not be fetched from the Hub", "hf auth login"]),
    ("script", ["is a loading script", "refs/convert/parquet"]),
    ("empty_split", ["validation-00000-of-00001.parquet has no rows", "--validation_split"]),
    ("no_data", ["holds no data files"]),
])
def test_datasets_that_cannot_load_fail_at_once_in_one_line(tmp_path, case, fragments):
    # datasets' own errors (offline and not cached, a script, a split without rows, a folder without data),
    # each turned into one DataError line naming the problem, with no network and no retries.
    options = {"missing_folder": data.DataOptions(dataset_name=str(tmp_path / "no_such_folder")),
               "hub_offline": data.DataOptions(dataset_name="someone/some-segmentation-set"),
               "ade20k_offline": data.DataOptions(dataset="ade20k")}.get(case)
    start = time.monotonic()
    with pytest.raises(data.DataError) as info:
        data.load_splits(options or data.DataOptions(dataset_name=str(unloadable_folder(tmp_path, case))))
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert "\n" not in message and all(fragment in message for fragment in fragments), message


def test_hub_dataset_names_the_cache_when_the_network_is_down(monkeypatch):
    # What datasets raises online when the Hub cannot be reached (no network here to produce it for real).
    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/some-segmentation-set' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(data.datasets, "load_dataset", unreachable)
    with pytest.raises(data.DataError) as info:
        data.load_splits(data.DataOptions(dataset_name="someone/some-segmentation-set"))
    message = str(info.value)
    assert "could not be fetched from the Hub" in message and "ConnectError" in message
    assert "set HF_HUB_OFFLINE=1 to use the cache" in message


def test_preset_without_hub_copy_asks_for_a_folder():
    with pytest.raises(data.DataError, match="pass --dataset_name") as err:
        data.load_splits(data.DataOptions(dataset="camvid"))
    assert str(err.value).count("--dataset_name") == 1 and str(err.value).count("../shared/data/camvid") == 1


def test_split_size_checks():
    data.check_split_sizes(range(8), range(1), train_batch_size=4, world_size=2)
    with pytest.raises(data.DataError, match="training split is empty"):
        data.check_split_sizes([], range(3), train_batch_size=1)
    with pytest.raises(data.DataError, match="evaluation split is empty"):
        data.check_split_sizes(range(3), [], train_batch_size=1)
    with pytest.raises(data.DataError, match="fewer than one batch .*4 per device x 2 processes = 8"):
        data.check_split_sizes(range(7), range(3), train_batch_size=4, world_size=2)


# ----------------------------------------------------------------------------- augmentation


# Corners of the RGB cube: no blend of other corners rounds to one of them, so a pixel that holds a palette
# colour exactly was resampled from that colour alone.
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 255, 255]],
                   dtype=np.uint8)


def in_memory_dataset(images: list[np.ndarray], labels: list[np.ndarray], num_labels: int,
                      mapping: str = data.LABELS_IDENTITY, ignore_index: int = 255
                      ) -> tuple[datasets.Dataset, data.DataInfo]:
    ds = datasets.Dataset.from_dict({"index": list(range(len(images)))}).with_transform(
        lambda batch: {"image": [images[i] for i in batch["index"]], "label": [labels[i] for i in batch["index"]]})
    info = data.DataInfo(id2label={i: str(i) for i in range(num_labels)}, ignore_index=ignore_index,
                         image_column="image", label_column="label", crop_size=(48, 48), label_mapping=mapping)
    return ds, info


def block_dataset(n: int = 3, size: tuple[int, int] = (64, 96), cell: int = 16
                  ) -> tuple[datasets.Dataset, data.DataInfo]:
    """Images of coloured blocks whose label is the palette index of each pixel's colour."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(n):
        cells = rng.integers(0, len(PALETTE), (size[0] // cell, size[1] // cell))
        label = np.kron(cells, np.ones((cell, cell), dtype=np.int64)).astype(np.uint8)
        images.append(PALETTE[label])
        labels.append(label)
    return in_memory_dataset(images, labels, len(PALETTE))


def test_augmentation_keeps_image_and_label_aligned():
    ds, info = block_dataset()
    # 80 columns: wider than every image scaled below 0.83, so some samples are padded.
    train = data.build_train_dataset(ds, info, crop_size=(64, 80), pad_mean=MEAN, seed=1)
    shares, padded = [], 0
    for epoch in range(12):
        train.set_epoch(epoch)
        for index in range(len(ds)):
            sample = train[index]
            image, label = sample["pixel_values"].permute(1, 2, 0).numpy(), sample["labels"].numpy()
            assert image.shape == (64, 80, 3) and label.shape == (64, 80)
            assert image.dtype == np.uint8 and label.dtype == np.uint8
            # Padding is whole rows and columns, the model's mean colour, and the only ignored label here.
            pad = label == 255
            assert np.array_equal(pad, pad.all(1, keepdims=True) | pad.all(0, keepdims=True))
            assert (image[pad] == MEAN_RGB).all()
            padded += bool(pad.any())
            # Wherever the image holds a palette colour exactly, the label is that colour's index.
            exact = (image[:, :, None, :] == PALETTE).all(-1)  # (h, w, colours)
            assert (label[exact.any(-1)] == exact.argmax(-1)[exact.any(-1)]).all()
            shares.append(exact.any(-1)[~pad].mean())
    assert padded > 0 and np.mean(shares) > 0.5  # and most pixels do hold one: the check is not vacuous


def ramp_dataset(n: int = 4, size: int = 256) -> tuple[datasets.Dataset, data.DataInfo]:
    """Red = column, green = row (so the image tells where each output pixel came from); label = column // 2."""
    rows, cols = np.mgrid[0:size, 0:size]
    image = np.stack([cols, rows, np.zeros_like(cols)], axis=-1).astype(np.uint8)
    label = (cols // 2).astype(np.uint8)
    return in_memory_dataset([image] * n, [label] * n, size // 2)


def test_scale_crop_and_flip_follow_the_configured_ranges():
    ds, info = ramp_dataset()
    crop, (low, high) = 64, (0.5, 2.0)
    train = data.build_train_dataset(ds, info, crop_size=(crop, crop), pad_mean=MEAN, seed=3, scale_range=(low, high))
    inner = np.arange(3, crop - 3)  # away from the window's edges, where the resampling filter is cut off
    scales, offsets, flips, agree = [], [], [], []
    for epoch in range(40):
        train.set_epoch(epoch)
        for index in range(len(ds)):
            sample = train[index]
            red, green = sample["pixel_values"][0].double().numpy(), sample["pixel_values"][1].double().numpy()
            slope_x = np.polyfit(inner, red[inner][:, inner].mean(0), 1)[0]  # source columns per output column
            slope_y = np.polyfit(inner, green[inner][:, inner].mean(1), 1)[0]
            scale = 1 / abs(slope_x)
            assert abs(1 / slope_y - scale) < 0.03 * scale  # one scale for both axes; rows are never flipped
            flips.append(slope_x < 0)
            # Where the crop's centre lies among the positions this scale allows (0 = left/top, 1 = right/bottom).
            half = crop / 2 / scale
            centre_x, centre_y = red[:, crop // 2 - 1:crop // 2 + 1].mean(), green[crop // 2 - 1:crop // 2 + 1].mean()
            # crop_geometry is what the dataset drew: its scale, flip and source windows (centred where the
            # crop's centre came from), so a teacher-logit cache can crop alike.
            geometry = data.crop_geometry(3, epoch, index, (256, 256), (crop, crop), (low, high))
            assert abs(geometry.scale - scale) < 0.03 * scale and geometry.flip == (slope_x < 0)
            assert geometry.rows.out == geometry.cols.out == crop
            assert abs(geometry.cols.start + geometry.cols.size / 2 - 0.5 - centre_x) < 1.5
            assert abs(geometry.rows.start + geometry.rows.size / 2 - 0.5 - centre_y) < 1.5
            offsets += [(centre_x + 0.5 - half) / (256 - 2 * half), (centre_y + 0.5 - half) / (256 - 2 * half)]
            scales.append(scale)
            # The label moved with the image, flip included, to the pixel: each label is that of the source
            # column the red says the pixel came from (a rounding tie may pick the neighbour).
            agree.append(np.mean(sample["labels"].numpy()[:, inner] == red[:, inner] // 2))
    scales, offsets = np.array(scales), np.array(offsets)
    assert low * 0.97 < scales.min() < low + 0.1 and high - 0.15 < scales.max() < high * 1.03
    assert abs(scales.mean() - (low + high) / 2) < 0.1  # uniform over the range
    assert -0.03 < offsets.min() < 0.1 and 0.9 < offsets.max() < 1.03 and abs(offsets.mean() - 0.5) < 0.07
    assert 0.4 < np.mean(flips) < 0.6
    assert min(agree) > 0.99 and np.mean(agree) > 0.999


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    ds, info = block_dataset()
    first = data.build_train_dataset(ds, info, crop_size=(32, 32), pad_mean=MEAN, seed=7)
    second = data.build_train_dataset(ds, info, crop_size=(32, 32), pad_mean=MEAN, seed=7)
    first.set_epoch(2)
    second.set_epoch(2)
    for index in (2, 0, 1):  # any access order
        a, b = first[index], second[index]
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    second.set_epoch(3)
    assert not torch.equal(first[1]["pixel_values"], second[1]["pixel_values"])
    other_seed = data.build_train_dataset(ds, info, crop_size=(32, 32), pad_mean=MEAN, seed=8)
    other_seed.set_epoch(2)
    assert not torch.equal(first[1]["pixel_values"], other_seed[1]["pixel_values"])


def test_pixels_shared_with_pillow_equal_a_copy_and_outlive_the_image():
    rng = np.random.default_rng(0)
    # 7x5 is shared through Arrow; 2100x2100 RGB (17 MiB) spans several of Pillow's blocks and is copied.
    for array, mode in [(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8), "RGB"),
                        (rng.integers(0, 256, (2100, 2100, 3), dtype=np.uint8), "RGB"),
                        (rng.integers(0, 256, (5, 7), dtype=np.uint8), "L"),
                        (rng.integers(0, 21, (5, 7), dtype=np.uint8), "P")]:
        image = Image.fromarray(array, mode=mode)
        pixels = data._pillow_pixels(image)
        del image
        Image.fromarray(255 - array, mode=mode).load()  # memory freed too early would be reused here
        assert np.array_equal(pixels[..., :3] if mode == "RGB" else pixels, array)


def test_crop_geometry_is_a_pure_function_with_fixed_draws():
    # The same (seed, epoch, index) gives the same augmentation in any process and in every version: resume and
    # a teacher-logit cache depend on it. Pinned values (a change here changes every run's augmentations).
    assert data.crop_geometry(0, 0, 0, (1024, 2048), (512, 1024)) == (
        1.9615520536899567, (316, 261, 512), (1415, 522, 1024), False)
    assert data.crop_geometry(42, 3, 12345, (375, 500), (512, 512)) == (
        1.5445425808429718, (16, 332, 512), (6, 332, 512), False)
    # An image smaller than the crop: the whole image, padded; scale 1 leaves only the flip random.
    assert data.crop_geometry(7, 1, 2, (360, 480), (352, 480), (1.0, 1.0)) == (1.0, (0, 352, 352), (0, 480, 480), True)
    assert data.crop_geometry(0, 0, 1, (10, 20), (32, 32), (1.0, 1.0))[1:3] == ((0, 10, 10), (0, 20, 20))


def test_rows_read_from_arrow_equal_the_datasets_rows_and_survive_pickling(tmp_path):
    # The pipelines read rows from the Arrow columns, past datasets' formatting, when a split has no indices
    # mapping: that reads datasets' private Dataset._indices. If datasets changes it, this fails.
    folder = simple_dataset(tmp_path / "rows", [np.full((8, 8), i) for i in range(3)],
                            validation={"image": [png_bytes(rgb(8, 8))], "label": [png_bytes(mask(np.zeros((8, 8))))],
                                        "name": ["v"]})
    (folder / "id2label.json").write_text(json.dumps({str(i): str(i) for i in range(3)}))
    train, _, info = data.load_splits(data.DataOptions(dataset_name=str(folder)))
    for ds, direct in ((train, True), (train.select([2, 0]), False)):  # select() maps indices: not direct
        pipeline = data.build_eval_dataset(ds, info, pad_mean=MEAN)
        assert [pipeline._row(i) for i in range(len(ds))] == [ds[i] for i in range(len(ds))]
        assert bool(pipeline._columns) == direct
        # deepcopy goes through the same __reduce_ex__/__getstate__ hooks as the pickle a "spawn" worker gets
        for original in (pipeline, data.build_train_dataset(ds, info, crop_size=(4, 4), pad_mean=MEAN, seed=1)):
            original[0]  # the column handles exist now: the copy must not carry them
            copy = deepcopy(original)
            assert copy._columns is None
            assert all(torch.equal(copy[i]["pixel_values"], original[i]["pixel_values"]) and
                       torch.equal(copy[i]["labels"], original[i]["labels"]) for i in range(len(ds)))


@pytest.mark.parametrize("mapping, num_labels", [
    (data.LABELS_IDENTITY, 11), (data.LABELS_REDUCE, 150), (data.LABELS_CITYSCAPES_LABELID, 19),
    (data.LABELS_CITYSCAPES_LABELID, 11),  # trainIds beyond the classes: not one range, so values are counted
])
def test_every_uint8_label_value_is_judged_as_the_mapping_says(mapping, num_labels):
    mapped = data.map_labels(np.arange(256), mapping, 255)
    valid = ((mapped >= 0) & (mapped < num_labels)) | (mapped == 255)
    masks = [np.array([[1, value], [value, 255]], dtype=np.uint8) for value in range(256)]
    ds, info = in_memory_dataset([np.zeros((2, 2, 3), dtype=np.uint8)] * 256, masks, num_labels, mapping)
    evaluation = data.build_eval_dataset(ds, info, pad_mean=MEAN)
    train = data.build_train_dataset(ds, info, crop_size=(2, 2), pad_mean=MEAN, seed=0, scale_range=(1.0, 1.0))
    for value in range(256):
        if valid[value]:
            assert evaluation[value]["labels"].tolist() == mapped[masks[value]].tolist()
            assert sorted(train[value]["labels"].flatten().tolist()) == sorted(mapped[masks[value]].flatten().tolist())
        else:
            with pytest.raises(data.LabelValueError, match=rf"dataset row {value}: label values \[{mapped[value]}\]"):
                evaluation[value]


def test_labels_beyond_a_byte_stay_int64():
    labels = [np.array([[0, 399], [1000, 7]], dtype=np.uint16)] * 2
    ds, info = in_memory_dataset([np.zeros((2, 2, 3), dtype=np.uint8)] * 2, labels, 400, ignore_index=1000)
    batch = data.train_collate([data.build_train_dataset(ds, info, crop_size=(2, 2), pad_mean=MEAN, seed=0,
                                                         scale_range=(1.0, 1.0))[i] for i in range(2)])
    assert batch["labels"].dtype == torch.int64 and batch["pixel_values"].dtype == torch.uint8
    assert sorted(batch["labels"][0].flatten().tolist()) == [0, 7, 399, 1000]
    with pytest.raises(data.LabelValueError, match=r"label values \[400\]"):
        bad = [np.array([[0, 400], [1, 2]], dtype=np.uint16)]
        data.build_eval_dataset(*in_memory_dataset([np.zeros((2, 2, 3), np.uint8)], bad, 400, ignore_index=1000),
                                pad_mean=MEAN)[0]


def test_eval_collate_pads_images_with_the_mean_colour_and_labels_with_ignore():
    samples = [
        {"pixel_values": torch.ones(3, 4, 6, dtype=torch.uint8), "labels": torch.zeros(8, 12, dtype=torch.uint8),
         "ignore_index": 99, "pad_rgb": MEAN_RGB},
        {"pixel_values": torch.ones(3, 5, 3, dtype=torch.uint8), "labels": torch.ones(10, 6, dtype=torch.uint8),
         "ignore_index": 99, "pad_rgb": MEAN_RGB},
    ]
    batch = data.eval_collate(samples)
    assert batch["pixel_values"].shape == (2, 3, 5, 6) and batch["labels"].shape == (2, 10, 12)
    assert batch["pixel_values"].dtype == batch["labels"].dtype == torch.uint8
    assert batch["image_sizes"].tolist() == [[4, 6], [5, 3]] and batch["label_sizes"].tolist() == [[8, 12], [10, 6]]
    assert batch["pixel_values"][1, :, :, 3:].permute(1, 2, 0).eq(torch.tensor(MEAN_RGB, dtype=torch.uint8)).all()
    assert batch["pixel_values"][0, :, :4].eq(1).all() and batch["labels"][0, 8:].eq(99).all()
    assert batch["labels"][1, :, 6:].eq(99).all() and int(batch["num_skipped"]) == 0
    # The padding colour round-trips: the pipeline's uint8 mean colour is MEAN rounded.
    ds, info = block_dataset(1)
    assert data.build_eval_dataset(ds, info, pad_mean=MEAN)[0]["pad_rgb"] == MEAN_RGB


def test_eval_collate_pads_images_below_the_models_smallest_input():
    samples = [{"pixel_values": torch.ones(3, 1, 2), "labels": torch.zeros(1, 2, dtype=torch.long), "ignore_index": 99,
                "min_size": 29}]
    batch = data.eval_collate(samples)
    assert batch["pixel_values"].shape == (1, 3, 29, 29) and batch["pixel_values"].sum() == 3 * 2  # zeros around
    assert batch["image_sizes"].tolist() == [[1, 2]] and batch["labels"].shape == (1, 1, 2)  # true sizes kept
