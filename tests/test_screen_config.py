"""Run config validation, stable sharding, series fingerprints and safe error reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.screen import series_fingerprint, stable_shard
from pdd_batch.ingest.discovery import SeriesRef
from pdd_batch.ingest.reasons import scrub_reason
from pdd_batch.runs.config import RunConfig, RunConfigError


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("batch_size", 0),
        ("num_actors", -1),
        ("rows_per_file", 0),
        ("flush_seconds", 0.0),
        ("topk", 0),
        ("run_id", "a/b"),
        ("precision", "fp16"),
    ],
)
def test_bad_options_raise_naming_the_key(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(RunConfigError, match=key):
        RunConfig(archive=tmp_path, out_dir=tmp_path / "o", **{key: value})


def test_address_falls_back_to_ray_address(tmp_path: Path, monkeypatch) -> None:
    cfg = RunConfig(archive=tmp_path, out_dir=tmp_path / "o")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cfg.resolved_address is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cfg.resolved_address == "10.0.0.1:6379"
    assert cfg.with_updates(address="head:6379").resolved_address == "head:6379"
    assert RunConfig(archive=tmp_path, out_dir=tmp_path).run_id != cfg.run_id


def test_shards_are_stable_and_spread() -> None:
    keys = [f"{i:016x}" for i in range(400)]
    shards = [stable_shard(k, 8) for k in keys]
    assert shards == [stable_shard(k, 8) for k in keys]  # no per-process salt, unlike hash()
    assert stable_shard("abc", 8) == int("ba7816bf8f01", 16) % 8  # sha256("abc") prefix
    assert min(shards.count(s) for s in range(8)) > 20


def test_fingerprint_changes_with_the_files_of_a_series(tmp_path: Path) -> None:
    (tmp_path / "a.dcm").write_bytes(b"12")
    (tmp_path / "b.dcm").write_bytes(b"34")
    ref = SeriesRef("s", "st", "dicom", "CT", ("a.dcm", "b.dcm"))
    fp = series_fingerprint(tmp_path, ref)
    assert fp == series_fingerprint(
        tmp_path, SeriesRef("s", "st", "dicom", "CT", ("b.dcm", "a.dcm"))
    )
    (tmp_path / "b.dcm").write_bytes(b"345")
    assert series_fingerprint(tmp_path, ref) != fp
    assert series_fingerprint(tmp_path, SeriesRef("s", "st", "dicom", "CT", ("a.dcm",))) != fp


def test_error_reasons_carry_no_uids_and_stay_short() -> None:
    text = "ValueError: bad frame in 1.2.840.113619.2.55.3.604688119\n  at  offset 12" + "x" * 999
    out = scrub_reason(text)
    assert "1.2.840" not in out and "<uid>" in out and "\n" not in out and len(out) <= 300


def test_fingerprint_of_archive_members_follows_the_archive_file(tmp_path: Path) -> None:
    (tmp_path / "s.zip").write_bytes(b"PK" + b"0" * 10)
    ref = SeriesRef("s", "st", "dicom", "CT", ("s.zip!a.dcm", "s.zip!b.dcm"))
    fp = series_fingerprint(tmp_path, ref)
    (tmp_path / "s.zip").write_bytes(b"PK" + b"0" * 11)
    assert series_fingerprint(tmp_path, ref) != fp


def test_fingerprint_changes_when_a_file_is_rewritten_at_the_same_size(tmp_path: Path) -> None:
    """A corrected file of the same length (edited header value, fixed pixels) is a change."""
    import os

    path = tmp_path / "a.dcm"
    path.write_bytes(b"1234")
    ref = SeriesRef("s", "st", "dicom", "CT", ("a.dcm",))
    fp = series_fingerprint(tmp_path, ref)
    before = path.stat().st_mtime_ns
    path.write_bytes(b"9999")
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a later write, whatever the clock tick
    assert series_fingerprint(tmp_path, ref) != fp


def test_read_failure_log_names_no_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """File names may carry patient ids: neither the worker's log line nor the reason hold one."""
    import logging

    from dicom_factory import truncate_file, write_ct_series

    from jobs.read_task import KIND_ERROR, read_series
    from pdd_batch.ingest.discovery import discover
    from pdd_batch.ingest.preprocess import PreprocessSpec

    files = write_ct_series(tmp_path / "DOE_JOHN_12345", n_slices=1, rows=32, cols=32, seed=9)
    (ref,) = discover(tmp_path).series
    truncate_file(files[0], keep_fraction=0.75)  # after discovery, which would refuse it
    with caplog.at_level(logging.WARNING, logger="jobs.read_task"):
        blocks = list(read_series(tmp_path, ref, PreprocessSpec(image_size=32), 8))
    assert blocks[-1]["kind"] == [KIND_ERROR] and "DOE_JOHN" not in blocks[-1]["reason"][0]
    assert caplog.records and not any("DOE_JOHN" in r.getMessage() for r in caplog.records)


