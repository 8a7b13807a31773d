"""How the command line presents itself: clean help screens, examples, and which errors are the user's.

Kept free of heavy imports (torch, numpy, PIL, matplotlib) so that ``--help``, ``--version`` and
configuration errors answer at once.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

import typer
import typer.core

USAGE_ERRORS = {  # module: exception class of a bad call (exit code 2), looked up only once loaded
    "lrp_cli.config": "ConfigError",
    "lrp_cli.errors": "RunError",
    "lrp_cli.data": "InputError",
    "lrp_cli.weights": "ModelError",
    "lrp_cli.snapshot": "SnapshotError",
    "lrp_cli.lrp.ops": "UnsupportedOperationError",
}


def is_usage_error(error: BaseException) -> bool:
    """Whether ``error`` is one of how the tool was called (exit 2). Only modules already imported are
    consulted: an error cannot come from a module that was never loaded, and checking must not load one."""
    classes = tuple(
        getattr(sys.modules[module], name)
        for module, name in USAGE_ERRORS.items()
        if module in sys.modules and hasattr(sys.modules[module], name)
    )
    return isinstance(error, classes)


TYPE_NAMES = {
    "str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "file": "FILE",
    "int range": "INTEGER", "float range": "FLOAT",  # Typer adds the range itself: [x>=1]
}  # fmt: skip


def examples(*lines: str) -> str:
    """An ``Examples:`` paragraph for the end of a command's help (one command per line, kept as is)."""
    return "Examples:\n\n" + "\n\n".join(f"  {line}" for line in lines)


def _bare(param: Any) -> None:
    """Typer shows a type marker (``<bool>``, ``<list[str]>``) and braces (``{inputs}...``) that read as
    syntax; show what click shows instead: flags bare, values by their metavar, arguments in capitals.
    (Typer versions without the markers are left as they are.)"""
    if getattr(param, "_polished", False):
        return
    param._polished = True  # type: ignore[attr-defined]
    if isinstance(param, typer.core.TyperArgument):
        name = (param.metavar or param.name or "ARG").upper()
        shown = name + ("..." if param.nargs != 1 else "")
        param.metavar = shown
        usage = shown if param.required else f"[{shown}]"
        param._usage_display_name = lambda: usage  # type: ignore[method-assign]
        param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]
    elif (
        isinstance(param, typer.core.TyperOption) and param.metavar is None and hasattr(param, "display_type")
    ):
        if param.is_flag or param.count:
            param.metavar = ""
        else:
            shown = param.display_type(typer.Context(typer.core.TyperCommand("x"))).strip("<>")
            shown = shown.removeprefix("list[").removesuffix("]")  # a repeatable option: its values' type
            param.metavar = TYPE_NAMES.get(shown, shown.upper())


def polish(command: Any) -> None:
    """Apply :func:`_bare` to every parameter of ``command`` and its subcommands, help options included."""
    for param in command.params:
        _bare(param)
    help_option = command.get_help_option(typer.Context(command))
    if help_option is not None:
        help_option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        if sub.short_help is None and sub.help:  # the command list: the first paragraph, reflowed
            sub.short_help = " ".join(inspect.cleandoc(sub.help).split("\n\n")[0].split())
        polish(sub)


class Group(typer.core.TyperGroup):
    """The root command group: every command's help polished once, when the command tree is built."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        polish(self)

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        polish(self)  # Typer adds the completion options after construction
        super().format_help(ctx, formatter)
