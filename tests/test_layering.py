"""The package's layering: the command line sits on top, nothing below it reaches back up.

``splitlbi.cli`` parses arguments and calls the plain functions of train, prune, plots
and experiments; those never import ``splitlbi.cli`` (only ``splitlbi/__main__.py``, the
entry point like the console script, may) and never build an argparse parser.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "splitlbi"
CLI = "splitlbi.cli"
#: The entry point of ``python -m splitlbi``: the one module outside cli/ that may import it.
ENTRY_POINTS = {PACKAGE / "__main__.py"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module of ``from ... import`` (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_cli(name: str) -> bool:
    return name == CLI or name.startswith(CLI + ".")


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[Tuple[int, str]]:
    """(line, module) for every module ``source`` imports: import statements, ``from`` imports
    (each imported name counted as a possible submodule), and ``importlib.import_module`` /
    ``__import__`` calls with a literal name."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def _package_modules() -> List[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _outside_cli(path: Path) -> bool:
    return PACKAGE / "cli" not in path.parents and path not in ENTRY_POINTS


def test_no_module_outside_cli_imports_cli() -> None:
    offenders = {}  # one entry per import statement
    for path in filter(_outside_cli, _package_modules()):
        module = _module_name(path)
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            if _is_cli(name):
                offenders.setdefault(f"{path.relative_to(PACKAGE.parent)}:{line}", f"imports {name}")
    offenders = [f"{place} {what}" for place, what in offenders.items()]
    assert not offenders, "only splitlbi/cli/ (and __main__.py) may import splitlbi.cli:\n" + "\n".join(offenders)


def test_argument_parsing_lives_in_cli() -> None:
    offenders = sorted({f"{path.relative_to(PACKAGE.parent)}:{line}"
                        for path in filter(_outside_cli, _package_modules())
                        for line, name in imported_modules(path.read_text(encoding="utf-8"), _module_name(path))
                        if name == "argparse" or name.startswith("argparse.")})
    assert not offenders, "argparse outside splitlbi/cli/: " + ", ".join(offenders)


def test_the_scan_sees_every_way_of_importing_cli() -> None:
    # The scan must be able to fail: each of these reaches splitlbi.cli from splitlbi.plots.curves.
    sources = [
        "import splitlbi.cli.main",
        "from splitlbi.cli.argtypes import positive_int",
        "from splitlbi import cli",
        "from ..cli import argtypes",
        "from .. import cli",
        "import importlib\nimportlib.import_module('splitlbi.cli.figures')",
        "def f():\n    from splitlbi.cli.main import main\n    return main",
    ]
    for source in sources:
        names = [name for _, name in imported_modules(source, "splitlbi.plots.curves")]
        assert any(_is_cli(name) for name in names), (source, names)
    harmless = "from splitlbi.plots import curves\nimport splitlbi.client_tools\nfrom . import cli_like"
    assert not any(_is_cli(name) for _, name in imported_modules(harmless, "splitlbi.plots.path"))
    # The entry point is the one exception, and it does import the command line.
    main_source = (PACKAGE / "__main__.py").read_text(encoding="utf-8")
    assert any(_is_cli(name) for _, name in imported_modules(main_source, "splitlbi.__main__"))
