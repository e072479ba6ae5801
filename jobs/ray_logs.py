"""Ray's own log lines go to the run folder, not the console; its errors stay visible.

Ray prints INFO/WARNING lines on the driver's console (cluster start, token authentication, Ray
Data's execution plan, progress-bar notices). During a run, ``ray_logs_to(folder)`` sends every
record of the ``ray`` and ``ray.data`` loggers at INFO and above to ``folder/ray.log`` and lets
only ERROR and above through to the console. Ray's full logs also remain in its session folder
(in the project's private Ray temp folder). The driver's C++ core worker writes straight to the
process's stderr (file descriptor 2), past Python's logging (e.g. "core_worker.cc: Actor …
constructor arguments in the object store"): during the block descriptor 2 points at
``folder/ray_stderr.log`` (0600), so those lines land there too; the CLI prints its own errors on
stdout after the block.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.data")
LOG_FILE = "ray.log"
STDERR_FILE = "ray_stderr.log"


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

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # like every folder of a run: private whatever the umask
    path = folder / LOG_FILE
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
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
        with _stderr_to(folder / STDERR_FILE):
            yield path
    finally:
        for name in RAY_LOGGERS:
            logging.getLogger(name).removeHandler(file_handler)
        for handler, level in saved:
            handler.setLevel(level)
        file_handler.close()


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Point file descriptor 2 (what C++ code writes to) at ``path`` (0600) for the block."""
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
