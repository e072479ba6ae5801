"""Stable, non-identifying keys: HMAC-SHA256 with a per-site secret, truncated.

Raw DICOM UIDs identify a patient's study and relative paths often name the patient (folders
such as ``DOE^JOHN_12345``); neither leaves discovery. Every study, series and input file is named
by one of these keys instead. The keys are keyed digests, so someone holding the PACS (and hence
every UID) still cannot link a key back to a study without the site secret.

The site secret is 32 random bytes (hex) in a file of its own, created once with mode 0600 in a
0700 folder: ``$PDD_BATCH_KEY_FILE`` if set, else ``$XDG_CONFIG_HOME/pdd-batch/site.key``, else
``~/.config/pdd-batch/site.key``. A key file that is a symbolic link, or that its group or others
can read, is refused. Its id (``key_id``: the first 12 hex of the SHA-256 of the secret) is
recorded in run manifests; the secret never is.

Each kind of key (study, series, file, fingerprint) uses its own sub-key derived from the secret,
so a process that only needs one kind (a read worker matching series keys) gets only that one.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import stat
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

KEY_LENGTH = 16  # hex characters (64 bits): collisions are negligible for any real archive
KEY_FILE_ENV = "PDD_BATCH_KEY_FILE"
KEY_FILE_NAME = "site.key"
SECRET_BYTES = 32
PURPOSES = ("study", "series", "file", "fingerprint")
_SEP = "\x1f"  # joins parts; UIDs and paths never contain it


class SiteKeyError(RuntimeError):
    """The site key file cannot be created, read or trusted (the message says what to do)."""


@dataclass(frozen=True)
class SiteKey:
    """Per-purpose sub-keys derived from the site secret (never shown: ``repr`` hides them).

    Attributes:
        key_id: first 12 hex of SHA-256 of the secret; safe to record and show.
        subkeys: purpose -> HMAC key.
    """

    key_id: str
    subkeys: Mapping[str, bytes] = field(repr=False)

    @classmethod
    def from_secret(cls, secret: bytes) -> SiteKey:
        """Derive every purpose's sub-key from the secret."""
        if len(secret) < 16:
            raise SiteKeyError("site key secret is too short (want 32 random bytes)")
        subkeys = {p: hmac.new(secret, p.encode(), hashlib.sha256).digest() for p in PURPOSES}
        return cls(hashlib.sha256(secret).hexdigest()[:12], subkeys)

    def scoped(self, *purposes: str) -> SiteKey:
        """The same key restricted to some purposes (what a worker process is given)."""
        return SiteKey(self.key_id, {p: self.subkeys[p] for p in purposes})

    def digest(self, purpose: str, *parts: str, length: int = KEY_LENGTH) -> str:
        """Truncated HMAC-SHA256 hex of the parts under the purpose's sub-key."""
        try:
            sub = self.subkeys[purpose]
        except KeyError:
            raise SiteKeyError(f"this process holds no {purpose!r} key") from None
        return hmac.new(sub, _SEP.join(parts).encode("utf-8"), hashlib.sha256).hexdigest()[:length]

    def export_scoped(self, purpose: str) -> str:
        """``key_id:hex`` of one sub-key, to hand to a worker (``SiteKey.import_scoped``)."""
        return f"{self.key_id}:{purpose}:{self.subkeys[purpose].hex()}"

    @classmethod
    def import_scoped(cls, text: str) -> SiteKey:
        """Inverse of ``export_scoped``."""
        key_id, purpose, hexkey = text.split(":")
        return cls(key_id, {purpose: bytes.fromhex(hexkey)})


def default_key_path() -> Path:
    """Where the site key lives: ``$PDD_BATCH_KEY_FILE``, else the user's config folder."""
    env = os.environ.get(KEY_FILE_ENV)
    if env:
        return Path(env).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "pdd-batch" / KEY_FILE_NAME


