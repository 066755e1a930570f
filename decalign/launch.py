"""The `decalign` command's entry point. It imports the commands (and torch with them) itself, so
that a Ctrl-C while they load ends in one line, as it does once they run, not in a traceback of
the import."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from .cli import main as run_command
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    run_command()
