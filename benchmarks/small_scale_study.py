r"""The paper's ablations at toy scale (Tables 3, 6, 9, 10 and Figure 1) on the demo's synthetic tokens, in
validation NLL and in the quality of samples (FID, precision / recall, class accuracy: the paper's currency).

    python -m dpar.demo                          # once: the token store, entropy model and metric it reuses
    python benchmarks/small_scale_study.py --variants static entropy_only dpar token gpt --seeds 0 1 2 \
        --epochs 8 --dropout 0.1                 # the core comparison, ~45 min on 2 cores

Every variant trains DGPT-tiny's depth (or GPT-tiny, for the baseline; width 64, head_dim 32; ``--size small``:
DGPT-small / GPT-small, the same depth at width 128, for the scale trend) with the same recipe, data, dropout and number of optimizer steps; only what the variant names differs (``VARIANTS``):

* Table 3: ``static`` (K-token patches, K = dpar's rounded mean), ``entropy_only`` (θ alone),
  ``entropy_cap`` (θ + P = 4), ``dpar`` (θ + P = 4 + row break, the paper's method), ``token`` (DPAR's
  architecture, one token per patch) and ``gpt`` (LlamaGen's GPT of equal depth);
* Table 9: the global transformer's RoPE; Table 10: encoder / decoder depth at a fixed sum;
* the paper's text, where the tiny configs depart from it (pooling FFN, decoder injection once);
* the global stream continued into the decoder (``decoder_injection: residual``, with and without 2D RoPE);
* token level: each of those options with one token per patch (``token_*``), compared with ``token`` and the
  GPT, to find which part of the architecture a token-level gap to the GPT comes from.

Validation is the trainers' seeded class-stratified hold-out (``data.val_holdout``, split seed 0), the same
images for every run; θ is calibrated on the other images (:func:`dpar.data.stats.store_threshold`).
Sample quality (``--quality-samples``, default 480 per cell): each Table 3 run's final checkpoint at every
``--cfg-scales``, ``--curve-points`` checkpoints along training at ``--curve-cfg`` (Figure 4: quality against
steps and training compute), and Table 6 (dpar and static sampled at the sweep's higher θ), each through
``sample_c2i_ddp.py`` and the evaluator with the demo classifier's features (``evaluations/c2i/classifier.py``).
Writes ``small_scale_study.md`` (tables, per-class NLL, command, environment), ``small_scale_study.json``
(every number) and PNG plots and sample grids to ``--output``. Runs go to ``--runs-dir``, samples and scores
to ``<runs-dir>/quality``; finished runs and scored cells are reused when the study is rerun with the same
settings (other settings are refused: give another ``--runs-dir``). A "## Findings" section that a person
added to the markdown is kept when it is rewritten.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dpar.data.dataset import PackedCollate, TokenDataset  # noqa: E402
from dpar.data.splits import holdout_split  # noqa: E402
from dpar.data.stats import (calibration_images, describe_images, missed_target, store_patch_stats,  # noqa: E402
                             store_threshold)
from dpar.data.store import TokenStore, file_sha256  # noqa: E402
from dpar.demo import CLASSIFIER, TOKENS_PER_PATCH, sample_batch, score_samples, train_side_by_side  # noqa: E402
from dpar.errors import ArgumentParser, UserError, run_main  # noqa: E402
from dpar.experiment import (CONFIG_FILE, METRICS_FILE, checkpoint_dir, config_difference,  # noqa: E402
                             latest_checkpoint)
from dpar.config import load_config, parse_overrides, read_section  # noqa: E402
from dpar.launch import set_parent_death_signal  # noqa: E402
from dpar.fileio import atomic_path, atomic_write_text, check_output_dir, check_output_file  # noqa: E402
from dpar.models import ModelConfig, is_dpar  # noqa: E402
from dpar.runs import load_trained_model  # noqa: E402
from dpar.patcher import PatcherConfig, patch_starts  # noqa: E402
from dpar.training import (RESUMABLE_KEYS, DataConfig, TrainConfig, TrainGlobalConfig,  # noqa: E402
                           check_entropy_source, nll_totals, token_nlls)
from dpar.validation import field_type, number, path as path_flag  # noqa: E402
from evaluations.c2i.classifier import WEIGHTS_FILE  # noqa: E402

DPAR_CONFIG = "configs/tiny/global_model_entropy_row_break.yaml"
GPT_CONFIG = "configs/tiny/gpt_baseline.yaml"
SIZES = {"tiny": 64, "small": 128}  # --size -> width of DGPT-<size> / GPT-<size> (same depth, head_dim 32)
# name -> (section of the report, config, overrides); static's K is appended once it is known
VARIANTS = {
    "static": ("Table 3", "configs/tiny/global_model_static.yaml", []),
    "entropy_only": ("Table 3", DPAR_CONFIG, ["patcher.max_patch_length=null", "patcher.row_break=false"]),
    "entropy_cap": ("Table 3", DPAR_CONFIG, ["patcher.row_break=false"]),
    "dpar": ("Table 3", DPAR_CONFIG, []),
    "token": ("Table 3", DPAR_CONFIG, ["patcher.mode=token"]),
    "gpt": ("Table 3", GPT_CONFIG, []),
    "rope_no_redundancy": ("Table 9", DPAR_CONFIG, ["model.rope=dynamic_no_redundancy"]),
    "rope_complementary": ("Table 9", DPAR_CONFIG, ["model.rope=dynamic_complementary"]),
    "rope_2d": ("Table 9", DPAR_CONFIG, ["model.rope=2d"]),
    "E2D1": ("Table 10", DPAR_CONFIG, ["model.n_enc_layer=2", "model.n_dec_layer=1"]),
    "no_pooling_ffn": ("Paper's text", DPAR_CONFIG, ["model.encoder_pooling_ffn=false"]),
    "inject_every_block": ("Paper's text", DPAR_CONFIG, ["model.decoder_injection=every_block"]),
    "paper_text": ("Paper's text", DPAR_CONFIG, ["model.encoder_pooling_ffn=false", "model.decoder_injection=every_block"]),
    "inject_residual": ("Residual", DPAR_CONFIG, ["model.decoder_injection=residual"]),
    "residual_rope_2d": ("Residual", DPAR_CONFIG, ["model.decoder_injection=residual", "model.rope=2d"]),
}
TOKEN_LEVEL = {"token_rope_complementary": ["model.rope=dynamic_complementary"],  # each with one token per patch
               "token_rope_no_redundancy": ["model.rope=dynamic_no_redundancy"], "token_rope_2d": ["model.rope=2d"],
               "token_E2D1": VARIANTS["E2D1"][2], "token_no_pooling_ffn": VARIANTS["no_pooling_ffn"][2],
               "token_inject_every_block": VARIANTS["inject_every_block"][2],
               "token_paper_text": VARIANTS["paper_text"][2],
               "token_inject_residual": VARIANTS["inject_residual"][2],
               "token_residual_rope_2d": VARIANTS["residual_rope_2d"][2]}
VARIANTS.update({name: ("Token level", DPAR_CONFIG, ["patcher.mode=token", *overrides])
                 for name, overrides in TOKEN_LEVEL.items()})
SECTIONS = {  # title, note, and the variants each option is compared with (the first one gives the Δ column)
    "Table 3": ("Table 3 / Figure 1: patching strategies, token-level DPAR and the GPT of equal depth",
                "static: K-token patches, K = DPAR's rounded mean; entropy_only: θ alone; entropy_cap: θ + P = 4; "
                "dpar: θ + P = 4 + row break (the paper's method); token: DPAR's architecture with one token per "
                "patch; gpt: LlamaGen's GPT of equal depth (6 layers).", ()),
    "Table 9": ("Table 9: RoPE of the global transformer (all with dpar's patching)",
                "dpar is Dynamic RoPE (row, start | row, end); rope_complementary gives the (row, end) half the "
                "frequencies between the first half's (together 2D RoPE's set); rope_no_redundancy encodes the row "
                "once; rope_2d is the 2D RoPE of each patch's first token.", ("dpar",)),
    "Table 10": ("Table 10: encoder / decoder depth at a fixed sum (E1D2 is dpar)",
                 "The toy model has 3 token-level blocks (paper: 5 for DGPT-L, E1D4 ... E4D1).", ("dpar",)),
    "Paper's text": ("The paper's text, where the tiny configs depart from it (all with dpar's patching)",
                     "The tiny configs (dpar) put a SwiGLU FFN after the encoder's patch cross-attention and add the "
                     "patch vector to the decoder before its first block only. no_pooling_ffn: cross-attention only, "
                     "as the paper and BLT; inject_every_block: every decoder block adds its own norm + linear of "
                     "the patch vector, as the paper; paper_text: both (the default architecture).", ("dpar",)),
    "Residual": ("The global stream continued into the decoder (all with dpar's patching)",
                 "inject_residual adds the global output to the decoder's input as it is, with no norm + linear; "
                 "residual_rope_2d does that with 2D RoPE in the global transformer. Neither is the paper's: they "
                 "are the two changes that bring token-level DPAR closest to the GPT (Token level).", ("dpar",)),
    "Token level": ("DPAR's architecture with one token per patch, option by option, against the GPT of equal depth",
                    "token is the tiny DPAR with no merging (Dynamic RoPE, E1D2, pooling FFN, the patch vector "
                    "into the decoder once); each token_* variant changes one of them as its Table 9 / 10 / paper's-text namesake does; "
                    "token_inject_residual adds the global output to the decoder's input as it is (no norm + linear); "
                    "token_residual_rope_2d does that with 2D RoPE in the global transformer. "
                    "Where token trails the GPT, the option that closes the gap is the part of the architecture "
                    "that costs it.", ("token", "gpt")),
}
FINDINGS = "## Findings"


def references_of(variants: list[str]) -> list[str]:
    """The chosen variants that some chosen architecture option is compared with (its section's references)."""
    return sorted({ref for v in variants for ref in SECTIONS[VARIANTS[v][0]][2]} & set(variants))


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_seed{seed}"


def finished_run(runs_dir: Path, name: str, epochs: int) -> Path | None:
    """The newest run of ``name`` whose last epoch checkpoint exists."""
    root = runs_dir / "scratch" / name
    runs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    done = [run for run in runs if checkpoint_dir(run, epochs - 1).is_dir()]
    return done[-1] if done else None


def matched_static_length(store: TokenStore, patcher: PatcherConfig, images: np.ndarray) -> tuple[int, float]:
    """(K, DPAR's mean tokens per patch on ``images``, view 0): the static length matched to DPAR."""
    entropies = torch.from_numpy(np.stack([store.entropies(int(i))[0] for i in images]))
    mean = entropies.numel() / float(patch_starts(patcher, entropies, store.grid).sum())
    return max(1, round(mean)), mean


def train_all(args, jobs: list[tuple[str, int, list[str]]]) -> dict[str, float]:
    """Train the missing runs, ``args.jobs`` at a time; returns wall seconds per run (kept in the runs dir)."""
    pending = {run_name(variant, seed): argv for variant, seed, argv in jobs
               if finished_run(args.runs_dir, run_name(variant, seed), epochs_of(args, variant)) is None}
    timings = args.runs_dir / "seconds.json"
    try:
        seconds = json.loads(timings.read_text()) if timings.is_file() else {}
    except ValueError:
        seconds = None
    if not isinstance(seconds, dict):
        raise UserError(f"{timings} is damaged; delete it (it only records how long each run took)")

    def keep(name: str, wall: float) -> None:
        seconds[name] = wall
        atomic_write_text(timings, json.dumps(seconds, indent=1) + "\n")

    try:
        train_side_by_side(pending, args.runs_dir, args.jobs, keep)
    except RuntimeError as error:
        raise UserError(str(error).splitlines()[0]) from None
    return seconds


def epoch_history(run: Path) -> list[dict]:
    lines = (run / METRICS_FILE).read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("epoch_summary")]


