r"""Sampling throughput of DPAR vs the GPT baseline with random weights and classifier-free guidance:
images/s, ms per token step, tokens per patch, global steps per image, where the time goes, and DGPT-X's
time over GPT-X's as the median of pairwise ratios of runs taken in turn in one process (with min-max).

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
from dataclasses import replace
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import (build_model, check_grid, device_name, interleaved, median_seconds,  # noqa: E402
                                  model_pairs, ratio_cell, synchronize, work_of)
from dpar import sampling  # noqa: E402
from dpar.data.preprocess import next_token_entropies  # noqa: E402
from dpar.errors import ArgumentParser, UserError, run_main  # noqa: E402
from dpar.models import DPAR, GPT_models, MODEL_NAMES, is_dpar  # noqa: E402
from dpar.patcher import PatcherConfig, calibrate_threshold, logits_entropy  # noqa: E402
from dpar.sampling import SamplingConfig, cached_steps, generate  # noqa: E402
from dpar.validation import device, number  # noqa: E402


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
        stages += [(sampling.DPARSteps, "global_outputs", "global"), (model, "encode_step", "encoder"),
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


def calibrated_patcher(entropy_model, model, grid: int, vocab: int, target: float, device) -> PatcherConfig:
    """P=4 and row breaks, with the θ at which images this DPAR samples give about ``target`` tokens per patch:
    θ is set on random token sequences, then set again on two images sampled with it (a random model's
    samples are not random sequences: its entropies on them differ)."""
    tokens = torch.randint(0, vocab, (16, grid * grid), generator=torch.Generator().manual_seed(0)).to(device)
    entropies = next_token_entropies(entropy_model, tokens).float().cpu()
    patcher = PatcherConfig(threshold=calibrate_threshold(entropies, grid, target), max_patch_length=4,
                            row_break=True)
    labels = torch.arange(2, device=device)
    sampled = generate(cached_steps(model, patcher, entropy_model), labels, torch.tensor([7, 8]),
                       SamplingConfig(cfg_scale=2.0)).tokens
    entropies = next_token_entropies(entropy_model, sampled).float().cpu()
    return replace(patcher, threshold=calibrate_threshold(entropies, grid, target))


def op_profile(run, rows: int) -> str:
    """torch.profiler's table of the ``rows`` operators (and stage labels) with the most self time in one
    ``run()``: what a sampling step spends its time on, op by op."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40)


def self_entropy_patcher(model, patcher: PatcherConfig, grid: int, vocab: int, target: float,
                         device) -> PatcherConfig:
    """``patcher`` in self_entropy mode, θ set so that the model's own entropies under "no new patch" give about
    ``target`` tokens per patch: first on one teacher-forced pass over two of its samples, each as a single
    patch, then twice more on the entropies that two images sampled with that θ met under their real
    boundaries (which shift them). The table prints what it gives."""
    labels = torch.arange(2, device=device)
    sampled = generate(cached_steps(model, replace(patcher, mode="static", static_length=1)), labels,
                       torch.tensor([7, 8]), SamplingConfig(cfg_scale=2.0)).tokens  # no entropy model needed
    one_patch = torch.zeros_like(sampled, dtype=torch.bool)
    one_patch[:, 0] = True
    with torch.no_grad():
        logits, _ = model(sampled, labels, one_patch)
    entropies = logits_entropy(logits).float().cpu()
    entropies[:, 0] = float("inf")
    patcher = replace(patcher, mode="self_entropy", threshold=calibrate_threshold(entropies, grid, target))
    for _ in range(2):
        entropies = generate(cached_steps(model, patcher), labels, torch.tensor([7, 8]),
                             SamplingConfig(cfg_scale=2.0)).entropies.float().cpu()
        patcher = replace(patcher, threshold=calibrate_threshold(entropies, grid, target))
    return patcher


