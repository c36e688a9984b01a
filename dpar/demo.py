r"""Build the embedded demo from nothing: synthetic images -> tokenizer -> tokens -> entropy model ->
entropies -> DPAR, the GPT baseline and static patching -> samples; beside them the sample-quality metric's
classifier and reference batch (``<output>/classifier``). Run from the repository root:

    python -m dpar.demo                  # rebuilds assets/demo/ (minutes on a laptop CPU)
    python -m dpar.demo --tiny --output /tmp/demo   # the same pipeline at toy sizes (CI's end-to-end test)

Every stage is the project's own command (``tokenizer.train_vq``, ``preprocess_tokens.py``,
``train_entropy_model.py``, ``train_global_model.py``, ``evaluations.c2i.classifier``,
``evaluations.c2i.reference_batch``) with the ``configs/tiny`` configs; the
runs end up in ``<output>/<name>/`` in the normal experiment-dir layout, with paths relative to the
repository so ``python sample_c2i.py`` works from a fresh clone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from .config import REPO
from .errors import ArgumentParser, UserError, run_main
from .fileio import atomic_write_text, check_output_dir
from .data.store import META_FILE, read_meta, write_json
from .experiment import CONFIG_FILE, EMA_FILE, METRICS_FILE, MODEL_FILE, STATE_FILE, latest_checkpoint
from .validation import path as path_flag

DEFAULT_OUTPUT = REPO / "assets" / "demo"
STORE = "tokens"  # the published token store: <output>/tokens
SUMMARY_FILE = "summary.json"  # marks a build's output folder (and is its summary)
WORK_MARKER = ".dpar-demo-work"  # marks a build's work folder


@dataclass
class Scale:
    """How big the demo is: the full build, or ``--tiny`` for CI."""
    images: int
    tokenizer_images: int
    tokenizer_epochs: int
    entropy_epochs: int
    global_epochs: int
    views: int
    val_holdout: int  # validation images: a seeded class-stratified draw (dpar/data/splits.py), split seed 0
    classifier_epochs: int = 10  # the metric's classifier, trained on the demo's training images
    reference_images: int = 1000  # held-out real images of the metric's reference batch (fresh, REFERENCE_SEED)
    quality_samples: int = 480  # samples per model and CFG scale scored by the metric (40 per class)
    quality_cfg_scales: tuple[float, ...] = (1.0, 2.0, 4.0)  # the CFG scales the samples are scored at


# The full build, sized to about 30 minutes on 2 CPU cores (docs/demo.md); the tokenizer keeps the classes from
# about 12 epochs on (benchmarks/results/demo-tokenizer-2026-12-05.md).
FULL = Scale(images=8000, tokenizer_images=4000, tokenizer_epochs=14, entropy_epochs=6, global_epochs=12, views=2,
             val_holdout=200)
TINY = Scale(images=96, tokenizer_images=32, tokenizer_epochs=1, entropy_epochs=1, global_epochs=1, views=1,
             val_holdout=16, classifier_epochs=1, reference_images=24, quality_samples=24,
             quality_cfg_scales=(4.0,))
REFERENCE_SEED = 2  # the reference batch's images: neither the training images' seed (0) nor the tokenizer's (1)
CLASSIFIER = "classifier"  # <output>/classifier: classifier.safetensors, classifier.json, reference.npz


def image_size() -> int:
    """The demo's image side in pixels: its tokenizer config's (read when used: importing this module needs no
    checkout)."""
    return OmegaConf.load(REPO / "configs" / "tokenizer" / "vq_tiny.yaml").data.image_size


TOKENS_PER_PATCH = 1.81  # DPAR's θ is set on the demo's store to give the paper's 256 px mean patch length
GLOBAL_RUNS = {name: str(REPO / "configs" / "tiny" / f"{config}.yaml") for name, config in
               (("dpar", "global_model_entropy_row_break"), ("gpt", "gpt_baseline"), ("static", "global_model_static"))}


def build(output: Path, work: Path, scale: Scale) -> dict:
    """Run every stage; returns the summary that is also written to ``<output>/summary.json``."""
    import preprocess_tokens
    import sample_c2i
    import train_entropy_model
    from evaluations.c2i import classifier, reference_batch
    from tokenizer import train_vq

    from .data.stats import calibration_images, describe_images, missed_target, store_patch_stats, store_threshold
    from .data.store import TokenStore
    from .data.synthetic import write_image_folder

    summary, timings = {}, {}

    def stage(name: str, run) -> None:
        started = time.perf_counter()
        print(f"\n=== {name} ===", flush=True)
        run()
        timings[name] = round(time.perf_counter() - started, 1)

    _replace_folder(work, WORK_MARKER)  # from nothing: no stale images, store or runs of an older build
    images, tokenizer_images, store = work / "images", work / "tokenizer_images", work / "tokens"
    batch = ["--train.global_batch_size", "16"] if scale is TINY else []
    holdout = ["--data.val_holdout", str(scale.val_holdout)]
    stage("synthetic images", lambda: (write_image_folder(images, scale.images, image_size(), seed=0),
                                       write_image_folder(tokenizer_images, scale.tokenizer_images, image_size(),
                                                          seed=1)))
    metric, reference_images = work / CLASSIFIER, work / "reference_images"
    stage("classifier", lambda: (
        classifier.main(["--images", str(images), "--output", str(metric), "--image-size", str(image_size()),
                         "--epochs", str(scale.classifier_epochs)]),
        write_image_folder(reference_images, scale.reference_images, image_size(), seed=REFERENCE_SEED),
        reference_batch.main([str(reference_images), str(metric / "reference.npz"), "--statistics", "--features",
                              str(metric / classifier.WEIGHTS_FILE), "--max-images", str(scale.reference_images)])))
    summary["classifier_held_out_accuracy"] = json.loads((metric / classifier.RECORD_FILE).read_text())[
        "held_out"]["accuracy"]
    stage("tokenizer", lambda: train_vq.main([
        "--config", str(REPO / "configs" / "tokenizer" / "vq_tiny.yaml"), "--data.data_path", str(tokenizer_images),
        "--train.results_dir", str(work / "runs"), "--train.epochs", str(scale.tokenizer_epochs),
        "--train.recon_every", str(max(scale.tokenizer_epochs // 2, 1)), *batch]))
    vq = _final(work / "runs" / "scratch" / "vq_tiny")
    reference, classifier_weights = metric / "reference.npz", metric / classifier.WEIGHTS_FILE
    stage("tokenizer check", lambda: summary.update(tokenizer_reconstructions=score_reconstructions(
        vq / "model.safetensors", reference, classifier_weights, work / "reconstructions.npz")))
    stage("tokens", lambda: preprocess_tokens.main([
        "--stage", "tokens", "--data-path", str(images), "--store", str(store), "--vq-ckpt", str(vq / "model.safetensors"),
        "--image-size", str(image_size()), "--views", str(scale.views), "--num-workers", "0", "--shard-size", "500"]))
    common = ["--data.store", str(store), "--train.results_dir", str(work / "runs")]
    stage("entropy model", lambda: train_entropy_model.main([
        "--config", str(REPO / "configs" / "tiny" / "entropy_model.yaml"), *common, "--train.epochs", str(scale.entropy_epochs), *batch,
        *holdout]))
    entropy = _final(work / "runs" / "scratch" / "entropy_model")
    stage("entropies", lambda: preprocess_tokens.main([
        "--stage", "entropies", "--store", str(store), "--entropy-model-checkpoint", str(entropy / "model.safetensors")]))
    # θ on every view of the global models' training split (the same val_holdout draw they use)
    tokens = TokenStore(store)
    images = calibration_images(tokens, scale.val_holdout)
    threshold = store_threshold(tokens, TOKENS_PER_PATCH, 4, True, images)
    summary["threshold"] = threshold
    summary["threshold_calibrated_on"] = describe_images(len(tokens), len(images), scale.val_holdout, 0)
    reached = store_patch_stats(tokens, [threshold], 4, True, images)[0]["tokens_per_patch"]
    summary["threshold_tokens_per_patch"] = round(reached, 4)
    print(f"patcher.threshold {threshold}: {reached:.3f} tokens per patch (P=4, row break) on "
          f"{summary['threshold_calibrated_on']} of {store}")
    if missed_target(reached, TOKENS_PER_PATCH):  # e.g. --tiny: a 1-epoch entropy model's entropies barely vary
        print(f"note: no θ gives {TOKENS_PER_PATCH} tokens per patch with this entropy model; DPAR trains at {reached:.3f}")
    global_runs = {name: ["--config", config, *common, "--train.epochs", str(scale.global_epochs), *batch,
                          "--patcher.entropy_model_checkpoint", str(entropy / "model.safetensors"),
                          "--patcher.threshold", str(threshold), *holdout] for name, config in GLOBAL_RUNS.items()}
    stage("global models", lambda: timings.update(
        {f"{name} model": seconds for name, seconds in train_side_by_side(global_runs, work / "logs").items()}))

    _replace_folder(output, SUMMARY_FILE)
    rewrites = {"patcher.entropy_model_checkpoint": _relative(output / "entropy_model" / _weights(entropy)),
                "patcher.entropy_model_checkpoint_config": _relative(output / "entropy_model" / CONFIG_FILE),
                "data.tokenizer_checkpoint": _relative(output / "tokenizer" / _weights(vq)),
                "data.store": _relative(output / STORE)}
    _publish(vq, output / "tokenizer", {})
    shutil.copytree(metric, output / CLASSIFIER, ignore=shutil.ignore_patterns("*.npz.*.npz"))  # not the feature caches
    _publish(entropy, output / "entropy_model", rewrites)
    publish_store(store, output / STORE, rewrites)
    for name in GLOBAL_RUNS:
        run = _final(work / "runs" / "scratch" / Path(GLOBAL_RUNS[name]).stem)
        summary[name] = _publish(run, output / name, rewrites)
    for name in ("dpar", "gpt"):
        stage(f"{name} samples", lambda name=name: sample_c2i.main([
            "--experiment_dir", str(output / name), "--output-dir", str(output / "samples" / name),
            "--per-class", "4" if scale is FULL else "1"]))
    stage("sample quality", lambda: summary.update(sample_quality={
        name: score_samples(output / name, reference, classifier_weights, work / "quality" / name,
                            scale.quality_samples, scale.quality_cfg_scales) for name in GLOBAL_RUNS}))
    summary["seconds"] = timings
    atomic_write_text(output / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")
    return summary


def train_side_by_side(runs: dict[str, list[str]], logs: Path, jobs: int | None = None,
                       finished: Callable[[str, float], None] | None = None) -> dict[str, float]:
    """Run ``train_global_model.py`` once per entry of ``runs`` (name -> its flags), ``jobs`` at a time (default:
    all at once), each with ``OMP_NUM_THREADS`` threads when it is set, else this process's cores // ``jobs``
    (at least one): small models use a second thread poorly, so on a 2-core laptop three runs side by side take
    about half the time of one after the other.

    Each run's output goes to ``logs/<name>.log``; ``finished(name, seconds)`` is called as each one ends. Returns
    each run's wall seconds. A run that fails stops the others and raises ``RuntimeError``: one line naming its
    log, then the log's last 20 lines; a log that cannot be written is a ``UserError``. The runs end with this
    process, even when it is killed (:func:`dpar.launch.set_parent_death_signal`).
    """
    from tqdm import tqdm

    from .launch import set_parent_death_signal

    jobs = jobs or max(1, len(runs))
    assert jobs >= 1, f"jobs must be >= 1, got {jobs}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
    pending, running, seconds = list(runs.items()), {}, {}
    bar = tqdm(total=len(runs), desc="training runs", unit="run")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                name, flags = pending.pop(0)
                log_path = logs / f"{name}.log"
                try:
                    logs.mkdir(parents=True, exist_ok=True)
                    log = open(log_path, "w")
                except OSError as error:
                    raise UserError(f"cannot write the training log {log_path}: {error.strerror}") from None
                with log:
                    running[name] = (subprocess.Popen(
                        [sys.executable, str(REPO / "train_global_model.py"), *flags], cwd=REPO, env=env, stdout=log,
                        stderr=subprocess.STDOUT, preexec_fn=partial(set_parent_death_signal, signal.SIGTERM,
                                                                     os.getpid())), time.perf_counter())
                bar.write(f"{name}: training, log {log_path}")
            time.sleep(0.5)
            # shortest first (the returned order is by seconds), and every success recorded before a failure
            ended = sorted((item for item in running.items() if item[1][0].poll() is not None),
                           key=lambda item: (item[1][0].returncode != 0, -item[1][1]))
            for name, (process, started) in ended:
                del running[name]
                if process.returncode != 0:
                    tail = "".join((logs / f"{name}.log").read_text().splitlines(keepends=True)[-20:])
                    raise RuntimeError(f"training run {name} failed (exit {process.returncode}); see "
                                       f"{logs / f'{name}.log'}\n{tail}")
                seconds[name] = round(time.perf_counter() - started, 1)
                bar.write(f"{name}: done in {seconds[name]:.0f} s")
                bar.update()
                if finished:
                    finished(name, seconds[name])
    finally:
        bar.close()
        for process, _ in running.values():
            if process.poll() is None:
                process.terminate()
                process.wait()
    return seconds


def evaluator_report(reference: Path, batch: Path, classifier_weights: Path) -> dict[str, float]:
    """The evaluator's metrics of ``batch`` against ``reference`` with the classifier as its feature network."""
    from evaluations.c2i import evaluator

    evaluator.main([str(reference), str(batch), "--features", str(classifier_weights)])
    lines = batch.with_suffix(".classifier.txt").read_text().splitlines()[1:]  # the first names the classifier
    return {name.lower().replace(" ", "_"): float(value) for name, value in (line.split(": ", 1) for line in lines)}


