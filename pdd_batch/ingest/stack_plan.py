"""Slice geometry from headers alone: which frames form which volume, in which order.

The same plan is made on the driver (from ``stop_before_pixels`` headers, for inspection and file
accounting) and in the worker (from the decoded files), so counts never disagree.

Rules:
- Frames are grouped by (orientation, rows, cols). The largest group is the series; other groups
  with at least ``MIN_STACK`` frames become their own stacks; smaller ones are scouts/localizers,
  excluded with a reason.
- Slices are sorted by their position projected on the slice normal (row x column cosines of
  ImageOrientationPatient), never by InstanceNumber.
- Several frames at every position (same count everywhere) are time points of a 4D series and are
  split into volumes; an uneven count is duplicates: the first per position is kept.
- Spacing is measured along the normal; steps > 1.5x the median are gaps (warned, not filled).
  Positions that advance off the normal (gantry tilt) are warned; slices are not resampled.
- Frames without position/orientation (projection X-ray, NM, mosaics) are single 2D images.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from pdd_batch.ingest.dicom_headers import FrameInfo

MIN_STACK = 3  # a different-orientation group smaller than this is a scout
POSITION_TOL_MM = 0.01  # positions closer than this along the normal are the same slice
GAP_FACTOR = 1.5  # a step this many times the median spacing is a gap
TILT_WARN_DEG = 0.5
IOP_TOL = 1e-3  # direction cosines closer than this are the same orientation
AXIS_NAMES = ("sagittal", "coronal", "axial")  # dominant LPS axis of the slice normal
DUPLICATE_POSITION = "duplicate slice position (another instance kept)"


@dataclass(frozen=True)
class StackPlan:
    """Volumes of one stack of frames.

    Attributes:
        volumes: each volume's frames in slice order (ascending along the normal).
        spacing: (slice, row, column) spacing in mm; slice spacing 0.0 when unknown/single.
        directions: LPS unit vectors of array axes (slice normal, down the rows, along the
            columns) or None when the frames have no geometry (2D images).
        orientation: "axial"/"coronal"/"sagittal" (+ " oblique") or "2D".
        warnings: geometry findings (gaps, tilt, 4D, duplicates, scouts), no identifiers.
        excluded: frames left out, each with the reason.
        tilt_deg: angle between slice positions' advance and the normal (0 when none).
        n_gaps: number of missing slices detected.
    """

    volumes: tuple[tuple[FrameInfo, ...], ...]
    spacing: tuple[float, float, float]
    directions: tuple[tuple[float, float, float], ...] | None
    orientation: str
    warnings: tuple[str, ...]
    excluded: tuple[tuple[FrameInfo, str], ...] = ()
    tilt_deg: float = 0.0
    n_gaps: int = 0

    @property
    def n_slices(self) -> int:
        """Total slices over all volumes."""
        return sum(len(v) for v in self.volumes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices per volume, rows, cols) of the first volume."""
        first = self.volumes[0]
        return (len(first), first[0].rows, first[0].cols)


def _time_key(f: FrameInfo) -> tuple:
    return (f.temporal, f.instance, f.file, f.frame)


def _orientation_label(normal: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(normal)))
    angle = float(np.degrees(np.arccos(min(1.0, abs(float(normal[axis]))))))
    return AXIS_NAMES[axis] + (" oblique" if angle > 10.0 else "")


def _flat_plan(frames: Sequence[FrameInfo], reason: str | None) -> StackPlan:
    """Frames without usable geometry: each is a 1-slice volume (2D image)."""
    ordered = sorted(frames, key=_time_key)
    spacing = ordered[0].pixel_spacing or (1.0, 1.0)
    warnings = (reason,) if reason else ()
    return StackPlan(
        volumes=tuple((f,) for f in ordered),
        spacing=(0.0, float(spacing[0]), float(spacing[1])),
        directions=None,
        orientation="2D",
        warnings=warnings,
    )


def _cluster_positions(dist: np.ndarray) -> np.ndarray:
    """Integer cluster id per frame: frames within POSITION_TOL_MM are the same slice."""
    order = np.argsort(dist, kind="stable")
    ids = np.empty(len(dist), dtype=np.int64)
    current, last = 0, None
    for i in order:
        if last is not None and dist[i] - last > POSITION_TOL_MM:
            current += 1
        ids[i] = current
        last = dist[i]
    return ids


def _drop_copies(frames: list[FrameInfo], excluded: list[tuple[FrameInfo, str]]) -> list[FrameInfo]:
    """Frames at one position without copies: a frame of another file with the same
    InstanceNumber, time and frame index is the same image stored twice (a copied folder),
    not a time point."""
    kept: list[FrameInfo] = []
    seen: dict[tuple, str] = {}
    for f in frames:
        key = (f.temporal, f.instance, f.frame)
        if f.instance > 0 and seen.get(key, f.file) != f.file:
            excluded.append((f, DUPLICATE_POSITION))
            continue
        seen.setdefault(key, f.file)
        kept.append(f)
    return kept


