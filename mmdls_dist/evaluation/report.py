"""The evaluation report: metrics -> one self-contained HTML page (figures.py draws).

Reading order for a clinician: the headline first (per task, the held-out split with its
95 % CI, internal and external marked, the publication's reported range beside it), then
per split and center the tables and figures, then provenance and methods (checkpoint,
epoch, config and data hashes, software versions, where every threshold, cut-point and
baseline was fitted). Estimates that are not results are flagged rather than shown:
divergent hazard ratios, small samples, p-values below what the test resolves.

Figures are drawn from the numbers in metrics.json (curves are stored there), so the page
and the JSON can never disagree. PNGs are written beside the page and also embedded in it
(base64), so the HTML file alone can be mailed to a clinician.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from mmdls_dist.data.schema import ENDPOINTS, SPLITS
from mmdls_dist.evaluation.figures import (
    classification_figure,
    km_figure,
    overlay_figure,
    stage_roc_figure,
    survival_calibration_figure,
)

SMALL_PATIENTS = 50  # below this many patients a group's estimates get a small-sample warning
SMALL_EVENTS = 20  # ... and below this many events, its survival estimates
SPLIT_LABELS = {
    "train": "train (internal, fitted on)",
    "val": "validation (internal)",
    "test": "test (internal, held out)",
    "external": "external (held-out centers)",
}
# What the MM-DLS publication reports (Nat Commun 2026), for orientation, not as a target
# met on another cohort: metric key -> text.
PUBLISHED = {
    "histology.auc": "0.85-0.92",
    "stage.macro_auc": "0.83-0.96",
    "dfs.harrell_c": "up to 0.75",
    "os.harrell_c": "up to 0.75",
    "dfs.td_auc": "0.77-0.91",
    "os.td_auc": "0.77-0.91",
    "dfs.integrated_brier": "< 0.2",
    "os.integrated_brier": "< 0.3",
}


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _p(value) -> str:
    """A p-value as a reader expects it: "< 0.001" below what three decimals show."""
    if value is None or not math.isfinite(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _with_ci(metrics: dict, key: str, value) -> str:
    ci = metrics.get("ci95", {}).get(key)
    text = _fmt(value)
    return f"{text} <small>({ci[0]:.3f}–{ci[1]:.3f})</small>" if ci and text != "–" else text


# --- HTML -----------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.6em 0 1.2em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
h2{border-bottom:2px solid #444;margin-top:2em}small{color:#666}img{max-width:100%}
.note{background:#fff8e0;padding:0.5em 1em;border-left:4px solid #e0b000}
.warn{background:#fdecea;padding:0.5em 1em;border-left:4px solid #c62828}
.disclaimer{font-size:0.9em;color:#555}
"""


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str | None) -> str:
    return f'<img src="data:image/png;base64,{data}">' if data else ""


def _case_mix(block: dict | None) -> str:
    """The label-free case-mix adaptation's cell: estimated LUSC fraction and the ECE of the
    adapted probabilities, or that the shift test saw none."""
    if not block:
        return _fmt(None)
    if not block["adapted"]:
        return f"{_fmt(block['estimated_prevalence'])} (no shift, p {block['p_value']:.2f})"
    return f"{_fmt(block['estimated_prevalence'])} / {_fmt(block['ece'])}"


HEADLINE_ROWS = (
    ("histology AUC", "histology", "auc", "histology.auc"),
    ("histology AP", "histology", "ap", "histology.ap"),
    ("histology ECE", "histology", "ece", None),
    ("histology Brier", "histology", "brier", None),
    ("stage macro AUC", "stage", "macro_auc", "stage.macro_auc"),
    *(
        row
        for e in ENDPOINTS
        for row in (
            (f"{e.upper()} C-index (Harrell)", e, "harrell_c", f"{e}.harrell_c"),
            (f"{e.upper()} C-index (Uno)", e, "uno_c", f"{e}.uno_c"),
            (f"{e.upper()} integrated Brier", e, "integrated_brier", None),
        )
    ),
    ("lung Dice", "segmentation", "dice_lung", None),
    ("lesion Dice", "segmentation", "dice_lesion", None),
)


