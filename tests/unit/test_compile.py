"""The compiled training step (run.compile) on CPU: static slice slots give the eager
model's outputs, the compiled network matches eager outputs and gradients, and batches with
other numbers of real slices do not recompile it.

The network goes through dynamo's capture and AOT autograd (backend "aot_eager"), where a
graph break, a guard that recompiles or a wrong backward of ours would show; inductor's
code generation is not ours to test and costs 1-5 minutes of C++ compilation on a cold
cache (a clean CI machine) on two cores."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import TINY_MODEL, TINY_TRAIN

from mmdls_dist.config import DataConfig, ModelConfig, load_config
from mmdls_dist.data.loader import make_loader
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.train.loop import TrainModule

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def batches(shard_dir):
    """Three training batches of 3 patients; fewer real slices in the later ones."""
    cfg = DataConfig(shards=str(shard_dir), batch_size=3, max_slices=6, num_workers=0)
    first = next(iter(make_loader(cfg, "train", "eval")))
    out = [first]
    for real in (4, 2):  # drop slices: other numbers of real slices, same slot count
        mask = first.slice_mask.clone()
        mask[:, real:] = False
        out.append(dataclasses.replace(first, slice_mask=mask))
    return out


def _outputs(model, batch, warmup: float):
    out = model(batch, warmup)
    return torch.cat([out.histology_logit, out.stage_logits.flatten(), out.os_log_hazard])


@pytest.mark.parametrize("warmup", [0.0, 0.5])
def test_static_slices_give_the_eager_models_outputs(batches, warmup):
    torch.manual_seed(0)
    dynamic = MMDLS(ModelConfig(**TINY_MODEL)).eval()
    static = MMDLS(ModelConfig(**TINY_MODEL), static_slices=True).eval()
    static.load_state_dict(dynamic.state_dict())
    for batch in batches:
        a, b = dynamic(batch, warmup), static(batch, warmup)
        torch.testing.assert_close(
            _outputs(static, batch, warmup), _outputs(dynamic, batch, warmup)
        )
        torch.testing.assert_close(a.lesion_logits, b.lesion_logits)
        torch.testing.assert_close(a.slice_weights, b.slice_weights)


def test_compiled_step_matches_eager_and_does_not_recompile(batches, monkeypatch):
    overrides = [*TINY_TRAIN, "data.max_slices=6"]
    torch.manual_seed(0)
    eager = TrainModule(load_config("debug", overrides))
    asked = []

    def compile_for_the_test(module, mode):  # TrainModule's call, on the aot_eager backend
        asked.append(mode)
        torch.nn.Module.compile(module, backend="aot_eager")

    monkeypatch.setattr(MMDLS, "compile", compile_for_the_test)
    torch.manual_seed(0)
    compiled = TrainModule(load_config("debug", [*overrides, "run.compile=max-autotune"]))
    assert asked == ["max-autotune"] and compiled.model.static_slices
    compiled.load_state_dict(eager.state_dict())  # same names: compilation is in place
    torch._dynamo.reset()
    results = {}
    for name, module in (("eager", eager), ("compiled", compiled)):
        # Dropout off (eval mode; the gradients flow the same): compiled code draws its
        # random numbers differently from eager, so dropout masks would differ.
        module.eval()
        _, losses = module(batches[0], 0.0)
        losses.total.backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        results[name] = (losses.total.detach(), grads)
    # Tolerance: the decomposed graph may order float32 sums differently; each parameter's
    # gradient is compared by its relative error norm (elementwise, a near-zero element's
    # relative error is noise).
    torch.testing.assert_close(results["compiled"][0], results["eager"][0], rtol=1e-4, atol=1e-5)
    assert results["compiled"][1].keys() == results["eager"][1].keys()
    # Parameters whose true gradient is 0, where what both report is rounding and a
    # relative error is noise (it reached 2.0 on one run): the Cox heads' biases (a partial
    # likelihood does not change when every log-hazard shifts) and, at these 32 px shards,
    # the segmentor's cross-attention query norm (a stride-32 bottleneck of one token: a
    # softmax over one key is constant). Checked instead: both report about nothing.
    zero = ("model.heads.dfs.bias", "model.heads.os.bias", "model.segmentor.cross.norm_q.weight",
            "model.segmentor.cross.norm_q.bias")  # fmt: skip
    largest = max(float(g.norm()) for g in results["eager"][1].values())
    for name in zero:
        for run in results.values():
            assert float(run[1][name].norm()) < 1e-5 * largest, name
    errors = {
        name: float((results["compiled"][1][name] - grad).norm() / grad.norm())
        for name, grad in results["eager"][1].items()
        if name not in zero
    }
    assert len(errors) > 50  # every other parameter of the network has a gradient
    print("largest relative gradient error:", max(errors.items(), key=lambda kv: kv[1]))
    assert max(errors.values()) < 1e-3, sorted(errors.items(), key=lambda kv: -kv[1])[:3]
    # Other numbers of real slices in the same slots: the compiled network is reused.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches[1:]:
            _, losses = compiled(batch, 0.0)
            losses.total.backward()
