"""The ``splitlbi`` command: one subcommand per module, each with ``add_parser(subparsers)``.

Every user error ends as ONE line ``splitlbi: error: <message>`` on stderr with exit
status 2 and no traceback: argparse errors and :class:`SplitLBIError` alike. A
:class:`~splitlbi.errors.SplitLBIWarning` (a path that is not useful) is one line
``splitlbi: warning: <message>`` on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import List, NoReturn, Optional, Sequence

import splitlbi
from splitlbi.errors import SplitLBIError, SplitLBIWarning

__all__ = ["ArgumentParser", "build_parser", "main"]

PROGRAM = "splitlbi"

#: Subcommand modules that are always present.
CORE_COMMANDS = ("splitlbi.cli.train",)
#: Subcommand modules written separately; a missing one just leaves its subcommand out.
OPTIONAL_COMMANDS = ("splitlbi.cli.figures", "splitlbi.cli.demo", "splitlbi.cli.compare",
                     "splitlbi.cli.masks", "splitlbi.cli.retrain", "splitlbi.cli.compact",
                     "splitlbi.cli.baseline", "splitlbi.cli.reproduce", "splitlbi.cli.grow")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def report_error(message: object) -> None:
    """Print ``splitlbi: error: <message>`` as a single line on stderr."""
    print(f"{PROGRAM}: error: {_one_line(message)}", file=sys.stderr)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``splitlbi: error: <msg> (see '<prog> --help')``, exit 2."""

    def error(self, message: str) -> NoReturn:
        report_error(f"{message} (see '{self.prog} --help')")
        self.exit(2)


def _load_optional(module_name: str) -> Optional[object]:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        # Only the optional module itself (or its package) being absent is expected; a
        # missing dependency inside it is a real problem and is reported below.
        if error.name is not None and (module_name == error.name or module_name.startswith(error.name + ".")):
            return None
        report_warning(f"subcommand module {module_name} could not be loaded: {error}")
        return None
    except Exception as error:  # a broken optional command must not take the others down
        report_warning(f"subcommand module {module_name} could not be loaded: {error}")
        return None


def report_warning(message: object) -> None:
    print(f"{PROGRAM}: warning: {_one_line(message)}", file=sys.stderr)


def build_parser() -> ArgumentParser:
    """The full ``splitlbi`` parser with all available subcommands registered."""
    parser = ArgumentParser(
        prog=PROGRAM,
        description="Split Linearized Bregman Iteration (SplitLBI / DessiLBI): train networks and read "
                    "their structural-sparsity paths.",
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {splitlbi.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in CORE_COMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    for module_name in OPTIONAL_COMMANDS:
        module = _load_optional(module_name)
        add_parser = getattr(module, "add_parser", None)
        if callable(add_parser):
            add_parser(subparsers)
    _mark_commands(parser)
    return parser


#: Namespace attribute naming the (sub)command parser that parsed the arguments.
_COMMAND_PARSER = "_command_parser"


def _mark_commands(parser: argparse.ArgumentParser) -> None:
    """Let each leaf subcommand parser record itself in the namespace, so that an
    unrecognized option is reported against ``splitlbi train --help`` rather than
    ``splitlbi --help`` (argparse reports it from the top-level parser)."""
    children = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not children:
        parser.set_defaults(**{_COMMAND_PARSER: parser})
    for action in children:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
            _mark_commands(child)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``splitlbi`` with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Subcommands set ``func`` on their parser (``parser.set_defaults(func=...)``); it gets
    the parsed namespace and returns an exit status (``None`` means 0).
    """
    parser = build_parser()
    arguments: List[str] = list(sys.argv[1:] if argv is None else argv)
    try:
        namespace, unknown = parser.parse_known_args(arguments)
        command_parser = vars(namespace).pop(_COMMAND_PARSER, parser)
        if unknown:
            command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        with warnings.catch_warnings():
            warnings.simplefilter("always", SplitLBIWarning)  # each is given once per run already
            shown = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None) -> None:
                if issubclass(category, SplitLBIWarning):
                    report_warning(message)
                else:
                    shown(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            return int(namespace.func(namespace) or 0)
    except SplitLBIError as error:
        report_error(error)
        return 2
    except OSError as error:  # a folder that cannot be written, a full disk, ...: the user's to fix
        report_error(error)
        return 2
    except UnicodeDecodeError as error:  # a text file (CSV, JSON, TOML) that is not UTF-8
        report_error(f"a file is not UTF-8 text: {error}")
        return 2
    except KeyboardInterrupt:
        print(f"{PROGRAM}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