def score_reconstructions(vq: Path, reference: Path, classifier_weights: Path, out: Path) -> dict[str, float]:
    """PSNR, codes in use and the metric (rFID, class accuracy of reconstructions) of the tokenizer ``vq`` on the
    reference batch (``evaluations.reconstruction``, then the evaluator)."""
    from evaluations import reconstruction

    summary = out.with_suffix(".json")
    reconstruction.main(["--vq-ckpt", str(vq), str(reference), str(out), "--json", str(summary)])
    return {**json.loads(summary.read_text()), **evaluator_report(reference, out, classifier_weights)}


def score_samples(run: Path, reference: Path, classifier_weights: Path, work: Path, count: int,
                  cfg_scales: tuple[float, ...], flags: tuple[str, ...] = ()) -> dict:
    """The metric of ``count`` samples of ``run`` at each of ``cfg_scales`` (``sample_c2i_ddp.py`` with
    ``flags``, e.g. ``--epoch 3 --threshold 2.8``, then the evaluator), keyed by scale."""
    import sample_c2i_ddp

    scores = {}
    for cfg_scale in cfg_scales:
        folder = work / f"cfg-{cfg_scale}"
        sample_c2i_ddp.main(["--experiment_dir", str(run), "--cfg-scale", str(cfg_scale), "--num-fid-samples",
                             str(count), "--per-proc-batch-size", "48", "--output-dir", str(folder), *flags])
        scores[str(cfg_scale)] = evaluator_report(reference, sample_batch(folder), classifier_weights)
    return scores


