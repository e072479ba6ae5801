"""Heatmap overlays for review: the anomaly map blended over the slice the model saw.

The heatmap in ``slices.heatmap_png`` lives on the model-input grid (S, S): the slice after
windowing and ``fit_to_square``. Overlays are drawn on that same grid (rebuilt from the source
file with the run's ``PreprocessSpec``), so a hot spot lands exactly where the model put it.
Images are upscaled by an integer factor for display, which keeps that alignment exact.

Runs name files by ``file_key`` (no paths); ``SourceLocator`` finds the file behind each key,
from the screened archive (keys recomputed) or the screening crosswalk.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pdd_batch.ingest.framing import RADIOGRAPHS, frame_image
from pdd_batch.ingest.preprocess import WINDOW_PRESETS, PreprocessSpec, to_model_square, window_ct
from pdd_batch.runs.heatmap import decode_heatmap

log = logging.getLogger(__name__)

DISPLAY_MIN = 256  # overlays are upscaled (integer factor) to at least this many pixels
ALPHA_MAX = 0.6  # opacity of the hottest heatmap pixel


class OverlayError(ValueError):
    """A slice that cannot be drawn; the message names the slice position, never identifiers."""


def colormap(x: np.ndarray) -> np.ndarray:
    """A jet-like colour map: (H, W) in [0, 1] -> uint8 (H, W, 3); 0 blue, 0.5 green, 1 red.

    Unlike jet, the top end stays bright red (not dark red) so hot spots stand out.
    """
    x = np.clip(x, 0.0, 1.0)
    r = np.clip(4.0 * x - 1.5, 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return (np.stack([r, g, b], axis=-1) * 255.0 + 0.5).astype(np.uint8)  # (H, W, 3)


def blend(base: np.ndarray, heat: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Blend a map over a grey image on the same grid.

    Args:
        base: float (H, W) in [0, 1], the model-input slice.
        heat: float (H, W) >= 0, the anomaly map in score units.
        scale: (lo, hi) map values: at or below ``lo`` transparent, ``hi`` red and most opaque.

    Returns:
        uint8 (H, W, 3) RGB.
    """
    if base.shape != heat.shape:
        raise OverlayError(f"slice {base.shape} and heatmap {heat.shape} grids differ")
    lo, hi = scale
    norm = np.clip((heat - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(heat)
    alpha = (ALPHA_MAX * norm)[..., None]  # (H, W, 1)
    grey = np.repeat((np.clip(base, 0.0, 1.0) * 255.0)[..., None], 3, axis=-1)  # (H, W, 3)
    out = (1.0 - alpha) * grey + alpha * colormap(norm).astype(np.float32)
    return (out + 0.5).astype(np.uint8)


def display_scale(rows: Sequence[dict]) -> tuple[float, float]:
    """One colour scale for a set of slices: (median of the per-slice map medians, largest max).

    The median floor keeps the background of every map transparent, so an untrained or
    uniformly high map does not paint the whole slice; only what stands out is coloured.
    """
    peaks, medians = [], []
    for r in rows:
        if not r.get("heatmap_png") or not r.get("heatmap_max"):
            continue
        peaks.append(float(r["heatmap_max"]))
        medians.append(float(np.median(decode_heatmap(r["heatmap_png"], r["heatmap_max"]))))
    if not peaks:
        return 0.0, 1.0
    hi = max(peaks)
    lo = float(np.median(medians))
    return (lo, hi) if hi > lo else (0.0, hi)


def upscale(rgb: np.ndarray, minimum: int = DISPLAY_MIN) -> np.ndarray:
    """Nearest-neighbour upscaling by the smallest integer factor reaching ``minimum`` pixels."""
    factor = max(1, -(-minimum // max(rgb.shape[:2])))
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def overlay_png(
    base: np.ndarray, heatmap_png: bytes, heatmap_max: float, scale: tuple[float, float]
) -> bytes:
    """PNG bytes of the overlay of one slice (display size, see ``upscale``)."""
    heat = decode_heatmap(heatmap_png, float(heatmap_max or 0.0))  # (S, S)
    if base.shape != heat.shape:
        base = np.asarray(
            Image.fromarray(base.astype(np.float32)).resize(heat.shape[::-1], Image.BILINEAR)
        )
    rgb = upscale(blend(base, heat, scale))
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def spec_from_json(text: str | None) -> PreprocessSpec:
    """The run's ``PreprocessSpec`` from the ``slices.preprocessing`` column."""
    return PreprocessSpec.from_dict(json.loads(text)) if text else PreprocessSpec()


def _to_unit(values: np.ndarray, modality: str, spec: PreprocessSpec) -> np.ndarray:
    if modality.upper() == "CT":
        return window_ct(values, *WINDOW_PRESETS[spec.ct_window])
    from pdd_batch.ingest.preprocess import normalise_percentile

    return normalise_percentile(values, *spec.percentiles)


def _per_image_framing_only(spec: PreprocessSpec) -> None:
    """A file read alone cannot be framed by a per-volume rule (its volume is not read)."""
    if spec.framing not in (None, "radiograph-v1"):
        raise OverlayError(f"framing {spec.framing} is per volume: needs the series reader")


def _dicom_slice(path: Path, spec: PreprocessSpec) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if str(ds.get("Modality", "")).upper() not in RADIOGRAPHS:
        _per_image_framing_only(spec)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise OverlayError("multi-frame source needs the series reader")
    values = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
    if values.ndim != 2:
        raise OverlayError(f"source pixels have shape {values.shape}, expected (H, W)")
    modality = str(ds.get("Modality", ""))
    img = _to_unit(values, modality, spec)
    # As the screening reader: CT stays in HU (the window fixes its display); other
    # MONOCHROME1 images are inverted (symmetric percentiles make the order irrelevant).
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" and modality.upper() != "CT":
        img = 1.0 - img
    return to_model_square(frame_image(img, spec.framing), spec)


def _nifti_slice(path: Path, volume_index: int, slice_index: int, spec: PreprocessSpec):
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj, dtype=np.float32)  # (X, Y, Z[, T]) RAS
    vol = data[..., volume_index] if data.ndim == 4 else data
    if vol.ndim != 3 or not 0 <= slice_index < vol.shape[2]:
        raise OverlayError(f"slice {slice_index} is outside a volume of shape {vol.shape}")
    _per_image_framing_only(spec)
    norm = _to_unit(vol, "MR", spec)
    axial = np.flipud(norm[:, :, slice_index].T)  # rows anterior -> posterior, columns R -> L
    return to_model_square(np.ascontiguousarray(axial), spec)


def _via_series_reader(root: Path, rows: Sequence[dict], wanted: set, spec: PreprocessSpec) -> dict:
    """Model-input slices rebuilt by the screening readers themselves (exact geometry)."""
    from pdd_batch.ingest.discovery import SeriesRef  # lazily: absent in builds without ingestion
    from pdd_batch.ingest.slicing import iter_model_slices
    from pdd_batch.ingest.volume import load_series

    first = rows[0]
    ordered = sorted(rows, key=lambda r: (r["volume_index"], r["slice_index"]))
    files = tuple(dict.fromkeys(r["source_file"] for r in ordered))
    kind = "nifti" if files[0].endswith((".nii", ".nii.gz")) else "dicom"
    ref = SeriesRef(
        series_key=first["series_key"],
        study_key=first["study_key"],
        kind=kind,
        modality=first.get("modality") or "",
        files=files,
    )
    series = load_series(root, ref)
    return {
        (s.volume_index, s.slice_index): s.image
        for s in iter_model_slices(series, spec)
        if (s.volume_index, s.slice_index) in wanted
    }


def model_input_slices(
    root: Path, rows: Sequence[dict], wanted: set[tuple[int, int]] | None = None
) -> dict[tuple[int, int], np.ndarray]:
    """Rebuild the model-input images (S, S) of some slices of one series.

    Args:
        root: the archive root (``source_file`` is relative to it).
        rows: all ``slices`` rows of one series (``series_key``, ``study_key``, ``source_file``
            as set by ``SourceLocator.attach``,
            ``volume_index``, ``slice_index``, ``modality``, ``preprocessing``).
        wanted: ``(volume_index, slice_index)`` pairs to rebuild (default: all rows).

    Returns:
        ``{(volume_index, slice_index): float32 (S, S) in [0, 1]}``; slices that cannot be
        rebuilt are missing (the caller draws the heatmap alone).
    """
    rows = [r for r in rows if r.get("source_file")]  # files the locator could not find: none
    if not rows:
        return {}
    wanted = wanted if wanted is not None else {(r["volume_index"], r["slice_index"]) for r in rows}
    spec = spec_from_json(rows[0].get("preprocessing"))
    try:
        found = _via_series_reader(root, rows, wanted, spec)
        if wanted <= set(found):
            return found
        log.warning("series reader returned %d of %d slices; reading files directly",
                    len(found), len(wanted))  # fmt: skip
    except ImportError:
        pass  # no series reader in this build: read the source files directly
    except Exception as exc:  # a reader failure must not stop an export: fall back
        log.warning("series reader failed for an overlay (%s); reading files directly",
                    type(exc).__name__)  # fmt: skip
    out: dict[tuple[int, int], np.ndarray] = {}
    for r in rows:
        key = (r["volume_index"], r["slice_index"])
        if key not in wanted:
            continue
        path = root / r["source_file"]
        try:
            if path.name.endswith((".nii", ".nii.gz")):
                img = _nifti_slice(path, r["volume_index"], r["slice_index"], spec)
            else:
                img = _dicom_slice(path, spec)
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("cannot rebuild slice %s for its overlay: %s", r["slice_index"],
                        type(exc).__name__)  # fmt: skip
            continue
        out[key] = img
    return out


class SourceNotFoundError(ValueError):
    """The files behind a run's keys cannot be located (the message says which option to give)."""


NEED_ARCHIVE = (
    "this run names its files by key, not by path: give --archive PATH (the folder that was "
    "screened; files are found by recomputing their keys with this site's key) or "
    "--screen-crosswalk FILE (written by `pdd-batch screen --crosswalk`)"
)


class SourceLocator:
    """Maps a run's ``file_key`` values back to archive-relative paths under ``root``."""

    def __init__(self, root: Path, paths: dict[str, str]) -> None:
        self.root = Path(root)
        self.paths = paths

    def path(self, key: str) -> str | None:
        """The relative path of a file key (None when it was not found)."""
        return self.paths.get(key)

    def attach(self, rows: Sequence[dict]) -> list[dict]:
        """Copies of slice rows with ``source_file`` set to their relative path ("" if unknown)."""
        return [{**r, "source_file": self.paths.get(r["file_key"], "")} for r in rows]

    @classmethod
    def for_run(
        cls, results, archive: Path | None = None, crosswalk: Path | None = None
    ) -> SourceLocator:
        """The locator of an opened run (``pdd_batch.results.RunResults``).

        Schema 1.0 runs name files by path: ``archive`` (else the manifest's archive root) is
        the root. Later runs need ``crosswalk`` (its paths; its root unless ``archive`` is
        given) or ``archive`` (walked, every file's key recomputed with this site's key).

        Raises:
            SourceNotFoundError: neither is given, or the keys were made with another site key.
        """
        wanted = set(results.slices.column("file_key").to_pylist())
        if results.legacy_paths or results.key_id is None:
            root = archive or results.archive_root
            if root is None:
                raise SourceNotFoundError("the run records no archive folder: give --archive PATH")
            return cls(Path(root), {k: k for k in wanted})
        if crosswalk is not None:
            return cls._from_crosswalk(results, Path(crosswalk), archive)
        if archive is None:
            raise SourceNotFoundError(NEED_ARCHIVE)
        from pdd_batch.ingest.keys import site_key

        if site_key().key_id != results.key_id:
            raise SourceNotFoundError(
                f"the run's keys were made with site key {results.key_id}, this machine's key is "
                f"{site_key().key_id}: set PDD_BATCH_KEY_FILE to that key file, or give "
                "--screen-crosswalk FILE"
            )
        open_archives = bool((results.manifest.get("run_config") or {}).get("open_archives"))
        return cls(Path(archive), find_keyed_files(Path(archive), wanted, open_archives))

    @classmethod
    def _from_crosswalk(cls, results, crosswalk: Path, archive: Path | None) -> SourceLocator:
        from pdd_batch.runs.crosswalk import CrosswalkError, paths_by_key, read_crosswalk

        try:
            doc = read_crosswalk(crosswalk)
        except CrosswalkError as exc:
            raise SourceNotFoundError(str(exc)) from exc
        if doc.get("key_id") != results.key_id:
            raise SourceNotFoundError(
                f"the crosswalk was written with site key {doc.get('key_id')}, the run with "
                f"{results.key_id}: not this run's crosswalk"
            )
        return cls(Path(archive or doc["archive_root"]), paths_by_key(doc))


def find_keyed_files(root: Path, wanted: set[str], open_archives: bool = False) -> dict[str, str]:
    """``{file_key: relative path}`` for the wanted keys, by walking ``root`` (links to folders
    followed, as discovery does) and keying every relative path; stops once all are found."""
    from pdd_batch.ingest.archive_io import is_archive_name, iter_archive_members, join_member
    from pdd_batch.ingest.keys import file_key

    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            names = [rel]
            if open_archives and is_archive_name(name):
                try:
                    names += [join_member(rel, m) for m, _, _ in iter_archive_members(root / rel)]
                except OSError:
                    pass  # an unreadable archive: its members stay unfound
            for candidate in names:
                key = file_key(candidate)
                if key in wanted:
                    found[key] = candidate
            if len(found) == len(wanted):
                return found
    return found
