"""The one pair of consoles the `bench` commands print through, and their JSON output.

User-facing output goes through here and the command modules only (library code logs); stdout
carries results, stderr carries log lines, warnings and errors, so `bench ... --format json > f`
stays clean.
"""

from __future__ import annotations

import json

import click
from rich.console import Console

console = Console(stderr=False)
err_console = Console(stderr=True)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))
