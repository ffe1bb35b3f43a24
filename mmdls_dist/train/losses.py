"""Multi-task losses. Each task term is a pure function; `compute_losses` returns every term
separately plus their weighted total.

Unknown labels (-1, NaN times) skip their term per patient. A term with no usable patient
returns a zero that is still connected to the graph, so DDP sees a gradient for every
parameter on every rank (a disconnected zero would hang or break its gradient sync).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torchsurv.loss.cox import neg_partial_log_likelihood

from mmdls_dist.config import LossConfig
from mmdls_dist.data.schema import ENDPOINTS, Batch
from mmdls_dist.model.output import ModelOutput

Gather = Callable[..., tuple[list[torch.Tensor], int]]

TERMS = ("seg_lung", "seg_lesion", "histology", "stage", "cox_dfs", "cox_os")


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that depends on the tensors (keeps them in the autograd graph)."""
    return sum(t.sum() for t in tensors) * 0.0


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
    if not include.any():
        return _zero(logits)
    logits, target, valid = logits[include], target[include].to(logits.dtype), slice_mask[include]
    m = valid[:, :, None, None].to(logits.dtype)
    p = torch.sigmoid(logits) * m
    t = target * m
    inter = (p * t).sum((1, 2, 3))
    dice = 1 - (2 * inter + smooth) / (p.sum((1, 2, 3)) + t.sum((1, 2, 3)) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * m
    pixels = m.sum((1, 2, 3)) * logits.shape[-1] * logits.shape[-2]
    return (dice + bce.sum((1, 2, 3)) / pixels).mean()


def histology_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits over patients with a known label (label -1 = unknown). [B], [B]."""
    known = label >= 0
    if not known.any():
        return _zero(logit)
    return F.binary_cross_entropy_with_logits(logit[known], label[known].to(logit.dtype))


def stage_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over patients with a known stage. logits [B,3], label [B] (-1 unknown)."""
    known = label >= 0
    if not known.any():
        return _zero(logits)
    return F.cross_entropy(logits[known], label[known])


@dataclass
class CoxTerm:
    loss: torch.Tensor  # value = mean negative partial log-likelihood per event; see cox_loss
    n_patients: int
    n_events: int


def cox_loss(
    log_hz: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    known: torch.Tensor,
    *,
    ties: str = "efron",
    gather: Gather | None = None,
) -> CoxTerm:
    """Cox negative partial log-likelihood (torchsurv) over the patients of all ranks.

    log_hz [B], time [B] (months), event [B] bool, known [B] bool. With `gather` (see
    distributed.gather_with_grad) every rank sees the global batch, so the risk sets
    compare each patient with everyone in the step, not just the few on its own GPU.

    Normalised by the number of events (torchsurv's reduction="mean" divides by the number
    of unique event times under ties, which would weight batches inconsistently). The
    returned value is that global loss on every rank; its gradient is scaled by the world
    size while the value is not, so that DDP's gradient averaging yields exactly the
    full-batch gradient, and anything multiplying the term (uncertainty weights) still sees
    the true value.
    """
    world = 1
    values = [log_hz, time.to(torch.float32), event.to(log_hz.dtype), known.to(log_hz.dtype)]
    if gather is not None:
        values, world = gather(*values)
    all_hz, all_time, all_event, all_known = values
    keep = all_known > 0
    n_patients = int(keep.sum().item())
    n_events = int(all_event[keep].sum().item())
    if n_events == 0 or n_patients < 2:
        # No event, or a lone patient (its own risk set: log-likelihood 0, and torchsurv
        # rejects 1-element inputs): nothing to compare, a connected zero.
        return CoxTerm(_zero(log_hz), n_patients, n_events)
    with warnings.catch_warnings():
        # torchsurv warns on every tied time; ties are normal in months-rounded follow-up
        # and are handled by the chosen method, so the warning would only flood the logs.
        warnings.filterwarnings("ignore", message="Ties in `time` detected")
        nll = neg_partial_log_likelihood(
            all_hz[keep], all_event[keep] > 0, all_time[keep], ties_method=ties, reduction="sum"
        )
    value = nll / n_events
    scaled = world * value - (world - 1) * value.detach()
    return CoxTerm(scaled, n_patients, n_events)


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
    counts: dict[str, int] = field(default_factory=dict)  # patients / events behind each term


def compute_losses(
    output: ModelOutput,
    batch: Batch,
    cfg: LossConfig,
    weighting: TaskWeighting,
    gather: Gather | None = None,
) -> LossOutput:
    """Batch + ModelOutput -> every task term and the weighted total."""
    parts: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
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
        counts["seg_lung"] = len(batch)
        counts["seg_lesion"] = int(batch.lesion_annotated.sum())
    parts["histology"] = histology_loss(output.histology_logit, batch.histology)
    counts["histology"] = int((batch.histology >= 0).sum())
    parts["stage"] = stage_loss(output.stage_logits, batch.stage)
    counts["stage"] = int((batch.stage >= 0).sum())
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
