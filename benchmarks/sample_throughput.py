r"""Sampling throughput of DPAR vs the GPT baseline with random weights: images/s, ms per token step,
tokens per patch and global steps per image, with classifier-free guidance.

    python benchmarks/sample_throughput.py                                   # tiny models on a CPU
    python benchmarks/sample_throughput.py --models DGPT-B GPT-B --image-size 256 --downsample 16 \
        --vocab 16384 --num-classes 1000 --batch-sizes 1 16 64 --entropy-model GPT-B --device cuda

DPAR's boundaries come from a random entropy model whose threshold is set so that random token
sequences give about ``--tokens-per-patch`` (1.81 = the paper's ImageNet-256 figure) with P=4 and row
breaks; generated images land near it. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import platform
import time

import torch

from dpar.data.preprocess import next_token_entropies
from dpar.models import ModelConfig, create_model, is_dpar
from dpar.patcher import PatcherConfig, patch_starts
from dpar.sampling import SamplingConfig, generate


def calibrated_patcher(entropy_model, grid: int, vocab: int, target: float, device) -> PatcherConfig:
    """The entropy threshold at which random sequences give ``target`` tokens per patch (bisection)."""
    tokens = torch.randint(0, vocab, (16, grid * grid), generator=torch.Generator().manual_seed(0)).to(device)
    entropies = next_token_entropies(entropy_model, tokens)
    low, high = float(entropies[:, 1:].min()) - 1, float(entropies[:, 1:].max()) + 1
    for _ in range(30):
        patcher = PatcherConfig(threshold=(low + high) / 2, max_patch_length=4, row_break=True)
        tokens_per_patch = entropies.numel() / float(patch_starts(patcher, entropies, grid).sum())
        low, high = (patcher.threshold, high) if tokens_per_patch < target else (low, patcher.threshold)
    return patcher


def build(name: str, args, model_type: str = "c2i"):
    config = ModelConfig(gpt_model=name, model_type=model_type, image_size=args.image_size,
                         downsample_size=args.downsample, vocab_size=args.vocab, num_classes=args.num_classes)
    torch.manual_seed(0)
    model = create_model(config)
    with torch.no_grad():  # LlamaGen zero-initialises the head; random logits give realistic entropies
        model.output.weight.normal_(std=0.02 * 50)
    return model.eval().to(args.device, dtype=getattr(torch, args.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DGPT-tiny", "GPT-tiny"])
    parser.add_argument("--entropy-model", default="GPT-tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--downsample", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--num-classes", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--tokens-per-patch", type=float, default=1.81)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args()
    grid = args.image_size // args.downsample
    entropy_model = build(args.entropy_model, args, "uncond")
    patcher = calibrated_patcher(entropy_model, grid, args.vocab, args.tokens_per_patch, args.device)
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(f"device {device_name}, torch {torch.__version__}, {args.dtype}, {grid}x{grid} tokens, "
          f"cfg {args.cfg_scale}, threshold {patcher.threshold:.3f}\n")
    print("| model | batch | images/s | ms per token step | tokens/patch | global steps/image |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        model = build(name, args)
        dpar = is_dpar(name)
        for batch in args.batch_sizes:
            labels = torch.arange(batch, device=args.device) % args.num_classes
            timings = []
            for repeat in range(args.repeats + 1):
                seeds = torch.arange(batch) + 1000 * repeat
                if args.device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                out = generate(model, labels, seeds, sampling, patcher=patcher if dpar else None,
                               entropy_model=entropy_model if dpar else None)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - started)
            seconds = sorted(timings[1:])[len(timings[1:]) // 2]  # median of the timed runs
            steps = float(out.global_steps.float().mean())
            print(f"| {name} | {batch} | {batch / seconds:.2f} | {1000 * seconds / grid ** 2:.2f} | "
                  f"{grid ** 2 / steps:.2f} | {steps:.1f} |")


if __name__ == "__main__":
    main()
