"""Tests for synthetic.py: the procedural street scenes behind the ``synthetic`` preset. Small scenes, CPU."""

import numpy as np
import pytest

import data
import synthetic

MEAN = (0.485, 0.456, 0.406)


def test_painted_class_ids_match_the_preset_class_names():
    ids = (synthetic.SKY, synthetic.BUILDING, synthetic.ROAD, synthetic.SIDEWALK, synthetic.VEGETATION,
           synthetic.CAR, synthetic.PERSON, synthetic.POLE, synthetic.SIGN)
    assert [data.SYNTHETIC_CLASSES[i] for i in ids] == [
        "sky", "building", "road", "sidewalk", "vegetation", "car", "person", "pole", "traffic sign"]
    assert sorted(ids) == list(range(len(data.SYNTHETIC_CLASSES)))


def test_synthetic_scenes_are_deterministic_and_cover_every_class():
    image, label = synthetic.render_synthetic_scene(0, 5, 96, 160)
    again_image, again_label = synthetic.render_synthetic_scene(0, 5, 96, 160)
    assert image.shape == (96, 160, 3) and label.shape == (96, 160) and image.dtype == np.uint8
    assert np.array_equal(image, again_image) and np.array_equal(label, again_label)
    assert not np.array_equal(image, synthetic.render_synthetic_scene(0, 6, 96, 160)[0])
    assert not np.array_equal(image, synthetic.render_synthetic_scene(1, 5, 96, 160)[0])

    train, evaluation, info = data.load_splits(data.DataOptions(dataset="synthetic"))
    assert (len(train), len(evaluation)) == (512, 64) and info.num_labels == len(data.SYNTHETIC_CLASSES) >= 8
    assert info.crop_size == (128, 128) and info.default_student == "config:segformer-tiny"
    seen = np.zeros(info.num_labels, dtype=bool)
    labels = [train[i]["label"] for i in range(24)]
    for label in labels:
        values = np.unique(label)
        seen[values[values != 255]] = True
        assert values.max() == 255 or values.max() < info.num_labels
    assert seen.all()
    # Spatial relations that make the classes' context meaningful.
    rows = np.arange(128)[:, None]
    sky_rows, road_rows = [], []
    for lab in labels[:8]:
        sky_rows.append(np.broadcast_to(rows, lab.shape)[lab == synthetic.SKY].mean())
        road_rows.append(np.broadcast_to(rows, lab.shape)[lab == synthetic.ROAD].mean())
    assert np.mean(sky_rows) < 40 < 80 < np.mean(road_rows)


def test_synthetic_splits_are_disjoint_and_sizable():
    options = data.DataOptions(dataset="synthetic", dataset_config_name="64x96", max_train_samples=10,
                               max_eval_samples=3)
    train, evaluation, info = data.load_splits(options)
    assert (len(train), len(evaluation)) == (10, 3)
    assert train[0]["image"].shape == (64, 96, 3) and info.crop_size == (64, 96)
    train_ids = {train[i]["index"] for i in range(len(train))}
    eval_ids = {evaluation[i]["index"] for i in range(len(evaluation))}
    assert not train_ids & eval_ids
    batch = data.train_collate([data.build_train_dataset(train, info, crop_size=(64, 64), pad_mean=MEAN,
                                                         seed=0)[i] for i in range(2)])
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    data.check_labels(batch["labels"], info.num_labels, info.ignore_index)
    with pytest.raises(data.DataError, match="drop --dataset_name, --id2label"):
        data.load_splits(data.DataOptions(dataset="synthetic", dataset_name="x", id2label="y.json"))


def test_scenes_too_small_are_refused():
    with pytest.raises(ValueError, match="at least 16x16, got 8x32"):
        synthetic.make_synthetic_splits(2, 1, height=8, width=32)
    # Through the preset the renderer's complaint is a DataError, like every other loading problem.
    with pytest.raises(data.DataError, match="at least 16x16, got 12x12"):
        data.load_splits(data.DataOptions(dataset="synthetic", dataset_config_name="12x12"))
