"""Settings declared once: a dataclass field carries its default and how the command line shows
it (flag, help, choices, range), so the CLI's options are generated from the dataclass and no
default is written twice."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class OptionSpec:
    """How one setting appears on the command line."""

    help: str
    key: str | None = None  # its keyword in `CompressConfig.of` and the CLI; default: the field
    flag: str | None = None  # default: --key (underscores as dashes)
    choices: Sequence[str] | None = None
    metavar: str | None = None
    value_type: type | None = None  # default: the type of the default value
    range: tuple[float | None, float | None] | None = None  # inclusive bounds of a number
    multiple: bool = False  # repeatable; the field holds a tuple
    negate: bool = False  # a flag that sets a True-by-default setting to False (--no-x)
    show_default: bool = True


def option(default: Any = None, help: str = "", *, factory: Callable[[], Any] | None = None,
           **spec: Any) -> Any:
    """A dataclass field with its default and its command-line `OptionSpec`."""
    metadata = {"option": OptionSpec(help=help, **spec)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def key_of(field: dataclasses.Field) -> str:
    """The keyword of a settings field (`OptionSpec.key`, else the field's name)."""
    spec = field.metadata.get("option")
    return spec.key if spec is not None and spec.key else field.name


def spec_of(cls: type, name: str) -> tuple[OptionSpec, Any]:
    """The `OptionSpec` and the default of field `name` of dataclass `cls`."""
    found = {f.name: f for f in dataclasses.fields(cls)}[name]
    if "option" not in found.metadata:
        raise KeyError(f"{cls.__name__}.{name} has no command-line option")
    default = found.default if found.default_factory is dataclasses.MISSING else \
        found.default_factory()
    return found.metadata["option"], default
