"""Heatmap overlays written back to a PACS (``export --to ... --secondary-capture``): one
Secondary Capture series per study, an RGB overlay per reported slice (the model-input slice
from the run's series cache with its anomaly map blended over it), marked DERIVED/SECONDARY with
a derivation description and BurnedInAnnotation YES (the score is in the pixels' meaning, and
the source pixels may carry text of their own).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from pdd_batch.ingest.dicomweb import PACS_FOLDER, SERIES_FOLDER, DicomwebError
from pdd_batch.review.overlay import (
    SourceLocator,
    SourceNotFoundError,
    display_scale,
    model_input_slices,
    overlay_png,
)
from pdd_batch.review.pacs_types import ResolvedSlice, StudyTarget, series_description
from pdd_batch.review.secondary_capture import ScSource, ScStudy, derived_uid, sc_dataset
from pdd_batch.runs.results import RunResults


def cache_locator(results: RunResults) -> SourceLocator:
    """The source files of a PACS run: its series cache (keys recomputed with this site's key).

    Raises:
        DicomwebError: the cache is gone or the run was keyed with another site key.
    """
    try:
        return SourceLocator.for_run(results, archive=results.run_dir / PACS_FOLDER / SERIES_FOLDER)
    except SourceNotFoundError as exc:
        raise DicomwebError(f"overlays need the run's series cache: {exc}") from None


def overlay_scale(rows: Sequence[dict]) -> tuple[float, float]:
    """One colour scale for every overlay of the export (``overlay.display_scale``)."""
    return display_scale(rows)


def _bases(locator: SourceLocator, rows: list[dict]) -> dict[tuple[str, int, int], np.ndarray]:
    """Model-input images (S, S) of the rows' slices, by (series key, volume, slice)."""
    out: dict[tuple[str, int, int], np.ndarray] = {}
    located = locator.attach(rows)
    for sk in dict.fromkeys(r["series_key"] for r in located):
        series_rows = [r for r in located if r["series_key"] == sk]
        wanted = {(r["volume_index"], r["slice_index"]) for r in series_rows}
        for (v, z), image in model_input_slices(locator.root, series_rows, wanted).items():
            out[(sk, v, z)] = image
    return out


def _comment(row: dict, source: ResolvedSlice | None) -> str:
    """The overlay's ImageComments: its source image by InstanceNumber (the run's own slice
    index only when the source is unknown or has none), and its score."""
    number = getattr(source.evidence, "InstanceNumber", None) if source is not None else None
    where = f"source image {number}" if number not in (None, "") else f"slice {row['slice_index']}"
    return f"{where} anomaly score {row['score']:.4f} (not for diagnosis)"


def overlay_datasets(
    rows: list[dict],
    refs: list[ResolvedSlice],
    locator: SourceLocator,
    scale: tuple[float, float],
    target: StudyTarget,
) -> list[Any]:
    """The Secondary Capture datasets of one study's reported slices for one model.

    Args:
        rows: slice rows (with ``heatmap_png``/``heatmap_max``), highest score first.
        refs: the rows' source images found on the PACS (headers, UIDs).
        locator: where the run's source files are (``cache_locator``).
        scale: the export's colour scale.
        target: the study and model (a stable series per model and study, so a re-export
            replaces it; the series description names the model and the run's date).
    """
    evidence = refs[0].evidence
    by_file = {r.slice.file_key: r for r in refs}
    study = ScStudy(
        study_uid=str(evidence.StudyInstanceUID),
        patient_id=str(evidence.PatientID or ""),
        patient_name=str(evidence.PatientName or ""),
        study_date=str(evidence.StudyDate or ""),
        deidentified=False,
        burned_in="YES",
    )
    series_uid = derived_uid(
        "pdd-batch", "sc", "series", target.model.checkpoint_hash, target.study_key
    )
    description = series_description("sc", target.model)
    bases = _bases(locator, rows)
    out = []
    for number, r in enumerate([r for r in rows if r.get("heatmap_png")], start=1):
        base = bases.get((r["series_key"], r["volume_index"], r["slice_index"]))
        if base is None:  # the slice cannot be rebuilt: the heatmap alone
            base = np.zeros((1, 1), dtype=np.float32)
        png = overlay_png(base, r["heatmap_png"], r["heatmap_max"], scale)
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # (H, W, 3) uint8
        ref = by_file.get(r["file_key"])
        source = None if ref is None else ScSource(ref.sop_class_uid, ref.sop_instance_uid)
        comment = _comment(r, ref)
        out.append(sc_dataset(rgb, study, series_uid, number, comment, source, description))
    return out
