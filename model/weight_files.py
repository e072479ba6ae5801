"""Reading weight files without running code from them.

Two formats are accepted: ``.safetensors``, and torch files (``.pth``/``.pt``/``.bin``) that
``torch.load(weights_only=True)`` reads, i.e. tensors inside dicts, lists, tuples, numbers and
strings. A torch file that holds any other Python object (a training config, a pickled
callable) is refused whole: unpickling it could run code, and no second, laxer pass is tried.
When the sha256 a file must have is known, it is checked on the raw bytes before the file is
parsed at all.
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from pathlib import Path

import torch

ACCEPTED_FORMATS = (
    ".safetensors, or a .pth/.pt file that torch.load(weights_only=True) reads "
    "(tensors in dicts, lists, numbers and strings only)"
)
_CONVERT_HINT = (
    "If you trust where the file came from, extract its state dict into a .safetensors file "
    "(safetensors.torch.save_file) on a machine you trust, and give that file instead"
)


class WeightFileError(ValueError):
    """A weight file is refused: unreadable, not an accepted format, or not the expected bytes."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file_sha256(path: str | Path, expected: str) -> None:
    """Refuse ``path`` unless its bytes hash to ``expected`` (checked before any parsing).

    Raises:
        WeightFileError: the hashes differ; the message names the file and both prefixes.
    """
    actual = file_sha256(path)
    if actual != expected:
        raise WeightFileError(
            f"{path}: sha256 {actual[:16]}… differs from the recorded {expected[:16]}…; "
            "the file was not read (replaced or corrupt: not the weights this model was "
            "trained with)"
        )


def read_weights(path: str | Path, *, sha256: str | None = None) -> object:
    """Read a weight file safely: safetensors, or ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        sha256: when given, the file's bytes must hash to it; checked before parsing.

    Returns:
        For safetensors a ``dict[str, Tensor]``; for torch files whatever plain data it holds.

    Raises:
        WeightFileError: missing, wrong hash, unreadable, or holding objects other than plain
            data (the message names the file and the accepted formats).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weights file not found: {path}")
    if sha256 is not None:
        verify_file_sha256(path, sha256)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - any safetensors failure, re-raised with the file
            raise WeightFileError(f"cannot read {path} as safetensors: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WeightFileError(
            f"{path} is refused: it is not plain tensor data ({_torch_reason(exc)}); a file that "
            f"holds other Python objects could run code when loaded, so it is not loaded. "
            f"Accepted formats: {ACCEPTED_FORMATS}. {_CONVERT_HINT}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - truncated/garbled file, re-raised with the file
        raise WeightFileError(
            f"cannot read {path}: {type(exc).__name__}: {exc}. Accepted formats: {ACCEPTED_FORMATS}"
        ) from exc


def _torch_reason(exc: Exception) -> str:
    """The one informative paragraph of torch's weights_only error (not its advice to unpickle)."""
    paragraphs = [p.strip() for p in str(exc).split("\n\n") if p.strip()]
    for before, after in itertools.pairwise(paragraphs):
        if after.startswith("Check the documentation"):
            return before.removeprefix("WeightsUnpickler error:").strip()[:200]
    return paragraphs[-1][:200] if paragraphs else type(exc).__name__
