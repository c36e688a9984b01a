r"""Sampling throughput of DPAR vs the GPT baseline with random weights and classifier-free guidance:
images/s, ms per token step, tokens per patch, global steps per image, and where the time goes.

    python benchmarks/sample_throughput.py                                   # tiny models on a CPU
    python benchmarks/sample_throughput.py --models DGPT-L GPT-L --image-size 256 --downsample 16 \
        --vocab 16384 --num-classes 1000 --entropy-model GPT-B --device cuda --dtype bfloat16

DPAR's boundaries come from a random entropy model whose threshold is set so that random token
sequences give about ``--tokens-per-patch`` (1.81 = the paper's ImageNet-256 figure) with P=4 and row
breaks; generated images land near it. The "%" columns split a separate, synchronised run (see
:func:`stage_shares`) by stage: entropy model, DPAR's encoder, the global transformer (all of the GPT),
DPAR's decoder, and sampling from the logits. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import build_model, device_name, median_seconds, synchronize  # noqa: E402
from dpar import sampling  # noqa: E402
from dpar.data.preprocess import next_token_entropies  # noqa: E402
from dpar.models import DPAR, is_dpar  # noqa: E402
from dpar.patcher import PatcherConfig, calibrate_threshold  # noqa: E402
from dpar.sampling import SamplingConfig, generate  # noqa: E402


STAGES = ("entropy_model", "encoder", "global", "decoder", "sample")


def stage_shares(run, model, entropy_model, device: str) -> dict[str, float]:
    """Share of one ``run()``'s wall time in each stage of ``generate``: the entropy model, DPAR's encoder, the
    global transformer (all of the GPT), DPAR's decoder, and sampling from the logits; the rest is bookkeeping.

    A separate run whose stage functions are wrapped with timers that synchronise the device, so kernel time
    is charged to the stage that launched it. (torch.profiler's op-level trace of a 256-token DPAR-L sampling
    run is hundreds of thousands of events and takes minutes to summarise.)
    """
    spent = dict.fromkeys(STAGES, 0.0)

    def timed(function, stage):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(device)
                spent[stage] += time.perf_counter() - started
        return wrapper

    stages = [(sampling, "sample_from_logits", "sample")]
    if isinstance(model, DPAR):
        stages += [(sampling, "_global_step", "global"), (model, "encode_step", "encoder"),
                   (model, "decode_step", "decoder"), (entropy_model, "forward", "entropy_model")]
    else:
        stages.append((model, "forward", "global"))
    with ExitStack() as stack:
        for owner, name, stage in stages:
            stack.enter_context(mock.patch.object(owner, name, timed(getattr(owner, name), stage)))
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        total = time.perf_counter() - started
    return {stage: seconds / total for stage, seconds in spent.items()}


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
    sampling_config = SamplingConfig(cfg_scale=args.cfg_scale)
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
                outputs.append(generate(model, labels, seeds, sampling_config, patcher=patcher if dpar else None,
                                        entropy_model=entropy_model if dpar else None))

            seconds = median_seconds(run, args.device, args.repeats)
            out = outputs[-1]
            steps = float(out.global_steps.float().mean())
            shares = stage_shares(run, model, entropy_model if dpar else None, args.device)
            print(f"| {name} | {batch} | {batch / seconds:.2f} | {1000 * seconds / grid ** 2:.2f} | "
                  f"{grid ** 2 / steps:.2f} | {steps:.1f} | "
                  + " | ".join(f"{100 * shares[stage]:.0f}" for stage in STAGES) + " |", flush=True)


if __name__ == "__main__":
    main()
