"""Metrics as pure functions of numpy arrays, one implementation each: classification
(AUC, AP, calibration, thresholds), survival (Harrell / Uno C, time-dependent AUC, Brier,
Breslow, risk groups) and segmentation (Dice). They import nothing else of the package."""
