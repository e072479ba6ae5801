"""The run manifest (``OUT/manifest.json``): what went in, what came out, with what.

Every discovered input file ends in exactly one outcome, so
``inputs_seen == inputs_scored + inputs_skipped + inputs_failed`` always holds; files that the
run lost (no rows and no error record, e.g. the run was interrupted) count as failed and also in
``inputs_lost``, and make the run's exit status non-zero.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pdd_batch
from pdd_batch.runs.schema import SCHEMA_VERSION
from pdd_batch.runs.writer import WriteError, overwrite_in_place, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"

SCORED, SKIPPED, FAILED, LOST = "scored", "skipped", "failed", "lost"
OUTCOMES = (SCORED, SKIPPED, FAILED, LOST)

# The reason of a file its series left out because the read stage could not read or decode it
# starts with this (the run state records dropped files by reason): such a file is ``failed``.
UNREADABLE_PREFIX = "unreadable instance, left out of its series: "

STATUS_RUNNING = "running"
STATUS_COMPLETE = "complete"  # every input accounted for
STATUS_INCOMPLETE = "incomplete"  # inputs lost or not fetched: rerun to finish
STATUS_FAILED = "failed"  # the run itself failed
# exit codes of `pdd-batch screen` and `summary` (docs/screening.md); 3: the folder is locked
EXIT_OK, EXIT_INCOMPLETE, EXIT_FAILED = 0, 1, 2

VERSIONED_PACKAGES = ("pdd-batch", "torch", "timm", "ray", "pydicom", "nibabel", "pyarrow", "numpy")


class ManifestError(ValueError):
    """Inconsistent accounting of inputs."""


@dataclass(frozen=True)
class InputCounts:
    """Files by outcome; ``seen == scored + skipped + failed`` and ``lost <= failed``."""

    inputs_seen: int
    inputs_scored: int
    inputs_skipped: int
    inputs_failed: int
    inputs_lost: int

    @classmethod
    def from_outcomes(cls, outcomes: Mapping[str, str]) -> InputCounts:
        """Count a ``{file: outcome}`` map (outcome one of scored/skipped/failed/lost)."""
        bad = sorted({o for o in outcomes.values() if o not in OUTCOMES})
        if bad:
            raise ManifestError(f"unknown input outcomes: {bad}")
        c = Counter(outcomes.values())
        return cls(
            inputs_seen=len(outcomes),
            inputs_scored=c[SCORED],
            inputs_skipped=c[SKIPPED],
            inputs_failed=c[FAILED] + c[LOST],
            inputs_lost=c[LOST],
        )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def code_version(repo_root: Path | None = None) -> str:
    """``pdd_batch`` version plus the git commit when run from a checkout (``0.1.0+g1a2b3c4``)."""
    root = repo_root or Path(pdd_batch.__file__).resolve().parents[1]
    head = root / ".git" / "HEAD"
    try:
        ref = head.read_text(encoding="utf-8").strip()
        if ref.startswith("ref: "):
            ref = (root / ".git" / ref[5:]).read_text(encoding="utf-8").strip()
        if len(ref) >= 7 and all(ch in "0123456789abcdef" for ch in ref[:7]):
            return f"{pdd_batch.__version__}+g{ref[:7]}"
    except OSError:
        pass
    return pdd_batch.__version__


def package_versions(names: Iterable[str] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """Installed versions (from package metadata; nothing is imported)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def exit_code_for(status: str) -> int:
    """0: every input accounted for (bad inputs included); 1: incomplete (inputs lost, or PACS
    series not fetched: rerun to finish); 2: the run failed (also a usage error's code)."""
    return {STATUS_COMPLETE: EXIT_OK, STATUS_INCOMPLETE: EXIT_INCOMPLETE}.get(status, EXIT_FAILED)


