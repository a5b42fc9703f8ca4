"""The ``pmoe`` command line.

Every public module in :mod:`pmoe.commands` is one sub-command, named as the module with
hyphens for underscores (``import_anomalyclip`` is ``pmoe import-anomalyclip``): its docstring
is the help text, ``add_arguments(parser)`` declares its options and ``run(args)`` does the work.
Errors the user can fix (:class:`pmoe.errors.PmoeError`) are printed without a traceback.

Usage: ``pmoe --help`` lists the commands; ``pmoe COMMAND --help`` shows one.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pmoe import commands
from pmoe.errors import PmoeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pmoe", description="PromptMoE zero-shot anomaly detection: data, training, evaluation, inference, "
        "and the paper's tables and figures. `pmoe COMMAND --help` shows one command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"pmoe.commands.{info.name}")
        doc = (module.__doc__ or info.name).strip()
        command = sub.add_parser(
            info.name.replace("_", "-"), help=doc.splitlines()[0], description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except PmoeError as error:
        print(f"pmoe {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pmoe {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
