"""What a training run prints: the settings changed against the preset, progress lines
inside an epoch, and Ray Train's per-report lines kept off the console."""

from __future__ import annotations

import logging

import pytest
import torch

from mmdls_dist.cli import _print_changes
from mmdls_dist.config import changes, load_config
from mmdls_dist.train import loop


def test_only_the_changed_settings_are_listed(capsys):
    base = load_config("debug")
    cfg = load_config("debug", ["optim.lr=0.01", "run.name=x", f"optim.epochs={base.optim.epochs}"])
    assert changes(base, cfg) == {"optim.lr": 0.01, "run.name": "x"}  # a no-op set is no change
    _print_changes(cfg, "debug")
    printed = capsys.readouterr().out.splitlines()
    assert printed == ["config: debug, with", "  optim.lr = 0.01", "  run.name = 'x'"]
    _print_changes(base, "debug")
    assert capsys.readouterr().out.strip() == "config: debug (no changes)"


def test_progress_line_every_n_seconds_with_rate_loss_and_eta(monkeypatch, caplog):
    clock = iter([100.0, 105.0, 106.0, 131.0, 140.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="mmdls_dist")
    line = loop.ProgressLine("epoch 2/5", steps=10, every_s=20.0)  # starts at t=100
    line(2, 8, torch.tensor(9.0))  # t=105: not yet due
    line(3, 12, torch.tensor(12.0))  # t=106: not yet due
    line(5, 20, torch.tensor(20.0))  # t=131: due
    line(10, 40, torch.tensor(40.0))  # t=140: the last step, the epoch line follows
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["epoch 2/5  step 5/10  0.6 patients/s  loss 4.000  ETA 0:31"]


def test_no_progress_lines_when_switched_off(caplog):
    caplog.set_level(logging.INFO, logger="mmdls_dist")
    line = loop.ProgressLine("epoch 1/1", steps=10, every_s=0.0)
    for step in range(1, 10):
        line(step, step, torch.tensor(1.0))
    assert not caplog.records


def test_ray_trains_report_lines_are_quieted_on_the_workers():
    pytest.importorskip("ray.train.v2._internal.execution.context")
    from ray.train.v2._internal.execution import context

    reporter = logging.getLogger(context.__file__)
    reporter.setLevel(logging.NOTSET)
    loop.setup_worker_logging(1)
    assert not reporter.isEnabledFor(logging.INFO)  # "Reporting training result ..."
    assert reporter.isEnabledFor(logging.WARNING)
