"""The command line the probes that score one model on one split share."""

from __future__ import annotations

import argparse


def model_on_split(doc: str) -> argparse.Namespace:
    """CHECKPOINT SHARDS [--split NAME] (default external), described by the probe's own
    module docstring's first paragraph."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("checkpoint", help="run folder (its best checkpoint) or checkpoint")
    parser.add_argument("shards")
    parser.add_argument("--split", default="external")
    return parser.parse_args()
