"""The `edgemodel` command.

Subcommands are found through the `edgemodel.commands` entry point group, so commands that
belong to the operator (`crd`, `reference`, later `operator` and `plan`) are offered here
without the runtime importing the operator package: each side stays within its layer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points, version

Command = Callable[[Sequence[str]], int]

ENTRY_POINT_GROUP = "edgemodel.commands"


def _version_command(argv: Sequence[str]) -> int:
    """Print the installed edgemodel version."""
    print(version("edgemodel"))
    return 0


def _build_command(argv: Sequence[str]) -> int:
    """Build, validate and publish an engine for this machine's hardware class."""
    from edgemodel_runtime.build.cli import build_command

    return build_command(argv)


def _serve_command(argv: Sequence[str]) -> int:
    """Serve an engine over the Open Inference Protocol v2."""
    from edgemodel_runtime.serve.cli import serve_command

    return serve_command(argv)


def _demo_command(argv: Sequence[str]) -> int:
    """Build FP32 and INT8 engines of a real model, shadow one against the other, decide."""
    from edgemodel_runtime.demo import demo_command

    return demo_command(argv)


def builtin_commands() -> dict[str, Command]:
    """Commands implemented in the runtime itself."""
    return {"version": _version_command, "build": _build_command, "serve": _serve_command, "demo": _demo_command}


def _usage(names: Sequence[str]) -> str:
    return "usage: edgemodel COMMAND [ARGS...]\n\ncommands:\n" + "".join(f"  {name}\n" for name in sorted(names))


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `edgemodel COMMAND ...` to the command's function."""
    args = list(sys.argv[1:] if argv is None else argv)
    commands: dict[str, Command | None] = {**builtin_commands()}
    plugins = {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}
    names = sorted({*commands, *plugins})
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage(names))
        return 0 if args else 2
    name, rest = args[0], args[1:]
    command = commands.get(name)
    if command is None and name in plugins:
        command = plugins[name].load()
    if command is None:
        print(f"edgemodel: unknown command {name!r}\n\n{_usage(names)}", file=sys.stderr)
        return 2
    return command(rest)


if __name__ == "__main__":
    raise SystemExit(main())
