"""``--archive`` sources of `train` and `calibrate`: a folder of DICOM/NIfTI studies, or a PACS
(``dicomweb+http(s)://HOST/ROOT``) with ``--study-uid-file`` listing the site's normal studies.

The UIDs stay in memory: nothing here prints or stores them (the description says how many).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console


def _exit(console: Console, text: str) -> typer.Exit:
    console.print(f"[red]{text}[/]")
    return typer.Exit(code=2)


def archive_source(
    console: Console, data: str, study_uid_file: Path | None, netrc: Path | None
) -> Any:
    """DATA of ``--archive``: its folder (``Path``), or a ``jobs.pacs_studies.PacsStudies`` for
    a DICOMweb source; exit 2 with the reason when it cannot be used (no path or UID shown)."""
    from pdd_batch.ingest.dicomweb import (
        DicomwebError,
        Query,
        endpoint_from_source,
        is_dicomweb_source,
        read_study_uid_file,
    )

    if not is_dicomweb_source(data):
        if study_uid_file is not None or netrc is not None:
            raise _exit(console, "--study-uid-file and --netrc are for a dicomweb+ source")
        if not Path(data).exists():
            raise _exit(console, "archive not found (give a folder or dicomweb+http(s)://...)")
        return Path(data)
    if study_uid_file is None:
        raise _exit(
            console,
            "a dicomweb+ source needs --study-uid-file FILE: the site's normal studies, one "
            "StudyInstanceUID a line",
        )
    try:
        endpoint = endpoint_from_source(data, netrc)
        uids = read_study_uid_file(study_uid_file)
    except (DicomwebError, OSError) as exc:
        raise _exit(console, str(exc) if isinstance(exc, DicomwebError) else "study UID file "
                    "unreadable") from None  # fmt: skip
    if not uids:
        raise _exit(console, "the study UID file lists no StudyInstanceUID")
    from jobs.pacs_studies import PacsStudies

    return PacsStudies(endpoint, Query(study_uids=uids))


def describe_source(source: Any) -> str:
    """Identifier-free words for the checkpoint: where the studies came from."""
    if isinstance(source, Path):
        return "site archive (folder)"
    return f"site PACS over DICOMweb ({len(source.query.study_uids)} listed studies)"
