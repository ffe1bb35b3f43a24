"""Probe: what a model trained with model.given_lesion_mask loses when the lesion contours
are withheld (CT-only patients), on one split.

    python docs/experiments/probe_contours.py RUN_OR_CHECKPOINT SHARDS TRUTH_JSON [--split val]

Scores the checkpoint twice on the same patients: with the contours the shards carry, and
with every patient flagged as unannotated (the segmentor's own lesion mask everywhere, as
`mmdls predict` does for a CT-only folder). Prints Harrell's C (DFS, OS) of both next to
the oracle (the generator's true linear predictor) on those patients. Used for issue #4's
benchmark notes (README).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from probe_descriptors import checkpoint_probe

from mmdls_dist.metrics.survival import harrell_c

ENDPOINTS = ("dfs", "os")


def main() -> None:
    args, truth, loaded, batches = checkpoint_probe(__doc__.split("\n\n")[0])
    cols: dict[str, list] = {"pid": [], "annotated": []}
    for e in ENDPOINTS:
        for k in ("time", "event", "known", "given", "withheld"):
            cols[f"{e}_{k}"] = []
    with torch.no_grad():
        for batch in batches:
            withheld = dataclasses.replace(
                batch, lesion_annotated=torch.zeros_like(batch.lesion_annotated)
            )
            outs = {"given": loaded.model(batch), "withheld": loaded.model(withheld)}
            cols["pid"] += batch.patient_id
            cols["annotated"] += batch.lesion_annotated.tolist()
            for e in ENDPOINTS:
                cols[f"{e}_time"] += getattr(batch, f"{e}_time").tolist()
                cols[f"{e}_event"] += getattr(batch, f"{e}_event").tolist()
                cols[f"{e}_known"] += getattr(batch, f"{e}_known").tolist()
                for name, out in outs.items():
                    cols[f"{e}_{name}"] += getattr(out, f"{e}_log_hazard").tolist()
    table = {k: np.asarray(v) for k, v in cols.items()}
    n, annotated = len(table["pid"]), int(table["annotated"].sum())
    print(f"{n} {args.split} patients ({annotated} with a lesion contour)")
    print(f"{'':<28}{'C DFS':>8}{'C OS':>8}")
    rows = {"oracle": None, "contours given": "given", "contours withheld": "withheld"}
    for label, key in rows.items():
        cells = []
        for e in ENDPOINTS:
            k = table[f"{e}_known"]
            if key is None:
                risk = np.array([truth[p][f"eta_{e}"] for p in table["pid"]])
            else:
                risk = table[f"{e}_{key}"]
            c = harrell_c(risk[k], table[f"{e}_time"][k], table[f"{e}_event"][k])
            cells.append(f"{c:8.3f}")
        print(f"{label:<28}{''.join(cells)}")


if __name__ == "__main__":
    main()
