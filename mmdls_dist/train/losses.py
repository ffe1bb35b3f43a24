"""Multi-task losses. Each task term is a pure function; `compute_losses` returns every term
separately plus their weighted total.

Unknown labels (-1, NaN times) skip their term per patient. Every term is a masked sum over
fixed shapes: no boolean indexing, no `.item()`, nothing that makes the host wait for the
device inside a training step (tests/unit/test_host_sync.py). A term with no usable
patient is a zero still connected to the graph, so DDP sees a gradient for every parameter
on every rank (a disconnected zero would hang or break its gradient sync).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mmdls_dist.config import LossConfig
from mmdls_dist.data.schema import ENDPOINTS, Batch
from mmdls_dist.model.output import ModelOutput

Gather = Callable[..., tuple[list[torch.Tensor], int]]

TERMS = ("seg_lung", "seg_lesion", "histology", "stage", "cox_dfs", "cox_os")


def _masked_mean(per_patient: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    """Mean of per_patient [B] over `include` [B] bool; 0 (connected) when none is."""
    weight = include.to(per_patient.dtype)
    return (per_patient * weight).sum() / weight.sum().clamp(min=1)


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    slice_mask: torch.Tensor,
    include: torch.Tensor,
    smooth: float = 1.0,
) -> torch.Tensor:
    """Soft-Dice + BCE per patient over its real slices, mean over included patients.

    logits [B,S,H,W], target [B,S,H,W] in {0,1}, slice_mask [B,S] bool, include [B] bool.
    Dice per patient: 1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), p = sigmoid.
    BCE per patient: mean over the pixels of its real slices.
    """
    target = target.to(logits.dtype)
    m = slice_mask[:, :, None, None].to(logits.dtype)
    p = torch.sigmoid(logits) * m
    t = target * m
    inter = (p * t).sum((1, 2, 3))
    dice = 1 - (2 * inter + smooth) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * m
    pixels = m.sum((1, 2, 3)).clamp(min=1) * logits.shape[-1] * logits.shape[-2]
    return _masked_mean(dice + bce.sum((1, 2, 3)) / pixels, include)


def histology_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over patients with a known label (label -1 = unknown). [B], [B]."""
    target = label.clamp(min=0).to(logit.dtype)
    per_patient = F.binary_cross_entropy_with_logits(logit, target, reduction="none")
    return _masked_mean(per_patient, label >= 0)