def build_manifest(
    *,
    run_id: str,
    status: str,
    key_id: str,
    counts: InputCounts,
    model_id: str,
    checkpoint_hash: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict; ``extra`` adds run details (timings, series counts, config, cluster).

    No path is recorded (the archive root often names a patient or a department): ``key_id``
    names the site key the run's study/series/file keys were made with (``pdd_batch.keys``).
    """
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run_id": run_id,
        "status": status,
        "exit_code": exit_code_for(status),
        "key_id": key_id,
        **counts.to_dict(),
        "model_id": model_id,
        "checkpoint_hash": checkpoint_hash,
        "code_version": code_version(),
        "versions": package_versions(),
        "argv": [Path(sys.argv[0]).name] if sys.argv else [],
    }
    if extra:
        manifest.update(extra)
    return manifest


def write_manifest(out_dir: Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``OUT/manifest.json`` atomically."""
    return write_json_atomic(manifest, Path(out_dir) / MANIFEST_NAME)


# a quoted string holding a path separator, or an absolute path (POSIX or Windows)
_PATH_RE = re.compile(
    r"""'[^'\n]*[/\\][^'\n]*'|"[^"\n]*[/\\][^"\n]*"|(?<![\w.-])(?:~|[A-Za-z]:)?[/\\][^\s'",;]*"""
)


def scrub_paths(text: str) -> str:
    """``text`` with file paths replaced by ``<path>`` (quoted ones, and absolute ones)."""
    return _PATH_RE.sub("<path>", text)


def record_failure(out_dir: Path, manifest: Mapping[str, Any]) -> bool:
    """Write the manifest of a failed run, whatever it takes: atomically, else (a full disk)
    compact JSON over the existing ``manifest.json`` in place. Returns whether it was written."""
    try:
        write_manifest(out_dir, manifest)
        return True
    except WriteError as exc:
        log.warning("manifest: %s; overwriting it in place", exc)
    data = json.dumps(manifest, separators=(",", ":"), sort_keys=True, default=str).encode()
    try:
        overwrite_in_place(data, Path(out_dir) / MANIFEST_NAME)
        return True
    except WriteError as exc:
        log.warning("manifest: %s", exc)
        return False


_RANK = {SCORED: 3, SKIPPED: 2, FAILED: 1, LOST: 0}


def dropped_outcome(reason: str) -> str:
    """The outcome of a file its committed series dropped: ``failed`` when the read stage could
    not read it (``UNREADABLE_PREFIX``), else ``skipped`` (a file that gave no slice)."""
    return FAILED if reason.startswith(UNREADABLE_PREFIX) else SKIPPED


def file_outcomes(
    files: Iterable[tuple[str, str, str]],
    series_files: Mapping[str, Iterable[str]],
    done: Mapping[str, Mapping[str, str]],
    failed: Iterable[str],
    spares: Mapping[str, Iterable[str]] | None = None,
) -> dict[str, str]:
    """The outcome of every discovered file.

    Args:
        files: ``(path, discovery status "used"/"skipped"/"failed", reason)`` per file.
        series_files: files of each series of the run.
        done: committed series -> the files it dropped (gave no slice) -> why.
        failed: series that failed to read.
        spares: each series' spare files (``SeriesRef.spares``): scored when a committed series
            used them (not among its dropped files), else their discovery record decides.

    A file of several series gets its best outcome; a used file of no finished series is lost.
    """
    failed = set(failed)
    out: dict[str, str] = {}
    for key, paths in series_files.items():
        dropped = done.get(key, {})
        for path in paths:
            if key in done:
                outcome = dropped_outcome(dropped[path]) if path in dropped else SCORED
            else:
                outcome = FAILED if key in failed else LOST
            if path not in out or _RANK[outcome] > _RANK[out[path]]:
                out[path] = outcome
    for key, paths in (spares or {}).items():
        if key in done:
            out.update((path, SCORED) for path in paths if path not in done[key])
    for path, status, _reason in files:
        if status == "skipped":
            out.setdefault(path, SKIPPED)
        elif status == "failed":
            out.setdefault(path, FAILED)
        else:
            out.setdefault(path, LOST)
    return out