def _split_positions(
    frames: Sequence[FrameInfo], ids: np.ndarray
) -> tuple[list[list[FrameInfo]], list[tuple[FrameInfo, str]], list[str]]:
    """Volumes (lists of frames in slice order) from per-frame position cluster ids."""
    by_pos: dict[int, list[FrameInfo]] = defaultdict(list)
    for f, i in zip(frames, ids, strict=True):
        by_pos[int(i)].append(f)
    positions = sorted(by_pos)
    excluded: list[tuple[FrameInfo, str]] = []
    for p in positions:
        by_pos[p].sort(key=_time_key)
        by_pos[p] = _drop_copies(by_pos[p], excluded)
    warnings: list[str] = []
    if excluded:
        warnings.append(f"{len(excluded)} duplicate-position instance(s) excluded")
    counts = {len(by_pos[p]) for p in positions}
    if len(counts) == 1:
        n_t = counts.pop()
        volumes = [[by_pos[p][t] for p in positions] for t in range(n_t)]
        if n_t > 1:
            warnings.append(f"4D: {n_t} volumes x {len(positions)} slices")
        return volumes, excluded, warnings
    for p in positions:
        excluded.extend((f, DUPLICATE_POSITION) for f in by_pos[p][1:])
    warnings = [w for w in warnings if "duplicate" not in w]
    warnings.append(f"{len(excluded)} duplicate-position instance(s) excluded")
    return [[by_pos[p][0] for p in positions]], excluded, warnings


def _spacing_findings(dist_sorted: np.ndarray) -> tuple[float, int, list[str]]:
    """Median spacing along the normal, number of missing slices, and gap warnings."""
    if len(dist_sorted) < 2:
        return 0.0, 0, []
    steps = np.diff(dist_sorted)
    median = float(np.median(steps))
    if median <= 0:
        return 0.0, 0, []
    big = steps > GAP_FACTOR * median
    missing = int(np.sum(np.rint(steps[big] / median) - 1)) if big.any() else 0
    warnings = []
    if big.any():
        missing = max(missing, int(big.sum()))
        warnings.append(
            f"gap: {missing} missing slice(s) (step {float(steps.max()):.2f} mm "
            f"vs spacing {median:.2f} mm)"
        )
    return median, missing, warnings


def _tilt_deg(first: np.ndarray, last: np.ndarray, normal: np.ndarray) -> float:
    advance = last - first
    length = float(np.linalg.norm(advance))
    if length == 0.0:
        return 0.0
    cos = min(1.0, abs(float(advance @ normal)) / length)
    return float(np.degrees(np.arccos(cos)))


def _positioned_plan(frames: Sequence[FrameInfo]) -> StackPlan:
    """Plan of frames sharing one orientation and size."""
    iop = np.asarray(frames[0].orientation, dtype=np.float64)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal) or 1.0
    pos = np.asarray([f.position for f in frames], dtype=np.float64)  # (N, 3)
    dist = pos @ normal  # (N,)
    volumes, excluded, warnings = _split_positions(frames, _cluster_positions(dist))
    first_pos = np.asarray([f.position for f in volumes[0]], dtype=np.float64)
    dist_sorted = first_pos @ normal
    spacing_z, n_gaps, gap_warnings = _spacing_findings(dist_sorted)
    tilt = _tilt_deg(first_pos[0], first_pos[-1], normal) if len(first_pos) > 1 else 0.0
    if tilt > TILT_WARN_DEG:
        gap_warnings.append(
            f"gantry tilt {tilt:.1f} deg (spacing along the slice normal; not resampled)"
        )
    ps = frames[0].pixel_spacing or (1.0, 1.0)
    return StackPlan(
        volumes=tuple(tuple(v) for v in volumes),
        spacing=(spacing_z, float(ps[0]), float(ps[1])),
        directions=tuple(tuple(float(x) for x in v) for v in (normal, col_dir, row_dir)),
        orientation=_orientation_label(normal),
        warnings=tuple(warnings + gap_warnings),
        excluded=tuple(excluded),
        tilt_deg=tilt if tilt > TILT_WARN_DEG else 0.0,
        n_gaps=n_gaps,
    )


def _geometry_groups(frames: Sequence[FrameInfo]) -> list[list[FrameInfo]]:
    """Frames grouped by size and orientation (cosines within IOP_TOL), largest group first."""
    groups: list[tuple[np.ndarray, int, int, list[FrameInfo]]] = []
    for f in frames:
        iop = np.asarray(f.orientation, dtype=np.float64)
        for rep, rows, cols, members in groups:
            if rows == f.rows and cols == f.cols and float(np.max(np.abs(iop - rep))) < IOP_TOL:
                members.append(f)
                break
        else:
            groups.append((iop, f.rows, f.cols, [f]))
    return sorted((g[3] for g in groups), key=len, reverse=True)


def plan_stacks(frames: Sequence[FrameInfo]) -> tuple[list[StackPlan], list[tuple[FrameInfo, str]]]:
    """Split one series' frames into stacks (largest first) and frames excluded as scouts.

    Returns:
        (stacks, excluded) where excluded pairs each scout frame with its reason. Frames excluded
        inside a stack (duplicates) are in that stack's ``excluded``.
    """
    if not frames:
        return [], []
    flat = [f for f in frames if f.mosaic or f.position is None or f.orientation is None]
    placed = [f for f in frames if not (f.mosaic or f.position is None or f.orientation is None)]
    stacks: list[StackPlan] = []
    scouts: list[tuple[FrameInfo, str]] = []
    if placed:
        for i, group in enumerate(_geometry_groups(placed)):
            if i == 0 or len(group) >= MIN_STACK:
                stacks.append(_positioned_plan(group))
            else:
                reason = "scout/localizer: orientation or size differs from the series"
                scouts.extend((f, reason) for f in group)
        if scouts:
            stacks[0] = _with_warning(stacks[0], f"{len(scouts)} scout/localizer frame(s) excluded")
    if flat:
        mosaic = any(f.mosaic for f in flat)
        note = "mosaic: each image treated as one 2D image (not unpacked)" if mosaic else None
        stacks.append(_flat_plan(flat, note))
    return stacks, scouts


def _with_warning(plan: StackPlan, warning: str) -> StackPlan:
    return replace(plan, warnings=(*plan.warnings, warning))
