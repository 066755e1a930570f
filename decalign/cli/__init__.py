"""The `decalign` command: a thin shell over the library. Errors are one line, never a traceback.

Each module here holds the click commands of one room and no logic: a command parses its options,
calls the library and prints. This module holds the group, registers the commands and runs them.
"""

from __future__ import annotations

import os
import signal
import sys

import click

from ..errors import DecalignError, first_line
from . import bench, generate, serve, tasks, train, values

EXIT_USER_ERROR = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="decalign")
@click.option("--device", default=None, metavar="auto|cpu|cuda[:N]",
              help="Where the policy runs [default: $DECALIGN_DEVICE, else auto: a CUDA GPU when visible].")
def cli(device: str | None) -> None:
    """decalign: steer what a language model writes at decoding time."""
    if device is not None:
        from ..engine.core import pick_device

        pick_device(device)  # a bad name fails here, in one line
        os.environ["DECALIGN_DEVICE"] = device  # read by every engine this run loads, Ray replicas included


COMMANDS = (generate.generate, generate.score, generate.methods, values.train_value, values.value_check, bench.bench,
            bench.bench_engine, bench.bench_cold, serve.serve, train.train_reward, train.train_lora, tasks.make_task,
            tasks.eval_task)
for command in COMMANDS:
    cli.add_command(command)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands, as Ctrl-C is: the work under way is cleaned up on
    the way out (a half-written model folder is removed, a job's records file released), where the
    default action ended the process at once and left them behind."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    signal.signal(signal.SIGTERM, _terminate)  # `serve` installs its own (a grace for requests in flight)
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort as exc:  # click's form of a KeyboardInterrupt (and so of Terminated)
        if isinstance(exc.__cause__, Terminated):
            click.echo("terminated", err=True)
            sys.exit(128 + signal.SIGTERM)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except DecalignError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # never a traceback to a user; DECALIGN_DEBUG=1 shows it
        if os.environ.get("DECALIGN_DEBUG"):
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {first_line(exc)} (DECALIGN_DEBUG=1 shows the traceback)",
                   err=True)
        sys.exit(1)
