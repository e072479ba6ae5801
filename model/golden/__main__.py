"""``python -m model.golden DIR``: run every golden check, one line each; exit 0 iff all pass."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from model.golden.checks import GoldenCheck


def _checkers() -> list[tuple[str, Callable[[Path], list[GoldenCheck]]]]:
    from model.golden.vmamba import check_vmamba

    checkers: list[tuple[str, Callable[[Path], list[GoldenCheck]]]] = [("vmamba", check_vmamba)]
    try:
        from model.golden.decoder import check_decoder
    except ImportError as err:
        print(f"decoder checks unavailable: {err}", file=sys.stderr)
    else:
        checkers.append(("decoder", check_decoder))
    return checkers


def main(argv: list[str] | None = None) -> int:
    """Run the checks on the fixtures in ``argv[0]``; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m model.golden GOLDEN_DIR", file=sys.stderr)
        return 2
    golden_dir = Path(args[0])
    if not golden_dir.is_dir():
        print(f"not a directory: {golden_dir}", file=sys.stderr)
        return 2
    checks: list[GoldenCheck] = []
    for _name, run in _checkers():
        checks += run(golden_dir)
    for c in checks:
        status = "ok  " if c.passed else "FAIL"
        print(f"{status} {c.name}: max abs err {c.max_abs_err:.3g} (tolerance {c.tolerance:.3g})")
    n_fail = sum(not c.passed for c in checks)
    print(f"{len(checks) - n_fail}/{len(checks)} golden checks passed")
    return 0 if n_fail == 0 and checks else 1


if __name__ == "__main__":
    sys.exit(main())
