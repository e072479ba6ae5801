"""Evaluation: datasets, metrics, calibration, plots."""
