"""`calibrate --archive`: a checkpoint's threshold from a site's own normal studies.

The studies are screened exactly as ``pdd-batch screen`` screens them (``jobs.screen.run_screen``,
or ``jobs.dicomweb_fetch.screen_pacs`` for a PACS: discovery, the model's scope, read tasks, the
model's preprocessing, the score actors and the in-distribution check) into a private temporary
run folder, which is deleted afterwards. Its slice rows (study key, score, out of distribution)
then give the threshold on the calibration studies and the false-positive rates on the held-out
studies (``pdd_batch.evaluation.site_calibration``); the block is stored in the checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.dicomweb_fetch import screen_pacs
from jobs.pacs_studies import PacsStudies
from jobs.screen import run_screen
from pdd_batch.evaluation.calibration import CalibrationError
from pdd_batch.evaluation.site_calibration import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_HOLDOUT,
    SiteSlices,
    StudySplit,
    site_calibration_record,
)
from pdd_batch.runs.config import RunConfig
from pdd_batch.runs.manifest import STATUS_COMPLETE, STATUS_INCOMPLETE
from pdd_batch.runs.results import open_run

log = logging.getLogger(__name__)

INPUT_COUNTS = ("inputs_seen", "inputs_scored", "inputs_skipped", "inputs_failed")


@dataclass(frozen=True)
class SiteOptions:
    """How a site calibration runs (the screen's own options where it has them)."""

    fpr: float = 0.05
    holdout: float = DEFAULT_HOLDOUT
    seed: int = 0
    n_boot: int = DEFAULT_BOOTSTRAP
    address: str | None = None
    num_cpus: int | None = None
    batch_size: int | None = None
    teacher_weights: dict[str, str] | None = None
    follow_links_outside: bool = False
    open_archives: bool = False


@dataclass(frozen=True)
class SiteCalibration:
    """What a site calibration stored (``record``), how it split the studies, and the counts of
    the screen it ran (inputs seen, scored, skipped as out of scope or not images, failed)."""

    record: dict[str, Any]
    split: StudySplit
    inputs: dict[str, int]


def _screen_normals(
    source: Path | PacsStudies, model_dir: Path, run_dir: Path, opts: SiteOptions,
    progress: Callable[[Any], None] | None,
) -> dict[str, Any]:  # fmt: skip
    """Screen the normal studies into ``run_dir``; returns the run's manifest.

    Raises:
        CalibrationError: the screen did not complete (a series unread is an error row and
            does not stop it; a run that failed does).
    """
    cfg = RunConfig(
        archive=run_dir / "unused" if isinstance(source, PacsStudies) else Path(source),
        out_dir=run_dir,
        model_path=Path(model_dir),
        address=opts.address,
        num_cpus=opts.num_cpus,
        batch_size=opts.batch_size,
        teacher_weights=dict(opts.teacher_weights or {}),
        follow_links_outside=opts.follow_links_outside,
        open_archives=opts.open_archives,
    )
    if isinstance(source, PacsStudies):
        result = screen_pacs(cfg, source.endpoint, source.query, progress=progress).screen
    else:
        result = run_screen(cfg, progress=progress)
    if result.status not in (STATUS_COMPLETE, STATUS_INCOMPLETE):
        raise CalibrationError(f"screening the normal studies ended {result.status}")
    return result.manifest


def calibrate_site(
    source: Path | PacsStudies,
    model_dir: Path,
    opts: SiteOptions = SiteOptions(),
    *,
    progress: Callable[[Any], None] | None = None,
    data_description: str = "",
) -> SiteCalibration:
    """Screen a site's normal studies, set the threshold on a calibration share of them, measure
    it on the held-out share, and store the block in ``model_dir``'s ``config.json``.

    Args:
        source: a folder (or .zip/.tar with ``opts.open_archives``) of DICOM/NIfTI normal
            studies, or studies on a PACS.
        model_dir: the checkpoint folder (its calibration is replaced).
        opts: target FPR, held-out share, seed, bootstrap draws, cluster and reader options.
        progress: receives the screen's ``jobs.screen.ProgressEvent``s.
        data_description: identifier-free text stored with the threshold.

    Raises:
        CalibrationError: nothing scored in scope, too few studies for the held-out share, no
            slice in distribution, or the screen failed.
        DicomwebError: the PACS could not be used.
    """
    from model.checkpoint import set_calibration

    work = Path(tempfile.mkdtemp(prefix="pdd-calibrate-"))  # 0700: private slices and heatmaps
    try:
        manifest = _screen_normals(source, model_dir, work / "run", opts, progress)
        slices = open_run(work / "run").slices
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if slices.num_rows == 0:
        raise CalibrationError(
            "no slice was scored: no series of the archive is in the model's scope "
            f"({manifest.get('series_out_of_scope', 0)} series out of scope) or none could be read"
        )
    site = SiteSlices.of(
        slices.column("study_key").to_pylist(),
        slices.column("score").to_pylist(),
        slices.column("out_of_distribution").to_pylist(),
    )
    record, split = site_calibration_record(
        site, opts.fpr, holdout=opts.holdout, seed=opts.seed, n_boot=opts.n_boot,
        data=data_description,
    )  # fmt: skip
    inputs = {k: int(manifest.get(k, 0)) for k in INPUT_COUNTS}
    inputs["series_out_of_scope"] = int(manifest.get("series_out_of_scope", 0))
    record["site"]["inputs"] = inputs
    set_calibration(Path(model_dir), record)
    log.info("site calibration stored: %d studies", record["site"]["n_studies"])
    return SiteCalibration(record, split, inputs)