def validation_set(run: Path) -> tuple[TokenStore, TokenDataset, int]:
    """The run's held-out images (the trainers' stratified draw, view 0, with entropies) and its batch size."""
    data, train = read_section(run / CONFIG_FILE, "data", DataConfig), read_section(run / CONFIG_FILE, "train", TrainConfig)
    store = TokenStore(data.store)
    held_out = holdout_split(store.labels, data.val_holdout, data.split_seed)[1]
    return store, TokenDataset(store, entropies=True, images=held_out, view=0), train.global_batch_size


def evaluate(run: Path, patcher: PatcherConfig | None, per_class: bool = False) -> dict:
    """Validation NLL per token (nats) of a run's final model with ``patcher``'s boundaries (None: a GPT), the
    tokens per patch they give, and (``per_class``) the NLL of each class's held-out images and of each grid
    position (``per_position``, row-major, averaged over the images)."""
    store, val, batch = validation_set(run)
    model, model_config = load_trained_model(latest_checkpoint(run) / "model.safetensors")
    collate, conditional = PackedCollate(patcher, store.grid), model_config.model_type == "c2i"
    if per_class:
        nlls = token_nlls(model, val, collate, batch, conditional).double()  # [images, N]
        labels = store.labels[np.asarray(val.images)]
        result = {"nll": float(nlls.mean()), "per_position": nlls.mean(0).tolist(),
                  "per_class": {int(c): float(nlls[torch.from_numpy(labels == c)].mean()) for c in np.unique(labels)}}
    else:
        totals = nll_totals(model, val, collate, batch, conditional, progress=False)
        result = {"nll": float(totals[0] / totals[1])}
    result["tokens_per_patch"] = 1.0
    if patcher is not None:
        entropies = torch.from_numpy(np.stack([val[i]["entropies"].numpy() for i in range(len(val))]))
        result["tokens_per_patch"] = entropies.numel() / float(patch_starts(patcher, entropies, store.grid).sum())
    return result


def own_patcher(run: Path) -> PatcherConfig | None:
    """The patcher a run trained with (None for a GPT)."""
    if not is_dpar(read_section(run / CONFIG_FILE, "model", ModelConfig).gpt_model):
        return None
    return read_section(run / CONFIG_FILE, "patcher", PatcherConfig)


def epochs_of(args, variant: str) -> int:
    """Table 3 runs train ``--epochs``; the architecture options ``--ablation-epochs`` (compared with their
    section's reference, dpar or token, at that step: with a constant learning rate a shorter run is the start of
    a longer one)."""
    return args.epochs if VARIANTS[variant][0] == "Table 3" else args.ablation_epochs


