"""GPU training throughput with the real loader: patients/s per GPU and data-wait fraction.

    python bench/bench_gpu_train.py [--patients 160] [--steps 60] [--batch 4 16 32]
                                    [--compile off default] [--peak-tflops 989]
    python bench/bench_gpu_train.py --flops-only --device cpu --patients 8   # no GPU needed

Runs the same per-worker loop as Ray Train (mmdls_dist.train.Trainer) in one process on one
GPU, paper preset (224 x 224, 30 slices, bf16, channels_last), on synthetic shards it makes
first (with a process pool). Ray itself is not needed here, so the script runs on a bare GPU
box; on a cluster the same figures are the run's train/patients_per_s and
train/data_wait_fraction in TensorBoard. Reports, per batch size: patients/s and the share
of the step time spent waiting for the next batch from the DataLoader.

Each row ends with the validation C-index after the two epochs, the quality check that a
compiled step trains the same model as the eager one.

The roofline: the FLOPs of one training step per patient (forward, losses and backward,
counted by torch.utils.flop_counter on a real batch: convolutions, matmuls, attention),
then per measured row the achieved TFLOP/s and its share of the GPU's dense bf16 peak
(--peak-tflops; H100 / H200 SXM 989, A100 312). The counter counts what the network
computes, not what a kernel moves, so the share says how far the step is from the
arithmetic limit, not why.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import torch

from mmdls_dist.config import PrepConfig, SynthConfig, load_config
from mmdls_dist.data.ingest import read_cohort
from mmdls_dist.data.loader import make_loader
from mmdls_dist.data.shards import MANIFEST, build_shards
from mmdls_dist.data.synth import generate
from mmdls_dist.train.loop import Trainer, TrainModule

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def make_shards(out: Path, patients: int, processes: int) -> str:
    shards = out / "shards"
    if (shards / MANIFEST).exists():
        return str(shards)
    with multiprocessing.get_context("spawn").Pool(processes) as pool:

        def mapper(fn, items):
            return pool.map(fn, items)

        t0 = time.perf_counter()
        spec = SynthConfig(
            patients=patients, centers=1, image_size=224, min_slices=30, max_slices=40
        )
        generate(spec, out / "raw", out / "truth.json", mapper=mapper)
        report = read_cohort(out / "raw", mapper=mapper)
        build_shards(
            report,
            shards,
            PrepConfig(
                image_size=224, max_patients_per_shard=16, val_fraction=0.1, test_fraction=0.0
            ),
            mapper=mapper,
        )
        print(
            f"made {patients} patients of 224 px x 30-40 slices in {time.perf_counter() - t0:.0f}s"
        )
    return str(shards)


def flops_per_patient(shards: str, batch: int = 2) -> tuple[float, float]:
    """FLOPs per patient of one training step (forward + losses + backward) and of its
    forward alone, at the paper preset. Device-independent: counted on the CPU in fp32 (the
    operators are the same in bf16)."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(
        "paper", [f"data.shards={shards}", f"data.batch_size={batch}", "data.num_workers=0"]
    )
    module = TrainModule(cfg)
    data = next(iter(make_loader(cfg.data, "train", "eval")))
    forward, step = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with forward:
        module(data, 0.5)
    with step:
        _, losses = module(data, 0.5)
        losses.total.backward()
    return step.get_total_flops() / len(data), forward.get_total_flops() / len(data)


def measure(
    shards: str, batch: int, steps: int, workers: int, device: torch.device, compile_mode: str
) -> dict:
    cfg = load_config(
        "paper",
        [
            f"data.shards={shards}",
            f"data.batch_size={batch}",
            f"data.steps_per_epoch={steps}",
            f"data.num_workers={workers}",
            "run.num_workers=1",
            "optim.epochs=2",
            f"run.compile={compile_mode}",
        ],
    )
    trainer = Trainer(cfg, device, 0, 1, lambda module: module.to(device))
    trainer.train_epoch(0, None)  # warm-up: cuDNN autotuning, allocator, worker start
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    metrics = trainer.train_epoch(1, None)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # The quality check: the validation C-index after these two epochs, eager or compiled.
    val = trainer.evaluate()[0]
    return {"batch": batch, **metrics, **val, "peak_GiB": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=160)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps measured")
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument(
        "--compile",
        nargs="+",
        default=["off"],
        help="run.compile modes to compare (off default max-autotune reduce-overhead)",
    )
    parser.add_argument("--loader-workers", type=int, default=6)
    parser.add_argument("--out", default="bench-out/gpu")
    parser.add_argument("--device", default="cuda", help="cpu only to smoke-test the script")
    parser.add_argument("--flops-only", action="store_true", help="count FLOPs, time nothing")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="dense bf16 peak (known GPUs: a table)"
    )
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    shards = make_shards(Path(args.out), args.patients, max(1, multiprocessing.cpu_count() - 1))
    flops, forward = flops_per_patient(shards)
    print(
        f"one training step: {flops / 1e9:.1f} GFLOP per patient "
        f"(forward {forward / 1e9:.1f}, backward {(flops - forward) / 1e9:.1f})"
    )
    if args.flops_only:
        return
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan")
    )
    print(
        f"paper preset on {name} (bf16 peak {peak:.0f} TFLOP/s), bf16 + channels_last, "
        f"{args.loader_workers} loader workers"
    )
    for mode in args.compile:
        for batch in args.batch:
            row = measure(shards, batch, args.steps, args.loader_workers, device, mode)
            rate = row["train/patients_per_s"]
            print(
                f"  compile {mode:<15} batch {batch:>3}: "
                f"{rate:7.1f} patients/s per GPU, "
                f"data wait {row['train/data_wait_fraction']:.1%} of step time, "
                f"peak {row['peak_GiB']:.1f} GiB, "
                f"{rate * flops / 1e12:.1f} TFLOP/s = {rate * flops / 1e12 / peak:.1%} of peak, "
                f"val C-index DFS {row['val/cindex_dfs']:.3f} OS {row['val/cindex_os']:.3f}"
            )


if __name__ == "__main__":
    main()
