"""Nightly incremental screening: ``python -m jobs.nightly ARCHIVE --out DIR`` (cron or RayJob).

Runs ``jobs.entry_screen`` over the same run folder every night: series already screened by the
same checkpoint are skipped, new or changed series are screened, a run interrupted the night
before is finished (no gaps, no duplicates). A second run while one still holds the folder exits
at once with code 3 (the folder lock), so overlapping cron starts are harmless.
"""

from __future__ import annotations

import logging
import sys

from jobs.entry_screen import build_parser, config_from_args
from jobs.entry_screen import main as screen_main
from pdd_batch.runs.state import RunLockedError

log = logging.getLogger("pdd_batch.nightly")

EXIT_LOCKED = 3


def main(argv: list[str] | None = None) -> int:
    args = build_parser("python -m jobs.nightly").parse_args(argv)
    if args.force:
        log.warning("--force in a nightly run rescreens the whole archive every night")
    config_from_args(args)  # validate before anything starts
    try:
        return screen_main(argv)
    except RunLockedError as exc:
        logging.basicConfig(level=logging.INFO)
        log.warning("skipped: %s", exc)
        return EXIT_LOCKED


if __name__ == "__main__":
    sys.exit(main())
