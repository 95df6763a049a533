"""Generate argparse options from config dataclasses (nanoGPT / HF ``TrainingArguments`` style).

Every config is a dataclass whose fields carry defaults and a ``help`` in their metadata; the CLI is
derived from it, so there is one source of truth for names, defaults and documentation.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def field(default: Any, help: str, required: bool = False, **meta: Any) -> Any:
    """A dataclass field with a default and a help text (and optional ``choices``/``flag``/``nargs``/``arg_type``:
    the argparse type of the value (of each item for a list field) when it is not the annotation's plain type,
    e.g. a token count or "auto", or "384,256" that the config parses itself).

    ``required=True``: the command line must give it (argparse enforces it) and :func:`check_required`, called
    from the config's ``__post_init__``, refuses an empty value when the config is built in Python.
    """
    meta = {"help": help, "required": required, **meta}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field (``--max-steps`` for ``max_steps``)."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def check_required(config: Any) -> None:
    """Raise ``ValueError("--NAME is required")`` for the first ``required`` field left empty."""
    for f in dataclasses.fields(config):
        if f.metadata.get("required") and getattr(config, f.name) in ("", None, [], ()):
            raise ValueError(f"{flag_of(f)} is required")


def check_range(config: Any, name: str, low: float, high: float | None = None) -> None:
    """Raise ``ValueError("--NAME must be ...")`` when field ``name`` of ``config`` is outside [low, high]."""
    value = getattr(config, name)
    if value < low or (high is not None and value > high):
        bound = f"between {_num(low)} and {_num(high)}" if high is not None else f">= {_num(low)}"
        raise ValueError(f"--{name.replace('_', '-')} must be {bound}, got {_num(value)}")


def _num(value: float) -> str:
    """An int in full (2147483647, not 2.14748e+09), a float short (%g)."""
    return str(value) if isinstance(value, int) else f"{value:g}"


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip ``Optional[...]``; returns (type, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (underscores become dashes)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = _base_type(hints[f.name])
        flag = flag_of(f)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if f.metadata.get("required"):
            kwargs["required"] = True
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) in (list, tuple):
            (inner,) = typing.get_args(tp)[:1]
            # ``arg_type=str`` lets a config parse "384,256" itself (in its __post_init__)
            kwargs.update(type=f.metadata.get("arg_type", inner), nargs=f.metadata.get("nargs", "+"))
        else:
            # metadata "arg_type": a field whose values are not of one plain type (e.g. a token count or "auto")
            kwargs["type"] = f.metadata.get("arg_type") or (finite_float if tp is float else tp)
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if kwargs["help"] and tp is not bool and not kwargs.get("required"):
            kwargs["help"] += " (default: %(default)s)"
        parser.add_argument(flag, **kwargs)


def finite_float(text: str) -> float:
    """argparse type of every float option: NaN and infinities are refused (no knob means them, and JSON
    files that record the options could not hold them)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


finite_float.__name__ = "float"  # argparse names the type in "invalid float value" messages


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build ``cls`` from parsed args (fields absent from ``args`` keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


# Errors a user can cause (bad option, missing or malformed file, name not found) and errors of the machine
# (a path that is a directory, no permission, disk full, a busy lock: every OSError): one line, exit 2.
USER_ERRORS = (ValueError, KeyError, OSError)


def error_line(exc: BaseException) -> str:
    """The one-line message of a user error: an OSError as "what: 'path'" (its errno text and file name)."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        other = f" -> '{exc.filename2}'" if exc.filename2 is not None else ""
        return f"{exc.strerror}: '{exc.filename}'{other}"
    return str(exc) or type(exc).__name__


def run_verb(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace, verb: str) -> int:
    """Run a verb's function: its return value as the exit status, a user error as one line on stderr and 2,
    Ctrl-C as one line and 130.

    Internal bugs (anything else: TypeError, AttributeError, AssertionError, ...) still raise with their
    traceback, so they get reported and fixed rather than hidden.
    """
    try:
        result = func(args)
    except USER_ERRORS as exc:
        print(f"twotower {verb}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"twotower {verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