def side_by_side(by_split: dict, horizons: list[str]) -> str:
    """Headline metrics, one column per split (internal vs external at a glance)."""
    splits = [s for s in SPLITS if s in by_split]
    rows = [["patients", *[str(by_split[s]["all"]["n_patients"]) for s in splits]]]
    for label, block, key, ci_key in HEADLINE_ROWS:
        cells = []
        for s in splits:
            m = by_split[s]["all"]
            value = m[block].get(key)
            cells.append(_with_ci(m, ci_key, value) if ci_key else _fmt(value))
        rows.append([label, *cells])
    for e in ENDPOINTS:
        for h in horizons:
            rows.append(
                [f"{e.upper()} AUC({h} mo)"]
                + [
                    _with_ci(
                        by_split[s]["all"],
                        f"{e}.td_auc.{h}",
                        by_split[s]["all"][e].get("td_auc", {}).get(h),
                    )
                    for s in splits
                ]
            )
            rows.append(
                [f"{e.upper()} Brier({h} mo)"]
                + [_fmt(by_split[s]["all"][e].get("brier", {}).get(h)) for s in splits]
            )
    return _table(["metric", *[SPLIT_LABELS[s] for s in splits]], rows)


def group_section(m: dict, title: str, figures: dict, horizons: list[str]) -> str:
    """Tables (and figures where given) of one split or center."""
    parts = [f"<h3>{html.escape(title)}</h3>"]
    parts += [f'<p class="warn">{html.escape(w)}</p>' for w in small_sample_warnings(m)]
    for e in ENDPOINTS:
        parts += [f'<p class="note">{html.escape(n)}</p>' for n in m[e].get("notes", [])]
    hist = m["histology"]
    at = hist.get("at_threshold", {})
    parts.append(
        _table(
            [
                "histology",
                "n",
                "LUSC",
                "P(LUSC) mean / observed",
                "AUC",
                "AP",
                "ECE",
                "ECE raw",
                "case mix: LUSC est. / ECE",
                "Brier",
                "threshold",
                "sens",
                "spec",
                "PPV",
                "NPV",
            ],
            [
                [
                    "LUAD vs LUSC",
                    str(hist["n"]),
                    str(hist["positives"]),
                    f"{_fmt(hist.get('mean_prob'))} / {_fmt(hist.get('prevalence'))}",
                    _with_ci(m, "histology.auc", hist.get("auc")),
                    _with_ci(m, "histology.ap", hist.get("ap")),
                    _fmt(hist.get("ece")),
                    _fmt(hist.get("ece_uncalibrated")),
                    _case_mix(hist.get("case_mix")),
                    _fmt(hist.get("brier")),
                    _fmt(at.get("threshold")),
                    _fmt(at.get("sensitivity")),
                    _fmt(at.get("specificity")),
                    _fmt(at.get("ppv")),
                    _fmt(at.get("npv")),
                ]
            ],
        )
    )
    stage = m["stage"]
    rows = [
        [name, str(v["n"]), _fmt(v["auc"]), _fmt(v["ap"])] for name, v in stage["per_class"].items()
    ]
    rows.append(["macro", str(stage["n"]), _with_ci(m, "stage.macro_auc", stage["macro_auc"]), ""])
    parts.append(_table(["stage (one vs rest)", "n", "AUC", "AP"], rows))
    names = list(stage["per_class"])
    parts.append(
        "<p><small>stage confusion matrix (rows = truth, columns = predicted)</small></p>"
        + _table(
            ["", *names],
            [[n, *map(str, r)] for n, r in zip(names, stage["confusion"], strict=True)],
        )
    )
    parts.append(survival_table(m, horizons))
    parts.append(calibration_table(m, horizons))
    parts.append(hazard_table(m))
    for key in ("classification", "stage", *ENDPOINTS, *(f"{e}_calibration" for e in ENDPOINTS)):
        parts.append(_img(figures.get(key)))
    parts.append(_img(figures.get("overlays")))
    return "\n".join(parts)


