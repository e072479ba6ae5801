"""Scope carries the population (issue 22, item 4): the patient's age from the headers, in memory
only; a model's age range; routing by it; the default chest model screens children only."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from dicom_factory import write_xray
from scope_support import CHEST_XR, tag

from pdd_batch.ingest.age import age_from_age_string, age_from_dates, age_years
from pdd_batch.ingest.discovery import discover, discovery_report
from pdd_batch.ingest.scope import (
    FALLBACK_MATCH,
    FULL_MATCH,
    NO_MATCH,
    ModelScope,
    ScopeError,
    derive_scope,
    match_rank,
    parse_scope,
    route_discovery,
)


@pytest.mark.parametrize(
    ("text", "years"),
    [("005Y", 5), ("030M", 2), ("012M", 1), ("002W", 0), ("010D", 0), ("089Y", 89), ("045y", 45)],
)
def test_patient_age_forms(text: str, years: int) -> None:
    assert age_from_age_string(text) == years


@pytest.mark.parametrize("text", ["", "Y", "5", "005X", "-05Y", "1234Y", "05.5Y", "999Y", "abc"])
def test_malformed_patient_age_is_unknown(text: str) -> None:
    assert age_from_age_string(text) is None


def test_age_from_birth_and_study_dates() -> None:
    assert age_from_dates("20180615", "20230614") == 4  # the day before the fifth birthday
    assert age_from_dates("20180615", "20230615") == 5
    assert age_from_dates("20200229", "20210228") == 0
    for birth, study in [("20230230", "20240101"), ("20250101", "20240101"), ("2018", "2023"),
                         ("", "20240101"), ("20180615", "")]:  # fmt: skip
        assert age_from_dates(birth, study) is None
    # PatientAge first; the dates only when it is absent or malformed
    assert age_years("003Y", "19700101", "20240229") == 3
    assert age_years("", "19700101", "20240229") == 54
    assert age_years("junk", "19700101", "20240229") == 54
    assert age_years("junk", "", "") is None


def _radiograph(path: Path, **attrs: str) -> Path:
    xray = write_xray(path, modality="CR", seed=sum(map(ord, path.parent.name)))  # own series
    tag([xray], BodyPartExamined="CHEST", ViewPosition="PA", **attrs)
    return xray


def test_age_is_read_from_headers_but_never_serialised(tmp_path: Path) -> None:
    _radiograph(tmp_path / "child" / "cr.dcm", PatientAge="030M")
    adult = _radiograph(tmp_path / "adult" / "cr.dcm")  # dates only: 1970 -> 2024
    nothing = _radiograph(tmp_path / "unknown" / "cr.dcm")
    ds = pydicom.dcmread(nothing)
    del ds.PatientBirthDate
    ds.save_as(nothing, enforce_file_format=True)
    disc = discover(tmp_path)
    ages = {Path(r.files[0]).parent.name: r.age_years for r in disc.series}
    assert ages == {"child": 2, "adult": 54, "unknown": None}
    assert "PatientAge" not in pydicom.dcmread(adult)
    for ref in disc.series:
        assert "age" not in json.dumps(ref.to_dict()) and "age" not in repr(ref)
    assert "age" not in json.dumps(discovery_report(disc))


def test_scope_age_range_parse_store_and_describe() -> None:
    scope = parse_scope("modality=CR/DX,body_part=CHEST,orientation=PA/AP,age=1-5")
    assert scope.age_range == (1, 5) and scope.age_fallback == "reject"
    stored = json.loads(json.dumps(scope.to_dict()))
    assert stored["age_range"] == [1, 5] and ModelScope.from_dict(stored) == scope
    assert "age 1-5 years" in scope.describe() and "unknown age reject" in scope.describe()
    assert parse_scope("modality=CT,body_part=HEAD,age=40").age_range == (40, 40)
    accept = parse_scope("modality=CT,body_part=HEAD,age=1-5,age_fallback=accept")
    assert accept.age_fallback == "accept"
    old = {k: v for k, v in CHEST_XR.to_dict().items() if not k.startswith("age")}
    assert ModelScope.from_dict(old).age_range == ()  # a checkpoint from before: any age
    for bad in ["age=5-1", "age=x", "age=1-500", "age=", "age_fallback=maybe"]:
        with pytest.raises(ScopeError):
            parse_scope(f"modality=CT,body_part=HEAD,{bad}")
    with pytest.raises(ScopeError):
        ModelScope.from_dict({**scope.to_dict(), "age_range": [1, 2, 3]})


def test_scope_matching_by_age(tmp_path: Path) -> None:
    _radiograph(tmp_path / "cr" / "cr.dcm", PatientAge="004Y")
    (ref,) = discover(tmp_path).series
    children = replace(CHEST_XR, age_range=(1, 5))
    assert match_rank(children, ref) == FULL_MATCH
    assert match_rank(children, replace(ref, age_years=1)) == FULL_MATCH
    assert match_rank(children, replace(ref, age_years=45)) == NO_MATCH
    assert match_rank(children, replace(ref, age_years=0)) == NO_MATCH
    assert match_rank(children, replace(ref, age_years=None)) == NO_MATCH
    accepting = replace(children, age_fallback="accept")
    assert match_rank(accepting, replace(ref, age_years=None)) == FALLBACK_MATCH
    assert match_rank(CHEST_XR, replace(ref, age_years=45)) == FULL_MATCH  # no range: any age


def test_out_of_scope_reason_names_age_without_the_age(tmp_path: Path) -> None:
    _radiograph(tmp_path / "adult" / "cr.dcm", PatientAge="045Y")
    _radiograph(tmp_path / "child" / "cr.dcm", PatientAge="003Y")
    nobody = _radiograph(tmp_path / "unknown" / "cr.dcm")
    ds = pydicom.dcmread(nobody)
    del ds.PatientBirthDate
    ds.save_as(nobody, enforce_file_format=True)
    routed = route_discovery(discover(tmp_path), [replace(CHEST_XR, age_range=(1, 5))])
    reasons = {r.path.split("/")[0]: r.reason for r in routed.disc.files if r.status == "skipped"}
    assert set(reasons) == {"adult", "unknown"} and routed.out_of_scope_series == 2
    assert reasons["adult"] == "outside every model's scope (CR, CHEST, PA; age outside its range)"
    assert reasons["unknown"].endswith("; age unknown)")
    assert not any(ch.isdigit() for r in reasons.values() for ch in r)


@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
def test_derive_scope_spans_the_training_ages(tmp_path: Path) -> None:
    _radiograph(tmp_path / "a" / "cr.dcm", PatientAge="002Y")
    _radiograph(tmp_path / "b" / "cr.dcm", PatientAge="060M")
    _radiograph(tmp_path / "c" / "cr.dcm", PatientAge="junk", PatientBirthDate="")
    scope = derive_scope(discover(tmp_path).series, {})
    assert scope.age_range == (2, 5) and scope.source == "archive headers"
    no_ages = [replace(r, age_years=None) for r in discover(tmp_path).series]
    assert derive_scope(no_ages, {}).age_range == ()


def test_default_chest_model_takes_children_only(tmp_path: Path) -> None:
    from jobs.screen import resolve_model
    from model.default import default_model_paths
    from pdd_batch.ingest.scope import route

    head, chest = (resolve_model(p).scope for p in default_model_paths())
    assert chest.age_range == (1, 5) and chest.age_fallback == "reject"
    assert head.age_range == ()
    for folder, age in [("adult", "045Y"), ("child", "004Y"), ("infant", "006M")]:
        _radiograph(tmp_path / folder / "cr.dcm", PatientAge=age)
    disc = discover(tmp_path)
    routes = dict(zip((Path(r.files[0]).parent.name for r in disc.series),
                      route(disc.series, [head, chest]), strict=True))  # fmt: skip
    assert routes == {"adult": None, "child": 1, "infant": None}
