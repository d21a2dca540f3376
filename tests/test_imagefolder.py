"""Tests of splitlbi.data.imagefolder on small generated ImageNet-style folders."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from splitlbi.data.imagefolder import (
    ImageFolderDataset,
    make_imagenet_loaders,
    random_resized_crop_box,
)
from splitlbi.errors import DataError

Image = pytest.importorskip("PIL.Image")

CLASSES = ["n01440764", "n01443537", "n02102040"]  # sorted, as ImageNet's wnids are
SIZES = [(300, 200), (180, 260), (256, 256), (500, 375)]  # (width, height)


def write_image(path: Path, width: int, height: int, colour: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([(x * 255 // width), (y * 255 // height), np.full_like(x, colour)], axis=-1).astype(np.uint8)
    image = Image.fromarray(array)
    if path.suffix.lower() == ".png":
        image.convert("L").save(path)  # a grayscale PNG: converted to RGB on reading
    else:
        image.save(path, quality=90)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    # Created in reverse order so that sorting, not creation order, decides the labels.
    for label, name in reversed(list(enumerate(CLASSES))):
        for index, (width, height) in enumerate(SIZES):
            suffix = [".JPEG", ".jpg", ".png", ".jpeg"][index]
            write_image(root / "train" / name / f"img{index}{suffix}", width, height, 80 * label)
        write_image(root / "val" / name / "val0.JPEG", 320, 240, 80 * label)
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    return root


def test_classes_are_sorted_and_labels_follow_them(root: Path) -> None:
    dataset = ImageFolderDataset(root, "train")
    assert dataset.classes == CLASSES and len(dataset) == len(CLASSES) * len(SIZES)
    for path, label in dataset.samples:
        assert Path(path).parent.name == CLASSES[label]
    assert dataset.targets == sorted(dataset.targets)


def test_train_transform_gives_uint8_224_crops(root: Path) -> None:
    dataset = ImageFolderDataset(root, "train")
    torch.manual_seed(0)
    for index in range(len(dataset)):
        image, label = dataset[index]
        assert image.dtype == torch.uint8 and image.shape == (3, 224, 224)
        assert label == dataset.samples[index][1]
    image, _ = dataset[2]  # the grayscale PNG: three equal channels
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    # Random, and reproducible from torch's RNG.
    torch.manual_seed(1)
    first = dataset[0][0]
    torch.manual_seed(1)
    assert torch.equal(first, dataset[0][0])
    assert not torch.equal(first, dataset[0][0])


def test_val_transform_resizes_the_short_side_and_crops_the_centre(root: Path) -> None:
    dataset = ImageFolderDataset(root, "val")
    image, label = dataset[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 224, 224) and label == 1
    assert torch.equal(image, dataset[1][0])  # deterministic
    # 320x240 -> 341x256 (short side 256, long side truncated), then the centre 224x224.
    source = dataset.load_image(1).resize((341, 256), Image.BILINEAR)
    left, top = int(round((341 - 224) / 2)), int(round((256 - 224) / 2))
    expected = np.asarray(source.crop((left, top, left + 224, top + 224)))
    assert torch.equal(image, torch.from_numpy(expected.copy()).permute(2, 0, 1))
    # The blue channel holds the class colour, the red channel a left-to-right ramp.
    assert int(image[2].float().mean().round()) == 80
    assert image[0, :, 0].float().mean() < image[0, :, -1].float().mean()


def test_other_image_size(root: Path) -> None:
    dataset = ImageFolderDataset(root, "val", image_size=64)
    assert dataset.resize_size == 73 and dataset[0][0].shape == (3, 64, 64)
    assert ImageFolderDataset(root, "train", image_size=32)[0][0].shape == (3, 32, 32)


def test_random_resized_crop_box_stays_inside_and_in_range() -> None:
    generator = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        top, left, height, width = random_resized_crop_box(200, 300, generator=generator)
        assert 0 <= top and top + height <= 200 and 0 <= left and left + width <= 300
        areas.append(height * width / (200 * 300))
        assert 3 / 4 - 0.05 <= width / height <= 4 / 3 + 0.05 or (height, width) == (200, 300)
    assert min(areas) < 0.2 and max(areas) > 0.8
    # An extreme aspect ratio falls back to the largest centred crop with ratio 4/3.
    top, left, height, width = random_resized_crop_box(10, 1000, scale=(0.99, 1.0), generator=generator)
    assert (height, width) == (10, 13) and left == (1000 - 13) // 2 and math.isclose(top, 0)


def test_loaders_yield_uint8_batches(root: Path) -> None:
    loaders = make_imagenet_loaders(root, batch_size=5, workers=0)
    train, val = loaders  # unpacks as a pair
    batches = list(train)
    assert [images.shape[0] for images, _ in batches] == [5, 5, 2]
    images, labels = batches[0]
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 224, 224) and labels.dtype == torch.int64
    assert sorted(torch.cat([labels for _, labels in batches]).tolist()) == sorted(train.dataset.targets)
    val_images, val_labels = next(iter(val))
    assert val_images.shape == (3, 3, 224, 224) and val_labels.tolist() == [0, 1, 2]
    assert val.dataset.classes == train.dataset.classes == CLASSES


def test_distributed_loaders_use_distributed_samplers(root: Path) -> None:
    loaders = make_imagenet_loaders(root, batch_size=4, workers=0, distributed=True, num_replicas=2, rank=1)
    assert isinstance(loaders.train.sampler, DistributedSampler) and loaders.train.sampler.shuffle
    assert isinstance(loaders.val.sampler, DistributedSampler) and not loaders.val.sampler.shuffle
    assert len(loaders.train.sampler) == 6 and len(loaders.val.sampler) == 2


def test_missing_root_and_empty_class_folders(tmp_path: Path, root: Path) -> None:
    with pytest.raises(DataError, match=r"image folder root .*missing does not exist; expected .*/train/<class>"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    write_image(tmp_path / "only_train" / "train" / "a" / "x.jpg", 40, 30, 0)
    with pytest.raises(DataError, match=r"image folder .*only_train/val does not exist"):
        make_imagenet_loaders(tmp_path / "only_train", batch_size=2, workers=0)
    (tmp_path / "only_train" / "train" / "b").mkdir()
    (tmp_path / "only_train" / "train" / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"class folder .*train/b holds no images"):
        ImageFolderDataset(tmp_path / "only_train", "train")
    with pytest.raises(DataError, match="split must be 'train' or 'val'"):
        ImageFolderDataset(root, "test")


def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "train" / "a" / "broken.JPEG"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"cannot read image .*broken.JPEG"):
        ImageFolderDataset(tmp_path, "train")[0]
