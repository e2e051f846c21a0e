"""The link between a component's typed config (a frozen dataclass) and the flags that set it.

A setting is declared once, as a flag in config.py (name, type, default, help, role, check, dataset-dependent
default). A component's config lists the settings it takes, as fields without defaults; a field named like its flag
needs nothing more, one named otherwise says which flag with `flag_field`. `from_flags` builds the config from parsed
flags (or a run's saved ones), so no value is copied by hand and no default is written twice.
"""

import argparse
import dataclasses
from typing import Any, TypeVar

Config = TypeVar("Config")


def flag_field(flag: str) -> Any:
    """A config field set by the flag `flag` (its dest), when the field's own name is another."""
    return dataclasses.field(metadata={"flag": flag})


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", field.name)


def from_flags(cls: type[Config], flags: argparse.Namespace, **derived: Any) -> Config:
    """`cls` with each field set from its flag; `derived` gives the fields computed from several flags. Lists (from
    nargs flags or JSON) become tuples: configs are frozen and hashable."""
    names = {field.name for field in dataclasses.fields(cls)}
    if unknown := set(derived) - names:
        raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
    values = {}
    for field in dataclasses.fields(cls):
        if field.name in derived:
            values[field.name] = derived[field.name]
            continue
        if not hasattr(flags, flag_name(field)):
            raise TypeError(f"{cls.__name__}.{field.name}: no flag --{flag_name(field)} among the parsed flags")
        value = getattr(flags, flag_name(field))
        values[field.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
