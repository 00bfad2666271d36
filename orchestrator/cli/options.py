"""Click options generated from the run config's fields, so flags, suite keys and docs never drift.

Every option defaults to None, meaning "not given": the dataclass default or a `WSM_*` variable
then applies (see `worker.envs`). Only explicitly given flags override.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal

import click

from worker import config


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _resolve(owner: type, name: str) -> Any:
    hint = typing.get_type_hints(owner)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    if typing.get_origin(hint) is Literal:
        return click.Choice(typing.get_args(hint))
    return {int: int, float: float, bool: bool, str: str}[hint]


def run_options(func: Callable) -> Callable:
    """Decorate a command with one option per flat run-config field."""
    owners = {f.name: cls for cls in (config.RunConfig, config.StreamConfig, config.KVConfig,
                                       config.SamplingConfig) for f in dataclasses.fields(cls)}
    for f in reversed(config.flat_fields()):
        ctype = _resolve(owners[f.name], f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} [default: {default}]"
        flag = flag_name(f.name)
        if ctype is bool:
            opt = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=help_text)
        else:
            opt = click.option(flag, f.name, type=ctype, default=None, help=help_text)
        func = opt(func)
    return func


def given(params: dict[str, Any]) -> dict[str, Any]:
    """The flat overrides the user actually passed."""
    fields = {f.name for f in config.flat_fields()}
    return {k: v for k, v in params.items() if k in fields and v is not None}
