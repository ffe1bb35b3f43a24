"""Fault injection for tests and failure drills (the config's chaos block)."""

from __future__ import annotations

import logging
import os
import signal

from mmdls_dist import storage
from mmdls_dist.config import ChaosConfig

log = logging.getLogger(__name__)


class Chaos:
    """Fault injection (config.chaos) for tests and failure drills: rank chaos.fail_rank
    fails once, at chaos.fail_point ("step": right after optimizer step fail_at_step;
    "validation": during the first validation after that step; "after_report": right
    after the first report (and checkpoint) after that step). A marker file in the run
    folder makes it once, across restarts."""

    def __init__(self, cfg: ChaosConfig, rank: int, run: str):
        self.cfg, self.rank = cfg, rank
        self.marker = storage.join(run, ".chaos_fired")
        self.armed = cfg.fail_at_step >= 0 and rank == cfg.fail_rank

    def __call__(self, point: str, step: int) -> None:
        cfg = self.cfg
        if not self.armed or point != cfg.fail_point:
            return
        due = step == cfg.fail_at_step if point == "step" else step >= cfg.fail_at_step
        if not due or storage.exists(self.marker):
            return
        storage.write_text(self.marker, f"{point} at step {step}\n")
        self.armed = False
        log.warning("chaos: rank %d fails at %s, step %d", self.rank, point, step)
        if cfg.fail_mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"chaos: injected failure at {point}, step {step}")
