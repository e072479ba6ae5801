"""Weight files are read without running code: safetensors or torch.load(weights_only=True)."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.teachers import TeacherWeightsError, read_state_dict
from model.weight_files import WeightFileError, read_weights

REPO = Path(__file__).resolve().parents[1]
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch's legacy-format magic number


class RunsCode:
    """Unpickling this runs a command (writes ``marker``)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["zip", "legacy", "header"])
def test_files_that_would_run_code_are_refused(tmp_path: Path, layout: str) -> None:
    marker, path = tmp_path / "pwned", tmp_path / f"{layout}.pth"
    if layout == "header":  # crafted: the legacy header itself is the payload
        path.write_bytes(pickle.dumps(RunsCode(marker), 2) + pickle.dumps(LEGACY_MAGIC, 2))
    else:
        obj = {"state_dict": {"w": torch.ones(2)}, "hook": RunsCode(marker)}
        torch.save(obj, path, _use_new_zipfile_serialization=layout == "zip")
    with pytest.raises(WeightFileError, match="refused") as err:
        read_weights(path)
    assert str(path) in str(err.value) and "Accepted formats" in str(err.value)
    with pytest.raises(TeacherWeightsError, match=re.escape(path.name)):
        read_state_dict(path)
    assert not marker.exists()


def test_plain_weights_load_and_the_hash_is_checked_first(tmp_path: Path) -> None:
    st, pth = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file({"w": torch.arange(3.0)}, str(st))
    torch.save({"model": {"w": torch.arange(3.0)}, "epoch": 3}, pth)
    assert torch.equal(read_weights(st)["w"], torch.arange(3.0))
    assert read_weights(pth)["epoch"] == 3
    digest = hashlib.sha256(pth.read_bytes()).hexdigest()
    assert read_weights(pth, sha256=digest)["epoch"] == 3
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(WeightFileError, match="sha256 .* differs .* not read"):
        read_weights(junk, sha256=digest)


# What a pickle fallback looks like in code; none of it may appear outside tests.
_UNSAFE = re.compile(
    r"weights_only\s*=\s*False|pickle_module\s*=|allow_pickle\s*=\s*True|"
    r"\bpickle\.(load|loads|Unpickler)\b|\bdill\b|\bcloudpickle\.load"
)


def test_no_pickle_fallback_in_the_code() -> None:
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for folder in ("model", "jobs", "pdd_batch", "tools")
        for path in sorted((REPO / folder).rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _UNSAFE.search(line)
    ]
    assert not hits, f"unsafe deserialisation: {hits}"
