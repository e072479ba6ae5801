"""The embedded default checkpoints that let ``pdd-batch screen`` run with no download.

The default is a model set: a head-CT model (``model/default_model/``, the default of every
command that takes one model: ``evaluate``, ``calibrate``, ``bench``) and a chest-radiograph
model (``model/default_chest_model/``). ``screen`` without ``--model`` routes each series to the
one whose scope matches it (``pdd_batch.ingest.scope``).
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent
DEFAULT_MODEL_DIR = _HERE / "default_model"
DEFAULT_CHEST_MODEL_DIR = _HERE / "default_chest_model"
# The default set in routing order (a tie between two matching models goes to the first).
DEFAULT_MODELS: dict[str, Path] = {
    "head CT": DEFAULT_MODEL_DIR,
    "chest X-ray": DEFAULT_CHEST_MODEL_DIR,
}


def _embedded(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no embedded default model in {folder}. Train one on normal studies with "
            "`pdd-batch train NORMALS --out DIR` and pass `--model DIR`, or copy a checkpoint "
            "folder (config.json + model.safetensors) to that path."
        )
    return folder


def default_model_path() -> Path:
    """The folder of the embedded head-CT checkpoint (``model/default_model/``): the default of
    the commands that take one model.

    Raises:
        FileNotFoundError: no default model is embedded in this build; the message says how to
            get one.
    """
    return _embedded(DEFAULT_MODEL_DIR)


def default_model_paths() -> list[Path]:
    """The embedded default set (head CT, chest X-ray), in routing order: what ``screen`` uses
    when no ``--model`` is given.

    Raises:
        FileNotFoundError: a member of the set is not embedded in this build (names it and says
            how to get one).
    """
    return [_embedded(folder) for folder in DEFAULT_MODELS.values()]
