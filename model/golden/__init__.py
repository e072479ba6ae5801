"""Golden-fixture checks: reproduce the reference outputs in ``../shared/golden`` exactly."""

from model.golden.checks import GoldenCheck

__all__ = ["GoldenCheck"]
