r"""Training throughput of DPAR vs the LlamaGen baseline, interleaved in one process: step time, images/s,
tokens/s, peak memory and MFU from the model's own FLOP count (forward + backward = 3 x forward), and
DGPT-X's step time over GPT-X's as the median of pairwise ratios (DGPT step, GPT step, DGPT step, ...),
with its min-max: both models see the same machine load, which on a shared CPU matters more than either.

    python benchmarks/train_throughput.py                                  # tiny models on a CPU
    python benchmarks/train_throughput.py --models DGPT-B GPT-B DGPT-L GPT-L DGPT-XL GPT-XL \
        --image-size 256 384 --downsample 16 --vocab 16384 --num-classes 1000 --batch-size 64 --device cuda

Each step is the trainer's: ``dpar.training.forward_loss`` under bf16 autocast (CUDA) over fp32 weights,
backward, gradient clipping and LlamaGen's AdamW (fused), on one device. DPAR's batches carry
patch boundaries cut by the paper's rule from image-like synthetic entropies at the paper's mean patch
length (1.81 tokens at 256 px, 2.06 at 384 px); the batches are built on the host beforehand, as the
DataLoader workers do, and moved to the device inside the timed step. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import (build_model, check_grid, device_name, interleaved, median_seconds,  # noqa: E402
                                  model_pairs, peak_tflops, ratio_cell, realistic_patch_starts)
from dpar.data.dataset import PackedBatch  # noqa: E402
from dpar.flops import PAPER_TOKENS_PER_PATCH, count  # noqa: E402
from dpar.errors import ArgumentParser, run_main  # noqa: E402
from dpar.models import MODEL_NAMES, PatchLayout, is_dpar  # noqa: E402
from dpar.models.attention import BACKENDS  # noqa: E402
from dpar.training import TrainConfig, build_optimizer, forward_loss  # noqa: E402
from dpar.validation import device, number  # noqa: E402


def host_batches(name: str, count_: int, batch: int, grid: int, vocab: int, num_classes: int,
                 tokens_per_patch: float) -> list[PackedBatch]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(count_):
        tokens = torch.randint(0, vocab, (batch, grid * grid), generator=generator)
        labels = torch.randint(0, num_classes, (batch,), generator=generator)
        if not is_dpar(name):
            batches.append(PackedBatch(tokens, labels, None, None))
            continue
        starts = realistic_patch_starts(batch, grid, tokens_per_patch, seed=index)
        batches.append(PackedBatch(tokens, labels, starts, PatchLayout.from_mask(starts, grid)))
    return batches


def prepare(name: str, image_size: int, args):
    """(one training step as a function, a function of its median seconds -> the table row's figures). Runs
    the ``--warmup`` steps, and on CUDA takes the model's own peak memory then (what was resident before, e.g.
    the other model of a pair, left out)."""
    grid = image_size // args.downsample
    tokens_per_patch = args.tokens_per_patch or PAPER_TOKENS_PER_PATCH.get(image_size, 1.81)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(name, image_size=image_size, downsample=args.downsample, vocab=args.vocab,
                        num_classes=args.num_classes, device=args.device, attn_backend=args.attn_backend)
    model.train()
    optimizer = build_optimizer(model, TrainConfig())
    step_model = torch.compile(model, dynamic=is_dpar(name)) if args.compile else model
    batches = host_batches(name, 4, args.batch_size, grid, args.vocab, args.num_classes, tokens_per_patch)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda and args.bf16 else nullcontext
    state = {"index": 0}

    def step():
        batch = batches[state["index"] % len(batches)].to(args.device)
        state["index"] += 1
        with autocast():
            loss = forward_loss(step_model, batch, conditional=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    peak_memory = (torch.cuda.max_memory_allocated() - resident) / 2 ** 30 if cuda else None

    def figures(seconds: float) -> dict:
        positions = sum(b.positions for b in batches) / len(batches)
        flops = count(name, image_size, tokens_per_patch if is_dpar(name) else None, args.downsample, args.vocab,
                      args.num_classes)
        train_tflop_per_image = 3 * flops["gflops"] / 1e3
        achieved = train_tflop_per_image * args.batch_size / seconds
        peak = peak_tflops(args.device, args.peak_tflops)
        return {"model": name, "image_size": image_size, "step_ms": 1e3 * seconds,
                "images_per_s": args.batch_size / seconds, "tokens_per_s": args.batch_size * grid * grid / seconds,
                "tokens_per_patch": args.batch_size * grid * grid / positions,
                "train_gflops_per_image": 1e3 * train_tflop_per_image, "achieved_tflops": achieved,
                "mfu": None if peak is None else achieved / peak,
                "peak_memory_gib": peak_memory}

    return step, figures


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, metavar="MODEL", default=["DGPT-tiny", "GPT-tiny"],
                        help="DGPT-X is compared with GPT-X when both are listed (sizes: %(choices)s)")
    parser.add_argument("--image-size", type=number(int, min=1), nargs="+", default=[32])
    parser.add_argument("--downsample", type=number(int, min=1), default=4)
    parser.add_argument("--vocab", type=number(int, min=2), default=1024)
    parser.add_argument("--num-classes", type=number(int, min=1), default=12)
    parser.add_argument("--batch-size", type=number(int, min=1), default=64,
                        help="images per optimizer step (one device)")
    parser.add_argument("--tokens-per-patch", type=number(float, min=1), default=None,
                        help="DPAR's mean patch length (default: the paper's figure for the image size, else 1.81)")
    parser.add_argument("--steps", type=number(int, min=1), default=10,
                        help="timed steps per model (median reported); a DGPT/GPT pair takes them in turn")
    parser.add_argument("--warmup", type=number(int, min=0), default=3,
                        help="untimed steps first (compilation, allocator)")
    parser.add_argument("--attn-backend", default="auto", choices=("auto",) + BACKENDS,
                        help="DPAR's packed attention backend")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model, as train.compile does")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 on CUDA too")
    parser.add_argument("--peak-tflops", type=number(float, gt=0), default=None,
                        help="device peak for MFU (default: bf16 dense peak of a known GPU)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    check_grid(args.image_size, args.downsample)

    precision = "bf16 autocast" if torch.device(args.device).type == "cuda" and args.bf16 else "fp32"
    print(f"device {device_name(args.device)}, torch {torch.__version__}, {precision}, batch {args.batch_size}, "
          f"compile {args.compile}, median of {args.steps} steps after {args.warmup}\n")
    print("| model | px | step ms | images/s | tokens/s | tokens/patch | train GFLOP/image | TFLOP/s | MFU | "
          "peak GiB | step vs GPT, median (min-max) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for image_size in args.image_size:
        # DGPT-X and GPT-X, when both are listed, step in turn (A B A B) and are compared pair by pair;
        # each row is printed once measured, so a run stopped midway keeps what it measured
        for group in model_pairs(args.models):
            prepared = [prepare(name, image_size, args) for name in group]  # warmed up
            if len(prepared) == 2:
                timing = interleaved(prepared[0][0], prepared[1][0], args.device, args.steps, warmup=0)
                results = [(prepared[0][1](timing["a"]), ratio_cell(timing)), (prepared[1][1](timing["b"]), "")]
            else:
                results = [(prepared[0][1](median_seconds(prepared[0][0], args.device, args.steps, warmup=0)), "")]
            for r, ratio in results:
                mfu = "" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                memory = "" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
                print(f"| {r['model']} | {image_size} | {r['step_ms']:.1f} | {r['images_per_s']:.1f} | "
                      f"{r['tokens_per_s']:,.0f} | {r['tokens_per_patch']:.2f} | {r['train_gflops_per_image']:.3f} | "
                      f"{r['achieved_tflops']:.3f} | {mfu} | {memory} | {ratio} |", flush=True)


if __name__ == "__main__":
    run_main(main)
