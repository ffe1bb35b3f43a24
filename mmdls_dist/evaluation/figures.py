"""The evaluation report's figures (matplotlib, headless): histology ROC / PR / calibration,
stage ROC curves, Kaplan-Meier curves with their 95 % bands, censor ticks and number-at-risk
tables, survival calibration per risk decile, segmentation overlays. Each is drawn from the
numbers of metrics.json (the bands and tick positions are lifelines'), saved as PNG and
returned base64-encoded for embedding."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

GROUP_COLORS = {"low": "#1b9e77", "intermediate": "#d95f02", "high": "#7570b3"}


def _png(fig, path: Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode()


def classification_figure(hist: dict, title: str, path: Path) -> str | None:
    """ROC, precision-recall and reliability diagram of the histology head."""
    if "roc_curve" not in hist:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    roc, pr, rel = hist["roc_curve"], hist["pr_curve"], hist["reliability"]
    axes[0].plot(roc["x"], roc["y"], lw=2)
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[0].set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, AUC {hist['auc']:.3f}")
    axes[1].plot(pr["x"], pr["y"], lw=2, drawstyle="steps-post")
    axes[1].axhline(hist["positives"] / max(1, hist["n"]), color="k", ls="--", lw=0.8)
    axes[1].set(xlabel="recall", ylabel="precision", title=f"PR, AP {hist['ap']:.3f}")
    filled = [i for i, c in enumerate(rel["count"]) if c > 0]
    axes[2].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[2].plot(
        [rel["mean_prob"][i] for i in filled], [rel["frac_pos"][i] for i in filled], "o-", lw=2
    )
    axes[2].set(
        xlabel="predicted P(LUSC)",
        ylabel="observed fraction LUSC",
        title=f"calibration, ECE {rel['ece']:.3f} ({rel['n_bins']} bins)",
    )
    for ax in axes:
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
    fig.suptitle(title, y=1.03)
    fig.tight_layout()
    return _png(fig, path)


def km_figure(block: dict, title: str, path: Path) -> str | None:
    """Kaplan-Meier curves of the risk groups with the number-at-risk table below."""
    groups = block.get("risk_groups", {})
    curves = groups.get("curves", {})
    if not curves:
        return None
    fig, (ax, table_ax) = plt.subplots(
        2, 1, figsize=(6.5, 5.4), gridspec_kw={"height_ratios": [4, 1.1], "hspace": 0.45}
    )
    for name, curve in curves.items():
        color = GROUP_COLORS[name]
        ax.step(
            curve["time"],
            curve["survival"],
            where="post",
            color=color,
            lw=2,
            label=f"{name} (n={curve['n']}, events {curve['events']})",
        )
        if "lower" in curve:
            ax.fill_between(
                curve["time"], curve["lower"], curve["upper"], step="post", color=color, alpha=0.15
            )
        if curve.get("censored"):
            ax.plot(
                curve["censored"],
                curve["censored_survival"],
                "|",
                color=color,
                markersize=7,
                markeredgewidth=1,
            )
    times = groups["at_risk_times"]
    ax.set(xlabel="months", ylabel="survival probability", ylim=(0, 1.02), xlim=(0, times[-1]))
    p = groups.get("logrank_p", math.nan)
    if math.isfinite(p):
        title = f"{title}: log-rank p " + ("< 0.001" if p < 0.001 else f"= {p:.3f}")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower left", fontsize=8, title="shaded: 95 % CI; |: censored", title_fontsize=7)
    table_ax.axis("off")
    rows = [[str(v) for v in c["at_risk"]] for c in curves.values()]
    table = table_ax.table(
        cellText=rows,
        rowLabels=list(curves),
        colLabels=[f"{t:g}" for t in times],
        loc="center",
        cellLoc="center",
    )
    table.scale(1, 1.1)
    table_ax.set_title("number at risk", fontsize=8)
    return _png(fig, path)


def stage_roc_figure(stage: dict, title: str, path: Path) -> str | None:
    """One-vs-rest ROC curve of every stage group."""
    curves = {k: v for k, v in stage.get("per_class", {}).items() if "roc_curve" in v}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    for name, block in curves.items():
        roc = block["roc_curve"]
        ax.plot(roc["x"], roc["y"], lw=2, label=f"{name} vs rest, AUC {block['auc']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, path)


def survival_calibration_figure(block: dict, title: str, path: Path) -> str | None:
    """Per horizon: predicted survival against Kaplan-Meier per risk decile (diagonal =
    calibrated)."""
    horizons = {h: c for h, c in block.get("calibration", {}).items() if c and c.get("groups")}
    if not horizons:
        return None
    fig, axes = plt.subplots(1, len(horizons), figsize=(3.3 * len(horizons), 3.4), squeeze=False)
    for ax, (h, c) in zip(axes[0], horizons.items(), strict=True):
        seen = [g for g in c["groups"] if g.get("observed") is not None]  # KM defined there
        predicted = [g["predicted"] for g in seen]
        observed = [g["observed"] for g in seen]
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.plot(predicted, observed, "o-", lw=1.5)
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="predicted survival", ylabel="Kaplan-Meier")
        ax.set_title(f"{h} months, mean |gap| {c['ici']:.3f}", fontsize=9)
    fig.suptitle(title, y=1.02, fontsize=10)
    fig.tight_layout()
    return _png(fig, path)


def overlay_figure(samples: list[dict], path: Path) -> str | None:
    """CT slices with predicted lung (blue) and lesion (red) contours, true lesion (green)."""
    if not samples:
        return None
    fig, axes = plt.subplots(1, len(samples), figsize=(3 * len(samples), 3.2), squeeze=False)
    for ax, s in zip(axes[0], samples, strict=True):
        ax.imshow(s["ct"], cmap="gray", vmin=0, vmax=255)
        for mask, color in ((s["lung"], "tab:blue"), (s["lesion"], "red"), (s["truth"], "lime")):
            if mask is not None and mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=1)
        ax.set_title(s["title"], fontsize=8)
        ax.axis("off")
    fig.suptitle("blue: predicted lung, red: predicted lesion, green: annotated lesion", fontsize=9)
    return _png(fig, path)


def overlay_samples(batch, out, limit: int = 4) -> list[dict]:
    """The most lesion-bearing slice of the first `limit` patients of a batch."""
    samples = []
    lung = (out.lung_logits > 0).cpu().numpy()
    lesion = (out.lesion_logits > 0).cpu().numpy()
    truth = batch.lesion_mask.cpu().numpy().astype(bool)
    ct = batch.ct.cpu().numpy()
    for i in range(min(limit, len(batch.patient_id))):
        area = truth[i].sum((1, 2)) + lesion[i].sum((1, 2))
        k = int(np.argmax(area))
        samples.append(
            {
                "ct": ct[i, k],
                "lung": lung[i, k],
                "lesion": lesion[i, k],
                "truth": truth[i, k] if bool(batch.lesion_annotated[i]) else None,
                # Position in the batch, not the patient id: ids stay out of shared figures.
                "title": f"patient {i + 1}, slice {k + 1}",
            }
        )
    return samples
