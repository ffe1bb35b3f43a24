"""Training-step throughput and peak memory of the full MM-DLS network at paper resolution.

    python bench/bench_model.py                       # CPU: full, pixels, reference
    python bench/bench_model.py --device cuda         # GPU: bf16 autocast + channels_last

One step = forward + backward + AdamW update on a batch of B patients x 30 slices x
224 x 224 (segmentation, every view, fusion, all six loss terms). Each variant runs in a
fresh subprocess so its peak memory is its own.

  full       the package's model (ModelConfig defaults, the paper preset's reader crop)
  pixels     the same network with the original MM-DLS slice encoders (a conv encoder over
             the masked full-resolution CT) in place of mask pooling of the segmentor's
             maps: the design the package replaced, kept here as a measured reference
  reference  the original MM-DLS imaging model's cost profile (two 2-layer full-resolution
             conv encoders over the masked CT + attention fusion, no segmentation)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from mmdls_dist.config import LossConfig, ModelConfig
from mmdls_dist.data.schema import CLINICAL_FEATURES, N_RADIOMICS, PET_FEATURES, Batch
from mmdls_dist.model.layers import conv_norm_act, mlp
from mmdls_dist.model.mmdls import MMDLS
from mmdls_dist.model.views import SliceContext, log_area
from mmdls_dist.train.losses import TaskWeighting, compute_losses


def synthetic_batch(b: int, s: int, size: int, device: str) -> Batch:
    g = torch.Generator().manual_seed(0)
    packed = -(-size * size // 8)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    batch = Batch(
        ct=torch.randint(0, 256, (b, s, size, size), generator=g, dtype=torch.uint8),
        masks=torch.randint(0, 256, (b, 2, s, packed), generator=g, dtype=torch.uint8),
        slice_mask=torch.ones(b, s, dtype=torch.bool),
        lesion_annotated=torch.ones(b, dtype=torch.bool),
        clinical=rnd(b, len(CLINICAL_FEATURES)),
        clinical_missing=torch.zeros(b, len(CLINICAL_FEATURES), dtype=torch.bool),
        pet=rnd(b, len(PET_FEATURES)),
        pet_missing=torch.zeros(b, len(PET_FEATURES), dtype=torch.bool),
        radiomics=rnd(b, N_RADIOMICS),
        radiomics_missing=torch.zeros(b, N_RADIOMICS, dtype=torch.bool),
        histology=torch.arange(b) % 2,
        stage=torch.arange(b) % 3,
        dfs_time=torch.arange(1, b + 1, dtype=torch.float32),
        dfs_event=torch.ones(b, dtype=torch.bool),
        dfs_known=torch.ones(b, dtype=torch.bool),
        os_time=torch.arange(b, 0, -1, dtype=torch.float32),
        os_event=torch.ones(b, dtype=torch.bool),
        os_known=torch.ones(b, dtype=torch.bool),
        patient_id=[f"P{i}" for i in range(b)],
        center=["C"] * b,
    )
    return batch.to(device)


class ReferenceImaging(nn.Module):
    """The original imaging model's cost profile: two encoders of two full-resolution 3x3
    convs (32 and 64 channels) over [masked CT, mask], attention fusion over slices."""

    def __init__(self, dim: int = 128):
        super().__init__()

        def encoder() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(2, 32, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, 64, 3, padding=1),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(64, dim),
            )

        self.lesion, self.space = encoder(), encoder()
        self.attn = nn.MultiheadAttention(2 * dim, 4, batch_first=True)
        self.head = nn.Linear(2 * dim, 6)

    def forward(self, batch: Batch) -> torch.Tensor:
        b, s, h, w = batch.ct.shape
        x = (batch.ct.float() / 255.0).reshape(b * s, 1, h, w)
        lesion = batch.lesion_mask.reshape(b * s, 1, h, w).float()
        lung = batch.lung_mask.reshape(b * s, 1, h, w).float()
        tokens = torch.cat(
            [
                self.lesion(torch.cat([x * lesion, lesion], 1)),
                self.space(torch.cat([x * lung, lung], 1)),
            ],
            1,
        ).reshape(b, s, -1)
        fused, _ = self.attn(tokens, tokens, tokens)
        return self.head(fused.mean(1))


class PixelView(nn.Module):
    """The original LesionEncoder / SpaceEncoder as a slice view: CT x soft mask at full
    resolution through four strided convs, mean-pooled, plus the soft area."""

    def __init__(self, lesion: bool, width: int, embed_dim: int, dropout: float):
        super().__init__()
        self.lesion, self.out_dim = lesion, embed_dim
        self.convs = nn.Sequential(
            conv_norm_act(2, width, stride=2),
            conv_norm_act(width, 2 * width, stride=2),
            conv_norm_act(2 * width, 4 * width, stride=2),
            conv_norm_act(4 * width, 4 * width, stride=2),
        )
        self.proj = mlp(4 * width + 1, embed_dim, dropout)

    def forward(self, ctx: SliceContext) -> torch.Tensor:
        mask = ctx.lesion if self.lesion else ctx.lung * (1 - ctx.lesion)
        mask = nn.functional.interpolate(
            mask, size=ctx.image.shape[-2:], mode="bilinear", align_corners=False
        )
        x = self.convs(torch.cat([ctx.image * mask, mask], dim=1))
        return self.proj(torch.cat([x.mean((2, 3)), log_area(mask)], dim=1))


def build(variant: str) -> nn.Module:
    if variant == "reference":
        return ReferenceImaging()
    cfg = ModelConfig(lesion_reader=84)  # the paper preset's crop at 224 px
    model = MMDLS(cfg)
    if variant == "pixels":  # a view swapped in: the slice token's width follows
        model.slice_views = nn.ModuleDict(
            {
                name: PixelView(name == "lesion", 16, cfg.embed_dim, cfg.dropout)
                for name in ("lesion", "space")
            }
        )
    return model


def run_one(variant: str, args: argparse.Namespace) -> dict:
    device = args.device
    torch.manual_seed(0)
    batch_size = args.reference_batch if variant == "reference" else args.batch
    batch = synthetic_batch(batch_size, args.slices, args.size, device)
    model = build(variant).to(device)
    if device == "cuda":
        model = model.to(memory_format=torch.channels_last)
    loss_cfg = LossConfig()
    weighting = TaskWeighting(loss_cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    amp = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        with amp:
            if variant == "reference":
                loss = model(batch).float().square().mean()
            else:
                loss = compute_losses(model(batch), batch, loss_cfg, weighting).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / (args.steps * batch_size)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "variant": variant,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": batch_size,
        "s_per_patient": seconds,
        "patients_per_s": 1 / seconds,
        "peak_MiB": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--variants", default="full,pixels,reference")
    parser.add_argument("--batch", type=int, default=4, help="patients per step")
    parser.add_argument("--reference-batch", type=int, default=1)
    parser.add_argument("--slices", type=int, default=30)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    passthrough = [
        f"--{name.replace('_', '-')}={value}"
        for name, value in vars(args).items()
        if name not in ("variants", "one")
    ]
    rows = []
    for variant in args.variants.split(","):
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--one", variant],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {threads} threads"
    print(f"train step (fwd + bwd + AdamW), {args.slices} slices x {args.size}^2, {where}")
    ref = next((r for r in rows if r["variant"] == "reference"), None)
    for r in rows:
        speedup = f"  {ref['s_per_patient'] / r['s_per_patient']:.1f}x vs reference" if ref else ""
        print(
            f"  {r['variant']:<9} {r['params_M']:.2f} M params, batch {r['batch']}: "
            f"{r['s_per_patient']:.3f} s/patient ({r['patients_per_s']:.1f} patients/s), "
            f"peak {r['peak_MiB']:.0f} MiB{speedup}"
        )


if __name__ == "__main__":
    main()
