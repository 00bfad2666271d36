"""`--set KEY=VALUE` for the benchmark scripts: one parser, so every script reads values the same way.

Each value is read as YAML (true, 2, 0.5, text), as a suite file would give it; the engine's config
validates the key and the value where they enter (`resolve_config`, the suite loader).
"""

from __future__ import annotations

import argparse

import yaml


def setting(kv: str) -> tuple[str, object]:
    """One `KEY=VALUE` (an argparse `type`): a missing `=` or key is the script's usage error."""
    key, sep, value = kv.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{kv!r}: expected KEY=VALUE, e.g. warm_page_cache=true")
    return key, yaml.safe_load(value)


def add_set_option(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", type=setting, help=help)
