r"""Sampling without the entropy model: DPAR's own entropy as the patching signal, against the entropy model's,
at equal tokens per patch, on a trained run (beyond the paper; issue "sampling at least as fast as the GPT").

    python benchmarks/self_entropy.py --experiment_dir assets/demo/dpar --gpt assets/demo/gpt \
        --output benchmarks/results/self_entropy_demo

Self-entropy patching (``patcher.mode: self_entropy``, ``sample_c2i.py --self-entropy --threshold θ``) decides
the boundary before x_i from the entropy of the model's own conditional prediction of x_i with no new patch at
i; the cap and the row breaks stay. Its training-time counterpart here is the trained run itself, evaluated
with those boundaries (as paper Table 6 evaluates other θ): teacher-forced on the run's validation images
(``dpar.sampling.generate`` with the images' tokens as the prefix, so the boundaries are exactly the ones
sampling would take), with θ_self set by bisection on training images so that it gives the entropy model's
tokens per patch there. Reports validation NLL and tokens per patch of both, sampling time of both (and of
``--gpt``) taken in turn in one process, and writes a sample grid of each.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import interleaved, ratio_cell  # noqa: E402
from dpar.config import REPO, read_section, recorded_path  # noqa: E402
from dpar.data.preprocess import next_token_entropies  # noqa: E402
from dpar.data.splits import holdout_split, stratified_sample  # noqa: E402
from dpar.data.store import TokenStore  # noqa: E402
from dpar.errors import ArgumentParser, UserError, run_main  # noqa: E402
from dpar.fileio import atomic_write_text, check_output_file  # noqa: E402
from dpar.models import is_dpar  # noqa: E402
from dpar.patcher import PatcherConfig, patch_starts  # noqa: E402
from dpar.runs import Sampler  # noqa: E402
from dpar.sampling import SamplingConfig, cached_steps, generate  # noqa: E402
from dpar.training import DataConfig  # noqa: E402
from dpar.validation import number  # noqa: E402
from dpar.visual import image_grid, save_png, with_row_labels  # noqa: E402
from evaluations.linear_probe import center_tokens  # noqa: E402


@torch.no_grad()
def teacher_forced(sampler: Sampler, patcher: PatcherConfig, tokens: torch.Tensor, labels: torch.Tensor,
                   batch_size: int = 256) -> tuple[float, float]:
    """(validation NLL per token, tokens per patch) of ``tokens [I, N]`` under ``patcher``'s boundaries."""
    nll, patches = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        x, y = tokens[start:start + batch_size], labels[start:start + batch_size]
        if patcher.mode == "self_entropy":  # the sampler's own loop, fed the image's tokens
            out = generate(cached_steps(sampler.model, patcher), y, torch.zeros(len(x), dtype=torch.long),
                           SamplingConfig(), prefix=x, record_logits=True)
            logits, starts = out.logits, out.patch_start
        else:
            starts = patch_starts(patcher, next_token_entropies(sampler.entropy_model, x), sampler.grid)
            logits, _ = sampler.model(x, y, starts)
        nll += F.cross_entropy(logits.flatten(0, 1).float(), x.flatten(), reduction="sum").item()
        patches += int(starts.sum())
    return nll / tokens.numel(), tokens.numel() / patches


