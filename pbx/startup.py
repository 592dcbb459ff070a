"""The start of every program (front, media worker, IVR executor): configuration,
logging and the ZeroMQ planes' preconditions, or exit 2 with the reason on stderr."""

from __future__ import annotations

import logging
import sys

from pbx import planes
from pbx.config import ConfigError, Settings, load_config
from pbx.logs import setup_logging

log = logging.getLogger("pbx.startup")


def start_program(program: str, role: planes.Role) -> Settings:
    """The validated settings, logging set up for `program`, the planes ready for `role`
    (the front binds, clients connect); a bad file or plane stops the process (exit 2)
    with the file, key and reason."""
    try:
        settings = load_config()
    except ConfigError as exc:
        print(f"{program}: bad configuration: {exc}", file=sys.stderr)
        sys.exit(2)
    setup_logging(settings, program)
    try:
        planes.prepare(settings, role)
    except ConfigError as exc:
        print(f"{program}: cannot start: {exc}", file=sys.stderr)
        sys.exit(2)
    if planes.secret_readable_by_others(settings):
        log.warning("%s holds a CURVE secret key and group or other can read it "
                    "(chmod 600 it)", settings.source_path)
    return settings
