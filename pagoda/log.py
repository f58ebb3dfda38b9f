"""pagoda's log format, the same in the API server and the engine-core process."""
from __future__ import annotations

import logging
import sys


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                           datefmt="%m-%d %H:%M:%S"))
    root = logging.getLogger("pagoda")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
