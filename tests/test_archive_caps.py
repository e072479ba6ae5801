"""The compression-ratio cap on total output (issue 21 item 6): a compressed tar is one stream,
so its decompressed output is capped at ``--max-compression-ratio`` times the archive's size; a
.nii.gz of several gzip members, or with bytes padded after its stream, is capped on what its
gzip members inflate to, not on the padded file size. Crafted files are written by streaming
zeros, so the tests themselves stay small in memory."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_ct_series, write_nifti
from hostile_factory import BOMB_BYTES, padded_nifti_bomb, ratio_tar
from typer.testing import CliRunner

from pdd_batch.cli.app import app
from pdd_batch.ingest.archive_io import IngestLimits, MemberReader, OverLimitError
from pdd_batch.ingest.discovery import discover
from pdd_batch.ingest.nifti_volume import NiftiReadError, read_nifti_info
from pdd_batch.ingest.volume import load_series

RATIO = IngestLimits().max_compression_ratio
TAR_SUFFIXES = ("tar.gz", "tgz", "tar.bz2", "tar.xz")


def _inspect(root: Path) -> tuple[dict, int]:
    """``pdd-batch inspect --open-archives --json --show-paths`` in this process; returns the
    report and the peak of Python allocations during the command."""
    tracemalloc.start()
    try:
        result = CliRunner().invoke(
            app, ["inspect", str(root), "--open-archives", "--json", "--show-paths"]
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.exit_code == 0, result.output
    return json.loads(result.output), peak


@pytest.mark.parametrize("suffix", TAR_SUFFIXES)
def test_compressed_tar_member_past_the_ratio_cap_is_refused_unread(
    tmp_path: Path, suffix: str
) -> None:
    """A good instance, a 64 MiB member of zeros (the archive: ~70 kB), one more member: the
    good one is used, the bomb is a failed row naming the cap, and listing stops at the cap (the
    archive's own failed row says so); nothing near the member's size is allocated."""
    good = write_ct_series(tmp_path / "src", n_slices=1, seed=3)[0].read_bytes()
    root = tmp_path / "root"
    archive = ratio_tar(root / f"batch.{suffix}", [("good.dcm", good), ("zeros.dcm", BOMB_BYTES),
                                              ("after.dcm", good)])  # fmt: skip
    assert BOMB_BYTES > RATIO * archive.stat().st_size  # the member alone is over the cap
    report, peak = _inspect(root)
    rows = {e["file"]: e for e in report["errors"]}
    assert set(rows) == {f"batch.{suffix}!zeros.dcm", f"batch.{suffix}"}
    bomb = rows[f"batch.{suffix}!zeros.dcm"]
    assert bomb["status"] == "failed" and "compression-ratio cap" in bomb["reason"]
    assert "--max-compression-ratio" in bomb["reason"]
    assert "listing stopped after 2 member(s)" in rows[f"batch.{suffix}"]["reason"]
    assert report["files"]["used"] == 1 and len(report["series"]) == 1
    assert peak < BOMB_BYTES // 4, f"peak Python allocation {peak} bytes"


def test_workers_read_members_before_the_cap_and_refuse_those_past_it(tmp_path: Path) -> None:
    """``MemberReader`` (the read tasks' reader) finds a member without listing the whole
    archive, so a bomb after it never blocks it; the bomb and what follows it are refused."""
    good = write_ct_series(tmp_path / "src", n_slices=1, seed=3)[0].read_bytes()
    ratio_tar(tmp_path / "root" / "b.tgz", [("good.dcm", good), ("zeros.dcm", BOMB_BYTES),
                                       ("after.dcm", good)])  # fmt: skip
    with MemberReader(tmp_path / "root") as reader:
        assert reader.read("b.tgz!good.dcm") == good
        for member in ("zeros.dcm", "after.dcm"):
            with pytest.raises(OverLimitError, match="compression-ratio cap"):
                reader.read(f"b.tgz!{member}")
        assert reader.read("b.tgz!good.dcm") == good  # still readable afterwards


def test_compressed_tar_under_the_cap_reads_whole(tmp_path: Path) -> None:
    """The same archive is read whole under a higher cap (the cap, not the shape, refuses)."""
    good = write_ct_series(tmp_path / "src", n_slices=1, seed=3)[0].read_bytes()
    ratio_tar(tmp_path / "root" / "b.tar.gz", [("zeros.dcm", BOMB_BYTES), ("after.dcm", good)])
    limits = IngestLimits(max_compression_ratio=100_000)
    by_path = {
        r.path: r for r in discover(tmp_path / "root", open_archives=True, limits=limits).files
    }
    assert by_path["b.tar.gz!after.dcm"].status == "used"
    assert "b.tar.gz" not in by_path  # no archive-level failure


def test_plain_tar_whose_first_name_looks_like_bzip2_is_read_as_tar(tmp_path: Path) -> None:
    """Compression is told by the stream's magic, not a prefix a member name can have."""
    good = write_ct_series(tmp_path / "src", n_slices=1, seed=3)[0].read_bytes()
    archive = ratio_tar(tmp_path / "root" / "b.tar", [("BZh91AY_notes.txt", b"x"), ("a.dcm", good)])
    assert archive.read_bytes().startswith(b"BZh9")
    by_path = {r.path: r for r in discover(tmp_path / "root", open_archives=True).files}
    assert by_path["b.tar!a.dcm"].status == "used" and "b.tar" not in by_path
    with MemberReader(tmp_path / "root") as reader:
        assert reader.read("b.tar!a.dcm") == good


# ---- .nii.gz: several gzip members, padding ------------------------------------------------


@pytest.mark.parametrize("tail_as_member", [False, True], ids=["padded", "second_member"])
def test_nifti_gz_padded_past_its_stream_is_capped_on_its_gzip_output(
    tmp_path: Path, tail_as_member: bool
) -> None:
    """64 MiB of zeros in ~65 kB plus 40 kB of random bytes: the file size alone would put it
    under the cap (~640x); the bytes that inflate to the promised size are over it (~1000x)."""
    tail = np.random.default_rng(0).bytes(40_000)
    path = padded_nifti_bomb(tmp_path / "vol.nii.gz", tail, tail_as_member)
    assert BOMB_BYTES < RATIO * path.stat().st_size  # what the file-size check let through
    with pytest.raises(NiftiReadError, match="compression-ratio cap"):
        read_nifti_info(tmp_path, "vol.nii.gz")
    (rec,) = discover(tmp_path).files
    assert rec.status == "failed" and "--max-compression-ratio" in rec.reason


def test_nifti_gz_of_several_members_reads_like_one(tmp_path: Path) -> None:
    """A legitimate multi-member .nii.gz (e.g. written in blocks) passes the cap and decodes to
    the same voxels as the single-member file."""
    single, _ = write_nifti(tmp_path / "one" / "vol.nii.gz", shape=(20, 16, 8))
    data = gzip.decompress(single.read_bytes())
    blocks = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    multi = tmp_path / "many" / "vol.nii.gz"
    multi.parent.mkdir()
    multi.write_bytes(b"".join(gzip.compress(b) for b in blocks))
    assert len(blocks) > 2
    a, b = (discover(p.parent).series[0] for p in (single, multi))
    va = load_series(single.parent, a).volumes[0].data
    vb = load_series(multi.parent, b).volumes[0].data
    np.testing.assert_array_equal(va, vb)
    # the last gzip size field is one block's: the size check took the several-member path
    assert int.from_bytes(multi.read_bytes()[-4:], "little") != len(data)