def stage_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over patients with a known stage. logits [B,3], label [B] (-1 unknown)."""
    per_patient = F.cross_entropy(logits, label.clamp(min=0), reduction="none")
    return _masked_mean(per_patient, label >= 0)


def partial_likelihood(
    log_hz: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    known: torch.Tensor,
    ties: str = "efron",
) -> torch.Tensor:
    """Negative Cox partial log-likelihood summed over the known events, Efron or Breslow
    ties: log_hz, time [N] float, event, known [N] bool; unknown patients are in no risk
    set. Pairwise [N, N] masks over the global batch (N = world x per-GPU batch, a few
    thousand at most), so every shape is fixed and nothing waits on the device.

    Why not torchsurv's neg_partial_log_likelihood (the tests' oracle): it takes only the
    patients to count, so the caller must index them out with a mask, and it reads values
    back to the host: 14 reads per call (torch.unique, .item(), boolean indexing, input
    checks) and 2 copies to the CPU for a searchsorted, each of which stalls a GPU step and
    none of which CUDA graphs can capture. Efron:
    for event i, tied with d - 1 other events at its time and l-th among them,
    -log L_i = log(sum_risk exp h - l/d sum_tied exp h) - h_i."""
    if ties not in ("efron", "breslow"):
        raise ValueError(f"cox ties {ties!r}: expected efron or breslow")
    h = log_hz.to(torch.promote_types(log_hz.dtype, torch.float32))
    dead = event & known
    own = torch.eye(h.shape[0], dtype=torch.bool, device=h.device)  # keeps every row finite
    at_risk = (time[None, :] >= time[:, None]) & known[None, :]
    log_risk = torch.logsumexp(h[None, :].masked_fill(~(at_risk | own), float("-inf")), 1)
    nll = log_risk - h
    if ties == "efron":
        tied = (time[None, :] == time[:, None]) & dead[None, :]  # events at patient i's time
        log_tied = torch.logsumexp(h[None, :].masked_fill(~(tied | own), float("-inf")), 1)
        order = torch.arange(h.shape[0], device=h.device)
        before = (tied & (order[None, :] < order[:, None])).sum(1)  # l: tied events before i
        share = torch.where(dead, before.to(h.dtype) / tied.sum(1).clamp(min=1), 0.0)
        nll = nll + torch.log1p(-share * torch.exp(log_tied - log_risk))
    return torch.where(dead, nll, 0.0).sum()


@dataclass
class CoxTerm:
    loss: torch.Tensor  # value = mean negative partial log-likelihood per event; see cox_loss
    n_events: torch.Tensor  # events of the known patients in the global batch (device scalar)


def cox_loss(
    log_hz: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    known: torch.Tensor,
    *,
    ties: str = "efron",
    gather: Gather | None = None,
) -> CoxTerm:
    """Cox negative partial log-likelihood over the patients of all ranks.

    log_hz [B], time [B] (months), event [B] bool, known [B] bool. With `gather` (see
    distributed.gather_with_grad) every rank sees the global batch, so the risk sets
    compare each patient with everyone in the step, not just the few on its own GPU.

    Normalised by the number of events (torchsurv's reduction="mean" divides by the number
    of unique event times under ties, which would weight batches inconsistently). The
    returned value is that global loss on every rank; its gradient is scaled by the world
    size while the value is not, so that DDP's gradient averaging yields exactly the
    full-batch gradient, and anything multiplying the term (uncertainty weights) still sees
    the true value. No event, or a lone patient (its own risk set): 0, connected.
    """
    world = 1
    values = [log_hz, time.to(torch.float32), event.to(log_hz.dtype), known.to(log_hz.dtype)]
    if gather is not None:
        values, world = gather(*values)
    all_hz, all_time, all_event, all_known = values
    keep = all_known > 0
    dead = (all_event > 0) & keep
    n_events = dead.sum()
    nll = partial_likelihood(all_hz, all_time, dead, keep, ties)
    value = nll / n_events.clamp(min=1)
    scaled = world * value - (world - 1) * value.detach()
    return CoxTerm(scaled, n_events)


class TaskWeighting(nn.Module):
    """Combine task terms: fixed weights, or learned uncertainty weighting (Kendall, Gal &
    Cipolla 2018): sum_k exp(-s_k) L_k + s_k with s_k = log sigma_k^2 learned, for the terms
    whose fixed weight is > 0 (a weight of 0 switches a task off in both modes).

    Has parameters in "uncertainty" mode: put it inside the DDP-wrapped module and the
    optimizer, so every rank keeps the same s_k.
    """

    def __init__(self, cfg: LossConfig):
        super().__init__()
        self.mode = cfg.weighting
        self.weights = cfg.task_weights()
        active = [k for k in TERMS if self.weights[k] > 0]
        self.index = {k: i for i, k in enumerate(active)}
        if self.mode == "uncertainty":
            self.log_vars = nn.Parameter(torch.zeros(len(active)))

    def forward(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, value in parts.items():
            if name not in self.index:
                continue
            if self.mode == "uncertainty":
                s = self.log_vars[self.index[name]]
                term = torch.exp(-s) * value + s
            else:
                term = self.weights[name] * value
            total = term if total is None else total + term
        if total is None:
            raise ValueError("every task weight is 0: nothing to optimise")
        return total


@dataclass
class LossOutput:
    total: torch.Tensor  # backward() this
    parts: dict[str, torch.Tensor]  # each term's value (before weighting)
    # patients / events behind each term, device scalars (read them outside the step)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)


def compute_losses(
    output: ModelOutput,
    batch: Batch,
    cfg: LossConfig,
    weighting: TaskWeighting,
    gather: Gather | None = None,
) -> LossOutput:
    """Batch + ModelOutput -> every task term and the weighted total."""
    parts: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    everyone = torch.ones_like(batch.lesion_annotated)
    if output.lung_logits is not None:
        parts["seg_lung"] = dice_bce_loss(
            output.lung_logits, batch.lung_mask, batch.slice_mask, everyone, cfg.dice_smooth
        )
        parts["seg_lesion"] = dice_bce_loss(
            output.lesion_logits,
            batch.lesion_mask,
            batch.slice_mask,
            batch.lesion_annotated,
            cfg.dice_smooth,
        )
        counts["seg_lung"] = everyone.sum()
        counts["seg_lesion"] = batch.lesion_annotated.sum()
    parts["histology"] = histology_loss(output.histology_logit, batch.histology)
    counts["histology"] = (batch.histology >= 0).sum()
    parts["stage"] = stage_loss(output.stage_logits, batch.stage)
    counts["stage"] = (batch.stage >= 0).sum()
    for endpoint in ENDPOINTS:
        term = cox_loss(
            getattr(output, f"{endpoint}_log_hazard"),
            torch.nan_to_num(getattr(batch, f"{endpoint}_time"), nan=1.0),
            getattr(batch, f"{endpoint}_event"),
            getattr(batch, f"{endpoint}_known"),
            ties=cfg.cox_ties,
            gather=gather,
        )
        parts[f"cox_{endpoint}"] = term.loss
        counts[f"cox_{endpoint}_events"] = term.n_events
    return LossOutput(weighting(parts), parts, counts)
