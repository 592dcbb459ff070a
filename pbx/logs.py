"""One logging set-up for every process: stderr, which supervisord captures to `logs/`."""

from __future__ import annotations

import logging
import os
import sys

from pbx.config import Settings


def setup_logging(settings: Settings, process: str) -> None:
    # numba logs its compiler passes at DEBUG: never useful here, and very long.
    logging.getLogger("numba").setLevel(logging.WARNING)
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, settings.logging.level),
        format=f"%(asctime)s {process}[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
    )
