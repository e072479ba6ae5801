"""Review: report, export, de-identification, overlays."""
