"""The machinery of `mmdls <subcommand>` (the commands themselves are in cli.py): a registry
of commands, each with its plain arguments and its config block, and the argparse parser
built from it, where a block's fields become flags (options.add_flags) beside --config and
--set. A command gets the resolved Config: preset, then --set, then its flags."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from mmdls_dist.config import DEFAULT_PRESET, Config, load_config
from mmdls_dist.options import add_flags, flag_overrides


def arg(*names: str, **kwargs) -> tuple:
    """One add_argument call, as data."""
    return names, kwargs


SETTINGS = (
    arg("--config", default=DEFAULT_PRESET, help="preset (debug, default, paper) or YAML file"),
    arg(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field, repeatable (e.g. --set optim.lr=3e-4)",
    ),
)
RAY = arg("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
EXECUTOR = (
    arg(
        "--executor",
        choices=("ray", "serial"),
        default="ray",
        help="ray: Ray tasks (a local Ray, or the cluster under `ray job submit` / "
        "RAY_ADDRESS); serial: in this process. Results are identical.",
    ),
    RAY,
)


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    fn: Callable  # fn(args, cfg) -> exit code; cfg is None for a command without settings
    args: tuple  # arg(...) entries
    block: str | None = None  # config block whose fields become flags
    only: tuple[str, ...] | None = None  # ... just these fields of it
    settings: bool = True  # takes --config / --set


class Registry:
    def __init__(self) -> None:
        self.commands: dict[str, Command] = {}

    def command(self, name: str, help: str, *args: tuple, **options):
        """Decorator: register fn(args, cfg) as the subcommand `name`; its docstring is the
        command's --help description."""

        def register(fn: Callable) -> Callable:
            self.commands[name] = Command(name, help, fn, args, **options)
            return fn

        return register

    def parser(self, prog: str, description: str) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=prog, description=description)
        parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        sub = parser.add_subparsers(dest="command", required=True)
        for c in self.commands.values():
            p = sub.add_parser(c.name, help=c.help, description=c.fn.__doc__)
            for names, kwargs in c.args + (SETTINGS if c.settings else ()):
                p.add_argument(*names, **kwargs)
            if c.block:
                add_flags(p, type(getattr(Config(), c.block)), c.block, c.only)
            p.set_defaults(command=c)
        return parser


def run(args: argparse.Namespace) -> int:
    """Resolve the command's config (preset, --set, then its flags) and run it."""
    command: Command = args.command
    cfg = load_config(args.config, args.set + flag_overrides(args)) if command.settings else None
    return command.fn(args, cfg)
