"""The embedded default checkpoint that lets ``pdd-batch screen`` run with no download."""

from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def default_model_path() -> Path:
    """The folder of the embedded default checkpoint (``model/default_model/``).

    Raises:
        FileNotFoundError: no default model is embedded in this build; the message says how to
            get one.
    """
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"no embedded default model in {DEFAULT_MODEL_DIR}. Train one on normal studies with "
            "`pdd-batch train NORMALS --out DIR` and pass `--model DIR`, or copy a checkpoint "
            "folder (config.json + model.safetensors) to that path."
        )
    return DEFAULT_MODEL_DIR
