"""Options shared by the `bench` commands, defined once.

`run_options` generates one flag per run-config field, so flags, suite keys and docs never drift:
every such option defaults to None, meaning "not given" (the dataclass default or a `WSM_*`
variable then applies, see `worker.envs`), and only explicitly given flags override. The cluster
and analysis commands share `--address`, `--results` and the row selection options.
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


WEIGHT_FIELDS = ("weight_format", "quant_group_size", "quantize_head")


def weight_options(func: Callable) -> Callable:
    """The weight-format options of the pack commands: the run config's own fields and help, with their
    defaults (a pack has no other layer of settings to fall back on)."""
    fields = {f.name: f for f in config.flat_fields()}
    for name in reversed(WEIGHT_FIELDS):
        f, ctype = fields[name], _resolve(config.RunConfig, name)
        flag = flag_name(name)
        decls = [f"{flag}/--no-{flag[2:]}"] if ctype is bool else [flag]
        func = click.option(*decls, name, type=None if ctype is bool else ctype, default=f.default,
                            show_default=True, help=f.metadata["help"])(func)
    return func


def given(params: dict[str, Any]) -> dict[str, Any]:
    """The flat overrides the user actually passed."""
    fields = {f.name for f in config.flat_fields()}
    return {k: v for k, v in params.items() if k in fields and v is not None}


def address_option(func):
    return click.option("--address", default=None, metavar="ADDR",
                        help="Ray cluster: HOST:PORT, ray://HOST:PORT or auto (for --detach/status/logs: the "
                             "dashboard, http://HEAD:8265). Default: RAY_ADDRESS, else an embedded local Ray.")(func)


def results_option(func):
    return click.option("--results", "results", default=None, metavar="PATH_OR_URI",
                        help="Results dataset: a directory or a pyarrow filesystem URI (s3://, gs://, ...) "
                             "[default: STREAMBENCH_RESULTS, else ./bench-results].")(func)


def selection_options(func):
    """Which runs compare / report look at (combined with AND; repeatable ones with OR)."""
    options = [
        click.option("--suite", "suites", multiple=True, help="Only this suite (repeatable)."),
        click.option("--suite-run-id", "suite_run_ids", multiple=True, help="Only this suite run (repeatable)."),
        click.option("--since", type=click.DateTime(), default=None, help="Only runs finished at or after (UTC)."),
        click.option("--until", type=click.DateTime(), default=None, help="Only runs finished before (UTC)."),
        click.option("--commit", "commits", multiple=True, metavar="SHA",
                     help="Only runs of this commit (a prefix; repeatable)."),
        click.option("--host", "hosts", multiple=True, metavar="HOST",
                     help="Only these hosts: a host name, a hardware key (prefix) or a GPU model such as h100 "
                          "(repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def selection(suites, suite_run_ids, since, until, commits, hosts, status: str | None = None):
    """The `Selection` the options of `selection_options` describe (times are UTC)."""
    from datetime import timezone

    from orchestrator.results.query import Selection

    utc = lambda t: t.replace(tzinfo=timezone.utc) if t else None  # noqa: E731
    return Selection(tuple(suites), tuple(suite_run_ids), utc(since), utc(until), tuple(commits), tuple(hosts), status)