def work_cells(work: dict[str, dict], name: str, group: list[str], batch: int, steps: int) -> list[str]:
    """GFLOP per image, weight MB per token step, and (DPAR's row of a pair) both as a ratio to the GPT's."""
    counted = work[name]
    cells = [f"{counted['flops'] / batch / 1e9:.2f}", f"{counted['weight_bytes'] / steps / 1e6:.3g}"]
    baseline = next((work[other] for other in group if not is_dpar(other)), None)
    if is_dpar(name) and baseline is not None:
        return cells + [f"{counted[key] / baseline[key]:.2f}x" for key in ("flops", "weight_bytes")]
    return cells + ["", ""]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, metavar="MODEL", default=["DGPT-tiny", "GPT-tiny"],
                        help="DGPT-X is compared with GPT-X when both are listed (sizes: %(choices)s)")
    parser.add_argument("--entropy-model", default="GPT-tiny", choices=tuple(GPT_models), metavar="GPT",
                        help="the unconditional GPT whose entropies set DPAR's boundaries (%(choices)s)")
    parser.add_argument("--image-size", type=number(int, min=1), default=32)
    parser.add_argument("--downsample", type=number(int, min=1), default=4)
    parser.add_argument("--vocab", type=number(int, min=2), default=1024)
    parser.add_argument("--num-classes", type=number(int, min=1), default=12)
    parser.add_argument("--batch-sizes", type=number(int, min=1), nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--cfg-scale", type=number(float, min=0), default=2.0)
    parser.add_argument("--tokens-per-patch", type=number(float, min=1), default=1.81)
    parser.add_argument("--static-shapes", action="store_true", help="DPAR: the static-shape sampling path")
    parser.add_argument("--profile-ops", type=number(int, min=0), default=0, metavar="N",
                        help="also print the N operators with the most self time in one profiled run of each row")
    parser.add_argument("--patching", nargs="+", choices=("entropy", "self_entropy"), default=["entropy"],
                        help="DPAR's boundaries: the entropy model's, and/or the model's own entropy (no entropy "
                             "model; beyond the paper)")
    parser.add_argument("--count-work", action="store_true",
                        help="also count, in a separate run of each row, its FLOPs per image and the weight bytes "
                             "it reads per token step, with DPAR's ratio of each to the GPT's")
    parser.add_argument("--repeats", type=number(int, min=1), default=3,
                        help="timed runs per setting after one warm-up; a DGPT/GPT pair takes them in turn")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    check_grid([args.image_size], args.downsample)
    if len(set(args.patching)) < len(args.patching):
        raise UserError(f"--patching {' '.join(args.patching)}: each of entropy, self_entropy at most once")
    if args.patching != ["entropy"] and not any(is_dpar(name) for name in args.models):
        raise UserError(f"--patching {' '.join(args.patching)} is DPAR's; --models {' '.join(args.models)} has no "
                        "DGPT model")
    grid = args.image_size // args.downsample

    def build(name: str, model_type: str = "c2i"):
        return build_model(name, image_size=args.image_size, downsample=args.downsample, vocab=args.vocab,
                           num_classes=args.num_classes, device=args.device, model_type=model_type,
                           dtype=getattr(torch, args.dtype)).eval()

    entropy_model = build(args.entropy_model, "uncond")
    models = {name: build(name) for name in args.models}
    calibrate_on = next((model for name, model in models.items() if is_dpar(name)), None)
    patchers = {}
    if calibrate_on is not None:
        patchers["entropy"] = calibrated_patcher(entropy_model, calibrate_on, grid, args.vocab,
                                                 args.tokens_per_patch, args.device)
        if "self_entropy" in args.patching:
            patchers["self_entropy"] = self_entropy_patcher(calibrate_on, patchers["entropy"], grid, args.vocab,
                                                            args.tokens_per_patch, args.device)
    sampling_config = SamplingConfig(cfg_scale=args.cfg_scale)
    print(f"device {device_name(args.device)}, torch {torch.__version__}, {args.dtype}, {grid}x{grid} tokens, "
          f"cfg {args.cfg_scale}, θ " + ", ".join(f"{mode} {p.threshold:.4g}" for mode, p in patchers.items()) + "\n")
    work_columns = ("GFLOP/image", "weight MB/step", "FLOPs vs GPT", "weights vs GPT") if args.count_work else ()
    columns = ("model", "patching", "batch", "images/s", "s per image", "ms per token step", "tokens/patch",
               "global steps/image", "time vs GPT, median (min-max)") + tuple(f"% {stage}" for stage in STAGES)
    print("| " + " | ".join(columns + work_columns) + " |")
    print("|" + "---|" * len(columns + work_columns))
    profiles = []
    for batch in args.batch_sizes:
        labels = torch.arange(batch, device=args.device) % args.num_classes
        # DGPT-X and GPT-X, when both are listed, sample in turn (A B A B) and are compared pair by pair
        for mode in args.patching:
            for group in model_pairs(args.models):
                if mode != args.patching[0] and not any(is_dpar(name) for name in group):
                    continue  # a lone GPT is measured once
                runs, outputs = [], {name: [] for name in group}
                for name in group:
                    def run(name=name):
                        dpar = is_dpar(name)
                        seeds = torch.arange(batch) + 1000 * len(outputs[name])
                        steps = cached_steps(models[name], patchers[mode] if dpar else None,
                                             entropy_model if dpar else None, args.static_shapes)
                        outputs[name].append(generate(steps, labels, seeds, sampling_config))
                    runs.append(run)
                if len(group) == 2:
                    timing = interleaved(runs[0], runs[1], args.device, args.repeats)
                    seconds, ratios = [timing["a"], timing["b"]], [ratio_cell(timing), ""]
                else:
                    seconds, ratios = [median_seconds(runs[0], args.device, args.repeats)], [""]
                work = {name: work_of(run, [models[name], entropy_model if is_dpar(name) else None])
                        for name, run in zip(group, runs)} if args.count_work else {}
                for name, run, time_, ratio in zip(group, runs, seconds, ratios):
                    dpar = is_dpar(name)
                    steps = float(outputs[name][-1].global_steps.float().mean())
                    shares = stage_shares(run, models[name], entropy_model if dpar else None, args.device)
                    cells = [name, mode if dpar else "", batch, f"{batch / time_:.2f}", f"{time_ / batch:.3f}",
                             f"{1000 * time_ / grid ** 2:.2f}", f"{grid ** 2 / steps:.2f}", f"{steps:.1f}", ratio]
                    cells += [f"{100 * shares[stage]:.0f}" for stage in STAGES]
                    if work:
                        cells += work_cells(work, name, group, batch, grid ** 2)
                    print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)
                    if args.profile_ops:
                        title = f"{name} {mode if dpar else ''}, batch {batch}"
                        profiles.append((title, op_profile(run, args.profile_ops)))
    for title, text in profiles:  # after the table: a profiled run is never a timed one
        print(f"\n### Operators of one sampling run: {title}\n\n```\n{text}\n```")


if __name__ == "__main__":
    run_main(main)
