"""Stable, non-identifying keys: truncated SHA-256 of UIDs or archive-relative paths.

Raw DICOM UIDs identify a patient's study; they never leave discovery. Every study, series and
shard is named by one of these keys instead (stable across runs and machines, unlike ``hash()``).
"""

from __future__ import annotations

import hashlib

KEY_LENGTH = 16  # hex characters (64 bits): collisions are negligible for any real archive


def hash_key(*parts: str, length: int = KEY_LENGTH) -> str:
    """Truncated SHA-256 hex digest of the parts (joined with a separator that UIDs never contain).

    Args:
        *parts: strings to hash, e.g. a StudyInstanceUID, or ``("nifti", "rel/path.nii.gz")``.
        length: number of hex characters kept.
    """
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:length]


def study_key(study_uid: str) -> str:
    """Key of a DICOM study (from its StudyInstanceUID)."""
    return hash_key("study", study_uid)


def series_key(study_uid: str, series_uid: str, part: int = 0) -> str:
    """Key of a DICOM series within its study; ``part`` > 0 names a sub-stack split off by
    orientation or size. The study is included so a series UID reused across studies (a broken
    anonymiser) never merges two series."""
    if part:
        return hash_key("series", study_uid, series_uid, str(part))
    return hash_key("series", study_uid, series_uid)


def short_key(key: str, length: int = 8) -> str:
    """The first characters of a key, for tables shown to people."""
    return key[:length]
