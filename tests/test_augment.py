"""Tests of splitlbi.data.augment: the batched crop + flip, on real Fashion-MNIST."""

from __future__ import annotations

import csv

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitlbi.data import DatasetSplits, load_dataset, normalize
from splitlbi.data.augment import augment_generator, random_crop_flip, train_transform
from helpers import read_rows

PADDING = 4
OFFSETS = 2 * PADDING + 1  # 9 offsets per axis


@pytest.fixture(scope="module")
def fashion32(shared_data_dir: Path) -> DatasetSplits:
    # The 10,000 test images are plenty here (train_split avoids reading the 60,000 train images).
    return load_dataset("fashion-mnist", shared_data_dir, train_split=9000, download=False, pad_to=32)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def candidate_matches(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Bool [N, 9, 9, 2]: output n equals the (top, left) crop of padded input n, flipped or not.

    Brute force: all 81 offsets x 2 flips compared pixel by pixel.
    """
    height, width = inputs.shape[-2:]
    padded = F.pad(inputs, (PADDING,) * 4)  # zeros
    matches = torch.zeros(inputs.shape[0], OFFSETS, OFFSETS, 2, dtype=torch.bool)
    for top in range(OFFSETS):
        for left in range(OFFSETS):
            crop = padded[:, :, top:top + height, left:left + width]
            matches[:, top, left, 0] = (crop == outputs).flatten(1).all(dim=1)
            matches[:, top, left, 1] = (crop.flip(-1) == outputs).flatten(1).all(dim=1)
    return matches


def candidate_matches_fast(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Like :func:`candidate_matches` for large batches, through a random linear hash.

    The hash of an image is a dot product of its pixels with random integer weights,
    computed exactly (float32 row sums below 2**24, float64 totals below 2**53): one
    per row of every (left offset, flip) column band of the padded input, then one per
    crop, the 9 tops at once. The matches found this way are verified pixel by pixel.
    """
    count, channels, height, width = inputs.shape
    row_weights = torch.randint(0, (1 << 24) // (255 * width * channels), (channels * width, 1),
                                generator=generator(123)).float()
    # A mirrored band hashes like the band with mirrored weights (per channel).
    mirrored = row_weights.view(channels, width).flip(-1).reshape(-1, 1)
    crop_weights = torch.randint(0, 1 << 20, (height,), generator=generator(124)).double()
    padded = F.pad(inputs, (PADDING,) * 4)  # zeros

    def row_hashes(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # [N, C, R, W] -> [N, R]
        rows = images.float().permute(0, 2, 1, 3).reshape(count, images.shape[2], channels * width)
        return (rows @ weights).squeeze(-1).double()

    output_keys = row_hashes(outputs, row_weights) @ crop_weights  # [N]
    matches = torch.zeros(count, OFFSETS, OFFSETS, 2, dtype=torch.bool)
    for left in range(OFFSETS):
        band = padded[..., left:left + width]
        for flip, weights in enumerate((row_weights, mirrored)):
            crop_keys = row_hashes(band, weights).unfold(1, height, 1) @ crop_weights  # [N, 9 tops]
            matches[:, :, left, flip] = crop_keys == output_keys.view(-1, 1)
    # Verify the first match of each image exactly.
    found = matches.flatten(1).any(dim=1)
    cell = matches.flatten(1).float().argmax(dim=1)
    for index in cell[found].unique().tolist():
        top, left, flip = index // (OFFSETS * 2), index // 2 % OFFSETS, index % 2
        chosen = torch.nonzero(found & (cell == index)).flatten()
        crop = padded[chosen, :, top:top + height, left:left + width]
        assert torch.equal(crop.flip(-1) if flip else crop, outputs[chosen])
    return matches


def test_output_keeps_dtype_shape_and_device(fashion32: DatasetSplits) -> None:
    images = fashion32.train.images[:64]
    output = random_crop_flip(images, generator=generator(0))
    assert output.dtype == torch.uint8 and output.shape == images.shape == (64, 1, 32, 32)
    assert output.device == images.device and output.data_ptr() != images.data_ptr()


def test_every_output_is_a_padded_crop_of_its_input_possibly_flipped(fashion32: DatasetSplits) -> None:
    # Brute force over all 81 offsets x 2 flips.
    images = fashion32.train.images[:8]
    output, top, left, flipped = random_crop_flip(images, generator=generator(1), return_params=True)
    matches = candidate_matches(images, output)
    assert matches.flatten(1).any(dim=1).all()
    assert torch.equal(candidate_matches_fast(images, output), matches)  # the hashed search used below agrees
    for n in range(images.shape[0]):  # the reported parameters are among the matching ones
        assert matches[n, top[n], left[n], int(flipped[n])]


@pytest.fixture
def one_thread():
    # Many small tensor ops: on a busy machine a second intra-op thread only adds waiting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_offsets_and_flips_are_uniform_over_a_large_batch(fashion32: DatasetSplits, one_thread) -> None:
    count = OFFSETS * OFFSETS * 2 * 50  # 8100: 50 expected per (top, left, flip) cell
    images = fashion32.train.images[torch.arange(count) % len(fashion32.train)]
    output = random_crop_flip(images, generator=generator(2))
    matches = candidate_matches_fast(images, output)
    assert matches.flatten(1).any(dim=1).all()  # the invariant holds for all 8100
    # Recover (top, left, flip) from the pixels where it is unambiguous (nearly always on real images).
    unique = matches.flatten(1).sum(dim=1) == 1
    assert unique.float().mean() > 0.98
    cells = matches[unique].flatten(1).float().argmax(dim=1)
    counts = torch.bincount(cells, minlength=OFFSETS * OFFSETS * 2).double()
    expected = counts.sum() / counts.numel()
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < 161 + 6 * (2 * 161) ** 0.5  # 161 degrees of freedom: mean 161, sd ~18
    by_cell = counts.view(OFFSETS, OFFSETS, 2)
    for marginal in (by_cell.sum(dim=(1, 2)), by_cell.sum(dim=(0, 2))):  # top, left: ~1/9 each
        assert torch.all((marginal / counts.sum() - 1 / 9).abs() < 0.025)
    assert abs(float(by_cell[..., 1].sum() / counts.sum()) - 0.5) < 0.03  # flips


def test_same_seed_same_output_and_different_seed_different_output(fashion32: DatasetSplits) -> None:
    images = fashion32.train.images[:256]
    first = random_crop_flip(images, generator=generator(7))
    assert torch.equal(first, random_crop_flip(images, generator=generator(7)))
    assert not torch.equal(first, random_crop_flip(images, generator=generator(8)))
    torch.manual_seed(3)  # no generator: the global CPU RNG
    from_global = random_crop_flip(images)
    torch.manual_seed(3)
    assert torch.equal(from_global, random_crop_flip(images))


def test_centre_crop_keeps_the_pixels(fashion32: DatasetSplits) -> None:
    images = fashion32.train.images[:2000]
    output, top, left, flipped = random_crop_flip(images, generator=generator(4), return_params=True)
    centre = (top == PADDING) & (left == PADDING)
    assert centre.sum() > 0 and (centre & flipped).sum() > 0 and (centre & ~flipped).sum() > 0
    for n in torch.nonzero(centre).flatten().tolist():
        assert torch.equal(output[n].flatten().sort().values, images[n].flatten().sort().values)
        expected = images[n].flip(-1) if flipped[n] else images[n]
        assert torch.equal(output[n], expected)
    # Without padding every output is the image or its mirror: the same pixel multiset.
    flips_only, _, _, mirrored = random_crop_flip(images, 0, generator(5), return_params=True)
    assert torch.equal(flips_only.flatten(1).sort(dim=1).values, images.flatten(1).sort(dim=1).values)
    assert torch.equal(flips_only, torch.where(mirrored.view(-1, 1, 1, 1), images.flip(-1), images))
    assert 0.4 < mirrored.float().mean() < 0.6


def test_no_flip_option_and_per_channel_fill() -> None:
    images = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    output, top, left, flipped = random_crop_flip(images, 2, generator(0), flip=False,
                                                  fill=(-1.0, -2.0, -3.0), return_params=True)
    assert not flipped.any()
    padded = torch.stack([F.pad(images[:, c], (2, 2, 2, 2), value=-1.0 - c) for c in range(3)], dim=1)
    for n in range(2):
        assert torch.equal(output[n], padded[n, :, top[n]:top[n] + 5, left[n]:left[n] + 6])
    with pytest.raises(ValueError, match="one value per channel"):
        random_crop_flip(images, 2, fill=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        random_crop_flip(images[0])


def test_transform_on_normalized_batches_equals_crop_then_normalize(fashion32: DatasetSplits) -> None:
    # train_one_epoch applies its transform after normalization; the padding must still be black.
    images = fashion32.train.images[:500]
    mean, std = fashion32.mean, fashion32.std
    transform = train_transform("crop-flip", mean, std, generator(9))
    expected = normalize(random_crop_flip(images, generator=generator(9)), mean, std)
    assert torch.equal(transform(normalize(images, mean, std)), expected)
    assert train_transform("none", mean, std) is None
    with pytest.raises(ValueError, match="unknown augmentation"):
        train_transform("cutout", mean, std)


def test_augment_generator_depends_on_seed_and_epoch_only() -> None:
    draw = lambda g: torch.randint(0, 1000, (50,), generator=g)  # noqa: E731
    assert torch.equal(draw(augment_generator(0, 3)), draw(augment_generator(0, 3)))
    assert not torch.equal(draw(augment_generator(0, 3)), draw(augment_generator(0, 4)))
    assert not torch.equal(draw(augment_generator(0, 3)), draw(augment_generator(1, 3)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batch_equals_cpu_batch_for_the_same_generator(fashion32: DatasetSplits) -> None:
    images = fashion32.train.images[:1024]
    on_cpu = random_crop_flip(images, generator=generator(11))
    on_gpu = random_crop_flip(images.cuda(), generator=generator(11))
    assert on_gpu.device.type == "cuda" and torch.equal(on_gpu.cpu(), on_cpu)
    mean, std = fashion32.mean, fashion32.std
    transform = train_transform("crop-flip", mean, std, generator(12))
    expected = normalize(random_crop_flip(images.cuda(), generator=generator(12)), mean, std)
    assert torch.equal(transform(normalize(images.cuda(), mean, std)), expected)


# --- training with --augment crop-flip ------------------------------------------------------

QUICK = ["--model", "lenet5", "--dataset", "digits", "--pad-to", "32", "--limit-train", "192", "--limit-test", "64",
         "--batch-size", "64", "--lr-milestones", "2", "--no-progress"]


def assert_same_checkpoint(first: Path, second: Path) -> None:
    from splitlbi.train import load_checkpoint

    a, b = load_checkpoint(first), load_checkpoint(second)
    assert a["epoch"] == b["epoch"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            other = b["optimizer"]["state"][index][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, name


def test_crop_flip_training_runs_and_resumes_bitwise(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from splitlbi.cli.main import main
    from splitlbi.train import load_checkpoint, read_run_config

    straight, resumed, plain = tmp_path / "straight", tmp_path / "resumed", tmp_path / "plain"
    assert main(["train", *QUICK, "--augment", "crop-flip", "--epochs", "1", "--out", str(resumed)]) == 0
    info = read_run_config(resumed)
    assert info["augment"] == "crop-flip" and info["image_size"] == 32
    assert main(["train", "--resume", str(resumed), "--epochs", "2", "--no-progress"]) == 0
    assert main(["train", *QUICK, "--augment", "crop-flip", "--epochs", "2", "--out", str(straight)]) == 0
    assert_same_checkpoint(straight, resumed)
    metrics = lambda run: [{k: v for k, v in row.items() if k != "epoch_seconds"}  # noqa: E731
                           for row in read_rows(run / "metrics.csv")]
    assert metrics(straight) == metrics(resumed)  # all but epoch_seconds (columns were added after it)
    # The augmentation does change training: the same run without it ends elsewhere.
    assert main(["train", *QUICK, "--epochs", "2", "--out", str(plain)]) == 0
    assert read_run_config(plain)["augment"] == "none"
    weights = lambda run: load_checkpoint(run)["model"]["conv1.weight"]  # noqa: E731
    assert not torch.equal(weights(plain), weights(straight))
    # It is part of the run: a resume cannot change it.
    assert main(["train", "--resume", str(resumed), "--augment", "none", "--epochs", "3", "--no-progress"]) == 2
    assert "--augment" in capsys.readouterr().err


def test_unknown_augmentation_is_refused() -> None:
    from splitlbi.errors import SplitLBIError
    from splitlbi.train import TrainConfig
    from splitlbi.train.config import validate_config

    with pytest.raises(SplitLBIError, match="unknown augmentation 'cutout'"):
        validate_config(TrainConfig(augment="cutout"))