def curve_status(val: np.ndarray, steps: list[int]) -> dict:
    """Where a validation curve (seeds x evaluations) is: best evaluation, and the change of the seed mean over
    the last quarter of the run (negative: still falling)."""
    mean = val.mean(0)
    back = max(1, len(mean) // 4)
    return {"best_step": steps[int(mean.argmin())], "last_quarter_change": float(mean[-1] - mean[-1 - back])
            if len(mean) > back else float("nan"), "last_quarter_from_step": steps[max(0, len(mean) - 1 - back)]}


def rankings(results: dict, names: list[str]) -> list[tuple[int, list[str]]]:
    """The order (best first) of ``names`` by seed-mean validation NLL after each evaluation."""
    variants = results["variants"]
    steps = variants[names[0]]["steps"]
    return [(step, sorted(names, key=lambda n: np.mean(np.array(variants[n]["val_nll"])[:, e])))
            for e, step in enumerate(steps)]


def summarize(args, runs: dict[tuple[str, int], Path], static_k: int, dpar_patcher: PatcherConfig,
              train_images: np.ndarray) -> dict:
    from tqdm import tqdm
    results = {"variants": {}, "sweep": {}}
    store = TokenStore(args.store)  # every run trained on it
    for variant in tqdm(args.variants, desc="evaluating", unit="variant"):
        histories = [epoch_history(runs[variant, seed]) for seed in args.seeds]
        final = [h[-1] for h in histories]
        val = np.array([[r["val_nll"] for r in h] for h in histories])
        steps = [r["step"] for r in histories[0]]
        evaluations = [evaluate(runs[variant, seed], own_patcher(runs[variant, seed]), per_class=True)
                       for seed in args.seeds]
        per_class = [e["per_class"] for e in evaluations]
        tokens_per_patch = float(np.mean([r["tokens_per_patch"] for r in final]))
        results["variants"][variant] = {
            "section": VARIANTS[variant][0], "steps": steps, "images_seen": [r["images_seen"] for r in histories[0]],
            "val_nll": val.tolist(), "final_val_nll_mean": float(val[:, -1].mean()),
            "final_val_nll_std": float(val[:, -1].std(ddof=1)) if len(args.seeds) > 1 else 0.0,
            "final_val_nll_seeds": val[:, -1].tolist(),
            "best_val_nll_mean": float(val.min(1).mean()), "tokens_per_patch": tokens_per_patch,
            "global_steps_per_image": store.num_tokens / tokens_per_patch,
            "forward_gmacs_per_sample": final[0]["forward_linear_gmacs_per_sample"],
            "per_class_val_nll": {str(c): float(np.mean([p[c] for p in per_class])) for c in per_class[0]},
            "per_position_val_nll": np.mean([e["per_position"] for e in evaluations], axis=0).tolist(),
            **curve_status(val, steps)}
    thetas = [store_threshold(store, target, dpar_patcher.max_patch_length, dpar_patcher.row_break, train_images)
              for target in args.sweep_tokens_per_patch]
    for variant in ("dpar", "static"):
        if variant not in args.variants:
            continue
        rows = []
        for target, theta in zip(args.sweep_tokens_per_patch, thetas):
            patcher = PatcherConfig(mode="entropy", threshold=theta, max_patch_length=dpar_patcher.max_patch_length,
                                    row_break=dpar_patcher.row_break)
            scores = [evaluate(runs[variant, seed], patcher) for seed in args.seeds]
            rows.append({"threshold": theta, "train_tokens_per_patch": target,
                         "val_nll": [s["nll"] for s in scores], "tokens_per_patch": scores[0]["tokens_per_patch"]})
        if variant == "static":  # its own training boundaries, for reference
            scores = [evaluate(runs[variant, seed], PatcherConfig(mode="static", static_length=static_k))
                      for seed in args.seeds]
            rows.append({"threshold": None, "val_nll": [s["nll"] for s in scores], "tokens_per_patch": float(static_k)})
        results["sweep"][variant] = rows
    return results



QUALITY_DIR = "quality"  # <runs-dir>/quality/<metric>: samples, evaluator reports, scores.json
METRICS = ("fid", "precision", "recall", "class_accuracy", "classifier_score")  # the evaluator's, per cell
MIN_QUALITY_SAMPLES = 4  # precision / recall compare each sample with its k = 3 nearest neighbours


@dataclass(frozen=True)
class QualityJob:
    """One cell of the sample-quality tables: ``run``'s checkpoint ``epoch`` sampled at ``cfg`` with
    ``sample_c2i_ddp.py`` (plus ``flags``) and scored by the evaluator with the demo classifier's features."""
    key: str      # its folder under the metric's folder and its scores' key (:func:`cell_key`)
    run: str
    epoch: int
    cfg: float
    flags: tuple[str, ...] = ()


def cell_key(run: Path, variant: str, seed: int, epoch: int, cfg: float, theta: float | None = None) -> str:
    """``variant_seedS/<run folder>/epoch-E/cfg-C[/theta-T]``: a retrained run (a new run folder) is never
    credited with the scores of the run it replaced."""
    return f"{run_name(variant, seed)}/{run.name}/epoch-{epoch}/cfg-{cfg}" + (
        "" if theta is None else f"/theta-{theta:.5f}")


def check_metric(args) -> tuple[Path, int]:
    """(the metric's folder, the reference's image count): ``--classifier`` holds a classifier and a reference
    batch whose statistics are that classifier's, checked before anything is trained or written; one line
    naming the flag otherwise. The folder is named by the content of both files and ``--quality-samples``, so
    another metric or sample count scores in a folder of its own."""
    from evaluations.c2i import evaluator
    if 0 < args.quality_samples < MIN_QUALITY_SAMPLES:
        raise UserError(f"--quality-samples {args.quality_samples}: 0 (no sample quality) or at least "
                        f"{MIN_QUALITY_SAMPLES} (precision / recall compare each sample with its 3 nearest)")
    weights, reference = args.classifier / WEIGHTS_FILE, args.classifier / "reference.npz"
    for path in (weights, reference):
        if not path.is_file():
            raise UserError(f"--classifier {args.classifier} has no {path.name}; build the demo (python -m "
                            "dpar.demo) or give --quality-samples 0")
    try:
        _, kind = evaluator.classifier_features(weights)
        evaluator.reference_statistics(reference, kind)  # statistics of this classifier's features
        batch = evaluator.ImageBatch(reference, 2)
        evaluator.check_image_size(batch, kind)
        images = len(batch)
    except UserError as error:
        raise UserError(f"--classifier {args.classifier}: {error}") from None
    folder = f"{file_sha256(weights, 8)}-{file_sha256(reference, 8)}-n{args.quality_samples}"
    return args.runs_dir / QUALITY_DIR / folder, images


def score_job(job: QualityJob, reference: Path, classifier: Path, work: Path, count: int) -> dict:
    """The evaluator's metrics of ``count`` samples of ``job`` (one thread; its output goes to a log beside
    its samples). Runs in a worker process."""
    torch.set_num_threads(1)
    folder = work / job.key
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "w") as log, redirect_stdout(log), redirect_stderr(log):
        scores = score_samples(Path(job.run), reference, classifier, folder, count, (job.cfg,),
                               ("--epoch", str(job.epoch), *job.flags))
    return scores[str(job.cfg)]


