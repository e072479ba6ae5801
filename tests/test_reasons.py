"""The one reason scrubber (pdd_batch.ingest.reasons) used by readers, read tasks and export."""

from __future__ import annotations

from pdd_batch.ingest.reasons import exception_reason, scrub_reason


def test_masks_paths_bytes_and_instance_uids_but_keeps_standard_uids() -> None:
    text = (
        "cannot read /data/DOE^JOHN/IM1.dcm: value b'SMITH' in 1.3.6.1.4.1.9590.100.1.2.3 "
        "with syntax 1.2.840.10008.1.2.4.70"
    )
    out = scrub_reason(text)
    assert "DOE" not in out and "SMITH" not in out and "9590" not in out
    assert out.count("<path>") == 1 and "<bytes>" in out and "<uid>" in out
    assert "1.2.840.10008.1.2.4.70" in out


def test_one_line_and_bounded() -> None:
    out = scrub_reason("a\n  b\t c" + "x" * 1000, limit=50)
    assert out.startswith("a b c") and len(out) == 50


def test_exception_reason_names_the_type() -> None:
    assert (
        exception_reason(ValueError("bad frame /tmp/PAT/x.dcm")) == "ValueError: bad frame <path>"
    )
    assert exception_reason(KeyError()) == "KeyError"
