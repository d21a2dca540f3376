"""A small timm-like model registry: ``@register_model`` a factory, ``create_model`` by name."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

from splitlbi.errors import SplitLBIError

__all__ = ["register_model", "create_model", "list_models", "is_model", "check_widths"]

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., nn.Module])

_model_factories: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFactory | None = None, *, name: str | None = None):
    """Register a model factory under ``name`` (default: the function's name), lower-cased.

    The factory must accept ``num_classes`` and ``in_channels`` keyword arguments.
    Usable bare (``@register_model``) or with a name (``@register_model(name="lenet5")``).
    """

    def decorator(factory: ModelFactory) -> ModelFactory:
        key = (name or factory.__name__).lower()
        existing = _model_factories.get(key)
        # Re-registering the same function (a module imported twice, e.g. by reload) is harmless.
        if existing is not None and (existing.__module__, existing.__qualname__) != (
            factory.__module__,
            factory.__qualname__,
        ):
            owner = f"{existing.__module__}.{existing.__qualname__}"
            raise ValueError(f"model name {key!r} is already registered by {owner}")
        _model_factories[key] = factory
        return factory

    return decorator(fn) if fn is not None else decorator


def check_widths(widths: Sequence[int], count: int, model: str) -> tuple[int, ...]:
    """``widths`` as a tuple of ``count`` positive integers (a factory's ``widths=``
    argument: filters per layer or per stage); :class:`SplitLBIError` naming ``model``
    and what was expected otherwise."""
    values = tuple(widths) if isinstance(widths, (list, tuple)) else None
    if (values is None or len(values) != count
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values)):
        raise SplitLBIError(f"widths of {model} must be {count} positive integers, got {widths!r}")
    return values


def list_models() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_model_factories)


def is_model(name: str) -> bool:
    """Whether ``name`` (case-insensitive) is a registered model."""
    return name.lower() in _model_factories


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """Build the registered model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    Extra keyword arguments go to the model's factory. ``pretrained`` is accepted for
    timm compatibility, but splitlbi ships no weights: SplitLBI trains from scratch, so
    ``pretrained=True`` is an error (load your own with ``model.load_state_dict``).
    Raises :class:`SplitLBIError` for an unknown name, ``pretrained=True`` or a
    non-positive ``num_classes``/``in_channels``.
    """
    factory = _model_factories.get(name.lower()) if isinstance(name, str) else None
    if factory is None:
        raise SplitLBIError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")
    if pretrained:
        raise SplitLBIError(f"no pretrained weights for {name!r}: splitlbi's models start from a random "
                            f"initialization (SplitLBI trains from scratch); load your own weights with "
                            f"model.load_state_dict(...)")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SplitLBIError(f"{arg} must be a positive integer, got {value!r}")
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)
