"""The embedded demo's pipeline end to end at toy size (python -m dpar.demo --tiny), sampling from it, and
the small-scale study on its token store. ``tiny_demo`` (tests/conftest.py) is built once per session."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import sample_c2i
from benchmarks import small_scale_study
from dpar import demo
from dpar.errors import UserError
from dpar.flops import count
from tests.helpers import ROOT, finish, labelled_grid, run_script


def test_tiny_demo_build_then_sample(tiny_demo, tmp_path, capsys):
    output = tiny_demo / "demo"
    summary = json.loads((output / "summary.json").read_text())
    stages = list(summary["seconds"])
    assert stages[:7] + stages[10:] == ["synthetic images", "classifier", "tokenizer", "tokenizer check", "tokens",
                                        "entropy model", "entropies", "global models", "dpar samples", "gpt samples",
                                        "sample quality"]
    models = stages[7:10]  # the three runs side by side, in the order they ended
    assert sorted(models) == ["dpar model", "gpt model", "static model"]
    assert [summary["seconds"][m] for m in models] == sorted(summary["seconds"][m] for m in models)
    # what the tokenizer keeps, and the metric of each model's samples (issue 31): evaluator figures in range
    reconstructions = summary["tokenizer_reconstructions"]
    assert reconstructions["images"] == demo.TINY.reference_images and reconstructions["psnr_db"] > 0
    assert 0 <= reconstructions["class_accuracy"] <= 1 and reconstructions["fid"] >= 0
    assert set(summary["sample_quality"]) == set(demo.GLOBAL_RUNS)
    for scores in summary["sample_quality"].values():
        assert list(scores) == [str(s) for s in demo.TINY.quality_cfg_scales]
        assert all(0 <= score["class_accuracy"] <= 1 and score["fid"] >= 0 for score in scores.values())
    metric = output / demo.CLASSIFIER  # the sample-quality metric: classifier and reference batch (issue 31)
    assert sorted(p.name for p in metric.iterdir()) == ["classifier.json", "classifier.safetensors", "reference.npz"]
    assert 0 <= summary["classifier_held_out_accuracy"] <= 1
    assert summary["static"]["tokens_per_patch"] == 2.0 and summary["gpt"]["tokens_per_patch"] == 1.0
    assert 1.0 <= summary["dpar"]["tokens_per_patch"] <= 4.0 and "threshold" in summary
    for name in ("tokenizer", "entropy_model", "dpar", "gpt", "static"):
        assert (output / name / "config.yaml").is_file()
        assert len(list((output / name / "checkpoints").glob("epoch_*/model.safetensors"))) == 1
    assert not list(output.rglob("training_state.pt"))  # weights only: the demo is for sampling
    assert len(list((output / "samples" / "dpar").glob("*_patches.png"))) == 1

    capsys.readouterr()
    sample_c2i.main(["--experiment_dir", str(output / "dpar"), "--output-dir", str(tmp_path / "samples"),
                     "--per-class", "1", "--classes", "0", "1", "2"])
    out = capsys.readouterr().out
    assert "tokens per patch" in out
    grid = np.asarray(Image.open(next((tmp_path / "samples").glob("*[0-9].png"))))
    labelled_grid(grid, 3, 1, demo.image_size())  # three rows of one image, each labelled


@pytest.mark.slow  # about 23 s on 2 CPU cores: two seeds of four variants trained, then rerun
def test_small_scale_study_on_the_tiny_store(tiny_demo, tmp_path):
    out = tmp_path / "study"
    argv = ["--store", str(tiny_demo / "work" / "tokens"), "--entropy-model", str(tiny_demo / "demo" / "entropy_model"),
            "--seeds", "0", "1", "--epochs", "2", "--ablation-epochs", "1", "--val-holdout", "16", "--variants", "dpar", "static", "gpt", "inject_every_block",
            "--runs-dir", str(tmp_path / "runs"), "--output", str(out), "--jobs", "2",
            "--extra", "train.global_batch_size=16", "--classifier", str(tiny_demo / "demo" / "classifier"),
            "--quality-samples", "24", "--cfg-scales", "1", "2", "--curve-points", "2"]
    small_scale_study.main(argv)
    results = json.loads((out / "small_scale_study.json").read_text())
    variants = results["variants"]
    assert set(variants) == {"dpar", "static", "gpt", "inject_every_block"}
    for name, r in variants.items():
        epochs = 1 if name == "inject_every_block" else 2  # an architecture option: --ablation-epochs
        assert np.array(r["val_nll"]).shape == (2, epochs), name  # seeds x epochs
        assert r["steps"] == [5, 10][:epochs]  # 80 training images / 16 per step
    assert variants["gpt"]["global_steps_per_image"] == 64
    k = results["static_length"]  # K-token patches over 64 tokens: the last one may be shorter
    assert variants["static"]["tokens_per_patch"] == pytest.approx(64 / -(-64 // k))
    tiny = OmegaConf.load(ROOT / "configs" / "tiny" / "global_model_entropy_row_break.yaml").model  # its architecture
    static_cost = count("DGPT-tiny", 32, variants["static"]["tokens_per_patch"], downsample_size=4,
                        vocab_size=OmegaConf.load(ROOT / "configs" / "tiny" / "entropy_model.yaml").model.vocab_size,
                        num_classes=12, encoder_pooling_ffn=tiny.encoder_pooling_ffn,
                        decoder_injection=tiny.decoder_injection)["linear_gmacs"]  # the runs' own patch length
    assert variants["static"]["forward_gmacs_per_sample"] == pytest.approx(static_cost)
    sweep = results["sweep"]
    assert [row["threshold"] is None for row in sweep["static"]] == [False] * 4 + [True]
    classes = len(json.loads((tiny_demo / "work" / "tokens" / "meta.json").read_text())["class_names"])
    assert len(variants["dpar"]["per_class_val_nll"]) == classes  # the stratified hold-out has every class
    assert variants["inject_every_block"]["section"] == "Paper's text"
    for png in ("nll_vs_steps", "nll_vs_gmacs", "nll_vs_steps_architecture", "threshold_sweep"):
        assert Image.open(out / f"small_scale_study_{png}.png").size[0] > 100
    # sample quality (issue 31): the evaluator's metrics per CFG scale, along training, and Table 6 in FID
    quality = results["quality"]
    assert set(quality) == {"dpar", "static", "gpt"}  # Table 3's variants; the architecture options have none
    for q in quality.values():
        assert list(q["final"]) == ["1.0", "2.0"] and q["curve"]["epochs"] == [0, 1] and q["curve"]["steps"] == [5, 10]
        for metrics in [*q["final"].values(), q["curve"]]:
            accuracy = np.array(metrics["class_accuracy"])
            assert accuracy.shape[0] == 2 and ((accuracy >= 0) & (accuracy <= 1)).all()  # per seed
            assert (np.array(metrics["fid"]) >= 0).all()
    assert quality["dpar"]["curve"]["fid"][0][-1] == quality["dpar"]["final"]["2.0"]["fid"][0]  # one cell, once
    metric, = (tmp_path / "runs" / "quality").glob("*-n24")  # named by the classifier, reference and count
    scores = json.loads((metric / "scores.json").read_text())
    thetas = len({f"{row['threshold']:.5f}" for row in results["sweep"]["dpar"] if row["threshold"]})  # a flat
    assert len(scores) == 3 * 2 * 3 + 2 * 2 * thetas  # entropy model may give two targets one θ; scored once
    assert all(cell["samples"] == 24 for cell in scores.values())
    sweep = results["quality_sweep"]
    assert [len(sweep[name]) for name in ("dpar", "static")] == [4, 4]
    assert [row["threshold"] for row in sweep["dpar"]] == [row["threshold"] for row in results["sweep"]["dpar"]]
    repatched = OmegaConf.load(next((tmp_path / "runs" / "quality" / "repatched").glob("static_seed0-*")) / "config.yaml")
    assert repatched.patcher.mode == "entropy" and repatched.patcher.max_patch_length == 4  # DPAR's boundaries
    for png in ("quality", "threshold_sweep_fid", "samples"):
        assert Image.open(out / f"small_scale_study_{png}.png").size[0] > 100
    report = (out / "small_scale_study.md").read_text()
    assert "### Sample quality" in report and "## Table 6 in sample quality" in report
    assert "| dpar |" in report and "| gpt |" in report and "## Validation NLL per class" in report
    assert "## The paper's text, where the tiny configs depart from it" in report and "val NLL at step 5 " in report  # dpar read at step 5
    by_position = report.split("## Validation NLL by position (seed mean), minus the GPT's")[1].split("\n## ")[0]
    assert "| dpar | " in by_position and "| inject_every_block |" not in by_position  # shorter: no difference
    assert "Runs of another length than the GPT's are left out." in by_position
    # a rerun reuses the finished runs and keeps a hand-written findings section
    (out / "small_scale_study.md").write_text(report + "\n## Findings\n\nhand-written\n")
    small_scale_study.main(argv)
    assert (out / "small_scale_study.md").read_text().endswith("## Findings\n\nhand-written\n")
    assert len(list((tmp_path / "runs" / "scratch" / "dpar_seed0").iterdir())) == 1
    assert json.loads((metric / "scores.json").read_text()) == scores  # every cell reused
    # a retrained run is scored again, never credited with the removed run's cells
    removed = next((tmp_path / "runs" / "scratch" / "gpt_seed0").iterdir()).name
    shutil.rmtree(tmp_path / "runs" / "scratch" / "gpt_seed0")
    gpt_only = argv[:argv.index("--variants")] + ["--variants", "gpt"] + argv[argv.index("--runs-dir"):]
    small_scale_study.main(gpt_only)
    retrained = next((tmp_path / "runs" / "scratch" / "gpt_seed0").iterdir()).name
    rescored = json.loads((metric / "scores.json").read_text())
    assert retrained != removed and {k: v for k, v in rescored.items() if k in scores} == scores
    assert sorted(set(rescored) - set(scores)) == sorted(k.replace(removed, retrained) for k in scores
                                                         if k.startswith(f"gpt_seed0/{removed}/"))
    # another sample count scores in a folder of its own
    small_scale_study.main(gpt_only + ["--quality-samples", "12"])
    cells = json.loads((metric.parent / metric.name.replace("-n24", "-n12") / "scores.json").read_text())
    assert len(cells) == 3 * 2 and {cell["samples"] for cell in cells.values()} == {12}
    # a finished run trained with other settings is never passed off as this study's
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(UserError, match=r"--runs-dir .* was trained with model.dropout_p=0.0, this study asks for 0.3"):
        small_scale_study.main(argv + ["--dropout", "0.3"])
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_the_shipped_demo_samples_with_no_arguments_from_any_directory(tmp_path):
    """The README's first command, against the committed assets/demo (paths relative to the repository), run
    from another directory."""
    for name in ("dpar", "gpt", "static"):
        config = OmegaConf.load(ROOT / "assets" / "demo" / name / "config.yaml")
        for key, kind in (("patcher.entropy_model_checkpoint", "file"), ("data.tokenizer_checkpoint", "file"),
                          ("data.store", "dir")):
            path = Path(OmegaConf.select(config, key))
            assert not path.is_absolute() and getattr(ROOT / path, f"is_{kind}")(), (name, key)
    size = sum(f.stat().st_size for f in (ROOT / "assets" / "demo").rglob("*") if f.is_file())
    assert size < 25 * 2 ** 20
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = finish(run_script([sys.executable, str(ROOT / "sample_c2i.py"), "--output-dir", "out"], cwd=elsewhere))
    assert "96 images of 12 classes" in out and "tokens per patch" in out
    grid = np.asarray(Image.open(next((elsewhere / "out").glob("*cfg-4.0-seed-0.png"))))
    labelled_grid(grid, 12, 8, demo.image_size())
    patches = np.asarray(Image.open(next((elsewhere / "out").glob("*_patches.png"))))
    assert patches.shape[0] > grid.shape[0]  # the legend below


def test_runs_side_by_side_stop_at_the_first_failure_naming_its_log(tmp_path):
    runs = {"broken": ["--config", str(tmp_path / "missing.yaml")], "never": ["--config", str(tmp_path / "other.yaml")]}
    with pytest.raises(RuntimeError) as raised:
        demo.train_side_by_side(runs, tmp_path / "logs", jobs=1)
    first, *tail = str(raised.value).splitlines()
    assert first == f"training run broken failed (exit 2); see {tmp_path / 'logs' / 'broken.log'}"
    assert "missing.yaml" in "".join(tail)  # the log's end: the trainer's own one-line error
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["broken.log"]  # one at a time: never not started


def test_a_training_log_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "logs").write_text("a file where the log folder goes")
    with pytest.raises(UserError, match=f"cannot write the training log {tmp_path / 'logs' / 'gpt.log'}: "):
        demo.train_side_by_side({"gpt": ["--config", "unused.yaml"]}, tmp_path / "logs")


def test_the_study_says_its_timings_file_is_damaged(tmp_path):
    from argparse import Namespace
    (tmp_path / "seconds.json").write_text("[1, 2")
    with pytest.raises(UserError, match="seconds.json is damaged; delete it"):
        small_scale_study.train_all(Namespace(runs_dir=tmp_path, jobs=1), [])
