"""Each loss term against hand computations and reference libraries; the global-batch Cox
gradient under DDP against the single-process full-batch gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from helpers import TINY_MODEL
from sklearn.metrics import log_loss
from torch import nn
from torchsurv.loss.cox import neg_partial_log_likelihood

from mmdls_dist.config import DataConfig, LossConfig, ModelConfig
from mmdls_dist.data.loader import make_loader
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.train.losses import (
    TaskWeighting,
    compute_losses,
    cox_loss,
    dice_bce_loss,
    histology_loss,
    partial_likelihood,
    stage_loss,
)


def cox_nll_numpy(eta, time, event, ties="efron"):
    """Negative Cox partial log-likelihood by the textbook formulas, summed over events."""
    eta, time, event = map(np.asarray, (eta, time, event))
    total = 0.0
    for t in np.unique(time[event == 1]):
        dead = (time == t) & (event == 1)
        risk = np.exp(eta[time >= t]).sum()
        d = dead.sum()
        total += eta[dead].sum()
        if ties == "breslow":
            total -= d * np.log(risk)
        else:
            tied = np.exp(eta[dead]).sum()
            total -= sum(np.log(risk - (k / d) * tied) for k in range(d))
    return -total


TIED = dict(
    eta=[0.3, -1.2, 0.8, 0.1, 0.0, 1.5, -0.4, 0.9],
    time=[5.0, 5.0, 5.0, 8.0, 12.0, 12.0, 20.0, 3.0],
    event=[1, 1, 0, 1, 1, 1, 0, 0],
)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_cox_matches_the_textbook_formula_with_ties(ties):
    eta = torch.tensor(TIED["eta"])
    term = cox_loss(
        eta,
        torch.tensor(TIED["time"]),
        torch.tensor(TIED["event"]).bool(),
        torch.ones(8, dtype=torch.bool),
        ties=ties,
    )
    expected = cox_nll_numpy(TIED["eta"], TIED["time"], TIED["event"], ties) / 5  # 5 events
    assert term.loss.item() == pytest.approx(expected, rel=1e-6)
    assert term.n_events == 5
    # torchsurv's "mean" divides by the 3 unique event times instead: the trap we avoid.
    mean = neg_partial_log_likelihood(
        eta, torch.tensor(TIED["event"]).bool(), torch.tensor(TIED["time"]), ties_method=ties
    )
    assert mean.item() == pytest.approx(expected * 5 / 3, rel=1e-6)


@pytest.mark.parametrize("ties", ["efron", "breslow"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_likelihood_matches_torchsurv_values_and_gradients(ties, seed):
    """Random batches with many ties (times drawn from 6 values), censoring and unknown
    patients mixed in: the masked fixed-shape likelihood equals torchsurv's on the known
    patients alone, value and gradient (unknown patients get none)."""
    g = torch.Generator().manual_seed(seed)
    n = 40
    log_hz = (2 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_()
    time = torch.randint(1, 7, (n,), generator=g).double()
    event = torch.rand(n, generator=g) < 0.6
    known = torch.rand(n, generator=g) < 0.8
    ours = partial_likelihood(log_hz, time, event, known, ties)
    (grad,) = torch.autograd.grad(ours, log_hz)
    leaf = log_hz.detach()[known].requires_grad_()
    theirs = neg_partial_log_likelihood(
        leaf, event[known], time[known], ties_method=ties, reduction="sum"
    )
    theirs.backward()
    # torchsurv accumulates Efron's sums in float32 whatever the input: float32 agreement;
    # the float64 textbook formula agrees more tightly.
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(grad[known], leaf.grad.double(), rtol=1e-5, atol=1e-6)
    k = known.numpy()
    textbook = cox_nll_numpy(log_hz.detach().numpy()[k], time.numpy()[k], event.numpy()[k], ties)
    assert ours.item() == pytest.approx(textbook, rel=1e-12)
    assert grad[~known].abs().sum() == 0


def test_cox_skips_unknown_labels_and_stays_connected_without_events():
    eta = torch.tensor(TIED["eta"] + [9.0, -9.0], requires_grad=True)
    time = torch.tensor(TIED["time"] + [1.0, 1.0])
    event = torch.tensor(TIED["event"] + [1, 1]).bool()
    known = torch.tensor([True] * 8 + [False, False])
    term = cox_loss(eta, time, event, known)
    expected = cox_nll_numpy(TIED["eta"], TIED["time"], TIED["event"]) / 5
    assert term.loss.item() == pytest.approx(expected, rel=1e-6)
    term.loss.backward()
    assert eta.grad[8:].abs().sum() == 0 and eta.grad[:8].abs().sum() > 0

    alone = cox_loss(eta[:1], time[:1], event[:1], known[:1])
    assert alone.loss.item() == 0 and alone.loss.requires_grad and alone.n_events == 1

    censored = cox_loss(eta, time, torch.zeros(10, dtype=torch.bool), known)
    assert censored.loss.item() == 0 and censored.loss.requires_grad
    eta.grad = None
    censored.loss.backward()
    assert eta.grad is not None and eta.grad.abs().sum() == 0


def test_classification_terms_match_sklearn():
    logit = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3])
    label = torch.tensor([1, 0, -1, 1, 0])
    known = [0, 1, 3, 4]
    p = torch.sigmoid(logit).numpy()
    expected = log_loss(label.numpy()[known], p[known], labels=[0, 1])
    assert histology_loss(logit, label).item() == pytest.approx(expected, rel=1e-6)

    logits = torch.tensor([[1.0, 0.2, -0.5], [0.0, 0.0, 3.0], [2.0, 1.0, 0.0], [0.3, 0.3, 0.3]])
    stage = torch.tensor([0, 2, -1, 1])
    probs = torch.softmax(logits, 1).numpy()
    expected = log_loss(stage.numpy()[[0, 1, 3]], probs[[0, 1, 3]], labels=[0, 1, 2])
    assert stage_loss(logits, stage).item() == pytest.approx(expected, rel=1e-6)

    nothing = torch.tensor([-1, -1, -1, -1, -1])
    assert histology_loss(logit.requires_grad_(), nothing).requires_grad


def test_dice_bce_by_hand():
    logits = torch.tensor(
        [
            [[[2.0, -1.0], [0.0, 3.0]], [[9.0, 9.0], [9.0, 9.0]]],
            [[[-2.0, 1.0], [1.0, -3.0]], [[0.0, 0.0], [0.0, 0.0]]],
        ]
    )
    target = torch.tensor(
        [[[[1, 0], [0, 1]], [[0, 0], [0, 0]]], [[[0, 0], [1, 1]], [[1, 1], [1, 1]]]],
        dtype=torch.uint8,
    )
    slice_mask = torch.tensor([[True, False], [True, True]])  # patient 0: 1 real slice
    include = torch.tensor([True, True])
    p = torch.sigmoid(logits).numpy()
    t = target.numpy().astype(float)

    def one(pp, tt, smooth=1.0):
        dice = 1 - (2 * (pp * tt).sum() + smooth) / (pp.sum() + tt.sum() + smooth)
        bce = -(tt * np.log(pp) + (1 - tt) * np.log(1 - pp)).mean()
        return dice + bce

    expected = (one(p[0, :1], t[0, :1]) + one(p[1], t[1])) / 2
    got = dice_bce_loss(logits, target, slice_mask, include)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    only_second = dice_bce_loss(logits, target, slice_mask, torch.tensor([False, True]))
    assert only_second.item() == pytest.approx(one(p[1], t[1]), rel=1e-5)


def test_task_weighting_fixed_and_uncertainty():
    parts = {
        "histology": torch.tensor(2.0),
        "stage": torch.tensor(3.0),
        "cox_os": torch.tensor(0.5),
        "seg_lung": torch.tensor(7.0),
    }
    cfg = LossConfig(w_histology=2.0, w_stage=0.5, w_os=1.0, w_seg_lung=0.0)
    assert TaskWeighting(cfg)(parts).item() == pytest.approx(2 * 2 + 0.5 * 3 + 0.5)
    weighting = TaskWeighting(LossConfig(weighting="uncertainty", w_seg_lung=0.0))
    with torch.no_grad():
        for name, s in (("histology", 0.5), ("stage", -1.0), ("cox_os", 2.0)):
            weighting.log_vars[weighting.index[name]] = s
    expected = sum(np.exp(-s) * v + s for v, s in ((2.0, 0.5), (3.0, -1.0), (0.5, 2.0)))
    assert weighting(parts).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="every task weight is 0"):
        TaskWeighting(
            LossConfig(w_seg_lung=0, w_seg_lesion=0, w_histology=0, w_stage=0, w_dfs=0, w_os=0)
        )(parts)


def test_compute_losses_on_a_batch(shard_dir):
    cfg = DataConfig(shards=str(shard_dir), batch_size=6, max_slices=5, num_workers=0)
    batch = next(iter(make_loader(cfg, "train", "eval")))
    torch.manual_seed(0)
    model = MMDLS(ModelConfig(**TINY_MODEL))
    out = model(batch)
    loss_cfg = LossConfig()
    result = compute_losses(out, batch, loss_cfg, TaskWeighting(loss_cfg))
    assert set(result.parts) == {
        "seg_lung",
        "seg_lesion",
        "histology",
        "stage",
        "cox_dfs",
        "cox_os",
    }
    weights = loss_cfg.task_weights()
    expected = sum(weights[k] * v for k, v in result.parts.items())
    assert result.total.item() == pytest.approx(expected.item(), rel=1e-6)
    lesion = dice_bce_loss(
        out.lesion_logits, batch.lesion_mask, batch.slice_mask, batch.lesion_annotated
    )
    assert result.parts["seg_lesion"].item() == pytest.approx(lesion.item())
    assert result.counts["seg_lesion"] == int(batch.lesion_annotated.sum())
    known = batch.os_known
    nll = cox_nll_numpy(
        out.os_log_hazard[known].detach().numpy(),
        batch.os_time[known].numpy(),
        batch.os_event[known].numpy().astype(int),
    )
    assert result.parts["cox_os"].item() == pytest.approx(
        nll / int(result.counts["cox_os_events"]), rel=1e-5
    )


@pytest.mark.slow
def test_global_batch_cox_gradient_equals_full_batch(tmp_path):
    """2 gloo processes under DDP, uneven local batches, ties, unknown labels and a rank
    whose own patients are all censored: gradients equal the full-batch ones."""
    from cox_worker import run

    g = torch.Generator().manual_seed(1)
    n = 13
    data = {
        "x": torch.randn(n, 5, generator=g),
        "time": torch.tensor([4.0, 4.0, 7.0, 9.0, 9.0, 2.0, 11.0, 3.0, 6.0, 8.0, 8.0, 1.0, 5.0]),
        "event": torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1]).bool(),
        "known": torch.tensor([1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 0, 1]).bool(),
    }
    cuts = [0, 5, n]  # rank 0: 5 patients, all censored; rank 1: 8
    out = str(tmp_path / "result")
    mp.spawn(run, args=(2, str(tmp_path / "init"), data, cuts, out), nprocs=2, join=True)

    torch.manual_seed(0)
    model = nn.Linear(5, 1)
    log_hz = model(data["x"])[:, 0]
    k = data["known"]
    nll = neg_partial_log_likelihood(
        log_hz[k], data["event"][k], data["time"][k], ties_method="efron", reduction="sum"
    )
    loss = nll / int(data["event"][k].sum())
    loss.backward()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
        assert got["events"] == int(data["event"][k].sum()) == 6
        for g_ddp, p in zip(got["grads"], model.parameters(), strict=True):
            assert torch.allclose(g_ddp, p.grad, atol=1e-6, rtol=0), (g_ddp, p.grad)


@pytest.mark.slow
def test_tiny_model_overfits_a_batch(shard_dir):
    """End-to-end learnability: every term (segmentation included) falls by more than half."""
    cfg = DataConfig(shards=str(shard_dir), batch_size=8, max_slices=6, num_workers=0)
    batch = next(iter(make_loader(cfg, "train", "eval")))
    torch.manual_seed(0)
    model = MMDLS(
        ModelConfig(
            widths=(8, 16, 16, 32),
            decoder_width=16,
            cross_attention_heads=2,
            embed_dim=32,
            fusion_heads=2,
            tabular_hidden=32,
            dropout=0.0,
        )
    )
    loss_cfg = LossConfig()
    weighting = TaskWeighting(loss_cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        result = compute_losses(model(batch), batch, loss_cfg, weighting)
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()
        if first is None:
            first = {k: v.item() for k, v in result.parts.items()}
    last = {k: v.item() for k, v in result.parts.items()}
    for name in first:
        assert last[name] < 0.5 * first[name], (name, first[name], last[name])
