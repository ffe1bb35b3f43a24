"""Classification metrics: histology (binary) and stage (3 classes), for training-time
validation and the evaluation report alike.

Pure functions of numpy arrays; labels use -1 for "unknown", and those patients are left
out of the task's metrics. scikit-learn computes AUC, average precision, Brier score,
ROC/PR curves and confusion matrices; calibration error is written here because
scikit-learn has no ECE (its calibration_curve drops empty bins and gives no weights).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

ECE_BINS = 10  # equal-width probability bins for ECE and the reliability diagram


def _known(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    keep = labels >= 0
    return np.asarray(probs, dtype=np.float64)[keep], labels[keep].astype(int)


def binary_auc(scores, labels) -> float:
    """ROC AUC of scores [n] (any scale, higher = class 1) for labels [n] in {0, 1, -1 =
    unknown}; NaN unless both classes are present."""
    scores, labels = _known(scores, labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def macro_ovr_auc(probs, labels) -> float:
    """Mean one-vs-rest AUC over classes. probs [n, K], labels [n] in 0..K-1 or -1; NaN if
    any class's AUC is undefined."""
    labels = np.asarray(labels)
    per_class = [
        binary_auc(probs[:, k], np.where(labels < 0, -1, (labels == k).astype(int)))
        for k in range(np.shape(probs)[1])
    ]
    return float(np.mean(per_class)) if not np.isnan(per_class).any() else float("nan")


def reliability(prob: np.ndarray, label: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Equal-width bins over [0, 1] (the last one closed). -> per bin: count, mean predicted
    probability, observed fraction of positives (None where the bin is empty), and
    ECE = sum_b (n_b / n) |mean_prob_b - frac_pos_b|."""
    prob = np.asarray(prob, dtype=np.float64)
    label = np.asarray(label, dtype=np.float64)
    which = np.minimum((prob * n_bins).astype(int), n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    sum_prob = np.bincount(which, weights=prob, minlength=n_bins)
    sum_pos = np.bincount(which, weights=label, minlength=n_bins)
    filled = count > 0
    mean_prob = np.divide(sum_prob, count, out=np.zeros(n_bins), where=filled)
    frac_pos = np.divide(sum_pos, count, out=np.zeros(n_bins), where=filled)
    ece = float(np.sum(count * np.abs(mean_prob - frac_pos)) / max(1, len(prob)))
    return {
        "n_bins": n_bins,
        "count": count.tolist(),
        "mean_prob": [float(v) if f else None for v, f in zip(mean_prob, filled, strict=True)],
        "frac_pos": [float(v) if f else None for v, f in zip(frac_pos, filled, strict=True)],
        "ece": ece,
    }


def youden_threshold(prob, label) -> float:
    """The probability threshold maximising sensitivity + specificity - 1 (fixed on the
    validation split, then applied unchanged elsewhere). 0.5 when undefined."""
    prob, label = _known(prob, label)
    if len(np.unique(label)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(label, prob)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def threshold_stats(prob, label, threshold: float) -> dict:
    """Sensitivity, specificity, PPV, NPV of `prob >= threshold` (NaN where undefined)."""
    prob, label = _known(prob, label)
    tn, fp, fn, tp = confusion_matrix(label, (prob >= threshold).astype(int), labels=[0, 1]).ravel()

    def ratio(a: int, b: int) -> float:
        return float(a / b) if b else float("nan")

    return {
        "threshold": float(threshold),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "tp": int(tp),
        "fp": int(fp),
        "tn": int(tn),
        "fn": int(fn),
    }


def _downsample(x: np.ndarray, y: np.ndarray, points: int = 200) -> dict:
    """Curve points for a figure, at most `points` (a 100,000-patient ROC has 100,000)."""
    if len(x) > points:
        idx = np.unique(np.round(np.linspace(0, len(x) - 1, points)).astype(int))
        x, y = x[idx], y[idx]
    return {"x": x.tolist(), "y": y.tolist()}


def binary_metrics(prob, label, threshold: float) -> dict:
    """Histology: AUC, AP, Brier, ECE + reliability diagram, calibration in the large (mean
    predicted probability against the observed fraction of positives: a case-mix shift
    between centers shows here, and no calibration fitted elsewhere can remove it),
    threshold statistics, curves."""
    prob, label = _known(prob, label)
    out = {"n": int(len(label)), "positives": int(label.sum())}
    if len(label):
        out |= {"mean_prob": float(np.mean(prob)), "prevalence": float(np.mean(label))}
    if len(np.unique(label)) < 2:
        return out | {"auc": float("nan"), "ap": float("nan")}
    fpr, tpr, _ = roc_curve(label, prob)
    precision, recall, _ = precision_recall_curve(label, prob)
    return out | {
        "auc": binary_auc(prob, label),
        "ap": float(average_precision_score(label, prob)),
        "brier": float(brier_score_loss(label, prob)),
        "reliability": reliability(prob, label),
        "ece": reliability(prob, label)["ece"],
        "at_threshold": threshold_stats(prob, label, threshold),
        "roc_curve": _downsample(fpr, tpr),
        "pr_curve": _downsample(recall[::-1], precision[::-1]),
    }


def multiclass_metrics(probs, labels, class_names: tuple[str, ...]) -> dict:
    """Stage: one-vs-rest AUC, AP and ROC curve per class, their macro mean, confusion
    matrix (rows = truth, columns = arg-max prediction), accuracy. probs [n, K]."""
    labels = np.asarray(labels)
    keep = labels >= 0
    probs, labels = np.asarray(probs, dtype=np.float64)[keep], labels[keep].astype(int)
    k = len(class_names)
    per_class = {}
    for c, name in enumerate(class_names):
        y = (labels == c).astype(int)
        defined = 0 < y.sum() < len(y)
        per_class[name] = {
            "n": int(y.sum()),
            "auc": binary_auc(probs[:, c], y),
            "ap": float(average_precision_score(y, probs[:, c])) if defined else float("nan"),
        }
        if defined:
            fpr, tpr, _ = roc_curve(y, probs[:, c])
            per_class[name]["roc_curve"] = _downsample(fpr, tpr)
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=int)
    return {
        "n": int(len(labels)),
        "per_class": per_class,
        "macro_auc": macro_ovr_auc(probs, labels),
        "confusion": confusion_matrix(labels, predicted, labels=list(range(k))).tolist(),
        "accuracy": float(np.mean(predicted == labels)) if len(labels) else float("nan"),
    }