def sample_batch(folder: Path) -> Path:
    """The one ``.npz`` of samples ``sample_c2i_ddp.py`` wrote into ``folder`` (not the evaluator's feature cache
    beside it, ``<batch>.npz.<features>.npz``)."""
    batches = [path for path in folder.glob("*.npz") if ".npz." not in path.name]
    assert len(batches) == 1, f"{folder} holds {len(batches)} sample batches"
    return batches[0]


def check_replaceable(folder: Path, marker: str, what: str) -> None:
    """The build replaces ``folder`` only if it is absent, empty, or an earlier build's (it holds ``marker``):
    a mistyped path never deletes anyone's files. One line otherwise."""
    check_output_dir(folder, what, removed=True)
    if folder.is_dir() and any(folder.iterdir()) and not (folder / marker).is_file():
        raise UserError(f"{what} {folder} holds files that are not an earlier demo build's (no {marker}); give an "
                        "empty or new folder")


def _replace_folder(folder: Path, marker: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / marker).touch()


def _final(runs: Path) -> Path:
    """The final epoch checkpoint of the newest run under ``runs``."""
    run = sorted(p for p in runs.iterdir() if p.is_dir())[-1]
    return latest_checkpoint(run)


def _weights(checkpoint: Path) -> Path:
    """A checkpoint's weights, relative to its run: checkpoints/epoch_*/model.safetensors."""
    return Path("checkpoints") / checkpoint.name / MODEL_FILE


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (the shipped demo), else absolute."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def publish_store(store: Path, target: Path, rewrites: dict[str, str]) -> None:
    """Copy the demo's token store (tokens, labels, entropies: 2 MB) as ``target``, its ``meta.json`` naming
    the published tokenizer and entropy model (same weights, so the same hashes) instead of the work dir's."""
    shutil.copytree(store, target)
    meta = read_meta(target)
    meta["tokenizer"]["checkpoint"] = rewrites["data.tokenizer_checkpoint"]
    if meta.get("entropies"):
        meta["entropies"]["model"]["checkpoint"] = rewrites["patcher.entropy_model_checkpoint"]
    write_json(target / META_FILE, meta)


