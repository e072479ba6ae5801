"""Model scope: header facts, parsing, derivation from a training archive, routing a mixed
archive to a model set (and to none), old checkpoints without a scope."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from dicom_factory import write_ct_series
from scope_support import (
    CHEST_XR,
    EXPECTED,
    HEAD_CT,
    folder_of,
    make_mixed_archive,
    scopes,
    tag,
)

from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.scope import (
    FALLBACK_MATCH,
    FULL_MATCH,
    NO_MATCH,
    UNKNOWN_SCOPE,
    ModelScope,
    ScopeError,
    derive_scope,
    match_rank,
    parse_scope,
    route,
    route_discovery,
)


def test_parse_scope_normalises_and_names_bad_keys() -> None:
    s = parse_scope("modality=ct,body_part=brain,orientation=axial,fallback=reject")
    assert s.modalities == ("CT",) and s.body_parts == ("HEAD",) and s.orientations == ("axial",)
    assert s.fallback == "reject" and s.known
    assert parse_scope("modality=CR/DX,body_part=chest,orientation=pa/ap").orientations == (
        "PA",
        "AP",
    )
    for bad, key in [
        ("body_part=HEAD", "modality"),
        ("modality=CT", "body_part"),
        ("modality=CT,body_part=HEAD,colour=red", "colour"),
        ("modality=CT,body_part=ELBOWS", "ELBOWS"),
        ("modality=CT,body_part=HEAD,orientation=diagonal", "(?i)diagonal"),
        ("modality=CT,body_part", "body_part"),
    ]:
        with pytest.raises(ScopeError, match=key):
            parse_scope(bad)
    assert ModelScope.from_dict(s.to_dict()) == s
    assert ModelScope.from_dict(None) == UNKNOWN_SCOPE == ModelScope.from_dict("unknown")


def test_discovery_keeps_body_part_and_view_terms_only(tmp_path: Path) -> None:
    root = make_mixed_archive(tmp_path / "a")
    free = write_ct_series(tmp_path / "a" / "free", n_slices=2, rows=16, cols=16, seed=9)
    tag(free, BodyPartExamined="SMITH_JOHN", SeriesDescription="Smith John follow-up")
    by_folder = {folder_of(r.files): r for r in discover(root).series}
    assert by_folder["ct_head"].body_part == "HEAD"
    assert by_folder["ct_chest"].body_part == "CHEST"  # from "CT THORAX W CONTRAST"
    assert by_folder["mr_brain"].body_part == "BRAIN"
    assert (by_folder["cr_chest"].body_part, by_folder["cr_chest"].view) == ("CHEST", "PA")
    assert (by_folder["nifti_ct"].modality, by_folder["nifti_ct"].body_part) == ("CT", "HEAD")
    assert (by_folder["nifti_plain"].modality, by_folder["nifti_plain"].body_part) == ("OT", "")
    assert by_folder["free"].body_part == ""  # free text is never kept
    ref = by_folder["cr_chest"]
    assert type(ref).from_dict(ref.to_dict()) == ref


def test_scope_derived_from_a_synthetic_training_archive(tmp_path: Path) -> None:
    for i in range(2):
        paths = write_ct_series(tmp_path / f"s{i}", n_slices=3, rows=16, cols=16, seed=i)
        tag(paths, BodyPartExamined="BRAIN")
    scope = derive_scope(discover(tmp_path).series, {"axis": "axial", "ct_window": "brain"})
    assert (scope.modalities, scope.body_parts, scope.orientations) == (
        ("CT",),
        ("HEAD",),
        ("axial",),
    )
    assert scope.domain == "CT HU, brain window 40/80" and scope.source == "archive headers"


def test_mixed_archive_routes_to_two_models_and_the_rest_is_skipped(tmp_path: Path) -> None:
    disc = discover(make_mixed_archive(tmp_path / "a"))
    routed = route_discovery(disc, scopes())
    got = {folder_of(r.files): i for i, refs in enumerate(routed.by_model) for r in refs}
    assert got == {k: v for k, (v, _) in EXPECTED.items() if v is not None}
    skipped = {folder_of([f.path]): f.reason for f in routed.disc.files if f.status == "skipped"}
    for folder, (target, facts) in EXPECTED.items():
        if target is None:
            assert skipped[folder] == f"outside every model's scope {facts}"
    assert routed.out_of_scope_series == 3
    assert routed.out_of_scope_files == sum(
        len(r.files) for r in disc.series if EXPECTED[folder_of(r.files)][0] is None
    )
    counts = routed.disc.counts()  # every file still accounted for
    assert counts["seen"] == disc.counts()["seen"]
    assert counts["skipped"] == disc.counts()["skipped"] + routed.out_of_scope_files
    assert counts["used"] + counts["skipped"] + counts["failed"] == counts["seen"]


def test_a_model_set_that_matches_nothing_skips_everything(tmp_path: Path) -> None:
    disc = discover(make_mixed_archive(tmp_path / "a"))
    knee = parse_scope("modality=MR,body_part=KNEE,orientation=sagittal,fallback=reject")
    routed = route_discovery(disc, [knee])
    assert routed.by_model == ((),) and routed.disc.series == []
    assert routed.out_of_scope_series == len(disc.series)
    assert {f.status for f in routed.disc.files} == {"skipped"}


def test_rank_rules_fallback_unknown_and_ties(tmp_path: Path) -> None:
    by_folder = {folder_of(r.files): r for r in discover(make_mixed_archive(tmp_path)).series}
    head = by_folder["ct_head"]
    no_part = replace(head, body_part="")
    assert match_rank(HEAD_CT, head) == FULL_MATCH
    assert match_rank(HEAD_CT, no_part) == FALLBACK_MATCH
    assert match_rank(replace(HEAD_CT, fallback="reject"), no_part) == NO_MATCH
    assert match_rank(CHEST_XR, by_folder["cr_chest"]) == FULL_MATCH
    assert match_rank(CHEST_XR, replace(by_folder["cr_chest"], view="LL")) == NO_MATCH
    assert match_rank(CHEST_XR, replace(by_folder["cr_chest"], modality="DX")) == FULL_MATCH
    # a thin coronal stack cannot be resliced axially; a thick one can
    coronal = replace(head, orientation="coronal", shape=(4, 32, 32))
    assert match_rank(HEAD_CT, coronal) == NO_MATCH
    assert match_rank(HEAD_CT, replace(coronal, shape=(40, 32, 32))) == FULL_MATCH
    # an old checkpoint (unknown scope) takes anything, but a matching scope is preferred
    assert route([by_folder["mr_brain"], head], [UNKNOWN_SCOPE, HEAD_CT]) == [0, 1]
    assert route([head], [HEAD_CT, HEAD_CT]) == [0]  # ties: the model named first


def test_train_on_an_archive_records_the_derived_scope(tmp_path: Path) -> None:
    from jobs.train import TrainConfig, train_model
    from model.checkpoint import load_checkpoint
    from model.config import get_config

    for i in range(2):
        paths = write_ct_series(tmp_path / "arc" / f"s{i}", n_slices=3, rows=32, cols=32, seed=i)
        tag(paths, BodyPartExamined="HEAD")
    cfg = replace(get_config("test"), image_size=32)
    train_model(tmp_path / "arc", tmp_path / "ck", cfg, TrainConfig(epochs=1, batch_size=4))
    scope = ModelScope.from_dict(load_checkpoint(tmp_path / "ck").meta["scope"])
    assert (scope.modalities, scope.body_parts, scope.orientations) == (
        ("CT",),
        ("HEAD",),
        ("axial",),
    )


def test_old_checkpoint_without_scope_loads_as_unknown(tmp_path: Path) -> None:
    from screen_support import make_checkpoint

    from jobs.screen import resolve_model
    from model.checkpoint import load_checkpoint, set_scope

    ckpt = make_checkpoint(tmp_path / "ck")
    cfg_path = ckpt / "config.json"
    meta = json.loads(cfg_path.read_text())
    meta.pop("scope", None)  # written before scopes existed
    cfg_path.write_text(json.dumps(meta))
    assert load_checkpoint(ckpt).model_id == meta["model_id"]
    assert resolve_model(ckpt).scope == UNKNOWN_SCOPE
    set_scope(ckpt, HEAD_CT.to_dict())  # the weights, hence the model_id, do not change
    info = resolve_model(ckpt)
    assert info.scope == HEAD_CT and info.model_id == meta["model_id"]


def test_the_embedded_default_is_a_head_ct_model() -> None:
    from jobs.screen import resolve_model

    scope = resolve_model(None).scope
    assert (scope.modalities, scope.body_parts, scope.orientations) == (
        ("CT",),
        ("HEAD",),
        ("axial",),
    )
