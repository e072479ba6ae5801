"""Discovery's header reads as Ray tasks sharded by folder (``jobs.discovery_shards``) on a
two-node cluster (both nodes on this machine): the driver merges into exactly the discovery and
file-index update of the in-process path; the manifest says how headers were read; a rerun with
nothing new reads no header; a shard whose worker dies loses no file."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest
from dicom_factory import (
    write_corrupt_dicom,
    write_ct_series,
    write_nifti,
    write_non_image,
    write_text,
)
from ray_support import local_cluster

from jobs.cluster import connect
from jobs.discovery_shards import CRASH_ON_FILE_ENV, CRASH_ONCE_SHARD_ENV, ShardedHeaderReader
from pdd_batch.ingest.discovery import Collector, discover, walk_files
from pdd_batch.ingest.file_index import FileIndex, discover_incremental
from pdd_batch.ingest.header_read import plan_shards
from pdd_batch.runs.discovery_index import discover_indexed
from pdd_batch.runs.state import RunState

SHARD = 3  # files per shard: the archive below needs several, and its big folder splits


@pytest.fixture(scope="module")
def cluster_info():
    """One two-node cluster for the module, this process connected to it."""
    with local_cluster(nodes=2, cpus_per_node=1) as cluster, connect(cluster.address) as info:
        assert info.nodes == 2
        yield info


def _archive(root: Path) -> Path:
    write_ct_series(root / "DOE^JANE" / "ct", n_slices=7, rows=32, cols=32, seed=1)  # splits
    write_ct_series(root / "DOE^JANE" / "mr", n_slices=2, modality="MR", seed=2)
    write_ct_series(root / "ROE^RICHARD" / "a", n_slices=3, add_scout=True, seed=3)
    write_corrupt_dicom(root / "ROE^RICHARD" / "a" / "broken.dcm")
    write_non_image(root / "ROE^RICHARD" / "sr.dcm", kind="SR")
    write_nifti(root / "nii" / "vol.nii.gz", shape=(8, 8, 3))
    write_text(root / "README.txt")
    return root


def _add_zip(root: Path) -> None:
    """A .zip of one series (members are never indexed: its container is read every run)."""
    packed = write_ct_series(root.parent / "to-pack", n_slices=2, seed=4)
    (root / "zips").mkdir()
    with zipfile.ZipFile(root / "zips" / "batch.zip", "w") as zf:
        for path in packed:
            zf.write(path, f"inner/{path.name}")


def _view(disc) -> tuple[list, list]:
    """Everything a discovery found, keys included, in its own order."""
    series = [repr(r.to_dict()) for r in disc.series]
    files = [(f.path, f.status, f.reason, f.series_key) for f in disc.files]
    return series, files


def _walked(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _shards_of(root: Path) -> int:
    """How many shards of ``SHARD`` files the walk of ``root`` makes."""
    walk = walk_files(root, Collector(root))
    return len(plan_shards([p.relative_to(root).as_posix() for p in walk], SHARD))


def test_plan_shards_cuts_by_folder_and_covers_every_file_once() -> None:
    rels = ["a/1", "a/2", "b/1", "c/1", "c/2", "c/3", "c/4", "c/5", "d/1"]
    shards = plan_shards(rels, 3)
    assert [i for s in shards for i in s] == list(range(len(rels)))  # each once, in order
    assert all(len(s) <= 3 for s in shards)
    folders = [{rels[i].split("/")[0] for i in s} for s in shards]
    # small folders packed whole; the big folder cut in pieces of 3 (its last piece packed
    # with the next folder)
    assert folders == [{"a", "b"}, {"c"}, {"c", "d"}]
    assert [len(s) for s in plan_shards(rels, 1)] == [1] * len(rels)
    assert len(plan_shards(rels, 100)) == 1 and plan_shards([], 3) == []


@pytest.mark.ray
@pytest.mark.slow
def test_sharded_discovery_equals_the_in_process_one(cluster_info, tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")
    _add_zip(archive)
    reader = ShardedHeaderReader(lambda: cluster_info, min_files=0, max_files=SHARD)
    disc, update = discover_incremental(archive, FileIndex(), read_headers=reader)
    local, local_update = discover_incremental(archive, FileIndex())
    assert _view(disc) == _view(local) == _view(discover(archive))
    assert update.files == local_update.files and update.series == local_update.series
    assert update.header_reads == local_update.header_reads == len(_walked(archive))
    assert update.shards == _shards_of(archive) > 3 and local_update.shards == 0
    statuses = {f.status for f in disc.files}
    assert statuses == {"used", "skipped", "failed"} and len(disc.series) == 4
    # .zip members are read in the task too, and merged like files
    opened, _ = discover_incremental(archive, FileIndex(), read_headers=reader, open_archives=True)
    assert _view(opened) == _view(discover(archive, open_archives=True))
    assert len(opened.series) == 5 and any("!" in f.path for f in opened.files)


def test_the_job_entry_point_takes_the_shard_settings(tmp_path: Path) -> None:
    from jobs.entry_screen import build_parser, config_from_args
    from pdd_batch.runs.config import RunConfig, RunConfigError

    base = [str(tmp_path), "--out", str(tmp_path / "o")]
    cfg = config_from_args(build_parser().parse_args(base))
    assert (cfg.discovery_shard_min_files, cfg.discovery_shard_files) == (
        RunConfig.discovery_shard_min_files, RunConfig.discovery_shard_files)  # fmt: skip
    args = [*base, "--discovery-shard-min-files", "0", "--discovery-shard-files", "64"]
    cfg = config_from_args(build_parser().parse_args(args))
    assert (cfg.discovery_shard_min_files, cfg.discovery_shard_files) == (0, 64)
    for bad in ({"discovery_shard_files": 0}, {"discovery_shard_min_files": -1}):
        with pytest.raises(RunConfigError):
            RunConfig(archive=tmp_path, out_dir=tmp_path, **bad)


def test_a_reader_below_its_threshold_starts_no_task(tmp_path: Path) -> None:
    archive = _archive(tmp_path / "archive")

    def no_cluster():
        raise AssertionError("the cluster was asked for below the threshold")

    reader = ShardedHeaderReader(no_cluster, min_files=10_000)
    disc, update = discover_incremental(archive, FileIndex(), read_headers=reader)
    assert update.shards == 0 and _view(disc) == _view(discover(archive))


@pytest.mark.ray
@pytest.mark.slow
def test_a_file_that_kills_its_worker_fails_alone_and_no_file_is_lost(
    cluster_info, tmp_path: Path
) -> None:
    archive = _archive(tmp_path / "archive")
    out = tmp_path / "out"
    os.environ[CRASH_ON_FILE_ENV] = "broken.dcm"  # every worker reading it dies
    try:
        reader = ShardedHeaderReader(lambda: cluster_info, min_files=0, max_files=SHARD,
                                     max_retries=0)  # fmt: skip
        disc, stats = discover_indexed(RunState.load(out), archive, read_headers=reader)
    finally:
        os.environ.pop(CRASH_ON_FILE_ENV)
    assert {f.path for f in disc.files} == _walked(archive)  # every file accounted for
    killed = [f for f in disc.files if f.reason.startswith("header read task failed")]
    assert [(f.path, f.status) for f in killed] == [("ROE^RICHARD/a/broken.dcm", "failed")]
    assert "WorkerCrashedError" in killed[0].reason and "ROE" not in killed[0].reason
    # the rest of its shard was read: the series of the in-process path, the same records
    local = discover(archive)
    assert _view(disc)[0] == _view(local)[0]
    others = [v for v in _view(disc)[1] if v[0] != killed[0].path]
    assert others == [v for v in _view(local)[1] if v[0] != killed[0].path]
    # the index did not keep it: the next run reads that one file again, and only it
    again, stats = discover_indexed(RunState.load(out), archive, read_headers=reader)
    assert stats == {"header_reads": 1, "files_unchanged": len(_walked(archive)) - 1,
                     "shards": 1}  # fmt: skip
    assert sorted(_view(again)[1]) == sorted(_view(local)[1])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("retries", [3, 0])  # Ray's retry; else the split of the failed shard
def test_a_worker_that_dies_once_changes_nothing(cluster_info, tmp_path: Path, retries) -> None:
    archive = _archive(tmp_path / "archive")
    (archive / "README.txt").unlink()  # the first shard (the one that dies) is then 3 files
    os.environ[CRASH_ONCE_SHARD_ENV] = str(tmp_path / "crashed-once")
    try:
        reader = ShardedHeaderReader(lambda: cluster_info, min_files=0, max_files=SHARD,
                                     max_retries=retries)  # fmt: skip
        disc, _ = discover_incremental(archive, FileIndex(), read_headers=reader)
    finally:
        os.environ.pop(CRASH_ONCE_SHARD_ENV)
    assert (tmp_path / "crashed-once").exists()
    assert _view(disc) == _view(discover(archive))


@pytest.mark.ray
@pytest.mark.slow
def test_screen_on_a_cluster_records_shards_and_a_rerun_reads_no_header(
    cluster_info, tmp_path: Path
) -> None:
    from scope_support import CHEST_XR
    from screen_support import make_scoped_checkpoint

    from jobs.screen import run_screen
    from pdd_batch.runs.config import RunConfig

    archive = _archive(tmp_path / "archive")
    # a chest-radiograph model: this archive holds none, so discovery is all the run does
    ckpt = make_scoped_checkpoint(tmp_path / "ckpt", 0, CHEST_XR.to_dict(), threshold=1.0)
    n_files = len(_walked(archive))

    def screen(run_id: str) -> dict:
        cfg = RunConfig(archive=archive, out_dir=tmp_path / "out", model_path=ckpt,
                        run_id=run_id, discovery_shard_min_files=0,
                        discovery_shard_files=SHARD)  # fmt: skip
        events = []
        result = run_screen(cfg, progress=events.append)
        assert result.manifest["inputs_lost"] == 0
        shards = [e for e in events if e.stage == "discover" and e.note == "header shards"]
        return {**result.manifest, "_shard_events": shards}

    first = screen("c1")
    assert first["discovery"] == {"header_reads": n_files, "files_unchanged": 0,
                                  "shards": _shards_of(archive)}  # fmt: skip
    shard_events = first["_shard_events"]
    assert [e.done for e in shard_events] == list(range(1, first["discovery"]["shards"] + 1))
    written = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written["discovery"] == first["discovery"] and first["series_out_of_scope"] == 4
    assert first["cluster"]["nodes"] == 2  # discovery connected to the cluster
    second = screen("c2")  # nothing new: no header read, no shard task
    assert second["discovery"] == {"header_reads": 0, "files_unchanged": n_files, "shards": 0}
    assert second["_shard_events"] == [] and second["series_screened_this_run"] == 0