def _create(path: Path) -> None:
    """Write a new secret with mode 0600 (the folder 0700 when this creates it)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return  # another process created it first: read theirs
    except OSError as exc:
        raise SiteKeyError(f"cannot create the site key {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(secrets.token_hex(SECRET_BYTES) + "\n")


def _read(path: Path) -> bytes:
    """The secret of an existing key file, refusing links and files others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise SiteKeyError(f"site key {path} is a symbolic link: refused") from exc
        raise SiteKeyError(f"cannot read the site key {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "r", encoding="ascii") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SiteKeyError(f"site key {path} is not a regular file: refused")
        if st.st_mode & 0o077:
            raise SiteKeyError(
                f"site key {path} can be read by others (mode {stat.S_IMODE(st.st_mode):o}): "
                f"refused; run `chmod 600 {path}`"
            )
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise SiteKeyError(f"site key {path} belongs to another user: refused")
        text = fh.read().strip()
    try:
        return bytes.fromhex(text)
    except ValueError as exc:
        raise SiteKeyError(f"site key {path} is not a hex secret") from exc


def load_site_key(path: Path | None = None, *, create: bool = True) -> SiteKey:
    """The site key at ``path`` (default ``default_key_path()``), created on first use.

    Raises:
        SiteKeyError: a link, a file others can read, another user's file, or bad content.
    """
    path = Path(path) if path is not None else default_key_path()
    if not path.exists() and not path.is_symlink():
        if not create:
            raise SiteKeyError(f"no site key at {path}")
        _create(path)
    return SiteKey.from_secret(_read(path))


_lock = threading.Lock()
_installed: SiteKey | None = None
_cache: dict[str, SiteKey] = {}


def install(key: SiteKey | None) -> None:
    """Use ``key`` for this process's keys (workers); ``None`` goes back to the key file."""
    global _installed
    with _lock:
        _installed = key


def site_key() -> SiteKey:
    """The key of this process: an installed one, else the key file's (cached per path)."""
    if _installed is not None:
        return _installed
    path = str(default_key_path())
    with _lock:
        if path not in _cache:
            _cache[path] = load_site_key(Path(path))
        return _cache[path]


def clear_cache() -> None:
    """Forget cached and installed keys (tests switch key files)."""
    global _installed
    with _lock:
        _cache.clear()
        _installed = None


def hash_key(*parts: str, length: int = KEY_LENGTH, purpose: str = "series") -> str:
    """Keyed digest of the parts (``purpose`` picks the sub-key).

    Args:
        *parts: strings to key, e.g. ``("nifti-series", "rel/path.nii.gz")``.
        length: number of hex characters kept.
        purpose: one of ``PURPOSES``.
    """
    return site_key().digest(purpose, *parts, length=length)


def study_key(study_uid: str) -> str:
    """Key of a DICOM study (from its StudyInstanceUID)."""
    return hash_key("study", study_uid, purpose="study")


def series_key(study_uid: str, series_uid: str, part: int = 0) -> str:
    """Key of a DICOM series within its study; ``part`` > 0 names a sub-stack split off by
    orientation or size. The study is included so a series UID reused across studies (a broken
    anonymiser) never merges two series."""
    if part:
        return hash_key("series", study_uid, series_uid, str(part))
    return hash_key("series", study_uid, series_uid)


def file_key(rel_path: str) -> str:
    """Key of an input file from its archive-relative posix path (``a.zip!m.dcm`` for members)."""
    return hash_key("file", rel_path, purpose="file")


def short_key(key: str, length: int = 8) -> str:
    """The first characters of a key, for tables shown to people."""
    return key[:length]


PATH_PLACEHOLDER = "<file>"
_MIN_PART = 3  # shorter path components ("a", "CT") are too common to redact as words


def redact_paths(text: str, paths: Iterable[str]) -> str:
    """``text`` with every given relative path, and each of its components (folder names,
    file names, ``archive!member`` parts), replaced by ``<file>``: error reasons must never
    carry a path (folder names are often patient names).
    """
    words: set[str] = set()
    for rel in paths:
        if not rel:
            continue
        words.add(rel.rstrip("/"))
        for piece in rel.split("!"):
            words.add(piece.rstrip("/"))
            words.update(p for p in piece.split("/") if len(p) >= _MIN_PART)
    for word in sorted(words, key=len, reverse=True):
        if word and word in text:
            text = re.sub(rf"(?<![\w]){re.escape(word)}(?![\w])", PATH_PLACEHOLDER, text)
            text = text.replace(word, PATH_PLACEHOLDER) if len(word) >= 8 else text
    return text
