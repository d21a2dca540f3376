"""Tests of splitlbi.data: IDX parsing, dataset discovery, checksums, splits, digits."""

from __future__ import annotations

import dataclasses
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from splitlbi.data import (
    DatasetSplits,
    available_datasets,
    encode_idx,
    load_dataset,
    normalize,
    parse_idx,
    read_idx,
    resolve_data_dir,
)
from splitlbi.data import datasets as datasets_module
from splitlbi.data.download import download_file
from splitlbi.errors import DataError, SplitLBIError

MNIST_TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# Official per-class counts of the 10,000 MNIST test images.
MNIST_TEST_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never touch the network nor the user's data folder.
    monkeypatch.setenv("SPLITLBI_OFFLINE", "1")
    monkeypatch.delenv("SPLITLBI_DATA", raising=False)


@pytest.fixture(scope="module")
def fashion(shared_data_dir: Path) -> DatasetSplits:
    return load_dataset("fashion-mnist", shared_data_dir, download=False)


def link_files(source_dir: Path, target_dir: Path, names=MNIST_TEST_FILES) -> Path:
    target_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        (target_dir / name).symlink_to(source_dir / name)
    return target_dir


def write_gz(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1))


# --- IDX format -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip(dtype) -> None:
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    data = encode_idx(array)
    type_code = {np.uint8: 8, np.int8: 9, np.int16: 11, np.int32: 12, np.float32: 13, np.float64: 14}[dtype]
    assert data[:4] == bytes([0, 0, type_code, 3])
    decoded = parse_idx(data)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == (2, 3, 4)
    np.testing.assert_array_equal(decoded, array)
    decoded[0, 0, 0] = 1  # owned and writable


