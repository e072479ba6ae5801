"""What a model knows (its scope) and which model, if any, a series goes to.

A checkpoint's ``config.json`` holds ``scope``: the modalities, body parts (region groups of
``ingest.anatomy``) and orientations (planes for volumes, views for radiographs) of its training
series, optionally the patients' age range (completed years, inclusive), the intensity domain,
and fallback policies for series whose headers do not say.

The routing rule (``match_rank``, ``route``), in order:

1. The modality must be one of the model's (CR, DX and DR count as one radiograph modality).
2. Body part: when the series' header names one, its region must be one of the model's; when it
   names none, the model's ``fallback`` decides ("accept": screened, "reject": not).
3. Orientation: a volume's plane must be one of the model's, or the volume must be thick enough
   (``MIN_REFORMAT_SLICES``) for the reader to reslice it along the model's axis; a radiograph's
   view (PA/AP...) must be one of the model's when both are known. Unknown: the fallback decides.
4. Age, when the model has an age range: the patient's age at the study (``ingest.age``: from
   PatientAge, else PatientBirthDate and StudyDate; in memory only) must be inside it. Unknown
   age: ``age_fallback`` decides, "reject" by default (a model trained on one age group says
   nothing about a patient who may be outside it).
5. Among the models a series matches, a full match beats a fallback match, which beats a model
   of unknown scope (an old checkpoint: it takes anything, as before scopes existed); ties go to
   the model named first. A series no model matches is skipped with ``out_of_scope_reason``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from pdd_batch.ingest.anatomy import REGIONS, VIEWS, region_of
from pdd_batch.ingest.series import Discovery, FileRecord, SeriesRef
from pdd_batch.ingest.slicing import MIN_REFORMAT_SLICES

PLANES = ("axial", "coronal", "sagittal")
FALLBACKS = ("accept", "reject")
MAX_AGE = 150  # years; an age range bound above this is a typo
RADIOGRAPH = frozenset({"CR", "DX", "DR"})
NO_MATCH, UNKNOWN_MATCH, FALLBACK_MATCH, FULL_MATCH = 0, 1, 2, 3
SCOPE_KEYS = {"modality": "modalities", "body_part": "body_parts", "orientation": "orientations"}


class ScopeError(ValueError):
    """A scope that cannot be parsed or used; the message names the key."""


@dataclass(frozen=True)
class ModelScope:
    """What a model was trained on (empty ``modalities``: unknown, an old checkpoint).

    Attributes:
        modalities: DICOM modalities ("CT"; "CR", "DX").
        body_parts: region groups ("HEAD", "CHEST"); empty: any.
        orientations: planes ("axial") and/or radiograph views ("PA", "AP"); empty: any.
        domain: intensity domain, e.g. "CT HU, brain window 40/80".
        fallback: "accept" or "reject" a series whose header lacks a fact the scope names.
        source: where the scope came from ("archive headers", "--scope", "unknown").
        age_range: (youngest, oldest) patient age in completed years, inclusive; () any age.
        age_fallback: "accept" or "reject" a series whose patient age is unknown (only with
            an ``age_range``).
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    orientations: tuple[str, ...] = ()
    domain: str = ""
    fallback: str = "accept"
    source: str = "unknown"
    age_range: tuple[int, ...] = ()
    age_fallback: str = "reject"

    def __post_init__(self) -> None:
        for key in ("fallback", "age_fallback"):
            if getattr(self, key) not in FALLBACKS:
                got = getattr(self, key)
                raise ScopeError(f"scope.{key} must be one of {FALLBACKS}, got {got!r}")
        if self.age_range:
            _check_age_range(self.age_range)
        bad = [b for b in self.body_parts if b not in REGIONS]
        if bad:
            raise ScopeError(f"scope.body_part: unknown region(s) {bad}; known: {sorted(REGIONS)}")
        bad = [o for o in self.orientations if o not in PLANES and o not in VIEWS]
        if bad:
            raise ScopeError(
                f"scope.orientation: unknown value(s) {bad}; planes {PLANES} or views "
                f"{sorted(VIEWS)}"
            )

    @property
    def known(self) -> bool:
        """False for the scope of a checkpoint that recorded none."""
        return bool(self.modalities)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> ModelScope:
        """Inverse of ``to_dict``; ``None`` or ``"unknown"`` gives the unknown scope."""
        if not d or d == "unknown":
            return UNKNOWN_SCOPE
        if not isinstance(d, Mapping):
            raise ScopeError(f"scope must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ScopeError(f"scope: unknown keys {sorted(unknown)}")
        kw = {
            k: tuple(str(x) for x in v) if isinstance(v, list | tuple) else v for k, v in d.items()
        }
        if "age_range" in d:
            kw["age_range"] = _age_range_value(d["age_range"])
        return cls(**kw)

    def describe(self) -> str:
        """One line for people: ``CT, HEAD, axial (CT HU, brain window 40/80; fallback accept)``."""
        if not self.known:
            return "unknown (checkpoint records no scope: every series is scored)"
        parts = [
            "/".join(self.modalities),
            "/".join(self.body_parts) or "any body part",
            "/".join(self.orientations) or "any orientation",
        ]
        fallbacks = f"fallback {self.fallback}"
        if self.age_range:
            lo, hi = self.age_range
            parts.append(f"age {lo}-{hi} years")
            fallbacks += f", unknown age {self.age_fallback}"
        tail = "; ".join(t for t in (self.domain, fallbacks) if t)
        return f"{', '.join(parts)} ({tail})"


UNKNOWN_SCOPE = ModelScope()


def _check_age_range(value: tuple[int, ...]) -> None:
    if (
        len(value) != 2
        or not all(isinstance(v, int) for v in value)
        or not 0 <= value[0] <= value[1] <= MAX_AGE
    ):
        raise ScopeError(
            f"scope.age_range must be [youngest, oldest] whole years, 0-{MAX_AGE}, youngest first"
        )


def _age_range_value(value: Any) -> tuple[int, ...]:
    """A stored ``age_range`` ([lo, hi] or empty) as a tuple of ints."""
    if not value:
        return ()
    if not isinstance(value, list | tuple):
        raise ScopeError("scope.age_range must be a list [youngest, oldest]")
    try:
        return tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ScopeError("scope.age_range must hold whole years") from exc


def parse_age_range(text: str) -> tuple[int, int]:
    """``1-5`` (completed years, inclusive) or ``40`` (one year) as (youngest, oldest).

    Raises:
        ScopeError: not whole years, or youngest after oldest.
    """
    lo, sep, hi = (text or "").strip().partition("-")
    try:
        out = (int(lo), int(hi) if sep else int(lo))
    except ValueError as exc:
        raise ScopeError(f"--scope: age={text!r} is not a range of whole years (age=1-5)") from exc
    _check_age_range(out)
    return out


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _values(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.replace("|", "/").replace("+", "/").split("/") if v)


def parse_scope(text: str, *, domain: str = "", source: str = "--scope") -> ModelScope:
    """Parse ``modality=CT,body_part=HEAD,orientation=axial`` (several values: ``CR/DX``).

    Keys: ``modality`` and ``body_part`` (required), ``orientation`` (a plane, or radiograph
    views such as ``PA/AP``; default any), ``fallback`` (``accept``/``reject``), ``age`` (the
    patients' age range in completed years, ``age=1-5``; default any) and ``age_fallback``
    (``accept``/``reject`` a series of unknown age; default reject).

    Raises:
        ScopeError: naming the key that is missing, unknown or bad.
    """
    found: dict[str, Any] = {}
    for item in (p.strip() for p in (text or "").split(",") if p.strip()):
        key, sep, value = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not sep or not value.strip():
            raise ScopeError(f"--scope: '{item}' is not key=value")
        if key in ("fallback", "age_fallback"):
            found[key] = value.strip().lower()
        elif key == "age":
            found["age_range"] = parse_age_range(value)
        elif key in SCOPE_KEYS:
            found[SCOPE_KEYS[key]] = _values(value)
        else:
            keys = [*SCOPE_KEYS, "fallback", "age", "age_fallback"]
            raise ScopeError(f"--scope: unknown key {key!r}; keys: {keys}")
    for key in ("modality", "body_part"):
        if SCOPE_KEYS[key] not in found:
            raise ScopeError(f"--scope needs {key}= (e.g. modality=CT,body_part=HEAD)")
    found["modalities"] = tuple(m.upper() for m in found["modalities"])
    regions = []
    for part in found["body_parts"]:
        region = region_of(part)
        if not region:
            raise ScopeError(f"--scope: unknown body_part {part!r}; known: {sorted(REGIONS)}")
        regions.append(region)
    found["body_parts"] = tuple(dict.fromkeys(regions))
    found["orientations"] = tuple(
        o.lower() if o.lower() in PLANES else o.upper() for o in found.get("orientations", ())
    )
    return ModelScope(**found, domain=domain, source=source)


def scope_record(text: str) -> dict[str, Any]:
    """``--scope`` text as ``train`` records it for an image folder: the parsed scope and its
    intensity domain under the default preprocessing.

    Raises:
        ScopeError: as ``parse_scope``.
    """
    from pdd_batch.ingest.preprocess import PreprocessSpec

    parsed = parse_scope(text)
    return {**parsed.to_dict(), "domain": domain_of(PreprocessSpec().to_dict(), parsed.modalities)}


def domain_of(preprocessing: Mapping[str, Any], modalities: Iterable[str]) -> str:
    """The intensity domain a model sees, from its ``PreprocessSpec`` dict."""
    from pdd_batch.ingest.preprocess import WINDOW_PRESETS

    if "CT" in set(modalities):
        name = str(preprocessing.get("ct_window", "brain"))
        level, width = WINDOW_PRESETS.get(name, (float("nan"), float("nan")))
        return f"CT HU, {name} window {level:g}/{width:g}"
    lo, hi = preprocessing.get("percentiles", (0.5, 99.5))
    return f"percentiles {lo:g}-{hi:g} per volume"


def plane_of(ref: SeriesRef) -> str:
    """The plane of a series' stored slices ("axial"...), "" for 2D images without geometry."""
    word = (ref.orientation or "").split(" ")[0].lower()
    return word if word in PLANES else ""


def derive_scope(refs: Sequence[SeriesRef], preprocessing: Mapping[str, Any]) -> ModelScope:
    """The scope of a model trained on ``refs`` (the series of a training archive).

    Modalities and regions are those of the series (a region only when some header names it);
    orientation is the model's slicing axis for volumes, the views seen for radiographs; the age
    range spans the patients' ages (in completed years) of the series whose headers give one
    (none: any age).
    """
    if not refs:
        raise ScopeError("no training series to derive a scope from")
    modalities = tuple(sorted({r.modality for r in refs if r.modality}))
    regions = tuple(sorted({region_of(r.body_part) for r in refs if region_of(r.body_part)}))
    views = {r.view for r in refs if r.view}
    volumes = any(plane_of(r) for r in refs)
    orientations = tuple(sorted(views))
    if volumes:
        orientations = (str(preprocessing.get("axis", "axial")), *orientations)
    ages = [r.age_years for r in refs if r.age_years is not None]
    return ModelScope(
        modalities=modalities,
        body_parts=regions,
        orientations=orientations,
        domain=domain_of(preprocessing, modalities),
        source="archive headers",
        age_range=(min(ages), max(ages)) if ages else (),
    )


def _same_modality(scope: ModelScope, modality: str) -> bool:
    if modality in scope.modalities:
        return True
    return modality in RADIOGRAPH and bool(RADIOGRAPH & set(scope.modalities))


def _orientation_fact(scope: ModelScope, ref: SeriesRef) -> bool | None:
    """True/False when the series' orientation fits the scope or not; None when unknown."""
    planes = [o for o in scope.orientations if o in PLANES]
    views = [o for o in scope.orientations if o in VIEWS]
    if not scope.orientations:
        return True
    plane = plane_of(ref)
    if ref.view and views:
        return ref.view in views
    if plane and planes:
        thick = bool(ref.shape) and ref.shape[0] >= MIN_REFORMAT_SLICES
        return plane in planes or thick
    if plane and views and not planes:
        return False  # a volume for a radiograph model
    return None


def age_fits(scope: ModelScope, ref: SeriesRef) -> bool | None:
    """True/False when the patient's age is inside the scope's range or not (True when the scope
    has none); None when the age is unknown."""
    if not scope.age_range:
        return True
    if ref.age_years is None:
        return None
    lo, hi = scope.age_range
    return lo <= ref.age_years <= hi


def match_rank(scope: ModelScope, ref: SeriesRef) -> int:
    """How well ``ref`` fits ``scope`` (``NO_MATCH`` ... ``FULL_MATCH``; see the module rule)."""
    if not scope.known:
        return UNKNOWN_MATCH
    if not _same_modality(scope, ref.modality):
        return NO_MATCH
    age = age_fits(scope, ref)
    if age is False or (age is None and scope.age_fallback == "reject"):
        return NO_MATCH
    facts = [_orientation_fact(scope, ref)]
    if scope.body_parts:
        region = region_of(ref.body_part)
        facts.append(region in scope.body_parts if region else None)
    if False in facts:
        return NO_MATCH
    if None in facts:
        return FALLBACK_MATCH if scope.fallback == "accept" else NO_MATCH
    return FULL_MATCH if age else FALLBACK_MATCH


def route(refs: Sequence[SeriesRef], scopes: Sequence[ModelScope]) -> list[int | None]:
    """Per series, the index of the model it goes to (best rank, first named on ties), or None."""
    out: list[int | None] = []
    for ref in refs:
        ranks = [match_rank(s, ref) for s in scopes]
        best = max(ranks, default=NO_MATCH)
        out.append(ranks.index(best) if best > NO_MATCH else None)
    return out


OUT_OF_SCOPE_PREFIX = "outside every model's scope"


def out_of_scope_reason(ref: SeriesRef, scopes: Sequence[ModelScope] = ()) -> str:
    """``outside every model's scope (MR, BRAIN)``: header facts only, no identifiers. When some
    model would take the series but for the patient's age: ``(CR, CHEST, PA; age outside its
    range)`` or ``(...; age unknown)``; the age itself is never shown."""
    facts = [ref.modality or "no modality", ref.body_part, ref.view]
    text = ", ".join(f for f in facts if f)
    ageless = [replace(s, age_range=()) for s in scopes if s.age_range]
    if any(match_rank(s, ref) > NO_MATCH for s in ageless):
        text += "; age outside its range" if ref.age_years is not None else "; age unknown"
    return f"{OUT_OF_SCOPE_PREFIX} ({text})"


@dataclass(frozen=True)
class Routed:
    """A discovery split by model: ``disc`` without the out-of-scope series, whose files are
    ``skipped`` records with the scope reason; ``by_model[i]`` the series of model ``i``."""

    disc: Discovery
    by_model: tuple[tuple[SeriesRef, ...], ...]
    out_of_scope_series: int
    out_of_scope_files: int
    out_of_scope_keys: tuple[str, ...] = ()


def route_discovery(disc: Discovery, scopes: Sequence[ModelScope]) -> Routed:
    """Route every series of ``disc`` (see ``route``); out-of-scope ones become skipped files.

    A file that also belongs to a series some model takes stays ``used``.
    """
    targets = route(disc.series, scopes)
    by_model: list[list[SeriesRef]] = [[] for _ in scopes]
    outside: dict[str, str] = {}  # file -> reason
    kept_files: set[str] = set()
    for ref, target in zip(disc.series, targets, strict=True):
        if target is None:
            reason = out_of_scope_reason(ref, scopes)
            for path in ref.files:
                outside.setdefault(path, reason)
        else:
            by_model[target].append(ref)
            kept_files.update(ref.files)
    outside = {p: r for p, r in outside.items() if p not in kept_files}
    files = [
        FileRecord(f.path, "skipped", outside[f.path], f.series_key) if f.path in outside else f
        for f in disc.files
    ]
    kept = [r for r, t in zip(disc.series, targets, strict=True) if t is not None]
    return Routed(
        disc=Discovery(root=disc.root, series=kept, files=files),
        by_model=tuple(tuple(refs) for refs in by_model),
        out_of_scope_series=len(disc.series) - len(kept),
        out_of_scope_files=len(outside),
        out_of_scope_keys=tuple(
            r.series_key for r, t in zip(disc.series, targets, strict=True) if t is None
        ),
    )
