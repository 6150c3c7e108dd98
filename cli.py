"""Command-line flags from a dataclass of settings, so that every setting is written once, with its meaning.

    @dataclass
    class Args:
        lr: float = arg(1e-5, "learning rate of AdamW")

becomes `--lr 1e-5` with that help text and its default in `--help`. Booleans become `--flag / --no-flag`;
`choices` restricts a value; `low`/`high` bound a number (`above`/`below` exclude the bound itself), and a float is
refused as nan or inf everywhere. Errors name the flag and the bad value, and `require` checks what depends on
several flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing


class UsageError(Exception):
    """A setting or an input the user can fix; the message names it. Entry points print it without a traceback."""


def arg(default, help: str, choices=None, *, low=None, high=None, above=None, below=None):
    """A dataclass field that is also a command-line flag. A list default becomes a flag taking one or more values.
    A number must be >= low, <= high, > above and < below, for each bound given (`parse` checks, naming the flag)."""
    metadata = {"help": help, "choices": choices, "bounds": (low, high, above, below)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def bounds_text(low=None, high=None, above=None, below=None) -> str:
    """The range a number must lie in, as `--help` and errors say it.

    >>> bounds_text(above=0, high=1), bounds_text(low=0), bounds_text()
    ('in (0, 1]', 'at least 0', '')
    """
    start = f"[{low}" if low is not None else f"({above}" if above is not None else None
    end = f"{high}]" if high is not None else f"{below})" if below is not None else None
    if start and end:
        return f"in {start}, {end}"
    if start:
        return f"at least {low}" if low is not None else f"above {above}"
    if end:
        return f"at most {high}" if high is not None else f"below {below}"
    return ""


def check_number(flag: str, value, low=None, high=None, above=None, below=None) -> None:
    """Raise a UsageError naming the flag unless `value` is a finite number within the bounds."""
    rule = bounds_text(low, high, above, below)
    require(not isinstance(value, float) or math.isfinite(value), flag, value,
            f"must be a finite number {rule}".rstrip())
    inside = ((low is None or value >= low) and (high is None or value <= high) and (above is None or value > above)
              and (below is None or value < below))
    require(inside, flag, value, f"must be {rule}")


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
        if bounds_text(*field.metadata["bounds"]):
            help_text += f"; {bounds_text(*field.metadata['bounds'])}"
        options = {"default": default, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if typing.get_origin(kind) is list:
            kind, options["nargs"] = typing.get_args(kind)[0], "+"
        choices = field.metadata["choices"]
        metavar = {str: "TEXT"}.get(kind, kind.__name__.upper())
        if choices:  # "" (the default that defers to another setting) is accepted but not listed
            metavar = "{" + ",".join(choice for choice in choices if choice) + "}"
        parser.add_argument(flag, type=kind, choices=choices, metavar=metavar, **options)
    args = cls(**vars(parser.parse_args(argv)))
    try:
        check_fields(args)
    except UsageError as error:
        parser.error(str(error))
    return args


def check_fields(args) -> None:
    """Check every setting of a settings dataclass as its flag is checked (check_setting); `parse` does, and so must
    whoever builds settings otherwise: a resumed run reads them back from a checkpoint file, where any JSON may
    stand."""
    for field in dataclasses.fields(args):
        check_setting(type(args), field.name, getattr(args, field.name))


def check_setting(cls, name: str, value) -> None:
    """Raise a UsageError naming the flag unless `value` may be setting `name` of the dataclass `cls`: its type (an int
    is no float, a bool no int, a list holds only its kind), its choices, and a number's bounds (each value of a
    list)."""
    field = next(field for field in dataclasses.fields(cls) if field.name == name)
    kind = typing.get_type_hints(cls)[name]
    listed = typing.get_origin(kind) is list
    kind = typing.get_args(kind)[0] if listed else kind
    require(isinstance(value, list) or not listed, name, value, f"must be a list of {kind.__name__}")
    for item in value if listed else [value]:
        accepted = (int, float) if kind is float else (kind,)
        require(isinstance(item, accepted) and (kind is bool or not isinstance(item, bool)), name, item,
                f"must be {'an' if kind is int else 'a'} {kind.__name__}, not {type(item).__name__}")
        choices = field.metadata["choices"] or ()
        require(not choices or item in choices, name, item,
                f"must be one of {', '.join(repr(choice) for choice in choices if choice)}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            check_number(name, item, *field.metadata["bounds"])


def require(condition: bool, flag: str, value, rule: str) -> None:
    """Raise a UsageError naming the flag and its value unless `condition` holds."""
    if not condition:
        raise UsageError(f"--{flag.replace('_', '-')} {value!r}: {rule}")
