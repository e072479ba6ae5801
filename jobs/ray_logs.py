"""Ray's own log lines go to the run folder, not the console; its errors stay visible.

Ray prints INFO/WARNING lines on the driver's console (cluster start, token authentication, Ray
Data's execution plan, progress-bar notices). During a run, ``ray_logs_to(folder)`` sends every
record of the ``ray`` and ``ray.data`` loggers at INFO and above to ``folder/ray.log`` and lets
only ERROR and above through to the console. Ray's full logs also remain in its session folder
(``/tmp/ray/session_*/logs``). Not covered: the driver's C++ core worker writes straight to the
process's stderr; setting ``RAY_BACKEND_LOG_LEVEL`` would itself print a line from every Ray
process ("Set ray log level from environment variable"), so it is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.data")
LOG_FILE = "ray.log"


def _console_handlers(logger: logging.Logger) -> list[logging.Handler]:
    return [
        h
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


@contextmanager
def ray_logs_to(folder: Path) -> Iterator[Path]:
    """Route Ray's log records to ``folder/ray.log`` for the duration of the block.

    Yields:
        the log file's path.
    """
    import ray.data  # noqa: F401  - Ray Data installs its console handler on import

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_FILE
    file_handler = logging.FileHandler(path, encoding="utf-8")
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved: list[tuple[logging.Handler, int]] = []
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(file_handler)
        for handler in _console_handlers(logger):
            saved.append((handler, handler.level))
            handler.setLevel(max(handler.level, logging.ERROR))
    try:
        yield path
    finally:
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(file_handler)
        for handler, level in saved:
            handler.setLevel(level)
        file_handler.close()
