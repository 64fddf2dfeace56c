"""Dataset readers on tiny fixture files written here, joint augmentation, synthetic shapes."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from uresnet_models.data import (DataError, DataInfo, SyntheticShapes, Transformed, build_dataset, build_transform,
                                 read_image)


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _rgb(seed, h=8, w=10):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- synthetic
def test_synthetic_is_seeded_and_consistent():
    a, b = SyntheticShapes(8, 32, 4, seed=3), SyntheticShapes(8, 32, 4, seed=3)
    s0, s1 = a[0], a[1]
    assert torch.equal(s0["image"], b[0]["image"]) and torch.equal(s0["mask"], b[0]["mask"])
    assert not torch.equal(s0["image"], s1["image"])
    assert s0["image"].dtype == torch.uint8 and s0["image"].shape == (3, 32, 32)
    masks = torch.stack([a[i]["mask"] for i in range(8)])
    assert set(masks.unique().tolist()) <= {0, 1, 2, 3} and (masks > 0).any()
    for i in range(8):  # the label is the class of a shape that is in the mask
        assert (a[i]["mask"] == a[i]["label"] + 1).any()
    train, _ = build_dataset("synthetic", None, "train", image_size=16, length=4)
    val, _ = build_dataset("synthetic", None, "val", image_size=16, length=4)
    assert not torch.equal(train[0]["image"], val[0]["image"])


def test_synthetic_tasks():
    _, info = build_dataset("synthetic", None, task="joint", num_classes=3)
    assert (info.task, info.num_classes, info.aux_classes) == ("joint", 3, 2)
    ds, info = build_dataset("synthetic", None, task="cls", image_size=16, length=4)
    assert info.task == "cls" and info.num_classes == 3 and 0 <= ds[0]["label"] < 3
    with pytest.raises(DataError):
        build_dataset("synthetic", None, num_classes=7)


# --------------------------------------------------------------------------- augmentation
def test_joint_augmentation_keeps_image_and_mask_aligned():
    mask = torch.zeros(40, 40, dtype=torch.long)
    mask[5:25, 8:20] = 1
    image = (mask * 180 + 30).to(torch.uint8).expand(3, -1, -1).clone()  # the image shows the mask
    raw = [{"image": tv_tensors.Image(image), "mask": tv_tensors.Mask(mask)}]
    info = DataInfo("test", "seg", 2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    ds = Transformed(raw, build_transform(info, train=True, image_size=24), seed=1)
    for epoch in range(6):
        ds.set_epoch(epoch)
        out = ds[0]
        assert out["image"].shape == (3, 24, 24) and out["mask"].shape == (24, 24)
        assert out["image"].dtype == torch.float32 and out["mask"].dtype == torch.long
        bright = out["image"][0] > out["image"][0].mean() if out["mask"].any() else out["image"][0] > 2
        agree = (bright == out["mask"].bool()).float().mean()
        assert agree > 0.9, f"epoch {epoch}: image and mask disagree on {1 - agree:.0%} of pixels"
    # the same (seed, epoch, index) gives the same augmentation; another epoch another one
    ds.set_epoch(2)
    first = ds[0]
    assert torch.equal(first["image"], ds[0]["image"])
    ds.set_epoch(3)
    assert not torch.equal(first["image"], ds[0]["image"])


def test_eval_transform_resizes_mask_with_nearest():
    mask = torch.randint(0, 5, (16, 16))
    raw = [{"image": tv_tensors.Image(torch.zeros(3, 16, 16, dtype=torch.uint8)), "mask": tv_tensors.Mask(mask)}]
    info = DataInfo("test", "seg", 5)
    out = Transformed(raw, build_transform(info, train=False, image_size=(8, 12)))[0]
    assert out["mask"].shape == (8, 12)
    assert set(out["mask"].unique().tolist()) <= set(mask.unique().tolist())  # no blended ids


# --------------------------------------------------------------------------- folders
def test_binary_folder(tmp_path):
    for i in range(5):
        _png(tmp_path / "images" / f"im{i}.png", _rgb(i))
        m = np.zeros((8, 10), np.uint8)
        m[:, : i + 1] = 255
        _png(tmp_path / "masks" / f"im{i}.png", m)
    train, info = build_dataset("binary", tmp_path, "train", val_fraction=0.2)
    val, _ = build_dataset("binary", tmp_path, "val", val_fraction=0.2)
    assert (len(train), len(val), info.num_classes) == (4, 1, 1)
    sample = train[0]
    assert set(sample["mask"].unique().tolist()) == {0, 1}
    i = int(train.indices[0])
    assert sample["mask"].sum() == 8 * (i + 1)
    assert torch.equal(sample["image"].permute(1, 2, 0), torch.from_numpy(_rgb(i)))
    (tmp_path / "masks" / "im3.png").unlink()
    with pytest.raises(DataError, match="im3"):
        build_dataset("binary", tmp_path, "train")


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        read_image(bad)
    with pytest.raises(DataError, match="missing.png"):
        read_image(tmp_path / "missing.png")


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    # road, sidewalk, car, unlabeled / sky, person, ego vehicle, bicycle
    ids = np.array([[7, 8, 26, 0], [23, 24, 1, 33]], np.uint8)
    for split in ("train", "val"):
        _png(tmp_path / "leftImg8bit" / split / "aachen" / "aachen_000000_000019_leftImg8bit.png", _rgb(0, 2, 4))
        _png(tmp_path / "gtFine" / split / "aachen" / "aachen_000000_000019_gtFine_labelIds.png", ids)
    ds, info = build_dataset("cityscapes", tmp_path, "val")
    assert info.num_classes == 19 and info.class_names[0] == "road" and info.class_names[13] == "car"
    assert ds[0]["mask"].tolist() == [[0, 1, 13, 255], [10, 11, 255, 18]]
    with pytest.raises(DataError, match="Cityscapes"):
        build_dataset("cityscapes", tmp_path / "leftImg8bit", "train")


def test_sunrgbd_rgb_depth_label(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "rgb" / f"{i:04d}.jpg", _rgb(i, 6, 6))
        _png(tmp_path / "train" / "depth" / f"{i:04d}.png", np.full((6, 6), 1000 * (i + 1), np.uint16))
        _png(tmp_path / "train" / "label" / f"{i:04d}.png", np.full((6, 6), 37 - i, np.uint8))
    raw, info = build_dataset("sunrgbd", tmp_path, "train")
    assert (len(raw), info.num_classes, info.in_channels, info.depth_channels) == (3, 38, 4, 1)
    ds = Transformed(raw, build_transform(info, train=False))
    out = ds[1]
    assert out["image"].shape == (4, 6, 6)
    assert torch.allclose(out["image"][3], torch.full((6, 6), 2000 / 65535))
    assert out["mask"].unique().tolist() == [36]
    _png(tmp_path / "train" / "label" / "0002.png", np.full((6, 6), 40, np.uint8))
    with pytest.raises(DataError, match="0002"):
        raw[2]


def test_cifar10_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    train, info = build_dataset("cifar10", tmp_path, "train")
    val, _ = build_dataset("cifar10", tmp_path, "val")
    assert (len(train), len(val), info.num_classes, info.task) == (10, 2, 10, "cls")
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert torch.equal(train[0]["image"].flatten(), torch.from_numpy(first["data"][0]))
    assert (train[0]["label"], train[1]["label"]) == (1, 9)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        build_dataset("cifar10", tmp_path, "train")


def test_imagefolder(tmp_path):
    for cls, n in (("cat", 2), ("dog", 3)):
        for i in range(n):
            _png(tmp_path / "train" / cls / f"{i}.png", _rgb(i))
            _png(tmp_path / "val" / cls / f"{i}.png", _rgb(i))
    ds, info = build_dataset("imagefolder", tmp_path, "train")
    assert info.class_names == ["cat", "dog"] and info.task == "cls" and len(ds) == 5
    assert [ds[i]["label"] for i in range(5)] == [0, 0, 1, 1, 1]
    assert ds[0]["image"].shape == (3, 8, 10)
    with pytest.raises(DataError):
        build_dataset("imagefolder", tmp_path / "nothing", "train")


def test_bad_format_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="unknown format"):
        build_dataset("coco", tmp_path)
    with pytest.raises(DataError, match="not found"):
        build_dataset("binary", tmp_path / "absent")
    with pytest.raises(DataError, match="folder not found"):
        build_dataset("binary", tmp_path)  # exists, but has no images/


def test_a_task_is_for_synthetic_data_only(tmp_path):
    with pytest.raises(DataError, match="--task is for --format synthetic"):
        build_dataset("binary", tmp_path, task="joint")
    with pytest.raises(DataError, match="--format binary needs --data"):
        build_dataset("binary", None)


# --------------------------------------------------------------------------- issue 28: masks read for what they are
def _mask_folder(root, masks, image_size=(8, 10), suffix=".png"):
    """``images/`` + ``masks/`` with one random image per mask (arrays or PIL images)."""
    for i, mask in enumerate(masks):
        _png(root / "images" / f"im{i}.png", _rgb(i, *image_size))
        path = root / "masks" / f"im{i}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(path)
    return root


def _square(h=8, w=10, value=1):
    m = np.zeros((h, w), np.uint8)
    m[2:6, 3:8] = value
    return m


def test_binary_masks_0_1_and_0_255_read_alike(tmp_path):
    expected = torch.from_numpy(_square()).long()
    one_bit = Image.fromarray(_square(value=255)).convert("1")
    palette = Image.fromarray(_square()).convert("P")  # indices 0/1, whatever colours they have
    palette.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    jpeg_like = _square(value=255)
    jpeg_like[2, 3], jpeg_like[0, 0] = 190, 12  # a blurred edge and noise
    for name, mask in (("zero_one", _square()), ("zero_255", _square(value=255)), ("one_bit", one_bit),
                       ("palette", palette), ("blurred", jpeg_like)):
        ds, _ = build_dataset("binary", _mask_folder(tmp_path / name, [mask] * 2), "train", val_fraction=0.5)
        assert torch.equal(ds[0]["mask"], expected), name


@pytest.mark.parametrize("values,needle", [((0, 1, 2), "neither 0/1 nor 0/255"), ((0, 1, 255), "0, 1 and 255")])
def test_ambiguous_binary_mask_is_named(tmp_path, values, needle):
    mask = np.array([values * 4], np.uint8).reshape(2, 6)
    ds, _ = build_dataset("binary", _mask_folder(tmp_path, [_square(2, 6), mask], (2, 6)), "train", val_fraction=0.5)
    ds = ds.dataset  # both files
    ds[0]
    with pytest.raises(DataError, match=f"im1.png.*{needle}.*--format masks"):
        ds[1]


def test_colour_label_map_is_refused(tmp_path):
    colour = np.zeros((8, 10, 3), np.uint8)
    colour[2:5, 2:5] = (255, 0, 0)
    path = _png(tmp_path / "label.png", colour)
    with pytest.raises(DataError, match="label.png: a colour image"):
        read_image(path, "labels")
    grey = _png(tmp_path / "grey.png", np.repeat(_square()[..., None], 3, axis=2))  # RGB but grey: fine
    assert torch.equal(read_image(grey, "labels")[0], torch.from_numpy(_square()).long())


def test_masks_format(tmp_path):
    ids = np.array([[0, 1, 2, 255], [2, 2, 1, 0]], np.uint8)
    for split in ("train", "val"):
        _mask_folder(tmp_path / split, [ids, ids], (2, 4))
    train, info = build_dataset("masks", tmp_path, "train", num_classes=3)
    assert (len(train), info.num_classes, info.ignore_index, info.task) == (2, 3, 255, "seg")
    assert train[0]["mask"].tolist() == ids.tolist()
    palette = Image.fromarray(ids).convert("P")  # VOC-style: the index is the class, the palette colours
    palette.putpalette([10, 20, 30] * 256)
    palette.save(tmp_path / "val" / "masks" / "im1.png")
    val, _ = build_dataset("masks", tmp_path, "val", num_classes=3)
    assert val[1]["mask"].tolist() == ids.tolist()
    # no split on disk: a seeded fraction held out
    flat, _ = build_dataset("masks", _mask_folder(tmp_path / "flat", [ids] * 5, (2, 4)), "val", num_classes=3,
                            val_fraction=0.4)
    assert len(flat) == 2
    # another ignore value; 255 is then out of range, named with its file
    ds, info = build_dataset("masks", tmp_path, "train", num_classes=2, ignore_index=2)
    assert info.ignore_index == 2
    with pytest.raises(DataError, match=r"train/masks/im0.png: class id 255 outside 0..1 \(and not the ignore index 2"):
        ds[0]
    with pytest.raises(DataError, match="needs --num-classes"):
        build_dataset("masks", tmp_path, "train")
    with pytest.raises(DataError, match="--ignore-index 1 is one of the class ids 0..2"):
        build_dataset("masks", tmp_path, "train", num_classes=3, ignore_index=1)
    _mask_folder(tmp_path / "jpeg", [ids], (2, 4), suffix=".jpg")
    with pytest.raises(DataError, match="im0.jpg: a JPEG mask"):
        build_dataset("masks", tmp_path / "jpeg", "train", num_classes=3)


def test_data_check_finds_missing_foreground_and_classes(tmp_path):
    from uresnet_models.data import check_dataset
    empty = [np.zeros((8, 10), np.uint8)] * 3
    ds, info = build_dataset("binary", _mask_folder(tmp_path / "empty", empty), "train", val_fraction=0.2)
    with pytest.raises(DataError, match="no foreground in any of the 2 training masks.*0/1 or 0/255"):
        check_dataset(ds, info, split="train")
    notes = check_dataset(ds, info, split="val")
    assert any("no foreground in any of the 2 masks" in n and "undefined" in n for n in notes), notes
    ids = np.array([[0, 1, 1, 3], [0, 0, 255, 3]], np.uint8)  # class 2 never present
    ds, info = build_dataset("masks", _mask_folder(tmp_path / "ids", [ids] * 2, (2, 4)), "train", num_classes=4,
                             val_fraction=0.5)
    assert check_dataset(ds, info, split="train") == ["class 2 (class2) in none of the 1 masks: the model cannot "
                                                      "learn it"]
    good, info = build_dataset("binary", _mask_folder(tmp_path / "good", [_square()] * 2), "train", val_fraction=0.5)
    assert check_dataset(good, info, split="train") == []
