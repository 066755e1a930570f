"""Logging settings of the libraries decalign drives."""

from __future__ import annotations

import os


def quiet_transformers() -> None:
    """Silence transformers' info and warning logs and its progress bars (errors still show), and keep
    the tokenizers library from forking worker threads unless TOKENIZERS_PARALLELISM says otherwise."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