def small_sample_warnings(m: dict) -> list[str]:
    """Warnings for a split or center too small for stable estimates."""
    out = []
    if m["n_patients"] < SMALL_PATIENTS:
        out.append(
            f"Small sample: {m['n_patients']} patients (under {SMALL_PATIENTS}); every estimate "
            "here is unstable, read the confidence intervals."
        )
    for e in ENDPOINTS:
        events = m[e].get("events", 0)
        if m[e].get("n", 0) and events < SMALL_EVENTS:
            out.append(
                f"{e.upper()}: {events} events (under {SMALL_EVENTS}); C-index, hazard ratios "
                "and survival calibration rest on few events."
            )
    return out


def headline(by_split: dict, horizons: list[str]) -> str:
    """Per task, the held-out splits (external first, then test; validation where neither
    exists) with 95 % CIs, and the publication's reported range beside."""
    shown = [s for s in ("external", "test") if s in by_split] or [
        s for s in ("val", "train") if s in by_split
    ][:1]
    last = horizons[-1] if horizons else None
    items = [  # (task, metric, value of a split's "all" block, CI key, PUBLISHED key)
        (
            "histology (LUAD vs LUSC)",
            "AUC",
            lambda m: m["histology"].get("auc"),
            "histology.auc",
            "histology.auc",
        ),
        (
            "stage (I-II / III / IV)",
            "macro AUC",
            lambda m: m["stage"]["macro_auc"],
            "stage.macro_auc",
            "stage.macro_auc",
        ),
    ]
    for e in ENDPOINTS:
        c_index = lambda m, e=e: m[e].get("harrell_c")  # noqa: E731
        td_auc = lambda m, e=e: m[e].get("td_auc", {}).get(last)  # noqa: E731
        brier = lambda m, e=e: m[e].get("integrated_brier")  # noqa: E731
        items += [
            (e.upper(), "C-index (Harrell)", c_index, f"{e}.harrell_c", f"{e}.harrell_c"),
            (e.upper(), f"AUC({last} mo)", td_auc, f"{e}.td_auc.{last}", f"{e}.td_auc"),
            (e.upper(), "integrated Brier", brier, None, f"{e}.integrated_brier"),
        ]
    rows = []
    for task, metric, value, ci_key, published in items:
        cells = [
            _with_ci(m, ci_key, value(m)) if ci_key else _fmt(value(m))
            for m in (by_split[split]["all"] for split in shown)
        ]
        rows.append([task, metric, *cells, PUBLISHED.get(published, "")])
    n_row = ["", "patients", *[str(by_split[s]["all"]["n_patients"]) for s in shown], ""]
    header = ["task", "metric", *[SPLIT_LABELS[s] for s in shown], "publication (reported)"]
    warn = []
    for split in shown:
        warn += [
            f"{SPLIT_LABELS[split]}: {w}" for w in small_sample_warnings(by_split[split]["all"])
        ]
    body = _table(header, [n_row, *rows])
    return body + "".join(f'<p class="warn">{html.escape(w)}</p>' for w in warn)


def provenance_section(provenance: dict, settings_text: str) -> str:
    """Checkpoints, epochs, hashes, where each reference was fitted, software versions."""
    parts = ["<h2>Provenance and methods</h2>"]
    for label, model in provenance.get("models", {}).items():
        parts.append(f"<h3>{html.escape(label)}</h3>")
        rows = [
            [
                html.escape(r["checkpoint"]),
                _fmt(r["epoch"]),
                f"<code>{html.escape(r['config_sha256'])}</code>",
                f"<code>{html.escape(r['manifest_sha256'])}</code>",
                html.escape(str(r["shards"])),
            ]
            for r in model["members"]
        ]
        parts.append(
            _table(
                ["checkpoint", "epoch", "config sha256", "data manifest sha256", "trained on"], rows
            )
        )
        if model.get("reference"):
            parts.append(f"<p>Reference: {html.escape(model['reference'])}.</p>")
    if settings_text:
        parts.append(f"<p>Methods: {html.escape(settings_text)}.</p>")
    software = provenance.get("software", {})
    if software:
        parts.append(
            _table(
                ["software", "version"],
                [[html.escape(k), html.escape(v)] for k, v in software.items()],
            )
        )
    return "\n".join(parts)


