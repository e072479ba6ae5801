"""Two instances claim one slice: the readable one wins (issue 21, item 3).

A damaged copy of an instance (same SOP Instance UID, cut short) or a pixel-less instance at the
same position sits in a folder that sorts first, so a reader that trusted it would keep it and
drop the good original as a duplicate. Discovery checks the pixel data of every header before
duplicates are dropped: the damaged copy is a ``failed`` record with its reason and the good one
is used. An instance only the read stage finds bad is a ``failed`` input of a screen, not skipped.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pydicom
import pytest
from dicom_factory import slice_values, write_ct_series
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid
from screen_support import make_checkpoint

from pdd_batch.ingest.discovery import discover, discovery_report
from pdd_batch.ingest.volume import load_series

SLICES = 5


def _cut_before_pixels(src: Path, dest: Path) -> Path:
    """A copy of ``src`` (same SOP Instance UID) cut just before its pixel data element."""
    raw = src.read_bytes()
    at = raw.rfind(b"\xe0\x7f\x10\x00")  # the (7FE0,0010) tag, little endian
    assert at > 0
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(raw[:at])
    return dest


def _cut_in_fragments(src: Path, dest: Path) -> Path:
    """A copy of the RLE file ``src`` cut inside its compressed fragment."""
    raw = src.read_bytes()
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(raw[: len(raw) - 40])
    return dest


def _without_pixels(src: Path, dest: Path) -> Path:
    """Another instance at ``src``'s position (same InstanceNumber) whose pixel data is gone."""
    ds = pydicom.dcmread(src)
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _undecodable(src: Path, dest: Path) -> Path:
    """A copy of ``src`` (same UIDs) whose RLE payload is garbage: its header and fragment items
    are intact, so only decoding finds it bad."""
    ds = pydicom.dcmread(src)
    header = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (80).to_bytes(4, "little")
    ds.PixelData = encapsulate([header + bytes(52) + bytes([5]) * 40])
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    dest.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def _statuses(root: Path) -> dict[str, tuple[str, str]]:
    return {r.path: (r.status, r.reason) for r in discover(root).files}


def test_truncated_copy_with_the_same_uid_never_displaces_the_original(tmp_path: Path) -> None:
    good = write_ct_series(tmp_path / "z_good", n_slices=SLICES, seed=1)
    cut = _cut_before_pixels(good[1], tmp_path / "a_cut" / good[1].name)
    status = _statuses(tmp_path)
    rel = cut.relative_to(tmp_path).as_posix()
    assert status[rel][0] == "failed" and "no pixel data" in status[rel][1]
    for path in good:
        assert status[path.relative_to(tmp_path).as_posix()] == ("used", "")
    (ref,) = discover(tmp_path).series
    assert ref.n_slices == SLICES and rel not in ref.files


def test_cut_rle_copy_is_failed_and_the_original_used(tmp_path: Path) -> None:
    good = write_ct_series(
        tmp_path / "z_good", n_slices=SLICES, rows=32, cols=32, seed=2, transfer_syntax=RLELossless
    )
    cut = _cut_in_fragments(good[2], tmp_path / "a_cut" / good[2].name)
    status = _statuses(tmp_path)
    rel = cut.relative_to(tmp_path).as_posix()
    assert status[rel][0] == "failed" and "cut short" in status[rel][1]
    assert all(status[p.relative_to(tmp_path).as_posix()][0] == "used" for p in good)
    (ref,) = discover(tmp_path).series
    loaded = load_series(tmp_path, ref)
    assert loaded.n_slices == SLICES and not loaded.unreadable


def test_pixel_less_instance_at_the_same_position_is_failed(tmp_path: Path) -> None:
    good = write_ct_series(tmp_path / "z_good", n_slices=SLICES, seed=3)
    empty = _without_pixels(good[3], tmp_path / "a_empty" / good[3].name)
    status = _statuses(tmp_path)
    rel = empty.relative_to(tmp_path).as_posix()
    assert status[rel][0] == "failed" and "no pixel data" in status[rel][1]
    (ref,) = discover(tmp_path).series
    loaded = load_series(tmp_path, ref)
    assert loaded.n_slices == SLICES
    assert loaded.volumes[0].data[3].tolist() == slice_values(3, 16, 12).tolist()


def test_a_copied_folder_without_instance_numbers_is_one_volume(tmp_path: Path) -> None:
    # No InstanceNumber: only the SOP Instance UID says the copies are the same instances (not a
    # second time point).
    for path in write_ct_series(tmp_path / "a", n_slices=SLICES, seed=4):
        ds = pydicom.dcmread(path)
        del ds.InstanceNumber
        ds.save_as(path, enforce_file_format=True)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    result = discover(tmp_path)
    (ref,) = result.series
    assert ref.n_volumes == 1 and ref.n_slices == SLICES
    copies = [r for r in result.files if r.status == "skipped"]
    assert len(copies) == SLICES and all("SOP Instance UID" in r.reason for r in copies)
    assert any("duplicate instance" in w for w in ref.warnings)