def final_scales(args) -> list[float]:
    """The CFG scales each final checkpoint is scored at: ``--cfg-scales`` and ``--curve-cfg`` (the sample grids
    and the curve's last point are the final checkpoint at that scale)."""
    return sorted(set(args.cfg_scales) | {args.curve_cfg})


def curve_epochs(epochs: int, points: int) -> list[int]:
    """Checkpoint epochs (0-based) at ``points`` even steps of a run of ``epochs`` epochs (every epoch when
    there are fewer), the last one included."""
    points = min(points, epochs)
    return sorted({round((i + 1) * epochs / points) - 1 for i in range(points)})


def repatched_run(run: Path, patcher: PatcherConfig, folder: Path) -> Path:
    """A run folder that samples ``run``'s weights with ``patcher`` (a static model at entropy boundaries,
    paper Table 6): its config with the patcher replaced, and its checkpoints linked."""
    config = OmegaConf.load(run / CONFIG_FILE)
    for key in ("mode", "threshold", "max_patch_length", "row_break"):
        config.patcher[key] = getattr(patcher, key)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / CONFIG_FILE, OmegaConf.to_yaml(config))
    if not (folder / "checkpoints").exists():
        (folder / "checkpoints").symlink_to((run / "checkpoints").resolve(), target_is_directory=True)
    return folder


def quality_jobs(args, runs: dict[tuple[str, int], Path], dpar_patcher: PatcherConfig,
                 thetas: list[float]) -> list[QualityJob]:
    """Table 3's runs at every ``--cfg-scales`` (final checkpoint) and along training at ``--curve-cfg``;
    Table 6: dpar and static at each sweep θ (``--curve-cfg``, final checkpoint)."""
    jobs = []
    for variant in [v for v in args.variants if VARIANTS[v][0] == "Table 3"]:
        for seed in args.seeds:
            run, last = runs[variant, seed], epochs_of(args, variant) - 1
            cells = [(last, cfg) for cfg in final_scales(args)]
            cells += [(epoch, args.curve_cfg) for epoch in curve_epochs(last + 1, args.curve_points)]
            for epoch, cfg in dict.fromkeys(cells):
                jobs.append(QualityJob(cell_key(run, variant, seed, epoch, cfg), str(run), epoch, cfg))
    for variant in ("dpar", "static"):
        if variant not in args.variants:
            continue
        for seed in args.seeds:
            run, last = runs[variant, seed], epochs_of(args, variant) - 1
            for theta in thetas:
                key = cell_key(run, variant, seed, last, args.curve_cfg, theta)
                if variant == "dpar":
                    jobs.append(QualityJob(key, str(run), last, args.curve_cfg, ("--threshold", str(theta))))
                else:
                    patcher = PatcherConfig(mode="entropy", threshold=theta,
                                            max_patch_length=dpar_patcher.max_patch_length,
                                            row_break=dpar_patcher.row_break)
                    copy = args.runs_dir / QUALITY_DIR / "repatched" / f"{run.parent.name}-{run.name}-theta-{theta:.5f}"
                    jobs.append(QualityJob(key, str(repatched_run(run, patcher, copy)), last, args.curve_cfg))
    return list({job.key: job for job in jobs}.values())  # two sweep targets may share a θ (a flat entropy model)


def score_all(args, jobs: list[QualityJob], work: Path) -> dict[str, dict]:
    """Every job's metrics, ``args.jobs`` at a time, in the metric's folder ``work`` (:func:`check_metric`);
    kept in its scores.json, so a rerun scores only the cells it lacks."""
    from tqdm import tqdm
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference.npz"  # a copy: the evaluator caches features beside its reference
    if not reference.is_file():
        with atomic_path(reference) as tmp:
            shutil.copyfile(args.classifier / "reference.npz", tmp)
    saved = work / "scores.json"
    try:
        scores = json.loads(saved.read_text()) if saved.is_file() else {}
    except ValueError as error:
        raise UserError(f"{saved} is damaged ({error}); delete it to score its cells again") from None
    pending = [job for job in jobs if not all(metric in scores.get(job.key, {}) for metric in METRICS)]
    # workers end with the study, even when it is killed
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=set_parent_death_signal,
                             initargs=(signal.SIGTERM, os.getpid())) as pool:
        futures = {pool.submit(score_job, job, reference, args.classifier / WEIGHTS_FILE, work,
                               args.quality_samples): job for job in pending}
        for future in tqdm(as_completed(futures), total=len(futures), desc="sample quality", unit="cell"):
            scores[futures[future].key] = {"samples": args.quality_samples, **future.result()}
            atomic_write_text(saved, json.dumps(scores, indent=1) + "\n")
    return {job.key: scores[job.key] for job in jobs}


def summarize_quality(args, runs: dict[tuple[str, int], Path], results: dict, thetas: list[float],
                      scores: dict[str, dict]) -> None:
    """results["quality"][variant]: the final checkpoint's metrics per CFG scale and the curve at
    ``--curve-cfg`` (per seed); results["quality_sweep"][variant]: Table 6 in sample quality."""
    def cell(variant, seed, epoch, cfg, theta=None):
        return scores[cell_key(runs[variant, seed], variant, seed, epoch, cfg, theta)]

    results["quality"], results["quality_sweep"] = {}, {}
    for variant in [v for v in args.variants if VARIANTS[v][0] == "Table 3"]:
        last = epochs_of(args, variant) - 1
        epochs = curve_epochs(last + 1, args.curve_points)
        history = epoch_history(runs[variant, args.seeds[0]])
        results["quality"][variant] = {
            "final": {str(cfg): {m: [cell(variant, s, last, cfg)[m] for s in args.seeds] for m in METRICS}
                      for cfg in final_scales(args)},
            "curve": {"epochs": epochs, "steps": [history[e]["step"] for e in epochs],
                      "images_seen": [history[e]["images_seen"] for e in epochs],
                      **{m: [[cell(variant, s, e, args.curve_cfg)[m] for e in epochs] for s in args.seeds]
                         for m in METRICS}}}
    for variant in ("dpar", "static"):
        if variant not in args.variants:
            continue
        last = epochs_of(args, variant) - 1
        results["quality_sweep"][variant] = [
            {"threshold": theta, "train_tokens_per_patch": target,
             **{m: [cell(variant, s, last, args.curve_cfg, theta)[m] for s in args.seeds] for m in METRICS}}
            for target, theta in zip(args.sweep_tokens_per_patch, thetas)]


def sample_grid(args, runs: dict[tuple[str, int], Path], work: Path, variant: str, per_class: int = 6) -> np.ndarray:
    """The first ``per_class`` samples of each class of seed ``--seeds[0]``'s final checkpoint at
    ``--curve-cfg``: uint8 [classes * H, per_class * W, 3] (one row per class)."""
    from dpar.visual import image_grid
    seed = args.seeds[0]
    key = cell_key(runs[variant, seed], variant, seed, epochs_of(args, variant) - 1, args.curve_cfg)
    with np.load(sample_batch(work / key / f"cfg-{args.curve_cfg}")) as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    rows = [images[labels == c][:per_class] for c in range(int(labels.max()) + 1)]
    return image_grid(np.concatenate(rows), per_class)