def _publish(checkpoint: Path, target: Path, rewrites: dict[str, str]) -> dict:
    """Copy a run's final checkpoint as ``target/checkpoints/epoch_*/`` (weights only), its config (paths
    rewritten) and metrics; returns its last epoch summary."""
    run = checkpoint.parents[1]
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name,
                    ignore=shutil.ignore_patterns(STATE_FILE, EMA_FILE))
    config = OmegaConf.load(run / CONFIG_FILE)
    for key, value in rewrites.items():
        if OmegaConf.select(config, key, default="absent") != "absent":
            OmegaConf.update(config, key, value)
    for section in config.values():  # the work dir's store, images and results_dir, relative to the repository too
        for key, value in section.items() if isinstance(section, DictConfig) else ():
            if isinstance(value, str) and Path(value).is_absolute():
                section[key] = _relative(Path(value))
    OmegaConf.save(config, target / CONFIG_FILE)
    shutil.copy(run / METRICS_FILE, target / METRICS_FILE)
    epochs = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines() if "epoch_summary" in line]
    return epochs[-1] if epochs else {}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=path_flag, default=DEFAULT_OUTPUT)
    parser.add_argument("--work-dir", type=path_flag, default=None, help="intermediate files (default: <output>.work)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the whole pipeline in about 10 s")
    args = parser.parse_args(argv)
    work = args.work_dir or args.output.with_name(args.output.name + ".work")
    output, work_dir = args.output.resolve(), work.resolve()
    if output == work_dir or output in work_dir.parents or work_dir in output.parents:
        raise UserError(f"--output {args.output} and --work-dir {work} must be separate folders (neither inside "
                        "the other): the build replaces both")
    check_replaceable(args.output, SUMMARY_FILE, "--output")
    check_replaceable(work, WORK_MARKER, "--work-dir")
    summary = build(args.output, work, TINY if args.tiny else FULL)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run_main(main)