def test_precision_reaches_the_job_entry_point(tmp_path: Path) -> None:
    from jobs.entry_screen import build_parser, config_from_args

    args = build_parser().parse_args([str(tmp_path), "--out", str(tmp_path / "o")])
    assert config_from_args(args).precision == "fp32"
    args = build_parser().parse_args(
        [str(tmp_path), "--out", str(tmp_path / "o"), "--precision", "bf16"]
    )
    assert config_from_args(args).precision == "bf16"


def test_teacher_weights_reach_the_job_entry_point_as_absolute_paths(
    tmp_path: Path, monkeypatch
) -> None:
    from jobs.entry_screen import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    base = [str(tmp_path), "--out", str(tmp_path / "o")]
    assert config_from_args(build_parser().parse_args(base)).teacher_weights == {}
    args = build_parser().parse_args(
        [*base, "--teacher-weights", "cnn=w/cnn.pth", "--teacher-weights", "mamba=/m.pth"]
    )
    cfg = config_from_args(args)
    assert cfg.teacher_weights == {"cnn": str(tmp_path / "w" / "cnn.pth"), "mamba": "/m.pth"}
    assert cfg.to_dict()["teacher_weights"] == cfg.teacher_weights  # recorded in the manifest
    for bad in ("head=/x.pth", "cnn=", "cnn"):
        with pytest.raises(RunConfigError, match="ROLE=PATH"):
            config_from_args(build_parser().parse_args([*base, "--teacher-weights", bad]))
    with pytest.raises(RunConfigError, match="teacher_weights"):
        RunConfig(archive=tmp_path, out_dir=tmp_path, teacher_weights={"head": "/x.pth"})


def test_failure_reason_names_the_error_an_actor_died_of() -> None:
    from jobs.read_task import failure_reason

    class ActorDiedError(RuntimeError):
        pass

    ray_text = (  # the shape of Ray's text for an actor that raised in its constructor
        "The actor died because of an error raised in its creation task, \x1b[36mray::MapWorker"
        "(MapBatches(SlicePredictor)).__init__()\x1b[39m (pid=1, ip=10.0.0.1)\n"
        '  File "/x/jobs/predictor.py", line 60, in __init__\n    loaded = load_checkpoint(\n'
        "model.teachers.TeacherWeightsError: the cnn teacher's weights are not at /w/cnn.pth"
    )
    assert failure_reason(ActorDiedError(ray_text)) == (
        "TeacherWeightsError: the cnn teacher's weights are not at /w/cnn.pth"
    )
    assert failure_reason(ValueError("no traceback here")) == "ValueError: no traceback here"


def test_ingest_caps_and_link_policy_reach_the_run(tmp_path: Path) -> None:
    from jobs.entry_screen import build_parser, config_from_args

    args = build_parser().parse_args(
        [str(tmp_path), "--out", str(tmp_path / "o"), "--follow-links-outside",
         "--max-series-voxels", "1000", "--max-compression-ratio", "50"]
    )  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.follow_links_outside and cfg.limits.max_series_voxels == 1000
    assert cfg.limits.max_compression_ratio == 50.0
    assert cfg.to_dict()["max_member_bytes"] == cfg.limits.max_member_bytes  # in the manifest
    with pytest.raises(RunConfigError, match="max_frames_per_file"):
        RunConfig(archive=tmp_path, out_dir=tmp_path / "o", max_frames_per_file=0)