def test_idx_gz_file_round_trip(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    write_gz(tmp_path / "tiny-labels-idx1-ubyte.gz", encode_idx(labels))
    np.testing.assert_array_equal(read_idx(tmp_path / "tiny-labels-idx1-ubyte.gz"), labels)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + b"\x00\x00\x00\x01" + b"\x07", "bad magic"),
        (b"\x00\x00\x07\x01" + b"\x00\x00\x00\x01" + b"\x07", "bad magic"),
        (b"\x00\x00\x08\x02" + b"\x00\x00\x00\x01", "truncated header"),
        (b"\x00\x00\x08\x01" + b"\x00\x00\x00\x03" + b"\x07", "needs 11"),
    ],
)
def test_parse_idx_rejects_malformed_data(data: bytes, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        parse_idx(data, "some/file")
    assert "some/file" in str(info.value)


# --- real data ----------------------------------------------------------------------------


def test_shared_files_have_the_official_checksums(shared_data_dir: Path) -> None:
    for source in (datasets_module._MNIST, datasets_module._FASHION_MNIST):
        for path in sorted((shared_data_dir / source.name / "raw").glob("*.gz")):
            read_idx(path, source.md5[path.name[:-3]])  # raises on mismatch


def test_mnist_test_set_split_8000_2000(shared_data_dir: Path) -> None:
    splits = load_dataset("mnist", shared_data_dir, train_split=8000, download=False)
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == ("mnist", 10, 1, 28)
    assert splits.classes == [str(d) for d in range(10)]
    assert splits.train.images.shape == (8000, 1, 28, 28) and splits.train.images.dtype == torch.uint8
    assert splits.test.images.shape == (2000, 1, 28, 28)
    assert splits.train.labels.shape == (8000,) and splits.train.labels.dtype == torch.int64
    assert len(splits.train) == 8000 and len(splits.test) == 2000
    # The first test digits are famously 7 2 1 0 4; the split keeps the file's order.
    assert splits.train.labels[:5].tolist() == [7, 2, 1, 0, 4]
    all_labels = torch.cat([splits.train.labels, splits.test.labels])
    assert torch.bincount(all_labels).tolist() == MNIST_TEST_CLASS_COUNTS
    assert splits.mean[0] == pytest.approx(0.1301, abs=1e-3) and splits.std[0] == pytest.approx(0.3077, abs=1e-3)
    assert "8000" in splits.description and "2000" in splits.description


def test_fashion_mnist_full_train_and_test(fashion: DatasetSplits) -> None:
    assert fashion.name == "fashion-mnist" and fashion.num_classes == 10 and fashion.classes[0] == "T-shirt/top"
    assert fashion.train.images.shape == (60000, 1, 28, 28)
    assert fashion.test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(fashion.train.labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels).tolist() == [1000] * 10
    # The usual normalization constants of Fashion-MNIST.
    assert fashion.mean[0] == pytest.approx(0.2860, abs=1e-4) and fashion.std[0] == pytest.approx(0.3530, abs=1e-4)


@pytest.mark.parametrize("alias", ["fashion_mnist", "FashionMNIST", " Fashion-MNIST "])
def test_dataset_aliases(alias: str, shared_data_dir: Path) -> None:
    assert load_dataset(alias, shared_data_dir, train_split=9000, download=False).name == "fashion-mnist"


def test_train_split_takes_test_set_in_order(shared_data_dir: Path, fashion: DatasetSplits) -> None:
    splits = load_dataset("fashion-mnist", shared_data_dir, train_split=7000, download=False)
    assert torch.equal(splits.train.images, fashion.test.images[:7000])
    assert torch.equal(splits.test.labels, fashion.test.labels[7000:])


@pytest.mark.parametrize("train_split", [0, -1, 10000, 20000, True, 1.5, "8000"])
def test_invalid_train_split(train_split, shared_data_dir: Path) -> None:
    with pytest.raises(DataError, match="train_split"):
        load_dataset("mnist", shared_data_dir, train_split=train_split, download=False)


def test_pad_to_32(shared_data_dir: Path) -> None:
    plain = load_dataset("mnist", shared_data_dir, train_split=8000, download=False)
    padded = load_dataset("mnist", shared_data_dir, train_split=8000, download=False, pad_to=32)
    assert padded.image_size == 32
    assert padded.train.images.shape == (8000, 1, 32, 32) and padded.test.images.shape == (2000, 1, 32, 32)
    assert torch.equal(padded.test.images[:, :, 2:30, 2:30], plain.test.images)
    border = padded.train.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert not border.any()
    assert padded.mean == plain.mean and padded.std == plain.std  # stats of the unpadded content


@pytest.mark.parametrize("pad_to", [20, 0, 32.0])
def test_invalid_pad_to(pad_to, shared_data_dir: Path) -> None:
    with pytest.raises(DataError, match="pad_to"):
        load_dataset("mnist", shared_data_dir, train_split=8000, download=False, pad_to=pad_to)


def test_unknown_dataset_lists_choices() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar-1000'.*cifar10, digits, fashion-mnist, mnist"):
        load_dataset("cifar-1000")
    assert available_datasets() == ["cifar10", "digits", "fashion-mnist", "mnist"]


# --- finding files --------------------------------------------------------------------------


def test_missing_files_without_download_say_where_to_put_them(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path / "data", train_split=8000, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "data" / "mnist" / "raw") in message
    assert "t10k-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "download=False" in message


def test_offline_env_disables_downloads(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="SPLITLBI_OFFLINE"):
        load_dataset("mnist", tmp_path, train_split=8000)


def test_missing_mnist_train_files_suggest_train_split(shared_data_dir: Path, tmp_path: Path) -> None:
    # A folder of its own with only the official test files: the shared folder holds the full set.
    link_files(shared_data_dir / "mnist" / "raw", tmp_path / "mnist" / "raw")
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz.*--train-split N"):
        load_dataset("mnist", tmp_path, download=False)


def test_torchvision_layout_and_uncompressed_files(shared_data_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    link_files(shared_data_dir / "mnist" / "raw", raw, names=MNIST_TEST_FILES[:1])
    # torchvision also extracts the archives next to them; a decompressed file is accepted.
    labels_gz = shared_data_dir / "mnist" / "raw" / MNIST_TEST_FILES[1]
    (raw / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(labels_gz.read_bytes()))
    splits = load_dataset("mnist", tmp_path, train_split=8000, download=False)
    assert len(splits.train) == 8000 and splits.train.labels[:5].tolist() == [7, 2, 1, 0, 4]


def test_debian_system_folder_for_fashion_mnist(
    shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    debian = link_files(shared_data_dir / "fashion-mnist" / "raw", tmp_path / "usr-share-datasets-fashion-mnist")
    source = dataclasses.replace(datasets_module._FASHION_MNIST, system_dirs=(debian,))
    monkeypatch.setitem(datasets_module._IDX_SOURCES, "fashion-mnist", source)
    splits = load_dataset("fashion-mnist", tmp_path / "empty", train_split=9000, download=False)
    assert len(splits.train) == 9000 and len(splits.test) == 1000


def test_data_dir_from_env(shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    link_files(shared_data_dir / "mnist" / "raw", tmp_path / "mnist" / "raw")
    monkeypatch.setenv("SPLITLBI_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert len(load_dataset("mnist", train_split=8000, download=False).test) == 2000
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"  # the argument wins


def test_default_data_dir_is_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_data_dir() == tmp_path / "splitlbi"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_dir() == Path.home() / ".cache" / "splitlbi"


def test_data_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        load_dataset("mnist", tmp_path / "file", train_split=8000, download=False)


# --- corrupt files ----------------------------------------------------------------------------


def copy_mnist_test(shared_data_dir: Path, tmp_path: Path) -> Path:
    raw = tmp_path / "mnist" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_TEST_FILES:
        shutil.copyfile(shared_data_dir / "mnist" / "raw" / name, raw / name)
    return raw


def test_truncated_gzip_names_the_file(shared_data_dir: Path, tmp_path: Path) -> None:
    raw = copy_mnist_test(shared_data_dir, tmp_path)
    images = raw / MNIST_TEST_FILES[0]
    images.write_bytes(images.read_bytes()[:100_000])
    with pytest.raises(DataError, match=f"corrupt file {images}"):
        load_dataset("mnist", tmp_path, train_split=8000, download=False)


def test_altered_content_fails_checksum_and_names_the_file(shared_data_dir: Path, tmp_path: Path) -> None:
    raw = copy_mnist_test(shared_data_dir, tmp_path)
    labels = raw / MNIST_TEST_FILES[1]
    content = bytearray(gzip.decompress(labels.read_bytes()))
    content[-1] = (content[-1] + 1) % 10  # a valid label, just the wrong one
    write_gz(labels, bytes(content))
    with pytest.raises(SplitLBIError, match=f"checksum mismatch for {labels}") as info:
        load_dataset("mnist", tmp_path, train_split=8000, download=False)
    assert isinstance(info.value, DataError)


# --- downloads (from file:// URLs: no network needed) -------------------------------------------


def test_download_fills_missing_files_atomically(
    shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPLITLBI_OFFLINE")
    broken_mirror = (tmp_path / "nowhere").as_uri() + "/"
    good_mirror = (shared_data_dir / "mnist" / "raw").as_uri() + "/"
    source = dataclasses.replace(datasets_module._MNIST, mirrors=(broken_mirror, good_mirror))
    monkeypatch.setitem(datasets_module._IDX_SOURCES, "mnist", source)
    splits = load_dataset("mnist", tmp_path / "data", train_split=8000)
    assert len(splits.train) == 8000
    raw = tmp_path / "data" / "mnist" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_TEST_FILES)  # no temp files left


def test_download_with_wrong_content_is_rejected(shared_data_dir: Path, tmp_path: Path) -> None:
    url = (shared_data_dir / "mnist" / "raw" / MNIST_TEST_FILES[1]).as_uri()
    target = tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match="download of t10k-labels-idx1-ubyte.gz failed.*expected 0123"):
        download_file([url], target, expected_md5="0123")
    assert list(target.parent.iterdir()) == []


# --- digits -------------------------------------------------------------------------------------


def test_digits_default_split() -> None:
    splits = load_dataset("digits")
    assert (splits.name, splits.num_classes, splits.in_channels, splits.image_size) == ("digits", 10, 1, 28)
    assert splits.train.images.shape == (1437, 1, 28, 28) and splits.test.images.shape == (360, 1, 28, 28)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert int(splits.train.images.max()) == 255 and int(splits.train.images.min()) == 0
    from sklearn.datasets import load_digits

    expected_counts = np.bincount(load_digits().target).tolist()
    assert torch.bincount(torch.cat([splits.train.labels, splits.test.labels])).tolist() == expected_counts
    # Pinned: the shuffle (numpy RandomState(0)) must never change, or results stop being comparable.
    assert splits.train.labels[:10].tolist() == [2, 8, 2, 6, 6, 7, 1, 9, 8, 5]
    again = load_dataset("digits", pad_to=32, train_split=1000)
    assert again.image_size == 32 and len(again.train) == 1000 and len(again.test) == 797
    assert torch.equal(again.train.labels, splits.train.labels[:1000])
    assert torch.equal(again.train.images[:, :, 2:30, 2:30], splits.train.images[:1000])


# --- normalize ------------------------------------------------------------------------------------


def test_normalize() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 2, 2, 2).contiguous()
    out = normalize(images, (0.2, 0.5), (0.5, 0.25))
    assert out.dtype == torch.float32 and out.shape == images.shape
    expected = (images.float() / 255 - torch.tensor([0.2, 0.5]).view(2, 1, 1)) / torch.tensor([0.5, 0.25]).view(2, 1, 1)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(normalize(images[0], (0.2, 0.5), (0.5, 0.25)), expected[0])  # [C, H, W] too
    with pytest.raises(TypeError):
        normalize(images.float(), (0.2, 0.5), (0.5, 0.25))
    with pytest.raises(ValueError):
        normalize(images, (0.2,), (0.5,))