REPORT_FILES = ("small_scale_study.md", "small_scale_study.json", "small_scale_study_nll_vs_steps.png",
                "small_scale_study_nll_vs_gmacs.png", "small_scale_study_nll_vs_steps_architecture.png",
                "small_scale_study_threshold_sweep.png", "small_scale_study_quality.png",
                "small_scale_study_threshold_sweep_fid.png", "small_scale_study_samples.png")  # what --output receives


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(results: dict, output: Path, batch: int) -> list[str]:
    plt = pyplot()
    names = []
    table3 = {k: v for k, v in results["variants"].items() if v["section"] == "Table 3"}
    references = references_of(list(results["variants"]))
    others = {k: v for k, v in results["variants"].items() if v["section"] != "Table 3" or k in references}
    panels = [("steps", "optimizer steps", table3), ("gmacs", "training compute (3 x forward linear GMACs)", table3)]
    if len(others) > 1:
        panels.append(("steps_architecture", "optimizer steps", others))
    for axis_name, x_label, variants in panels:
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for variant, r in variants.items():
            val = np.array(r["val_nll"])
            x = np.array(r["steps"], dtype=float)
            if axis_name == "gmacs":
                x = 3 * np.array(r["images_seen"]) * r["forward_gmacs_per_sample"]
            ax.plot(x, val.mean(0), marker="o", markersize=3, label=f"{variant} ({r['tokens_per_patch']:.2f} tok/patch)")
            ax.fill_between(x, val.min(0), val.max(0), alpha=0.2)
        ax.set_xlabel(x_label)
        ax.set_ylabel("validation NLL (nats/token)")
        ax.set_title(f"val NLL (seed mean; band = min-max over seeds; batch {batch})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        names.append(f"small_scale_study_nll_vs_{axis_name}.png")
        with atomic_path(output / names[-1]) as tmp:
            fig.savefig(tmp, format="png")
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
        with atomic_path(output / names[-1]) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    if results.get("quality"):
        names += plot_quality(results, output, plt)
    return names


def _save(fig, output: Path, name: str) -> str:
    fig.tight_layout()
    with atomic_path(output / name) as tmp:
        fig.savefig(tmp, format="png")
    pyplot().close(fig)
    return name


def plot_quality(results: dict, output: Path, plt) -> list[str]:
    """FID and class accuracy of samples along training (against steps and training compute; seed mean, band
    min-max over seeds), and Table 6 in FID."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=110)
    for variant, q in results["quality"].items():
        r, curve = results["variants"][variant], q["curve"]
        compute = 3 * np.array(curve["images_seen"]) * r["forward_gmacs_per_sample"]
        for row, metric, label in ((0, "fid", "FID (classifier features)"), (1, "class_accuracy", "class accuracy")):
            values = np.array(curve[metric])
            for col, x in enumerate((np.array(curve["steps"]), compute)):
                ax = axes[row, col]
                ax.plot(x, values.mean(0), marker="o", markersize=3, label=variant)
                ax.fill_between(x, values.min(0), values.max(0), alpha=0.2)
                ax.set_ylabel(label)
                ax.set_xlabel("optimizer steps" if col == 0 else "training compute (3 x forward linear GMACs)")
                ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"sample quality along training at CFG {results['curve_cfg']} ({results['quality_samples']} samples "
                 "per cell; seed mean, band = min-max over seeds)", fontsize=9)
    names = [_save(fig, output, "small_scale_study_quality.png")]
    if results.get("quality_sweep"):
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
        for variant, rows in results["quality_sweep"].items():
            ax.errorbar([row["train_tokens_per_patch"] for row in rows], [np.mean(row["fid"]) for row in rows],
                        yerr=[np.std(row["fid"], ddof=1) if len(row["fid"]) > 1 else 0 for row in rows], marker="o",
                        capsize=3, label=f"{variant} at DPAR's entropy boundaries")
        if "static" in results["quality"]:
            own = np.mean(results["quality"]["static"]["final"][str(results["curve_cfg"])]["fid"])
            ax.axhline(own, color="grey", linestyle="--", label=f"static with its own K = {results['static_length']}")
        ax.set_xlabel("target tokens per patch of the inference θ (training images)")
        ax.set_ylabel("FID (classifier features)")
        ax.set_title(f"threshold sweep in FID (paper Table 6), CFG {results['curve_cfg']}; seed mean, bars = std",
                     fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        names.append(_save(fig, output, "small_scale_study_threshold_sweep_fid.png"))
    return names


def plot_samples(args, results: dict, runs: dict[tuple[str, int], Path], work: Path) -> str:
    """One sample grid per Table 3 variant side by side (rows: classes), titled with its FID and class accuracy."""
    plt = pyplot()
    variants = list(results["quality"])
    fig, axes = plt.subplots(1, len(variants), figsize=(2.6 * len(variants), 5.6), dpi=120)
    for ax, variant in zip(np.atleast_1d(axes), variants):
        grid = sample_grid(args, runs, work, variant)
        final = results["quality"][variant]["final"][str(args.curve_cfg)]
        ax.imshow(grid)
        ax.set_title(f"{variant}\nFID {final['fid'][0]:.2f}, class acc {final['class_accuracy'][0]:.0%}", fontsize=8)
        ax.set_xticks([])
        rows = len(results["class_names"]) or 1
        ax.set_yticks((np.arange(rows) + 0.5) * grid.shape[0] / rows)
        ax.set_yticklabels([results["class_names"].get(str(c), str(c)) for c in range(rows)] if ax is np.atleast_1d(axes)[0]
                           else [], fontsize=6)
    fig.suptitle(f"samples of seed {args.seeds[0]}'s final checkpoints at CFG {args.curve_cfg} (rows: classes; "
                 "titles: this seed's scores)", fontsize=8)
    return _save(fig, args.output, "small_scale_study_samples.png")


def up_to(r: dict, step: int) -> dict:
    """A variant's validation figures over its evaluations up to ``step``: (mean, std over seeds) at ``step``,
    the best seed-mean and where the curve is (:func:`curve_status`)."""
    end = r["steps"].index(step) + 1
    val, steps = np.array(r["val_nll"])[:, :end], r["steps"][:end]
    return {"mean": float(val[:, -1].mean()), "std": float(val[:, -1].std(ddof=1)) if len(val) > 1 else 0.0,
            "best": float(val.min(1).mean()), **curve_status(val, steps)}


def _change(at: dict) -> str:
    if np.isnan(at["last_quarter_change"]):
        return "- (too few evaluations)"
    return f"{at['last_quarter_change']:+.4f} (from step {at['last_quarter_from_step']})"


def _table(lines: list[str], results: dict, names: list[str], versus: str) -> None:
    """One row per variant at the section's last common step (longer curves are read there); Δ vs ``versus``."""
    v = results["variants"]
    step = min(v[name]["steps"][-1] for name in names)
    lines += [f"| variant | tokens/patch | global steps/image | forward GMACs/sample | val NLL at step {step} "
              f"(mean ± std) | Δ vs {versus} | best val NLL (mean) | best at step | change over last quarter |",
              "|---|---|---|---|---|---|---|---|---|"]
    reference = up_to(v[versus], step) if versus in v else None
    for name in names:
        r, at = v[name], up_to(v[name], step)
        delta = f"{at['mean'] - reference['mean']:+.4f}" if reference else "-"
        lines.append(f"| {name} | {r['tokens_per_patch']:.2f} | {r['global_steps_per_image']:.1f} | "
                     f"{r['forward_gmacs_per_sample']:.4f} | {at['mean']:.4f} ± {at['std']:.4f} | {delta} | "
                     f"{at['best']:.4f} | {at['best_step']} | {_change(at)} |")
    lines.append("")


def _mean_std(values: list[float], spec: str) -> str:
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):{spec}} ± {std:{spec}}"