def survival_table(m: dict, horizons: list[str]) -> str:
    rows = []
    for e in ENDPOINTS:
        b = m[e]
        rows.append(
            [
                e.upper(),
                str(b["n"]),
                str(b["events"]),
                _with_ci(m, f"{e}.harrell_c", b.get("harrell_c")),
                _with_ci(m, f"{e}.uno_c", b.get("uno_c")),
                *[_with_ci(m, f"{e}.td_auc.{h}", b.get("td_auc", {}).get(h)) for h in horizons],
                *[_fmt(b.get("brier", {}).get(h)) for h in horizons],
                _fmt(b.get("integrated_brier")),
            ]
        )
    return _table(
        [
            "endpoint",
            "n",
            "events",
            "C Harrell",
            "C Uno",
            *[f"AUC {h}" for h in horizons],
            *[f"Brier {h}" for h in horizons],
            "IBS",
        ],
        rows,
    )


def calibration_table(m: dict, horizons: list[str]) -> str:
    """Survival calibration: per horizon, the mean |predicted - Kaplan-Meier| over risk
    deciles, and the predicted vs observed survival of the lowest and highest decile."""
    rows = []
    for e in ENDPOINTS:
        for h in horizons:
            c = m[e].get("calibration", {}).get(h)
            if not c or not c["groups"]:
                continue
            low, high = c["groups"][-1], c["groups"][0]  # ranked by predicted survival
            rows.append(
                [
                    e.upper(),
                    h,
                    _fmt(c["ici"]),
                    f"{_fmt(low['predicted'])} / {_fmt(low['observed'])}",
                    f"{_fmt(high['predicted'])} / {_fmt(high['observed'])}",
                ]
            )
    if not rows:
        return ""
    return "<p><small>survival calibration against Kaplan-Meier per risk decile</small></p>" + (
        _table(
            [
                "endpoint",
                "months",
                "mean |pred - KM|",
                "lowest-risk decile pred / KM",
                "highest-risk decile pred / KM",
            ],
            rows,
        )
    )


def hazard_table(m: dict) -> str:
    rows = []
    for e in ENDPOINTS:
        groups = m[e].get("risk_groups", {})
        for name, hr in groups.get("hazard_ratios", {}).items():
            if not hr.get("estimable", True):
                rows.append(
                    [
                        e.upper(),
                        f"{name} vs low",
                        "not estimable",
                        "a group with no events: the Cox fit diverges",
                        "–",
                        _p(groups.get("logrank_p")),
                    ]
                )
                continue
            rows.append(
                [
                    e.upper(),
                    f"{name} vs low",
                    _fmt(hr["hr"], 2),
                    f"{hr['ci_low']:.2f}–{hr['ci_high']:.2f}",
                    _p(hr["p"]),
                    _p(groups.get("logrank_p")),
                ]
            )
    if not rows:
        return ""
    return _table(["endpoint", "group", "HR", "95% CI", "p", "log-rank p"], rows)


def comparison_rows(results: dict[str, dict]) -> list[dict]:
    """Model label -> evaluate_frame output  =>  one row per (model, split) of headline
    numbers, for the comparison table (e.g. full vs imaging-only vs clinical-only)."""
    rows = []
    for label, by_split in results.items():
        for split, groups in by_split.items():
            m = groups["all"]
            rows.append(
                {
                    "model": label,
                    "split": split,
                    "n": m["n_patients"],
                    "histology AUC": m["histology"].get("auc", math.nan),
                    "stage macro AUC": m["stage"]["macro_auc"],
                    **{
                        f"{e.upper()} {k}": m[e].get(key, math.nan)
                        for e in ENDPOINTS
                        for k, key in (("C (Harrell)", "harrell_c"), ("C (Uno)", "uno_c"))
                    },
                    "lesion Dice": m["segmentation"].get("dice_lesion", math.nan),
                }
            )
    return rows


def comparison_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    return _table(header, [[_fmt(r[h]) for h in header] for r in rows])


