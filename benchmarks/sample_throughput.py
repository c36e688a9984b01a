r"""Sampling throughput of DPAR vs the GPT baseline with random weights and classifier-free guidance:
images/s, ms per token step, tokens per patch, global steps per image, and where the time goes.

    python benchmarks/sample_throughput.py                                   # tiny models on a CPU
    python benchmarks/sample_throughput.py --models DGPT-L GPT-L --image-size 256 --downsample 16 \
        --vocab 16384 --num-classes 1000 --entropy-model GPT-B --device cuda --dtype bfloat16

DPAR's boundaries come from a random entropy model whose threshold is set so that random token
sequences give about ``--tokens-per-patch`` (1.81 = the paper's ImageNet-256 figure) with P=4 and row
breaks; generated images land near it. The "%" columns split one profiled run by the stage labels of
``dpar.sampling.generate``: entropy model, DPAR's encoder, the global transformer (all of the GPT),
DPAR's decoder, and guidance + sampling. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import build_model, device_name, median_seconds  # noqa: E402
from dpar.data.preprocess import next_token_entropies  # noqa: E402
from dpar.models import is_dpar  # noqa: E402
from dpar.patcher import PatcherConfig, calibrate_threshold  # noqa: E402
from dpar.sampling import SamplingConfig, generate  # noqa: E402


STAGES = ("entropy_model", "encoder", "global", "decoder", "sample")


def stage_shares(run, device: str) -> dict[str, float]:
    """Share of one ``run()``'s time in each labelled stage of ``generate`` (host time on a CPU, kernel time
    on CUDA; the rest is bookkeeping between stages)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        run()
    events = {e.key: e for e in profile.key_averages()}
    spent = {stage: getattr(events[stage], "device_time_total" if cuda else "cpu_time_total") if stage in events
             else 0.0 for stage in STAGES}
    total = sum(e.self_device_time_total for e in events.values()) if cuda else \
        sum(e.self_cpu_time_total for e in events.values())
    return {stage: value / total for stage, value in spent.items()}


def calibrated_patcher(entropy_model, grid: int, vocab: int, target: float, device) -> PatcherConfig:
    """P=4 and row breaks, with the θ at which random token sequences give ``target`` tokens per patch."""
    tokens = torch.randint(0, vocab, (16, grid * grid), generator=torch.Generator().manual_seed(0)).to(device)
    entropies = next_token_entropies(entropy_model, tokens).float().cpu()
    return PatcherConfig(threshold=calibrate_threshold(entropies, grid, target), max_patch_length=4, row_break=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DGPT-tiny", "GPT-tiny"])
    parser.add_argument("--entropy-model", default="GPT-tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--downsample", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--num-classes", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--tokens-per-patch", type=float, default=1.81)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting (after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    grid = args.image_size // args.downsample

    def build(name: str, model_type: str = "c2i"):
        return build_model(name, image_size=args.image_size, downsample=args.downsample, vocab=args.vocab,
                           num_classes=args.num_classes, device=args.device, model_type=model_type,
                           dtype=getattr(torch, args.dtype)).eval()

    entropy_model = build(args.entropy_model, "uncond")
    patcher = calibrated_patcher(entropy_model, grid, args.vocab, args.tokens_per_patch, args.device)
    sampling = SamplingConfig(cfg_scale=args.cfg_scale)
    print(f"device {device_name(args.device)}, torch {torch.__version__}, {args.dtype}, {grid}x{grid} tokens, "
          f"cfg {args.cfg_scale}, threshold {patcher.threshold:.3f}\n")
    print("| model | batch | images/s | ms per token step | tokens/patch | global steps/image | "
          + " | ".join(f"% {stage}" for stage in STAGES) + " |")
    print("|---|---|---|---|---|---|" + "---|" * len(STAGES))
    for name in args.models:
        model = build(name)
        dpar = is_dpar(name)
        for batch in args.batch_sizes:
            labels = torch.arange(batch, device=args.device) % args.num_classes
            outputs = []

            def run():
                seeds = torch.arange(batch) + 1000 * len(outputs)
                outputs.append(generate(model, labels, seeds, sampling, patcher=patcher if dpar else None,
                                        entropy_model=entropy_model if dpar else None))

            seconds = median_seconds(run, args.device, args.repeats)
            out = outputs[-1]
            steps = float(out.global_steps.float().mean())
            shares = stage_shares(run, args.device)
            print(f"| {name} | {batch} | {batch / seconds:.2f} | {1000 * seconds / grid ** 2:.2f} | "
                  f"{grid ** 2 / steps:.2f} | {steps:.1f} | "
                  + " | ".join(f"{100 * shares[stage]:.0f}" for stage in STAGES) + " |", flush=True)


if __name__ == "__main__":
    main()
