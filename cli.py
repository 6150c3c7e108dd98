"""Command-line flags from a dataclass of settings, so that every setting is written once, with its meaning.

    @dataclass
    class Args:
        lr: float = arg(1e-5, "learning rate of AdamW")

becomes `--lr 1e-5` with that help text and its default in `--help`. Booleans become `--flag / --no-flag`;
`choices` restricts a value. Errors name the flag and the bad value (argparse's own messages), and `require` checks
the values argparse cannot.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing


class UsageError(Exception):
    """A setting or an input the user can fix; the message names it. Entry points print it without a traceback."""


def arg(default, help: str, choices=None):
    """A dataclass field that is also a command-line flag. A list default becomes a flag taking one or more values."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def parse(cls, argv=None, description: str | None = None):
    """An instance of the dataclass `cls` from command-line arguments."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # --step must not silently mean --steps
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        kind = hints[field.name]
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        help_text = field.metadata["help"]
        if "default:" not in help_text:  # a help text may explain its default itself
            help_text += f" (default: {default!r})"
        options = {"default": default, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if typing.get_origin(kind) is list:
            kind, options["nargs"] = typing.get_args(kind)[0], "+"
        choices = field.metadata["choices"]
        metavar = None if choices else {str: "TEXT"}.get(kind, kind.__name__.upper())
        parser.add_argument(flag, type=kind, choices=choices, metavar=metavar, **options)
    return cls(**vars(parser.parse_args(argv)))


def require(condition: bool, flag: str, value, rule: str) -> None:
    """Raise a UsageError naming the flag and its value unless `condition` holds."""
    if not condition:
        raise UsageError(f"--{flag.replace('_', '-')} {value!r}: {rule}")