def write_report(out: Path, results: dict, meta: dict, overlays: dict) -> Path:
    """results: model label -> split -> {"all", "centers"}; overlays: label -> samples;
    meta: summary, notes, overlay_split, horizons (months)."""
    horizons = [f"{h:g}" for h in meta["horizons"]]
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    body = [
        "<h1>MM-DLS evaluation</h1>",
        '<p class="disclaimer">Research software: these figures describe a model on a '
        "cohort; they are not for clinical decisions about patients.</p>",
    ]
    for label, by_split in results.items():
        body.append(f"<h2>Headline: {html.escape(label)}</h2>" + headline(by_split, horizons))
    body.append(f"<p>{html.escape(meta.get('summary', ''))}</p>")
    for note in meta.get("notes", []):
        body.append(f'<p class="note">{html.escape(note)}</p>')
    if len(results) > 1:
        body.append("<h2>Model comparison</h2>" + comparison_table(comparison_rows(results)))
    for label, by_split in results.items():
        body.append(f"<h2>{html.escape(label)}: every split, internal and external</h2>")
        body.append(side_by_side(by_split, horizons))
        for split in [s for s in SPLITS if s in by_split]:
            stem = f"{slug(label)}-{split}"
            m = by_split[split]["all"]
            figures = {
                "classification": classification_figure(
                    m["histology"],
                    f"{label}: histology, {split}",
                    figures_dir / f"{stem}-histology.png",
                ),
                "stage": stage_roc_figure(
                    m["stage"], f"{label}: stage, {split}", figures_dir / f"{stem}-stage-roc.png"
                ),
                **{
                    e: km_figure(
                        m[e],
                        f"{label}: {e.upper()} risk groups, {split}",
                        figures_dir / f"{stem}-km-{e}.png",
                    )
                    for e in ENDPOINTS
                },
                **{
                    f"{e}_calibration": survival_calibration_figure(
                        m[e],
                        f"{label}: {e.upper()} survival calibration per risk decile, {split}",
                        figures_dir / f"{stem}-calibration-{e}.png",
                    )
                    for e in ENDPOINTS
                },
            }
            if split == meta.get("overlay_split"):
                figures["overlays"] = overlay_figure(
                    overlays.get(label, []), figures_dir / f"{stem}-overlays.png"
                )
            title = f"{label} / {SPLIT_LABELS[split]}: all centers"
            body.append(group_section(m, title, figures, horizons))
            for center, cm in by_split[split]["centers"].items():
                title = f"{label} / {SPLIT_LABELS[split]}: {center}"
                body.append(group_section(cm, title, {}, horizons))
    body.append(provenance_section(meta.get("provenance", {}), meta.get("methods", "")))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>MM-DLS evaluation</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    path = out / "report.html"
    path.write_text(page)
    return path


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


CONSOLE_COLUMNS = (  # (header, width, metric of a split's "all" block)
    ("hist AUC", 10, lambda m, h: m["histology"].get("auc")),
    ("stage AUC", 11, lambda m, h: m["stage"]["macro_auc"]),
    ("DFS C", 8, lambda m, h: m["dfs"].get("harrell_c")),
    ("OS C", 8, lambda m, h: m["os"].get("harrell_c")),
    ("OS AUC@{h}", 11, lambda m, h: m["os"].get("td_auc", {}).get(h)),
    ("OS IBS", 8, lambda m, h: m["os"].get("integrated_brier")),
)


def console_table(metrics: dict) -> str:
    """metrics.json -> the headline numbers, one line per model and split, for a terminal."""
    h = f"{metrics['settings']['horizons_months'][-1]:g}"
    header = "".join(f"{name.format(h=h):>{w}}" for name, w, _ in CONSOLE_COLUMNS)
    lines = [f"\n{'model':<16}{'split':<10}{'n':>6}{header}"]
    for label, model in metrics["models"].items():
        for split, groups in model["splits"].items():
            m = groups["all"]
            cells = "".join(f"{_fmt(get(m, h)):>{w}}" for _, w, get in CONSOLE_COLUMNS)
            lines.append(f"{label[:15]:<16}{split:<10}{m['n_patients']:>6}{cells}")
    return "\n".join(lines)
