"""`bench`: benchmark SSD-streaming LLM inference, on one host or a Ray cluster.

Thin Click commands over library functions. Bad input ends with a one-line `error:` message and
exit code 2; user-facing output goes through rich/Click here and nowhere else.
"""

from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console

from worker.cli_options import given, run_options
from worker.errors import UserError

console = Console(stderr=False)
err_console = Console(stderr=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--log-level", default="INFO", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
              help="Log level of the library's messages (stderr).", show_default=True)
def bench(log_level: str) -> None:
    """Benchmark SSD-streaming LLM inference: one host (`bench run`) or a Ray cluster (`bench submit`)."""
    from rich.logging import RichHandler

    logging.basicConfig(level=log_level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=err_console, show_path=False)], force=True)


# ---------------------------------------------------------------------------------------------
# one host: checkpoints, packs, a single run
# ---------------------------------------------------------------------------------------------


@bench.command("run")
@run_options
def run_cmd(**params) -> None:
    """Run one benchmark on this host (the seed's bench_infer.py) and write its JSON."""
    from worker import bench as runner
    from worker.summary import format_summary

    result = runner.run_from_overrides(given(params))
    console.print(format_summary(result))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    """Console entry point: user errors are one line and exit 2; bugs keep their traceback."""
    try:
        bench.main(standalone_mode=False)
    except UserError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


if __name__ == "__main__":
    main()