def calibrate_self_threshold(sampler: Sampler, patcher: PatcherConfig, tokens: torch.Tensor, labels: torch.Tensor,
                             target: float, iterations: int = 24) -> tuple[float, float]:
    """(θ_self, the tokens per patch it gives): bisection on θ over ``tokens``, for ``target`` tokens per patch
    (more θ, fewer boundaries, longer patches). Stops early at the target's exact number of patches (the same
    token count over the same patch count: no θ comes closer, so later iterations would keep this one)."""
    low, high = 0.0, float(np.log(sampler.model_config.vocab_size))
    best = (high, 0.0)
    for _ in range(iterations):
        theta = (low + high) / 2
        _, reached = teacher_forced(sampler, replace(patcher, threshold=theta), tokens, labels)
        if abs(reached - target) < abs(best[1] - target):
            best = (theta, reached)
        if reached == target:
            break
        low, high = (theta, high) if reached < target else (low, theta)
    return round(best[0], 6), best[1]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment_dir", default=str(REPO / "assets" / "demo" / "dpar"),
                        help="a DPAR run with entropy patching (default: the embedded demo's)")
    parser.add_argument("--gpt", default=str(REPO / "assets" / "demo" / "gpt"),
                        help="the GPT run (a GPT-* of train_global_model.py) to time against, or none (default: the "
                             "embedded demo's)")
    parser.add_argument("--calibration-images", type=number(int, min=1), default=800,
                        help="training images θ_self is set on")
    parser.add_argument("--per-class", type=number(int, min=1, max=64), default=4,
                        help="sample grid: images per class")
    parser.add_argument("--timing-batch", type=number(int, min=1, max=1024), default=16)
    parser.add_argument("--pairs", type=number(int, min=1), default=5, help="interleaved timing pairs")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "self_entropy_demo"),
                        help="<output>.md, .json and PNGs (default: benchmarks/results/self_entropy_demo)")
    args = parser.parse_args(argv)
    command = " ".join(["python benchmarks/self_entropy.py", *(sys.argv[1:] if argv is None else argv)])

    output = Path(args.output)
    if output.name in ("", ".."):
        raise UserError(f"--output {args.output!r}: give a folder and a name stem (<output>.md, .json, _*.png)")
    outputs = {suffix: output.with_name(output.name + suffix)
               for suffix in (".md", ".json", "_entropy_model.png", "_self_entropy.png")}
    for path in outputs.values():  # before the minutes of work
        check_output_file(path, "--output")
    sampler = Sampler.from_experiment(args.experiment_dir)
    if sampler.patcher is None or sampler.patcher.mode != "entropy":
        raise UserError(f"--experiment_dir {args.experiment_dir} is not a DPAR run with entropy patching")
    cfg = SamplingConfig(cfg_scale=4.0)  # the timing and the sample grids sample with guidance
    sampler.check(cfg)
    gpt = None
    if args.gpt and args.gpt != "none":  # checked before the minutes of calibration
        baseline = Sampler.from_experiment(args.gpt, tokenizer=False)
        if is_dpar(baseline.model_config.gpt_model):
            raise UserError(f"--gpt {args.gpt} is a {baseline.model_config.gpt_model} run; give the token-level "
                            "GPT run (GPT-*) to time against, or none")
        if baseline.model_config.num_classes != sampler.model_config.num_classes:
            raise UserError(f"--gpt {args.gpt} has {baseline.model_config.num_classes} classes, --experiment_dir "
                            f"{sampler.model_config.num_classes}; the timing samples the same labels with both")
        baseline.check(cfg)
        gpt = baseline.model
    config = Path(args.experiment_dir) / "config.yaml"
    data = read_section(config, "data", DataConfig)
    store = TokenStore(recorded_path(data.store))
    labels_all = store.labels.astype(np.int64)
    train, val = holdout_split(labels_all, data.val_holdout, data.split_seed)  # the run's own validation images
    calibration = train[stratified_sample(labels_all[train], min(args.calibration_images, len(train)),
                                          data.split_seed)]
    as_tensor = lambda indices: (torch.from_numpy(center_tokens(store, indices).astype(np.int64)),  # noqa: E731
                                 torch.from_numpy(labels_all[indices]))
    val_x, val_y = as_tensor(val)
    cal_x, cal_y = as_tensor(calibration)

    entropy_patcher = sampler.patcher
    _, target = teacher_forced(sampler, entropy_patcher, cal_x, cal_y)
    started = time.perf_counter()
    theta, reached = calibrate_self_threshold(sampler, replace(entropy_patcher, mode="self_entropy"), cal_x, cal_y,
                                              target)
    self_patcher = replace(entropy_patcher, mode="self_entropy", threshold=theta)
    calibration_seconds = time.perf_counter() - started
    rows = {}
    for name, patcher in (("entropy model", entropy_patcher), ("self-entropy", self_patcher)):
        nll, tokens_per_patch = teacher_forced(sampler, patcher, val_x, val_y)
        rows[name] = {"threshold": patcher.threshold, "val_nll": nll, "tokens_per_patch": tokens_per_patch}

    # sampling time, taken in turn: self-entropy vs the entropy model, and vs the GPT
    classes = torch.arange(sampler.model_config.num_classes)
    batch_labels = classes.repeat(args.timing_batch // len(classes) + 1)[:args.timing_batch]
    seeds = torch.arange(args.timing_batch)

    def sample_with(patcher):
        return lambda: generate(cached_steps(sampler.model, patcher, sampler.entropy_model), batch_labels, seeds,
                                cfg)

    timings = {"self-entropy vs entropy model": interleaved(sample_with(self_patcher), sample_with(entropy_patcher),
                                                            "cpu", args.pairs)}
    if gpt is not None:
        run_gpt = lambda: generate(cached_steps(gpt), batch_labels, seeds, cfg)  # noqa: E731
        timings["self-entropy vs GPT"] = interleaved(sample_with(self_patcher), run_gpt, "cpu", args.pairs)
        timings["entropy model vs GPT"] = interleaved(sample_with(entropy_patcher), run_gpt, "cpu", args.pairs)

    grid_labels = classes.repeat_interleave(args.per_class)
    names = sampler.class_names
    row_labels = [f"{c} {names[c]}" if names else str(c) for c in classes.tolist()]
    pictures = {}
    for name, patcher in (("entropy_model", entropy_patcher), ("self_entropy", self_patcher)):
        steps = cached_steps(sampler.model, patcher, sampler.entropy_model)
        images = sampler.vq.codes_to_images(generate(steps, grid_labels, torch.arange(len(grid_labels)), cfg).tokens,
                                            sampler.grid)
        pictures[name] = save_png(with_row_labels(image_grid(images, nrow=args.per_class), row_labels,
                                                  images.shape[1]), outputs[f"_{name}.png"])

    lines = [f"# Self-entropy patching vs the entropy model: `{args.experiment_dir}`", "",
             f"Command: `{command}`; torch {torch.__version__}, {torch.get_num_threads()} CPU threads.", "",
             f"θ_self = {theta} (bisection on {len(calibration)} training images, {calibration_seconds:.0f} s): "
             f"{reached:.3f} tokens per patch there, the entropy model's {target:.3f}.", "",
             f"Validation: the run's {len(val)} held-out images (class-stratified, split seed {data.split_seed}), "
             "teacher-forced, the boundaries those of sampling.", "",
             "| boundaries | θ | tokens/patch | val NLL (nats/token) |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['threshold']} | {r['tokens_per_patch']:.3f} | {r['val_nll']:.4f} |"
              for name, r in rows.items()]
    lines += ["", f"Sampling time, batch {args.timing_batch}, CFG 4.0, {args.pairs} pairs taken in turn (median "
                  "ratio of pairwise times, min-max; absolute medians beside):", "",
              "| comparison | time ratio | A s/batch | B s/batch |", "|---|---|---|---|"]
    lines += [f"| {name} | {ratio_cell(t)} | {t['a']:.2f} | {t['b']:.2f} |" for name, t in timings.items()]
    lines += ["", "Samples (seeds 0..; one class per row): " +
              ", ".join(f"`{p.name}` ({name.replace('_', ' ')})" for name, p in pictures.items()), ""]
    report = "\n".join(lines)
    atomic_write_text(outputs[".md"], report)
    atomic_write_text(outputs[".json"],
                      json.dumps({"theta_self": theta, "rows": rows, "timings": timings}, indent=1) + "\n")
    print(report)


if __name__ == "__main__":
    run_main(main)
