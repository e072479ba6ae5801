"""The result of one golden-fixture comparison, shared by every golden checker."""

from __future__ import annotations

from typing import NamedTuple


class GoldenCheck(NamedTuple):
    """One comparison against a golden fixture.

    Attributes:
        name: What was compared, e.g. ``"vmamba_small/feat0"``.
        max_abs_err: Largest absolute difference found (0.0 for exact checks such as key lists).
        tolerance: Largest error that still passes.
        passed: Whether ``max_abs_err <= tolerance`` (and any exact condition held).
    """

    name: str
    max_abs_err: float
    tolerance: float
    passed: bool
