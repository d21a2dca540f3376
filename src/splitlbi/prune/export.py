"""Deployable files of a compacted network: a ``torch.export`` program and a plain ``state_dict``.

A compacted network is an ordinary ``nn.Module`` whose layers are smaller than the
registry's architecture (and, for option-A CIFAR ResNets, has
:class:`~splitlbi.prune.compact.IndexShortcut` shortcuts), so a pickled module only
loads with ``torch.load(weights_only=False)`` and splitlbi importable. For deployment
:func:`save_compact` writes, next to each other:

* ``NAME.pt2``: the network traced by :func:`torch.export.export` into an ATen graph
  with its weights (batch dimension dynamic). ``torch.export.load("NAME.pt2").module()``
  runs it in any Python with the same torch and nothing else; the deploy path of
  ``torch.export`` (AOTInductor, ExecuTorch) starts from this file;
* ``NAME.state_dict.pt``: its ``state_dict``, loadable with ``weights_only=True``;
* ``NAME.pt``: the whole module pickled, as before (``torch.load(path,
  weights_only=False)`` with splitlbi installed), for further work in Python.

**Which input.** A network trained by splitlbi reads normalized images,
``(x - mean) / std`` per channel with ``x`` in [0, 1] (``splitlbi.data.normalize``).
Given the ``mean`` and ``std`` (``splitlbi compact`` takes them from the run's config.json),
:func:`save_compact` puts that normalization in front of the network
(:class:`InputNormalization`), and all three files take images **scaled to [0, 1]**:
``uint8_images.float() / 255``, float32 ``[N, C, H, W]`` at the size the network trained
on. Without them, the files take what the network takes.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from splitlbi.errors import SplitLBIError
from splitlbi.utils.io import atomic_torch_save, atomic_write_bytes

__all__ = ["InputNormalization", "compact_file_names", "export_program", "save_compact"]

PathLike = Union[str, "Path"]


class InputNormalization(nn.Module):
    """``network((x - mean) / std)`` per channel: a network that takes images in [0, 1].

    ``mean``/``std`` are buffers (in the ``state_dict``, and constants of an exported program)."""

    def __init__(self, network: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std) or not len(mean):
            raise SplitLBIError(f"input normalization: {len(mean)} means but {len(std)} stds")
        if any(float(value) <= 0 for value in std):
            raise SplitLBIError(f"input normalization: every std must be > 0, got {list(std)}")
        self.network = network
        self.register_buffer("mean", torch.tensor([float(m) for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([float(v) for v in std]).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.network((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def compact_file_names(out: PathLike) -> Dict[str, Path]:
    """The three files :func:`save_compact` writes for ``--out out``: keys ``module``
    (``.pt``), ``program`` (``.pt2``) and ``state_dict`` (``.state_dict.pt``); a ``.pt`` or
    ``.pt2`` suffix of ``out`` is replaced, any other name gets the suffixes appended."""
    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".pt", ".pt2") else out
    return {"module": stem.with_name(stem.name + ".pt"), "program": stem.with_name(stem.name + ".pt2"),
            "state_dict": stem.with_name(stem.name + ".state_dict.pt")}


def export_program(model: nn.Module, example_input: Tensor, dynamic_batch: bool = True
                   ) -> "torch.export.ExportedProgram":
    """``torch.export.export`` of ``model`` in eval mode on ``example_input`` (a batch of at
    least two images when ``dynamic_batch``, so that the batch size stays symbolic).

    Raises :class:`SplitLBIError` when the network cannot be exported (a module doing
    data-dependent Python control flow, for example).
    """
    was_training = model.training
    model.eval()
    dynamic_shapes = None
    if dynamic_batch:
        if example_input.shape[0] < 2:  # a batch of 1 would be specialized to the constant 1
            example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},)
    try:
        return torch.export.export(model, (example_input.detach(),), dynamic_shapes=dynamic_shapes)
    except Exception as error:  # torch raises several kinds (UserError, Unsupported, ...)
        raise SplitLBIError(f"torch.export could not trace the compacted network: "
                            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    finally:
        model.train(was_training)


def save_compact(model: nn.Module, example_input: Tensor, out: PathLike, *,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Dict[str, Path]:
    """Write the exported program, the ``state_dict`` and the pickled module of ``model``
    (see the module docstring) atomically; return the paths as :func:`compact_file_names`.

    Args:
        model: the network to deploy, e.g. :func:`~splitlbi.prune.compact_model`'s or
            ``budget_masks(...).compact``.
        example_input: a batch of what the files will take (images in [0, 1] when ``mean``
            and ``std`` are given), at least two images, to trace the program.
        out: ``NAME`` (or ``NAME.pt``/``NAME.pt2``): the files are NAME.pt2,
            NAME.state_dict.pt and NAME.pt.
        mean, std: the per-channel normalization the network was trained with (the
            dataset's, in [0, 1] units); given, the files take images in [0, 1]
            (:class:`InputNormalization`).

    The program is exported first, so a network that cannot be exported leaves no file.
    """
    if (mean is None) != (std is None):
        raise SplitLBIError("save_compact: give both mean and std (the normalization the network was trained with)")
    if mean is not None and std is not None:
        model = InputNormalization(model, mean, std).eval()
    paths = compact_file_names(out)
    program = export_program(model, example_input)
    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(paths["program"], buffer.getvalue())
    atomic_torch_save(state, paths["state_dict"])
    atomic_torch_save(model, paths["module"])
    return paths
