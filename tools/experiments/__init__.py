"""Research scripts behind docs/results.md (not packaged; python -m tools.experiments.X)."""
