"""Probe: how well a trained model's predicted lesion masks carry the synthetic margin and
texture, against the same measurements on ground-truth masks (validation split).

    python docs/experiments/probe_descriptors.py RUN_OR_CHECKPOINT SHARDS TRUTH_JSON

Prints Spearman correlations of the lesion descriptors (model/descriptors.py: boundary
irregularity, interior texture) with the generator's true margin and texture. Used for
issue #4's diagnosis (README, training benchmark).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch
from scipy.stats import spearmanr

from mmdls_dist.evaluation.inference import (
    eval_loader,
    inference_manifest,
    load_model,
    resolve_checkpoint,
)
from mmdls_dist.model.descriptors import measure

TEXTURE, IRREGULARITY = 2, 3  # columns of measure()


def checkpoint_probe(description: str):
    """The command line of the probes that score a trained checkpoint on one split of a
    synthetic cohort -> (args, truth per patient, loaded model, the batches)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("checkpoint", help="run folder (its best checkpoint) or checkpoint")
    parser.add_argument("shards")
    parser.add_argument("truth", help="the synthetic cohort's ground-truth JSON")
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    truth = json.loads(Path(args.truth).read_text())["patients"]
    loaded = load_model(resolve_checkpoint(args.checkpoint))
    manifest = inference_manifest(args.shards, loaded.identity["normalization"])
    batches = eval_loader(loaded, args.shards, args.split, manifest, batch_size=8)
    return args, truth, loaded, batches


def main() -> None:
    args, truth, loaded, batches = checkpoint_probe(__doc__.split("\n\n")[0])
    rows = []
    with torch.no_grad():
        for batch in batches:
            out = loaded.model(batch)
            ct = batch.ct.float() / 255
            pred = measure(ct, torch.sigmoid(out.lesion_logits.float()), batch.slice_mask)
            gt = measure(ct, batch.lesion_mask.float(), batch.slice_mask)
            for i, pid in enumerate(batch.patient_id):
                if bool(batch.lesion_annotated[i]):
                    rows.append(
                        {
                            "margin": truth[pid]["margin"],
                            "texture": truth[pid]["texture"],
                            "irregularity (ground truth mask)": gt[i, IRREGULARITY].item(),
                            "irregularity (predicted mask)": pred[i, IRREGULARITY].item(),
                            "texture (ground truth mask)": gt[i, TEXTURE].item(),
                            "texture (predicted mask)": pred[i, TEXTURE].item(),
                        }
                    )
    table = pd.DataFrame(rows)
    print(f"{len(table)} annotated {args.split} patients; Spearman with the true factor")
    for column in table.columns[2:]:
        factor = "margin" if column.startswith("irregularity") else "texture"
        rho = spearmanr(table[factor], table[column]).correlation
        print(f"  {column:<36} vs true {factor:<8} {rho:6.3f}")


if __name__ == "__main__":
    main()
