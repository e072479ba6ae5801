"""Entry point for ``ray job submit --working-dir . -- python -m jobs.entry_screen ARCHIVE ...``.

Same options as ``pdd-batch screen`` (argparse: ``jobs/`` never imports typer or rich); progress
is logged. Exit code: 0 when every input is accounted for, 1 when inputs were lost (rerun to
finish), 2 when the run failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from jobs.screen import ProgressEvent, run_screen
from pdd_batch.runs.config import PRECISIONS, RunConfig, parse_teacher_weights

log = logging.getLogger("pdd_batch.screen")


def build_parser(prog: str = "python -m jobs.entry_screen") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("archive", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--address", default=None, help="Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--num-actors", type=int, default=None)
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--rows-per-file", type=int, default=4096)
    p.add_argument("--flush-seconds", type=float, default=30.0)
    p.add_argument("--open-archives", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument(
        "--teacher-weights", action="append", default=[], metavar="ROLE=PATH",
        help="where the checkpoint's teacher weight files are now (repeatable; sha256 checked)",
    )  # fmt: skip
    p.add_argument("--follow-links-outside", action="store_true")
    p.add_argument("--max-series-voxels", type=int, default=RunConfig.max_series_voxels)
    p.add_argument("--max-frames-per-file", type=int, default=RunConfig.max_frames_per_file)
    p.add_argument("--max-member-bytes", type=int, default=RunConfig.max_member_bytes)
    p.add_argument("--max-compression-ratio", type=float, default=RunConfig.max_compression_ratio)
    p.add_argument("--min-assessed", type=float, default=RunConfig.min_assessed)
    p.add_argument(
        "--discovery-shard-min-files", type=int, default=RunConfig.discovery_shard_min_files,
        help="on a cluster of several nodes, header reads run as Ray tasks from this many on",
    )  # fmt: skip
    p.add_argument(
        "--discovery-shard-files", type=int, default=RunConfig.discovery_shard_files,
        help="files per header-read task (whole folders; a larger folder is split)",
    )  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        archive=args.archive,
        out_dir=args.out,
        model_path=args.model,
        address=args.address,
        force=args.force,
        batch_size=args.batch_size,
        num_actors=args.num_actors,
        num_cpus=args.num_cpus,
        rows_per_file=args.rows_per_file,
        flush_seconds=args.flush_seconds,
        open_archives=args.open_archives,
        precision=args.precision,
        teacher_weights=parse_teacher_weights(args.teacher_weights),
        follow_links_outside=args.follow_links_outside,
        max_series_voxels=args.max_series_voxels,
        max_frames_per_file=args.max_frames_per_file,
        max_member_bytes=args.max_member_bytes,
        max_compression_ratio=args.max_compression_ratio,
        min_assessed=args.min_assessed,
        discovery_shard_min_files=args.discovery_shard_min_files,
        discovery_shard_files=args.discovery_shard_files,
    )


class LogProgress:
    """Progress events to the log, at most every ``every_s`` seconds per stage."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.last = every_s, {}

    def __call__(self, ev: ProgressEvent) -> None:
        now = time.monotonic()
        final = ev.total is not None and ev.done >= ev.total
        if not final and now - self.last.get(ev.stage, 0.0) < self.every_s:
            return
        self.last[ev.stage] = now
        rate = f" ({ev.rate:.1f}/s)" if ev.rate is not None else ""
        total = f"/{ev.total}" if ev.total is not None else ""
        log.info("%s: %d%s%s %s", ev.stage, ev.done, total, rate, ev.note)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = config_from_args(build_parser().parse_args(argv))
    result = run_screen(cfg, progress=LogProgress())
    m = result.manifest
    log.info(
        "status %s: inputs seen %d = scored %d + skipped %d + failed %d (lost %d); exit %d",
        result.status,
        m["inputs_seen"],
        m["inputs_scored"],
        m["inputs_skipped"],
        m["inputs_failed"],
        m["inputs_lost"],
        result.exit_code,
    )
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
