"""One training step (forward, multitask loss, backward, AdamW) in fp32 vs. under mixed precision.

    python benchmarks/train_step.py [--backbones small_cnn,resnet18_lowres] [--batch-size 128] [--threads 2]

The baseline is the same step in fp32 in the same run; the ratio is what `TrainConfig.amp` buys on
this machine (bf16 autocast on a CPU with native bf16 — AVX512-BF16 or AMX —, bf16/fp16 on CUDA);
the last column says whether training uses it for that backbone (not on a CPU for depthwise convs).
Median of timed steps after warm-up, channels_last as in training. Prints one row per backbone.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def step_ms(backbone: str, dtype: torch.dtype | None, batch_size: int, image_size: int, device: torch.device,
            steps: int) -> float:
    from model.network import build_model
    from schemas.taxonomy import load_taxonomy
    from training.train import adamw

    torch.manual_seed(0)
    tax = load_taxonomy("fashion-mnist")
    model = build_model(backbone, tax, pretrained=False).to(device).to(memory_format=torch.channels_last).train()
    opt = adamw(model.parameters(), lr=1e-3)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(tax.categories), (batch_size,), device=device)
    times = []
    for i in range(steps + 5):
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        loss = torch.nn.functional.cross_entropy(out.category.float(), y) + out.embedding.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 5:  # warm-up: allocator, oneDNN/cuDNN kernel choice
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", default="small_cnn", help="comma-separated registered backbones")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=40, help="timed steps per configuration")
    args = p.parse_args()
    from model.backbones import create_backbone
    from model.inference import mixed_precision_dtype

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = mixed_precision_dtype(device, training=True)
    print(f"device {device}, {args.threads} threads, batch {args.batch_size} × {args.image_size} px, "
          f"mixed precision: {dtype or 'none (fp32 only: this machine has no native bf16)'}")
    print(f"{'backbone':<18}{'fp32 ms':>10}{'amp ms':>10}{'fp32/amp':>10}  training uses amp")
    for name in args.backbones.split(","):
        fp32 = step_ms(name, None, args.batch_size, args.image_size, device, args.steps)
        amp = step_ms(name, dtype, args.batch_size, args.image_size, device, args.steps) if dtype else fp32
        used = mixed_precision_dtype(device, training=True, model=create_backbone(name, pretrained=False).module)
        print(f"{name:<18}{fp32:>10.1f}{amp:>10.1f}{fp32 / amp:>9.2f}×  {'yes' if used else 'no'}")


if __name__ == "__main__":
    main()