def test_copy_cut_inside_a_long_header_is_failed(tmp_path: Path) -> None:
    # a 200 kB private element (like a Siemens CSA header): the file is longer than the first
    # read of the header scan, and the copy ends inside that element
    good = write_ct_series(tmp_path / "z_good", n_slices=SLICES, seed=10)
    ds = pydicom.dcmread(good[0])
    ds.private_block(0x0029, "TEST LONG HEADER", create=True).add_new(0x10, "OB", bytes(200_000))
    ds.save_as(good[0], enforce_file_format=True)
    cut = tmp_path / "a_cut" / good[0].name
    cut.parent.mkdir()
    cut.write_bytes(good[0].read_bytes()[:150_000])
    status = _statuses(tmp_path)
    assert status[f"a_cut/{cut.name}"] == ("failed", "truncated file: data set cut short")
    assert all(status[p.relative_to(tmp_path).as_posix()][0] == "used" for p in good)


def test_truncated_rle_file_is_failed_at_discovery(tmp_path: Path) -> None:
    (path,) = write_ct_series(
        tmp_path, n_slices=1, rows=32, cols=32, seed=5, transfer_syntax=RLELossless
    )
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2 + 200])
    ((status, reason),) = _statuses(tmp_path).values()
    assert status == "failed" and "cut short" in reason


def test_rle_cut_at_a_fragment_boundary_is_failed_at_discovery(tmp_path: Path) -> None:
    # only the sequence delimiter item is missing: pydicom would drop the whole pixel data
    (path,) = write_ct_series(
        tmp_path, n_slices=1, rows=32, cols=32, seed=6, transfer_syntax=RLELossless
    )
    raw = path.read_bytes()
    assert raw.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00")
    path.write_bytes(raw[:-8])
    ((status, reason),) = _statuses(tmp_path).values()
    assert status == "failed" and "cut short" in reason


def test_an_undecodable_copy_kept_at_discovery_gives_way_to_the_original(tmp_path: Path) -> None:
    # Header and fragment items intact: only decoding finds the copy bad. Discovery keeps it (it
    # sorts first) and the original is a spare of the series; the read stage falls back to it.
    good = write_ct_series(
        tmp_path / "z_good", n_slices=SLICES, rows=32, cols=32, seed=9, transfer_syntax=RLELossless
    )
    copy = _undecodable(good[2], tmp_path / "a_copy" / good[2].name)
    disc = discover(tmp_path)
    (ref,) = disc.series
    copy_rel, good_rel = (p.relative_to(tmp_path).as_posix() for p in (copy, good[2]))
    assert copy_rel in ref.files and ref.spares == (good_rel,)
    assert "spares" not in discovery_report(disc)["series"][0]  # paths stay out of inspect
    loaded = load_series(tmp_path, ref)
    assert loaded.n_slices == SLICES and set(loaded.unreadable) == {copy_rel}
    assert good_rel in loaded.volumes[0].source_files
    assert loaded.volumes[0].data[2].tolist() == (slice_values(2, 32, 32)).tolist()


@pytest.mark.ray
@pytest.mark.slow
def test_screen_scores_the_good_slice_and_fails_each_damaged_copy(
    tmp_path: Path, shared_ray
) -> None:
    from jobs.screen import run_screen
    from pdd_batch.ingest.keys import file_key
    from pdd_batch.runs.config import RunConfig

    root = tmp_path / "archive"
    good = write_ct_series(root / "z_ct", n_slices=SLICES, rows=32, cols=32, seed=7)
    rle = write_ct_series(
        root / "z_rle", n_slices=SLICES, rows=32, cols=32, seed=8, transfer_syntax=RLELossless
    )
    damaged = {
        _cut_before_pixels(good[1], root / "a_cut" / good[1].name): "no pixel data",
        _without_pixels(good[2], root / "a_empty" / good[2].name): "no pixel data",
        _cut_in_fragments(rle[1], root / "a_rle_cut" / rle[1].name): "cut short",
    }
    # the RLE series' last slice decodes to nothing: only the read stage can find it bad
    bad_rle = _undecodable(rle[-1], root / "z_rle" / rle[-1].name)
    # an undecodable copy of another RLE slice that discovery keeps (it sorts first): the read
    # stage falls back to the original
    bad_copy = _undecodable(rle[2], root / "a_rle_copy" / rle[2].name)
    out = tmp_path / "run"
    result = run_screen(
        RunConfig(archive=root, out_dir=out, model_path=make_checkpoint(tmp_path / "ckpt"))
    )
    m = result.manifest
    rels = {p.relative_to(root).as_posix() for p in root.rglob("*.dcm")}
    assert (
        m["inputs_seen"]
        == len(rels)
        == m["inputs_scored"] + m["inputs_skipped"] + m["inputs_failed"]
    )
    slices = pq.read_table(out / "slices").to_pandas()
    errors = pq.read_table(out / "errors").to_pandas().set_index("file_key")
    scored = set(slices["file_key"])
    assert {file_key(p.relative_to(root).as_posix()) for p in good} <= scored
    assert {file_key(p.relative_to(root).as_posix()) for p in rle[:-1]} <= scored
    assert scored | set(errors.index) == {file_key(r) for r in rels}
    for path, reason in damaged.items():
        row = errors.loc[file_key(path.relative_to(root).as_posix())]
        assert row["status"] == "failed" and reason in row["reason"], path.name
    for path in (bad_rle, bad_copy):
        row = errors.loc[file_key(path.relative_to(root).as_posix())]
        assert (row["status"], row["stage"]) == ("failed", "read") and "decode" in row["reason"]
    assert m["inputs_failed"] == len(damaged) + 2 and m["inputs_skipped"] == 0
