"""Tests of the CIFAR-10 loader on small archives generated in the original format."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch

from splitlbi.data import cifar, load_dataset
from splitlbi.errors import DataError

PER_BATCH = 20
CLASSES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # not the real names


@pytest.fixture(autouse=True)
def _offline_and_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPLITLBI_OFFLINE", "1")
    monkeypatch.delenv("SPLITLBI_DATA", raising=False)


def batch_content(index: int) -> Tuple[np.ndarray, List[int]]:
    """Images [n, 3, 32, 32] with a known pattern: pixel (c, y, x) of image k of batch b."""
    k = np.arange(PER_BATCH).reshape(-1, 1, 1, 1)
    c = np.arange(3).reshape(1, -1, 1, 1)
    y = np.arange(32).reshape(1, 1, -1, 1)
    x = np.arange(32).reshape(1, 1, 1, -1)
    images = ((index * 37 + k * 11 + c * 80 + y * 3 + x * 5) % 256).astype(np.uint8)
    labels = [int((index * 3 + j) % 10) for j in range(PER_BATCH)]
    return images, labels


def batch_pickle(index: int, name: str) -> bytes:
    images, labels = batch_content(index)
    # The original layout: one row per image, 1024 R then 1024 G then 1024 B, each row-major.
    rows = images.reshape(PER_BATCH, 3 * 32 * 32)
    if index == 5:  # as if re-pickled from numpy: labels as numpy scalars
        labels = [np.int64(label) for label in labels]
    content = {b"batch_label": name.encode(), b"labels": labels, b"data": rows,
               b"filenames": [f"img_{index}_{j}.png".encode() for j in range(PER_BATCH)]}
    return pickle.dumps(content, protocol=2)


def archive_members() -> Dict[str, bytes]:
    members = {f"data_batch_{b}": batch_pickle(b, f"training batch {b} of 5") for b in range(1, 6)}
    members["test_batch"] = batch_pickle(0, "testing batch 1 of 1")
    members["batches.meta"] = pickle.dumps(
        {b"label_names": [name.encode() for name in CLASSES], b"num_cases_per_batch": PER_BATCH,
         b"num_vis": 3072}, protocol=2)
    return members


def write_archive(path: Path, members: Dict[str, bytes]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def register(monkeypatch: pytest.MonkeyPatch):
    """Register checksums of generated files in CIFAR10_MD5 (restored after the test)."""
    def register_md5(name: str, md5: str) -> None:
        monkeypatch.setitem(cifar.CIFAR10_MD5, name, md5)
    return register_md5


@pytest.fixture
def archive(tmp_path: Path, register) -> Path:
    path = tmp_path / "cifar10" / cifar.CIFAR10_ARCHIVE
    register(cifar.CIFAR10_ARCHIVE, write_archive(path, archive_members()))
    return path


def expected_split(indices) -> Tuple[torch.Tensor, torch.Tensor]:
    parts = [batch_content(index) for index in indices]
    images = torch.from_numpy(np.concatenate([images for images, _ in parts]))
    labels = torch.tensor([label for _, labels in parts for label in labels], dtype=torch.int64)
    return images, labels


def test_archive_round_trips_pixels_labels_and_classes(archive: Path, tmp_path: Path) -> None:
    splits = load_dataset("cifar10", tmp_path, download=False)
    assert splits.name == "cifar10" and splits.classes == CLASSES
    assert splits.train.images.shape == (100, 3, 32, 32) and splits.train.images.dtype == torch.uint8
    assert splits.test.images.shape == (20, 3, 32, 32)
    assert splits.train.labels.dtype == torch.int64
    train_images, train_labels = expected_split(range(1, 6))
    test_images, test_labels = expected_split([0])
    assert torch.equal(splits.train.images, train_images) and torch.equal(splits.train.labels, train_labels)
    assert torch.equal(splits.test.images, test_images) and torch.equal(splits.test.labels, test_labels)
    # CHW order, checked on one raw row: entry 1024 + 32 y + x is green (c = 1) at (y, x).
    row = pickle.loads(archive_members()["data_batch_2"])[b"data"][3]
    assert splits.train.images[20 + 3, 1, 2, 7] == row[1024 + 32 * 2 + 7]
    assert splits.train.images[20 + 3, 2, 31, 0] == row[2048 + 32 * 31]
    # Stats of the train images, per channel, like the other datasets.
    values = train_images.double() / 255
    assert splits.mean == pytest.approx(values.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert splits.std == pytest.approx(values.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)
    assert splits.in_channels == 3 and splits.image_size == 32 and splits.num_classes == 10
    assert "CIFAR-10 official split: 100 train images, 20 test images" == splits.description


def test_pad_to_32_is_a_no_op_and_aliases(archive: Path, tmp_path: Path) -> None:
    plain = load_dataset("cifar10", tmp_path, download=False)
    padded = load_dataset("CIFAR-10", tmp_path, download=False, pad_to=32)
    assert torch.equal(plain.train.images, padded.train.images) and plain.description == padded.description
    assert load_dataset("cifar_10", tmp_path, download=False, pad_to=40).image_size == 40
    with pytest.raises(DataError, match="smaller than the images"):
        load_dataset("cifar10", tmp_path, download=False, pad_to=28)


def test_train_split_uses_the_test_batch_only(archive: Path, tmp_path: Path) -> None:
    splits = load_dataset("cifar10", tmp_path, download=False, train_split=15)
    test_images, test_labels = expected_split([0])
    assert torch.equal(splits.train.images, test_images[:15]) and torch.equal(splits.test.labels, test_labels[15:])
    assert "first 15 images train, last 5" in splits.description


def test_archive_in_the_data_dir_itself(tmp_path: Path, register) -> None:
    register(cifar.CIFAR10_ARCHIVE, write_archive(tmp_path / cifar.CIFAR10_ARCHIVE, archive_members()))
    assert len(load_dataset("cifar10", tmp_path, download=False).train) == 100


def test_extracted_folder_is_verified_file_by_file(tmp_path: Path, register) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name, data in archive_members().items():
        (folder / name).write_bytes(data)
        register(name, hashlib.md5(data).hexdigest())
    splits = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(splits.train.images, expected_split(range(1, 6))[0])
    assert splits.classes == CLASSES
    (folder / "data_batch_3").write_bytes(b"\x80\x02}q\x00.")  # a valid pickle, wrong content
    with pytest.raises(DataError, match=r"checksum mismatch for .*data_batch_3: .*expected"):
        load_dataset("cifar10", tmp_path, download=False)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"cifar-10-batches-py lacks data_batch_3"):
        load_dataset("cifar10", tmp_path, download=False)


def test_official_checksums_are_the_default() -> None:
    assert cifar.CIFAR10_MD5[cifar.CIFAR10_ARCHIVE] == "c58f30108f718f92721af3b95e74349a"
    assert cifar.CIFAR10_MD5["test_batch"] == "40351d587109b95175f43aff81a1287e"


def test_unregistered_archive_fails_the_official_checksum(tmp_path: Path) -> None:
    path = tmp_path / "cifar10" / cifar.CIFAR10_ARCHIVE
    write_archive(path, archive_members())
    with pytest.raises(DataError, match=r"checksum mismatch for .*cifar-10-python.tar.gz.*c58f3010"):
        load_dataset("cifar10", tmp_path, download=False)


def test_corrupted_archive_names_the_file(archive: Path, tmp_path: Path) -> None:
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum mismatch for .*cifar10/cifar-10-python.tar.gz") as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert "\n" not in str(info.value)


def test_truncated_archive_with_matching_checksum_names_the_file(tmp_path: Path, register) -> None:
    path = tmp_path / "cifar10" / cifar.CIFAR10_ARCHIVE
    write_archive(path, archive_members())
    path.write_bytes(path.read_bytes()[:2000])
    register(cifar.CIFAR10_ARCHIVE, hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(DataError, match=r"(corrupt archive|corrupt CIFAR-10 file) .*cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, download=False)


def test_archive_missing_a_member(tmp_path: Path, register) -> None:
    members = archive_members()
    del members["data_batch_4"]
    path = tmp_path / "cifar10" / cifar.CIFAR10_ARCHIVE
    register(cifar.CIFAR10_ARCHIVE, write_archive(path, members))
    with pytest.raises(DataError, match=r"lacks cifar-10-batches-py/data_batch_4"):
        load_dataset("cifar10", tmp_path, download=False)


class Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickles_may_hold_nothing_but_arrays(tmp_path: Path, register, capsys: pytest.CaptureFixture) -> None:
    members = archive_members()
    members["batches.meta"] = pickle.dumps({b"label_names": Exploit()}, protocol=2)
    path = tmp_path / "cifar10" / cifar.CIFAR10_ARCHIVE
    register(cifar.CIFAR10_ARCHIVE, write_archive(path, members))
    with pytest.raises(DataError, match=r"refusing to load global _*builtins?_*\.print"):
        load_dataset("cifar10", tmp_path, download=False)
    assert "pickle code ran" not in capsys.readouterr().out


def test_missing_dataset_says_where_to_put_the_archive(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("cifar10", tmp_path / "data", download=False)
    message = str(info.value)
    assert "missing cifar-10-python.tar.gz: put the original archive" in message
    assert str(tmp_path / "data" / "cifar10") in message and "download=False" in message
    assert "\n" not in message


def test_download_fetches_and_verifies_the_archive(
    tmp_path: Path, register, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SPLITLBI_OFFLINE")
    mirror = tmp_path / "mirror" / cifar.CIFAR10_ARCHIVE
    register(cifar.CIFAR10_ARCHIVE, write_archive(mirror, archive_members()))
    monkeypatch.setattr(cifar, "CIFAR10_URLS", ((tmp_path / "nowhere").as_uri(), mirror.as_uri()))
    splits = load_dataset("cifar10", tmp_path / "data")
    assert len(splits.train) == 100
    assert sorted(p.name for p in (tmp_path / "data" / "cifar10").iterdir()) == [cifar.CIFAR10_ARCHIVE]
    # A download whose md5 is wrong is refused and leaves nothing behind.
    register(cifar.CIFAR10_ARCHIVE, "0" * 32)
    with pytest.raises(DataError, match=r"download of cifar-10-python.tar.gz failed.*md5 is [0-9a-f]+, expected 0000"):
        load_dataset("cifar10", tmp_path / "other")
    assert list((tmp_path / "other" / "cifar10").iterdir()) == []
