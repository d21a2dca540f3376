"""A small timm-like model registry: ``@register_model`` a factory, ``create_model`` by name.

A model is named either by its registered name (``"lenet5"``, ``"resnet20"``, or one your
code registered with :func:`register_model`) or by an import path ``"package.module:factory"``:
any importable callable that returns an ``nn.Module`` (a function or a class). The import
path is what ``splitlbi train --model`` stores in a run's config.json, so ``splitlbi masks``,
``retrain``, ``compact`` and the Python readers of the run build the same network in a new
process without any registration.
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Iterable, Optional, TypeVar, Union

from torch import nn

from splitlbi.errors import SplitLBIError

__all__ = ["register_model", "create_model", "list_models", "is_model", "is_factory_path", "model_factory",
           "model_module", "import_model_module", "provide_model",
           "check_widths"]

ModelFactory = TypeVar("ModelFactory", bound=Callable[..., nn.Module])

_model_factories: dict[str, Callable[..., nn.Module]] = {}

#: ``package.module:factory`` (the factory may be an attribute path, ``module:Class.build``).
_FACTORY_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def register_model(fn: ModelFactory | None = None, *, name: str | None = None):
    """Register a model factory under ``name`` (default: the function's name), lower-cased.

    The factory is called with ``num_classes`` and ``in_channels`` keyword arguments where
    it accepts them (``in_chans``, timm's name, works too). Usable bare
    (``@register_model``) or with a name (``@register_model(name="lenet5")``).

    A name registered by your code exists only in the processes that import it; a run
    trained with it records the registering module in its config.json (``model_module``)
    and the readers import it again. Registering in a script (``__main__``) cannot be
    found that way: put the factory in a module, or name it by import path instead
    (``--model mymodels:make_net``).
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


def list_models(filter: Union[str, Iterable[str]] = "", module: str = "", pretrained: bool = False,
                exclude_filters: Union[str, Iterable[str]] = "") -> list[str]:
    """Sorted names of the registered models, as ``timm.list_models``.

    Args:
        filter: shell-style wildcard(s) a name must match (``"resnet*"``); all by default.
        module: only the models of this family module (``"resnet_cifar"``, ``"vgg"``).
        pretrained: only models with pretrained weights: none (SplitLBI trains from scratch).
        exclude_filters: wildcard(s) of names to leave out.
    """
    if pretrained:
        return []
    include = [filter] if isinstance(filter, str) else list(filter)
    exclude = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = []
    for key, factory in _model_factories.items():
        if include and any(include) and not any(fnmatch.fnmatchcase(key, pattern.lower()) for pattern in include if pattern):
            continue
        if any(fnmatch.fnmatchcase(key, pattern.lower()) for pattern in exclude if pattern):
            continue
        if module and factory.__module__.rsplit(".", 1)[-1] != module:
            continue
        names.append(key)
    return sorted(names)


def is_factory_path(name: str) -> bool:
    """Whether ``name`` is an import path ``package.module:factory`` rather than a registered name."""
    return isinstance(name, str) and bool(_FACTORY_PATH.match(name))


def check_widths(widths: Sequence[int], count: int, model: str) -> tuple[int, ...]:
    """``widths`` as a tuple of ``count`` positive integers (a factory's ``widths=``
    argument: filters per layer or per stage); :class:`SplitLBIError` naming ``model``
    and what was expected otherwise."""
    values = tuple(widths) if isinstance(widths, (list, tuple)) else None
    if (values is None or len(values) != count
            or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in values)):
        raise SplitLBIError(f"widths of {model} must be {count} positive integers, got {widths!r}")
    return values


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model (case-insensitive) or an import path of a callable."""
    if not isinstance(name, str):
        return False
    if name.lower() in _model_factories:
        return True
    if not is_factory_path(name):
        return False
    try:
        model_factory(name)
    except SplitLBIError:
        return False
    return True


def _import(module_name: str, what: str):
    """Import ``module_name`` as ``python -m`` would: also from the current directory, which
    the ``splitlbi`` console script does not put on ``sys.path``. Raises :class:`SplitLBIError`."""
    here = os.getcwd()
    for attempt in (1, 2):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            missing_top = error.name == module_name.split(".")[0]
            if attempt == 1 and missing_top and here not in sys.path and "" not in sys.path:
                sys.path.append(here)
                continue
            where = " (looked in the installed packages, PYTHONPATH and the current directory)" if missing_top else ""
            raise SplitLBIError(f"{what}: cannot import {module_name!r}: {error}{where}") from None
        except Exception as error:  # the module itself failed (a syntax error, a failing import inside)
            raise SplitLBIError(f"{what}: importing {module_name!r} failed: {type(error).__name__}: "
                                f"{' '.join(str(error).split())}") from None
    raise AssertionError("unreachable")


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The factory of a registered name or of an import path ``package.module:factory``.

    Raises :class:`SplitLBIError` (one line) for an unknown name, a module that cannot be
    imported or an attribute that is missing or not callable.
    """
    factory = _model_factories.get(name.lower()) if isinstance(name, str) else None
    if factory is not None:
        return factory
    if not is_factory_path(name):
        raise SplitLBIError(f"unknown model {name!r}: expected one of {', '.join(list_models())}, or your own "
                            f"network as an import path package.module:factory (any callable returning an "
                            f"nn.Module)")
    module_name, attribute = name.split(":", 1)
    target = _import(module_name, f"model {name!r}")
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SplitLBIError(f"model {name!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise SplitLBIError(f"model {name!r}: {attribute} is a {type(target).__name__}, not a callable that "
                            f"returns an nn.Module")
    return target


def model_module(name: str) -> Optional[str]:
    """The module that registered ``name`` when it is not one of splitlbi's and can be imported
    again by name (not a script's ``__main__``); None otherwise (import paths included)."""
    factory = _model_factories.get(name.lower()) if isinstance(name, str) else None
    if factory is None:
        return None
    module = getattr(factory, "__module__", None)
    if not module or module == "__main__" or module.split(".")[0] == "splitlbi":
        return None
    return module


def import_model_module(name: str, module: Optional[str]) -> None:
    """Import ``module`` when it registered the model ``name`` and this process has not (a run
    trained with a model of the user's own registry). Failures are left to :func:`create_model`."""
    if not module or not isinstance(name, str) or name.lower() in _model_factories:
        return
    try:
        _import(module, f"model {name!r}")
    except SplitLBIError:  # create_model reports the unknown name
        pass


def provide_model(name: str, factory_path: Optional[str]) -> None:
    """Let this process build a run's model ``name`` with the factory at ``factory_path``
    (``splitlbi masks/retrain/compact --model``): for a run whose model was registered by code
    this process does not import. Nothing to do for ``None`` or the run's own name; an error
    when ``name`` already builds here (a different factory would not fit the checkpoint's
    weights by design, only by accident)."""
    if factory_path is None or factory_path == name:
        return
    factory = model_factory(factory_path)  # a clear error first when the path does not resolve
    if is_model(name):
        raise SplitLBIError(f"--model {factory_path}: the run's model {name!r} can be built here already; --model "
                            f"is for a run whose model this process cannot find (one registered by your own code)")
    _model_factories[name.lower()] = factory


def _accepted(factory: Callable[..., nn.Module]) -> tuple[set, bool]:
    """(keyword names the factory takes, whether it takes ``**kwargs``)."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins: assume the registry's convention
        return {"num_classes", "in_channels"}, False
    names = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in parameters)


def _first(model: nn.Module, kind: type) -> Optional[nn.Module]:
    return next((m for m in model.modules() if isinstance(m, kind)), None)


def _last(model: nn.Module, kind: type) -> Optional[nn.Module]:
    found = None
    for module in model.modules():
        if isinstance(module, kind):
            found = module
    return found


def create_model(name: str, num_classes: int = 10, in_channels: Optional[int] = None, pretrained: bool = False,
                 *, in_chans: Optional[int] = None, **kwargs) -> nn.Module:
    """Build the model ``name`` for ``num_classes`` classes and ``in_channels`` input channels.

    ``name`` is a registered name (case-insensitive) or an import path
    ``package.module:factory`` of any callable returning an ``nn.Module``. The factory gets
    ``num_classes`` and ``in_channels`` (or ``in_chans``) where its signature takes them;
    where it takes neither, the network it returns must already fit (its first conv reads
    ``in_channels`` channels, its last linear layer has ``num_classes`` outputs), else this
    is an error. ``in_chans`` is timm's name for ``in_channels`` (default 1).

    Extra keyword arguments go to the model's factory. ``pretrained`` is accepted for
    timm compatibility, but splitlbi ships no weights: SplitLBI trains from scratch, so
    ``pretrained=True`` is an error (load your own with ``model.load_state_dict``).
    Raises :class:`SplitLBIError` for an unknown name, ``pretrained=True``, a
    non-positive ``num_classes``/``in_channels``, or a factory that returns no module.
    """
    if in_chans is not None and in_channels is not None and in_chans != in_channels:
        raise SplitLBIError(f"in_channels={in_channels} and in_chans={in_chans} disagree (in_chans is timm's "
                            f"name for in_channels: give one)")
    in_channels = in_channels if in_channels is not None else (in_chans if in_chans is not None else 1)
    factory = model_factory(name) if isinstance(name, str) else None
    if factory is None:
        raise SplitLBIError(f"unknown model {name!r}: expected one of {', '.join(list_models())}")
    if pretrained:
        raise SplitLBIError(f"no pretrained weights for {name!r}: splitlbi's models start from a random "
                            f"initialization (SplitLBI trains from scratch); load your own weights with "
                            f"model.load_state_dict(...)")
    for arg, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SplitLBIError(f"{arg} must be a positive integer, got {value!r}")
    names, var_keyword = _accepted(factory)
    arguments = dict(kwargs)
    if "num_classes" in names or var_keyword:
        arguments["num_classes"] = num_classes
    channel_keyword = next((key for key in ("in_channels", "in_chans") if key in names), None)
    if channel_keyword is not None:
        arguments[channel_keyword] = in_channels
    try:
        model = factory(**arguments)
    except TypeError as error:
        raise SplitLBIError(f"model {name!r}: calling its factory with {sorted(arguments)} failed: {error}") from None
    if not isinstance(model, nn.Module):
        raise SplitLBIError(f"model {name!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    if channel_keyword is None:
        first = _first(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        if first is not None and first.in_channels != in_channels:
            raise SplitLBIError(f"model {name!r}: its first conv reads {first.in_channels} channels, the data has "
                                f"{in_channels}, and its factory takes no in_channels argument to change that")
    if "num_classes" not in arguments:
        last = _last(model, nn.Linear)
        if last is not None and last.out_features != num_classes:
            raise SplitLBIError(f"model {name!r}: its last linear layer has {last.out_features} outputs, the data "
                                f"{num_classes} classes, and its factory takes no num_classes argument")
    return model