def _quality_tables(lines: list[str], results: dict) -> None:
    """Sample quality of Table 3's final checkpoints at each CFG scale, and along training at the curve's."""
    quality, v = results["quality"], results["variants"]
    lines += ["### Sample quality (the demo classifier's features; the evaluator's FID, precision / recall and class "
              "accuracy)", "",
              f"{results['quality_samples']} samples per model, seed and CFG scale against the classifier's "
              f"{results['reference_images']:,}-image reference batch; mean ± std over seeds. **Bold**: the variant's best CFG scale by FID. Training "
              "compute: 3 x forward linear GMACs per image x images seen.", "",
              "| variant | CFG | FID | precision | recall | class accuracy | Classifier Score | val NLL | "
              "training compute (GMAC) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, q in quality.items():
        best = min(q["final"], key=lambda cfg: np.mean(q["final"][cfg]["fid"]))
        compute = 3 * v[name]["images_seen"][-1] * v[name]["forward_gmacs_per_sample"]
        for cfg, m in q["final"].items():
            mark = "**" if cfg == best else ""
            lines.append(f"| {name} | {mark}{cfg}{mark} | {mark}{_mean_std(m['fid'], '.2f')}{mark} | "
                         f"{_mean_std(m['precision'], '.3f')} | {_mean_std(m['recall'], '.3f')} | "
                         f"{_mean_std(m['class_accuracy'], '.1%')} | {_mean_std(m['classifier_score'], '.2f')} | "
                         f"{v[name]['final_val_nll_mean']:.4f} | {compute:.0f} |")
    first = next(iter(quality.values()))["curve"]
    lines += ["", f"Along training, CFG {results['curve_cfg']} (seed mean FID / class accuracy):", "",
              "| variant | " + " | ".join(f"step {s}" for s in first["steps"]) + " |",
              "|---|" + "---|" * len(first["steps"])]
    for name, q in quality.items():
        lines.append(f"| {name} | " + " | ".join(f"{f:.2f} / {a:.1%}" for f, a in zip(
            np.mean(q["curve"]["fid"], 0), np.mean(q["curve"]["class_accuracy"], 0))) + " |")
    lines += ["", "![sample quality along training](small_scale_study_quality.png)", "",
              "![samples](small_scale_study_samples.png)", ""]


def _position_table(lines: list[str], v: dict, grid: int) -> None:
    """Validation NLL by grid row, and on the first row and column (whose tokens have no upper or no left
    neighbour) against the interior; as differences from the GPT's when it ran: where a gap to it lies."""
    versus = v.get("gpt")
    shown = [n for n in v if not versus or v[n]["steps"][-1] == versus["steps"][-1]]  # a difference needs equal steps
    lines += ["## Validation NLL by position (seed mean)" + (", minus the GPT's" if versus else ""), "",
              "Each run's final model, every held-out token by its place in the "
              f"{grid}x{grid} grid. Edge: the first row and the first column; interior: the rest."
              + (" Runs of another length than the GPT's are left out." if len(shown) < len(v) else ""), "",
              "| variant | " + " | ".join(f"row {r}" for r in range(grid)) + " | edge | interior |",
              "|---|" + "---|" * (grid + 2)]
    interior = np.zeros((grid, grid), bool)
    interior[1:, 1:] = True
    for name in shown:
        nll = np.array(v[name]["per_position_val_nll"]).reshape(grid, grid)
        if versus:
            nll = nll - np.array(versus["per_position_val_nll"]).reshape(grid, grid)
        cells = list(nll.mean(1)) + [nll[~interior].mean(), nll[interior].mean()]
        lines.append(f"| {name} | " + " | ".join(f"{x:+.3f}" if versus else f"{x:.3f}" for x in cells) + " |")
    lines.append("")


def write_report(args, results: dict, plots: list[str], command: str) -> Path:
    v = results["variants"]
    lines = [
        "# Small-scale study: DPAR vs patching ablations, architecture options and the GPT baseline",
        "",
        f"Measured {date.today().isoformat()} on {platform.processor() or platform.machine()} "
        f"({os.cpu_count()} cores), torch {torch.__version__}, fp32; {len(args.seeds)} seed(s) "
        f"({', '.join(map(str, args.seeds))}), {args.epochs} epochs per Table 3 run"
        + (f" and {args.ablation_epochs} per architecture-option run (compared with the curve of "
           f"{' or '.join(references_of(args.variants)) or 'dpar'} at that step)"
           if any(v["section"] != "Table 3" for v in results["variants"].values()) else "")
        + ", same recipe for all "
        f"(configs/tiny at size {args.size}: DGPT-{args.size} / GPT-{args.size}, width {SIZES[args.size]}, head_dim 32, "
        f"dropout_p = token_dropout_p = {args.dropout} for every variant; "
        f"`{results['store']}`).",
        "",
        f"    {command}",
        "",
        f"Validation: {results['val_images']} images held out of the store, drawn per class in proportion to its "
        f"size (data.val_holdout, split seed 0), view 0; every run and seed uses the same images. θ = "
        f"{results['threshold']:.6g} gives {results['threshold_tokens_per_patch']:.3f} tokens per patch (P = 4, row "
        f"break; target {TOKENS_PER_PATCH}) on {results['threshold_images']}, every view. NLL is per token, in nats. GMACs are the forward linear-layer "
        "MACs of `dpar.flops` at the run's mean tokens per patch, with the run's architecture options. "
        "\"change over last quarter\" is the seed-mean val NLL at the end minus a quarter of the run earlier "
        "(negative: still falling).",
        "",
    ]
    if missed_target(results["threshold_tokens_per_patch"], TOKENS_PER_PATCH):
        lines += [f"**Note:** no θ gives {TOKENS_PER_PATCH} tokens per patch with this entropy model: dpar trains at "
                  f"{results['threshold_tokens_per_patch']:.3f}, the sweep's targets are not reached, and variants "
                  "whose patches then coincide give the same figures.", ""]
    for section, (title, note, compared_with) in SECTIONS.items():
        names = [n for n in v if v[n]["section"] == section]
        if not names:
            continue
        present = [n for n in compared_with if n in v]
        lines += [f"## {title}", "", note, ""]
        _table(lines, results, present + names, present[0] if present else "dpar")
        if section == "Table 3":
            if "static" in v:
                lines += [f"Static patching uses K = {results['static_length']} (dpar's mean patch length on the "
                          f"training images is {results['dpar_mean_patch_length']:.2f}).", ""]
            lines += ["Ranking by seed-mean validation NLL (best first) at the last evaluations:", ""]
            for step, order in rankings(results, names)[-4:]:
                lines.append(f"- step {step}: {' < '.join(order)}")
            lines += ["", f"![val NLL vs steps]({plots[0]})", "", f"![val NLL vs compute (Figure 1b)]({plots[1]})", ""]
            if results.get("quality"):
                _quality_tables(lines, results)
    if any(p.endswith("steps_architecture.png") for p in plots):
        lines += [f"![architecture options: val NLL vs steps]({next(p for p in plots if 'architecture' in p)})", ""]
    classes = sorted(next(iter(v.values()))["per_class_val_nll"], key=int)
    class_names = results.get("class_names") or {}
    lines += ["## Validation NLL per class (seed mean)", "",
              "A one-class validation set cannot hide here: each class's held-out images separately, for each run's "
              "final model (architecture options at their shorter length).", "",
              "| variant | " + " | ".join(class_names.get(c, c) for c in classes) + " |",
              "|---|" + "---|" * len(classes)]
    for name, r in v.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_class_val_nll'][c]:.3f}" for c in classes) + " |")
    lines.append("")
    _position_table(lines, v, results["grid"])
    if results["sweep"]:
        lines += ["## Table 6 at toy scale: boundaries recomputed with a higher threshold at inference", "",
                  "θ set for the given tokens per patch on the training images; the tokens per patch it gives on the "
                  "held-out images are shown.", "",
                  "| model | threshold | tokens/patch (target on the training images → held out) | val NLL (mean ± std) |", "|---|---|---|---|"]
        for name, rows in results["sweep"].items():
            for row in rows:
                if row["threshold"] is None:
                    theta, tpp = f"own static K={results['static_length']}", f"{row['tokens_per_patch']:.2f}"
                else:
                    theta, tpp = f"{row['threshold']:.4f}", f"{row['train_tokens_per_patch']:.2f} → {row['tokens_per_patch']:.2f}"
                std = np.std(row["val_nll"], ddof=1) if len(row["val_nll"]) > 1 else 0.0
                lines.append(f"| {name} | {theta} | {tpp} | {np.mean(row['val_nll']):.4f} ± {std:.4f} |")
        lines += ["", f"![threshold sweep]({next(p for p in plots if 'sweep' in p)})", ""]
    if results.get("quality_sweep"):
        lines += ["## Table 6 in sample quality: the final models sampled at a higher θ", "",
                  f"CFG {results['curve_cfg']}, {results['quality_samples']} samples per seed; the static model (trained "
                  f"on K = {results['static_length']} patches) is sampled with DPAR's entropy boundaries (P = 4, row "
                  "break) at each θ, as in the paper.", "",
                  "| model | threshold | tokens/patch (target on the training images → held out) | FID (mean ± std) | "
                  "class accuracy | precision | recall |", "|---|---|---|---|---|---|---|"]
        held_out = {row["threshold"]: row["tokens_per_patch"] for rows in results["sweep"].values() for row in rows}
        for name, rows in results["quality_sweep"].items():
            for row in rows:
                lines.append(f"| {name} | {row['threshold']:.4f} | {row['train_tokens_per_patch']:.2f} → "
                             f"{held_out[row['threshold']]:.2f} | "
                             f"{_mean_std(row['fid'], '.2f')} | {_mean_std(row['class_accuracy'], '.1%')} | "
                             f"{_mean_std(row['precision'], '.3f')} | {_mean_std(row['recall'], '.3f')} |")
        lines += ["", "![threshold sweep in FID](small_scale_study_threshold_sweep_fid.png)", ""]
    lines += ["Run wall times (s; runs trained concurrently on a shared machine, so these say how long a run took, "
              "not which variant is faster): " + ", ".join(f"{k} {s}" for k, s in sorted(results["seconds"].items())),
              ""]
    path = args.output / "small_scale_study.md"
    findings = ""
    if path.is_file() and FINDINGS in path.read_text():
        findings = path.read_text()[path.read_text().index(FINDINGS):]
    atomic_write_text(path, "\n".join(lines) + ("\n" + findings if findings else ""))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=path_flag, default=REPO / "assets" / "demo.work" / "tokens",
                        help="token store with entropies (default: the one python -m dpar.demo leaves)")
    parser.add_argument("--entropy-model", type=path_flag, default=REPO / "assets" / "demo" / "entropy_model",
                        help="the entropy model run (or its model.safetensors) whose entropies the store holds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=number(int, min=0, max=2**31 - 1), nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=number(int, min=1), default=16, help="epochs per run (same for every variant)")
    parser.add_argument("--ablation-epochs", type=number(int, min=1), default=None,
                        help="epochs of the architecture-option runs (Tables 9, 10, the paper's text, residual; default --epochs)")
    parser.add_argument("--val-holdout", type=number(int, min=1), default=200,
                        help="held-out images for the validation NLL (a stratified draw, split seed 0)")
    parser.add_argument("--dropout", type=field_type(ModelConfig, "dropout_p"), default=0.0,
                        help="model.dropout_p and model.token_dropout_p of every variant (default 0)")
    parser.add_argument("--threshold", type=field_type(PatcherConfig, "threshold"), default=None,
                        help=f"DPAR's θ (default: the θ giving {TOKENS_PER_PATCH} tokens per patch on the training "
                             "images, as the demo does)")
    parser.add_argument("--sweep-tokens-per-patch", type=number(float, min=1), nargs="+",
                        default=[1.81, 1.92, 2.03, 2.16],
                        help="inference thresholds for the sweep, as the mean patch lengths they give on the training "
                             "images (the paper's Table 6 row)")
    parser.add_argument("--quality-samples", type=number(int, min=0), default=480,
                        help="samples per model, seed and CFG scale for the sample-quality tables (40 per class; "
                             "0: NLL only)")
    parser.add_argument("--cfg-scales", type=number(float, min=1), nargs="+", default=[1.0, 2.0, 4.0],
                        help="CFG scales the final checkpoints are sampled at (--curve-cfg is added)")
    parser.add_argument("--curve-cfg", type=number(float, min=1), default=2.0,
                        help="the CFG scale of the quality-along-training curve, the sample grids and Table 6")
    parser.add_argument("--curve-points", type=number(int, min=1), default=4,
                        help="checkpoints along each Table 3 run scored at --curve-cfg (evenly spaced, the last one "
                             "included)")
    parser.add_argument("--classifier", type=path_flag, default=REPO / "assets" / "demo" / CLASSIFIER,
                        help="the sample-quality metric: a folder with the classifier's weights and reference.npz "
                             "(default: the demo's)")
    parser.add_argument("--size", choices=tuple(SIZES), default="tiny",
                        help="model size of every variant: tiny (width 64) or small (width 128, the same depth)")
    parser.add_argument("--jobs", type=number(int, min=1), default=2, help="runs trained (and cells scored) at once")
    parser.add_argument("--runs-dir", type=path_flag, default=REPO / "results" / "small_scale_study")
    parser.add_argument("--output", type=path_flag, default=REPO / "benchmarks" / "results")
    parser.add_argument("--extra", nargs="*", default=[], help="config overrides for every run (key=value)")
    args = parser.parse_args(argv)
    args.ablation_epochs = args.ablation_epochs or args.epochs
    compared_with = references_of(args.variants)
    if args.ablation_epochs > args.epochs and compared_with:
        raise UserError(f"--ablation-epochs {args.ablation_epochs} exceeds --epochs {args.epochs}: the options are "
                        f"compared with the curve of {' and '.join(compared_with)}, which must reach their last step")
    for flag, values in (("--variants", args.variants), ("--seeds", args.seeds)):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise UserError(f"{flag} {', '.join(repeated)} given twice; each run is named by variant and seed")
    for name in REPORT_FILES:
        check_output_file(args.output / name, "--output")
    check_output_dir(args.runs_dir, "--runs-dir")
    metric_folder, reference_images = check_metric(args) if args.quality_samples else (None, 0)
    if not (args.store / "meta.json").is_file():
        raise UserError(f"no token store at --store {args.store}; build it with python -m dpar.demo")
    entropy = args.entropy_model
    if entropy.is_dir():
        checkpoint = latest_checkpoint(entropy)
        if checkpoint is None:
            raise UserError(f"--entropy-model {entropy} has no checkpoints")
        entropy = checkpoint / "model.safetensors"
    if not entropy.is_file():
        raise UserError(f"--entropy-model {args.entropy_model} not found (a run folder or its model.safetensors)")
    store = TokenStore(args.store)
    train_images = calibration_images(store, args.val_holdout)
    threshold = args.threshold
    if threshold is None:
        threshold = store_threshold(store, TOKENS_PER_PATCH, 4, True, train_images)
    dpar_patcher = PatcherConfig(mode="entropy", threshold=threshold, max_patch_length=4, row_break=True)
    static_k, dpar_mean = matched_static_length(store, dpar_patcher, train_images)
    common = ["--data.store", str(args.store), "--data.val_store", "null", "--data.val_holdout", str(args.val_holdout),
              "--data.split_seed", "0", "--train.val_every", "1",
              "--train.results_dir", str(args.runs_dir), "--patcher.entropy_model_checkpoint", str(entropy),
              "--patcher.threshold", str(threshold), "--model.dropout_p", str(args.dropout),
              "--model.token_dropout_p", str(args.dropout)]
    jobs = []  # Table 3 over every seed first: the core comparison is complete before the architecture options
    for table3 in (True, False):
        for seed, variant in ((s, v) for s in args.seeds for v in args.variants
                              if (VARIANTS[v][0] == "Table 3") == table3):
            _, config, overrides = VARIANTS[variant]
            overrides = overrides + ([f"patcher.static_length={static_k}"] if variant == "static" else [])
            if args.size != "tiny":
                overrides += [f"model.gpt_model={'GPT' if config == GPT_CONFIG else 'DGPT'}-{args.size}"]
            jobs.append((variant, seed, ["--config", config, *common, "--train.epochs", str(epochs_of(args, variant)),
                                         "--train.experiment_name", run_name(variant, seed),
                                         f"train.global_seed={seed}", *overrides, *args.extra]))
    check_jobs(jobs, args.extra, common, args.runs_dir, store)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    args.output.mkdir(parents=True, exist_ok=True)
    seconds = train_all(args, jobs)
    runs = {(v, s): finished_run(args.runs_dir, run_name(v, s), epochs_of(args, v)) for v in args.variants
            for s in args.seeds}
    results = summarize(args, runs, static_k, dpar_patcher, train_images)
    results.update(store=str(args.store.resolve().relative_to(REPO) if args.store.resolve().is_relative_to(REPO)
                             else args.store), static_length=static_k, dpar_mean_patch_length=dpar_mean,
                   threshold=threshold, val_images=args.val_holdout, grid=store.grid,
                   threshold_tokens_per_patch=store_patch_stats(store, [threshold], 4, True, train_images)[0][
                       "tokens_per_patch"],
                   threshold_images=describe_images(len(store), len(train_images), args.val_holdout, 0),
                   class_names=_class_names(store), seconds=seconds, size=args.size)
    if args.quality_samples:
        thetas = [row["threshold"] for row in results["sweep"].get("dpar") or results["sweep"].get("static") or []
                  if row["threshold"] is not None]
        scores = score_all(args, quality_jobs(args, runs, dpar_patcher, thetas), metric_folder)
        summarize_quality(args, runs, results, thetas, scores)
        results.update(curve_cfg=args.curve_cfg, quality_samples=args.quality_samples,
                       reference_images=reference_images)
    atomic_write_text(args.output / "small_scale_study.json", json.dumps(results, indent=1) + "\n")
    batch = read_section(next(iter(runs.values())) / CONFIG_FILE, "train", TrainConfig).global_batch_size
    plots = plot(results, args.output, batch)
    if results.get("quality"):
        plots.append(plot_samples(args, results, runs, metric_folder))
    command = "python benchmarks/small_scale_study.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {write_report(args, results, plots, command.strip())}")


