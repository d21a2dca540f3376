"""Models by name: ``create_model("lenet5", num_classes=10, in_channels=1)``, or your own
network by import path: ``create_model("mymodels:make_net", num_classes=10, in_channels=3)``.

One module per model family (``lenet.py``, ``resnet.py``, ...) registers its
factories with ``@register_model``. Every module of this package is imported
here, so a new family needs no edit to this file.
"""

import importlib
import pkgutil

from splitlbi.models.registry import create_model, is_model, list_models, model_factory, register_model


def _import_model_families() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_") and module.name != "registry":
            importlib.import_module(f"{__name__}.{module.name}")


_import_model_families()

from splitlbi.models.lenet import LeNet5, lenet5  # noqa: E402  (already imported above)

__all__ = ["LeNet5", "create_model", "is_model", "lenet5", "list_models", "model_factory", "register_model"]
