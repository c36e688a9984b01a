r"""The paper's patching ablations at toy scale (Table 3, Figure 1, Table 6) on the demo's synthetic tokens.

    python -m dpar.demo                          # once: the token store and entropy model it reuses
    python benchmarks/small_scale_study.py       # 5 variants x 3 seeds, then the threshold sweep

Every variant trains DGPT-tiny's depth (or GPT-tiny, for the baseline) with the same recipe, data and
number of optimizer steps; only the patching differs:

* ``dpar``: entropy threshold + cap P=4 + row break (the paper's method, Table 3 row 4);
* ``entropy_only``: the threshold alone, no cap, no row break (Table 3 row 2);
* ``static``: fixed patches of K tokens, K the rounded mean patch length of ``dpar`` (Table 3 row 1);
* ``token``: DPAR's architecture with one token per patch;
* ``gpt``: LlamaGen's token-level GPT of equal depth.

Writes ``small_scale_study.md`` (tables, command, environment), ``small_scale_study.json`` (every number) and
three PNG plots to ``--output``. Runs go to ``--runs-dir``; finished ones are reused when the study is rerun.
A "## Findings" section that a person added to the markdown is kept when it is rewritten.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpar.data.dataset import PackedCollate, TokenDataset  # noqa: E402
from dpar.data.stats import store_threshold  # noqa: E402
from dpar.data.store import TokenStore  # noqa: E402
from dpar.demo import TOKENS_PER_PATCH  # noqa: E402
from dpar.errors import UserError, run_main  # noqa: E402
from dpar.experiment import CONFIG_FILE, METRICS_FILE, checkpoint_dir, latest_checkpoint, load_trained_model  # noqa: E402
from dpar.patcher import PatcherConfig, patch_starts  # noqa: E402
from dpar.training import nll_totals  # noqa: E402

DPAR_CONFIG = "configs/tiny/global_model_entropy_row_break.yaml"
VARIANTS = {  # name -> (config, overrides); static's K is appended once it is known
    "dpar": (DPAR_CONFIG, []),
    "entropy_only": (DPAR_CONFIG, ["patcher.max_patch_length=null", "patcher.row_break=false"]),
    "static": ("configs/tiny/global_model_static.yaml", []),
    "token": (DPAR_CONFIG, ["patcher.mode=token"]),
    "gpt": ("configs/tiny/gpt_baseline.yaml", []),
}
FINDINGS = "## Findings"


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def finished_run(runs_dir: Path, name: str, epochs: int) -> Path | None:
    """The newest run of ``name`` whose last epoch checkpoint exists."""
    root = runs_dir / "scratch" / name
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    done = [run for run in runs if checkpoint_dir(run, epochs - 1).is_dir()]
    return done[-1] if done else None


def matched_static_length(store: TokenStore, patcher: PatcherConfig, images: range) -> tuple[int, float]:
    """(K, DPAR's mean tokens per patch on ``images``, view 0): the static length matched to DPAR."""
    entropies = torch.from_numpy(np.stack([store.entropies(i)[0] for i in images]))
    mean = entropies.numel() / float(patch_starts(patcher, entropies, store.grid).sum())
    return max(1, round(mean)), mean


def train_all(args, jobs: list[tuple[str, int, list[str]]]) -> dict[str, float]:
    """Train the missing runs, ``args.jobs`` at a time; returns wall seconds per run (kept in the runs dir)."""
    from tqdm import tqdm
    pending = [job for job in jobs if finished_run(args.runs_dir, run_name(job[0], job[1]), args.epochs) is None]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    timings = args.runs_dir / "seconds.json"
    seconds = json.loads(timings.read_text()) if timings.is_file() else {}
    running = []
    bar = tqdm(total=len(pending), desc="study runs", unit="run")
    while pending or running:
        while pending and len(running) < args.jobs:
            variant, seed, argv = pending.pop(0)
            name = run_name(variant, seed)
            log = open(args.runs_dir / f"{name}.log", "w")
            proc = subprocess.Popen([sys.executable, str(REPO / "train_global_model.py"), *argv], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((name, proc, log, time.perf_counter()))
        time.sleep(1)
        for item in [r for r in running if r[1].poll() is not None]:
            name, proc, log, started = item
            log.close()
            running.remove(item)
            if proc.returncode:
                for _, other, *_ in running:
                    other.kill()
                raise UserError(f"study run {name} failed (exit {proc.returncode}); see {args.runs_dir / name}.log")
            seconds[name] = round(time.perf_counter() - started, 1)
            timings.write_text(json.dumps(seconds, indent=1) + "\n")
            bar.update()
    bar.close()
    return seconds


def epoch_history(run: Path) -> list[dict]:
    lines = (run / METRICS_FILE).read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("epoch_summary")]


def validation_set(run: Path) -> tuple[TokenStore, TokenDataset, int]:
    """The run's held-out images (view 0, with entropies) and its micro-batch size."""
    config = OmegaConf.load(run / CONFIG_FILE)
    store = TokenStore(config.data.store)
    images = range(len(store) - config.data.val_holdout, len(store))
    return store, TokenDataset(store, entropies=True, images=images, view=0), config.train.global_batch_size


def evaluate(run: Path, patcher: PatcherConfig | None) -> tuple[float, float]:
    """(validation NLL per token, tokens per patch) of a run's final model with ``patcher``'s boundaries."""
    store, val, batch = validation_set(run)
    model, model_config = load_trained_model(latest_checkpoint(run) / "model.safetensors")
    totals = nll_totals(model, val, PackedCollate(patcher, store.grid), batch, model_config.model_type == "c2i",
                        progress=False)
    if patcher is None:
        return float(totals[0] / totals[1]), 1.0
    entropies = torch.from_numpy(np.stack([val[i]["entropies"].numpy() for i in range(len(val))]))
    return float(totals[0] / totals[1]), entropies.numel() / float(patch_starts(patcher, entropies, store.grid).sum())


def summarize(args, runs: dict[tuple[str, int], Path], static_k: int, dpar_patcher: PatcherConfig) -> dict:
    results = {"variants": {}, "sweep": {}}
    store = TokenStore(args.store)  # every run trained on it
    for variant in args.variants:
        histories = [epoch_history(runs[variant, seed]) for seed in args.seeds]
        final = [h[-1] for h in histories]
        val = np.array([[r["val_nll"] for r in h] for h in histories])
        gmacs = final[0]["forward_linear_gmacs_per_sample"]
        tokens_per_patch = float(np.mean([r["tokens_per_patch"] for r in final]))
        results["variants"][variant] = {
            "steps": [r["step"] for r in histories[0]], "images_seen": [r["images_seen"] for r in histories[0]],
            "val_nll": val.tolist(), "final_val_nll_mean": float(val[:, -1].mean()),
            "final_val_nll_std": float(val[:, -1].std(ddof=1)) if len(args.seeds) > 1 else 0.0,
            "best_val_nll_mean": float(val.min(1).mean()), "tokens_per_patch": tokens_per_patch,
            "global_steps_per_image": store.num_tokens / tokens_per_patch,
            "forward_gmacs_per_sample": gmacs}
    thetas = [round(store_threshold(store, target, dpar_patcher.max_patch_length, dpar_patcher.row_break), 3)
              for target in args.sweep_tokens_per_patch]
    for variant in ("dpar", "static"):
        if variant not in args.variants:
            continue
        rows = []
        for theta in thetas:
            patcher = PatcherConfig(mode="entropy", threshold=theta, max_patch_length=dpar_patcher.max_patch_length,
                                    row_break=dpar_patcher.row_break)
            scores = [evaluate(runs[variant, seed], patcher) for seed in args.seeds]
            rows.append({"threshold": theta, "val_nll": [s[0] for s in scores], "tokens_per_patch": scores[0][1]})
        if variant == "static":  # its own training boundaries, for reference
            scores = [evaluate(runs[variant, seed], PatcherConfig(mode="static", static_length=static_k))
                      for seed in args.seeds]
            rows.append({"threshold": None, "val_nll": [s[0] for s in scores], "tokens_per_patch": float(static_k)})
        results["sweep"][variant] = rows
    return results


def plot(results: dict, output: Path, batch: int) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = []
    for axis_name, x_label in (("steps", "optimizer steps"), ("gmacs", "training compute (3 x forward linear GMACs)")):
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for variant, r in results["variants"].items():
            val = np.array(r["val_nll"])
            x = np.array(r["steps"], dtype=float)
            if axis_name == "gmacs":
                x = 3 * np.array(r["images_seen"]) * r["forward_gmacs_per_sample"]
            ax.plot(x, val.mean(0), marker="o", markersize=3, label=f"{variant} ({r['tokens_per_patch']:.2f} tok/patch)")
            ax.fill_between(x, val.min(0), val.max(0), alpha=0.2)
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation NLL (nats/token)")
        ax.set_title(f"val NLL vs {axis_name} (mean, band = min-max over seeds; batch {batch})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        names.append(f"small_scale_study_nll_vs_{axis_name}.png")
        fig.savefig(output / names[-1])
        plt.close(fig)
    if results["sweep"]:
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        for variant, rows in results["sweep"].items():
            rows = [row for row in rows if row["threshold"] is not None]
            ax.errorbar([row["tokens_per_patch"] for row in rows], [np.mean(row["val_nll"]) for row in rows],
                        yerr=[np.std(row["val_nll"]) for row in rows], marker="o", capsize=3, label=variant)
        ax.set_xlabel("tokens per patch at inference (threshold raised left to right)")
        ax.set_ylabel("validation NLL (nats/token)")
        ax.set_title("inference-time threshold sweep (paper Table 6)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        names.append("small_scale_study_threshold_sweep.png")
        fig.savefig(output / names[-1])
        plt.close(fig)
    return names


def write_report(args, results: dict, plots: list[str], command: str) -> Path:
    v = results["variants"]
    lines = [
        "# Small-scale study: DPAR vs patching ablations and the GPT baseline",
        "",
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores), torch {torch.__version__}, fp32; {len(args.seeds)} seed(s) "
        f"({', '.join(map(str, args.seeds))}), {args.epochs} epochs per run, same recipe for all "
        f"(configs/tiny; `{results['store']}`).",
        "",
        f"    {command}",
        "",
        "## Table 3 / Figure 1 at toy scale",
        "",
        "| variant | tokens/patch | global steps/image | forward GMACs/sample | final val NLL (mean ± std) | "
        "best val NLL (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in v.items():
        lines.append(f"| {name} | {r['tokens_per_patch']:.2f} | {r['global_steps_per_image']:.1f} | "
                     f"{r['forward_gmacs_per_sample']:.4f} | {r['final_val_nll_mean']:.4f} ± "
                     f"{r['final_val_nll_std']:.4f} | {r['best_val_nll_mean']:.4f} |")
    lines += ["", f"Static patching uses K = {results['static_length']} (DPAR's mean patch length on the training "
              f"images is {results['dpar_mean_patch_length']:.2f} at θ = {results['threshold']}). NLL is per token, in nats, on the "
              "store's held-out images (view 0). GMACs are the forward linear-layer MACs of `dpar.flops` at the "
              "run's mean tokens per patch.", ""]
    lines += [f"![val NLL vs steps]({plots[0]})", "", f"![val NLL vs compute]({plots[1]})", ""]
    if results["sweep"]:
        lines += ["## Table 6 at toy scale: boundaries recomputed with a higher threshold at inference", "",
                  "| model | threshold | tokens/patch | val NLL (mean ± std) |", "|---|---|---|---|"]
        for name, rows in results["sweep"].items():
            for row in rows:
                theta = f"{row['threshold']:.2f}" if row["threshold"] is not None else f"own static K={results['static_length']}"
                std = np.std(row["val_nll"], ddof=1) if len(row["val_nll"]) > 1 else 0.0
                lines.append(f"| {name} | {theta} | {row['tokens_per_patch']:.2f} | {np.mean(row['val_nll']):.4f} ± "
                             f"{std:.4f} |")
        lines += ["", f"![threshold sweep]({plots[2]})", ""]
    lines += ["Run wall times (s; runs trained concurrently, "
              f"{args.jobs} at a time): " + ", ".join(f"{k} {s}" for k, s in sorted(results["seconds"].items())), ""]
    path = args.output / "small_scale_study.md"
    findings = ""
    if path.is_file() and FINDINGS in path.read_text():
        findings = path.read_text()[path.read_text().index(FINDINGS):]
    path.write_text("\n".join(lines) + ("\n" + findings if findings else ""))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "assets" / "demo.work" / "tokens",
                        help="token store with entropies (default: the one python -m dpar.demo leaves)")
    parser.add_argument("--entropy-model", type=Path, default=REPO / "assets" / "demo" / "entropy_model",
                        help="the entropy model run (or its model.safetensors) whose entropies the store holds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12, help="epochs per run (same for every variant)")
    parser.add_argument("--val-holdout", type=int, default=200, help="held-out images for the validation NLL")
    parser.add_argument("--threshold", type=float, default=None,
                        help=f"DPAR's θ (default: the θ giving {TOKENS_PER_PATCH} tokens per patch on the store, as "
                             "the demo does)")
    parser.add_argument("--sweep-tokens-per-patch", type=float, nargs="+", default=[1.81, 1.92, 2.03, 2.16],
                        help="inference thresholds for the sweep, as the mean patch lengths they give on the store "
                             "(the paper's Table 6 row)")
    parser.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "results" / "small_scale_study")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--extra", nargs="*", default=[], help="config overrides for every run (key=value)")
    args = parser.parse_args(argv)
    if not (args.store / "meta.json").is_file():
        raise UserError(f"no token store at --store {args.store}; build it with python -m dpar.demo")
    entropy = args.entropy_model
    if entropy.is_dir():
        checkpoint = latest_checkpoint(entropy)
        if checkpoint is None:
            raise UserError(f"--entropy-model {entropy} has no checkpoints")
        entropy = checkpoint / "model.safetensors"
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)

    store = TokenStore(args.store)
    threshold = args.threshold
    if threshold is None:
        threshold = round(store_threshold(store, TOKENS_PER_PATCH, max_patch_length=4, row_break=True), 3)
    dpar_patcher = PatcherConfig(mode="entropy", threshold=threshold, max_patch_length=4, row_break=True)
    train_images = range(len(store) - args.val_holdout)
    static_k, dpar_mean = matched_static_length(store, dpar_patcher, train_images)
    common = ["--data.store", str(args.store), "--data.val_holdout", str(args.val_holdout), "--train.epochs",
              str(args.epochs), "--train.val_every", "1", "--train.results_dir", str(args.runs_dir),
              "--patcher.entropy_model_checkpoint", str(entropy), "--patcher.threshold", str(threshold)]
    jobs = []
    for seed in args.seeds:
        for variant in args.variants:
            config, overrides = VARIANTS[variant]
            overrides = overrides + ([f"patcher.static_length={static_k}"] if variant == "static" else [])
            jobs.append((variant, seed, ["--config", config, *common, "--train.experiment_name", run_name(variant, seed),
                                         f"train.global_seed={seed}", *overrides, *args.extra]))
    seconds = train_all(args, jobs)
    runs = {(v, s): finished_run(args.runs_dir, run_name(v, s), args.epochs) for v in args.variants for s in args.seeds}
    results = summarize(args, runs, static_k, dpar_patcher)
    results.update(store=str(args.store.resolve().relative_to(REPO) if args.store.resolve().is_relative_to(REPO)
                             else args.store), static_length=static_k, dpar_mean_patch_length=dpar_mean,
                   threshold=threshold,
                   seconds=seconds)
    (args.output / "small_scale_study.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = plot(results, args.output, OmegaConf.load(REPO / DPAR_CONFIG).train.global_batch_size)
    command = "python benchmarks/small_scale_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {write_report(args, results, plots, command.strip())}")


if __name__ == "__main__":
    run_main(main)