def check_jobs(jobs: list[tuple[str, int, list[str]]], extra: list[str], common: list[str], runs_dir: Path,
               store: TokenStore) -> None:
    """Every run's config loads and builds before anything is written: ``--extra`` may not set what the study
    or a variant sets (the report would describe runs it did not make), and must suit every variant; the
    entropy model loads and made the store's entropies (as the trainer checks it); a finished run in
    ``runs_dir`` is reused only when it was trained with this study's settings."""
    owned = {item.partition("=")[0] for item in parse_overrides(common)} | {"patcher.static_length", "train.epochs",
                                                                           "model.gpt_model"} | \
        {item.partition("=")[0] for _, _, overrides in VARIANTS.values() for item in overrides}
    try:
        extras = parse_overrides(extra)
    except UserError as error:
        raise UserError(f"--extra: {error}") from None
    for item in extras:
        if item.partition("=")[0] in owned:
            raise UserError(f"--extra {item}: the study sets {item.partition('=')[0]} itself (its flags or its variants)")
    for variant, seed, argv in jobs:
        try:  # every section's rules, the model's (ModelConfig.check) among them
            config = load_config(TrainGlobalConfig, REPO / argv[1], argv[2:])
        except UserError as error:
            raise UserError(f"--extra {' '.join(extra)}: variant {variant}: {error}") from None
        if is_dpar(config.model.gpt_model) and config.patcher.mode == "entropy":
            try:  # also fills in the entropy model's config path, as the run records it
                check_entropy_source(config, store)
            except UserError as error:
                raise UserError(f"--entropy-model: {error}") from None
        run = finished_run(runs_dir, run_name(variant, seed), config.train.epochs)
        # the run fills in the store's tokenizer when it starts
        differs = run and config_difference(config, run / CONFIG_FILE, RESUMABLE_KEYS | {"data.tokenizer_checkpoint"})
        if differs:
            key, saved, value = differs
            raise UserError(f"--runs-dir {runs_dir}: the finished run {run} was trained with {key}={saved!r}, this "
                            f"study asks for {value!r}; give another --runs-dir (or remove that run to retrain it)")


def _class_names(store: TokenStore) -> dict[str, str]:
    """Class id -> the image folder's class name (the store's meta.json)."""
    return {str(i): name for i, name in enumerate(store.meta.get("class_names") or [])}


if __name__ == "__main__":
    run_main(main)
