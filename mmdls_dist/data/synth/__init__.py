"""Synthetic cohorts: two independently designed styles (classic, findings) written by one
cohort writer (cohort.py)."""

from mmdls_dist.data.synth.cohort import STYLES, generate, oracle_cindex, oracle_metrics

__all__ = ["STYLES", "generate", "oracle_cindex", "oracle_metrics"]
