"""Bad input, one table: every case stops with one line naming the key, flag or file, the value and what is
allowed; exit status 2 and no traceback (the subprocess rows); nothing written where the command would write.
Then the kill windows (faults injected at the exact step) and the correctness fixes found with them."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
import torch

import preprocess_tokens
import sample_c2i
import sample_c2i_ddp
import train_entropy_model
import train_global_model
from dpar import demo, experiment
from dpar.data import stats
from dpar.data.store import TokenStore, shard_file
from dpar.errors import UserError, one_line
from dpar.fileio import atomic_write_text, lock_folder
from dpar.sampling import SamplingConfig, sample_from_logits
from sample_c2i_ddp import SampleChunks
from evaluations.c2i import evaluator
from tests.helpers import ROOT, demo_checkpoint, without_record, write_token_store
from tokenizer import train_vq
from tokenizer.vq_model import VQConfig, create_vq, unit_to_uint8

DEMO = ROOT / "assets" / "demo"
DEMO_CODES = yaml.safe_load((DEMO / "tokenizer" / "config.yaml").read_text())["model"]["codebook_size"]  # = vocab
ENTROPY_CKPT = demo_checkpoint("entropy_model") / "model.safetensors"
GPT_CKPT = demo_checkpoint("gpt") / "model.safetensors"
TINY_GLOBAL = ["--config", "configs/tiny/global_model_entropy_row_break.yaml"]


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A plain file, a 12-class store of the demo's 8x8 tokens with entropies, a tiny ADM batch."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "a_file").write_text("not a folder")
    (root / "empty").write_bytes(b"")  # what a failed download leaves
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, DEMO_CODES, (24, 1, 64), generator=generator).numpy()
    entropies = (torch.rand(24, 1, 64, generator=generator) * 4).numpy()
    write_token_store(root / "store", tokens, np.arange(24) % 12, codebook_size=DEMO_CODES, num_classes=12,
                      entropies=entropies, entropy_checkpoint=ENTROPY_CKPT, shard_size=8)
    rng = np.random.default_rng(0)
    np.savez(root / "batch.npz", arr_0=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    return {"file": root / "a_file", "store": root / "store", "batch": root / "batch.npz", "root": root,
            "empty": root / "empty"}


# (id, script module, argv, fragment of the one-line error). {out} is a fresh folder that must stay absent,
# {file} a plain file, {store} a complete store, {batch} a small ADM batch.
CASES = [
    ("lr", train_global_model, [*TINY_GLOBAL, "--train.lr", "-1"], "config key 'train.lr' must be > 0; got -1.0"),
    ("log_every", train_global_model, [*TINY_GLOBAL, "--train.log_every", "0"], "'train.log_every' must be >= 1"),
    ("ckpt_every", train_global_model, [*TINY_GLOBAL, "--train.ckpt_every", "0"], "'train.ckpt_every' must be >= 1"),
    ("dropout", train_global_model, [*TINY_GLOBAL, "--model.dropout_p", "1.5"], "'model.dropout_p' must be in [0, 1)"),
    ("max_patch_length", train_global_model, [*TINY_GLOBAL, "--patcher.max_patch_length", "-1"],
     "'patcher.max_patch_length' must be >= 1; got -1"),
    ("epochs_0", train_global_model, [*TINY_GLOBAL, "--train.epochs", "0"], "'train.epochs' must be >= 1; got 0"),
    ("epochs_neg", train_global_model, [*TINY_GLOBAL, "--train.epochs", "-1"], "'train.epochs' must be >= 1"),
    ("max_steps", train_global_model, [*TINY_GLOBAL, "--train.max_steps", "-3"], "'train.max_steps' must be >= 1"),
    ("class_dropout", train_global_model, [*TINY_GLOBAL, "--model.class_dropout_prob", "-0.5"],
     "'model.class_dropout_prob' must be in [0, 1); got -0.5"),
    ("warmup", train_global_model, [*TINY_GLOBAL, "--train.warmup_steps", "-10"], "'train.warmup_steps' must be >= 0"),
    ("threshold_nan", train_global_model, [*TINY_GLOBAL, "--patcher.threshold", "nan"],
     "'patcher.threshold' must be a finite number >= 0; got nan"),
    ("mixed_precision_yes", train_global_model, [*TINY_GLOBAL, "--train.mixed_precision", "yes"],
     "'train.mixed_precision' must be one of: no, bf16; got 'yes'"),
    ("results_dir_file", train_global_model, [*TINY_GLOBAL, "--train.results_dir", "{file}", "--data.store", "{store}"],
     "train.results_dir {file} must be a folder, but it is a file"),
    ("results_dir_under_file", train_global_model,
     [*TINY_GLOBAL, "--train.results_dir", "{file}/runs", "--data.store", "{store}"], "({file} is a file)"),
    ("num_workers", train_entropy_model, ["--config", "configs/tiny/entropy_model.yaml", "--data.num_workers", "-1"],
     "'data.num_workers' must be >= 0"),
    ("val_holdout", train_entropy_model, ["--config", "configs/tiny/entropy_model.yaml", "--data.val_holdout", "-5"],
     "'data.val_holdout' must be >= 0"),
    ("codebook_size", train_vq, ["--config", "configs/tokenizer/vq_tiny.yaml", "--model.codebook_size", "0"],
     "'model.codebook_size' must be >= 2; got 0"),
    ("vq_lr", train_vq, ["--config", "configs/tokenizer/vq_tiny.yaml", "--train.lr", "0"], "'train.lr' must be > 0"),
    ("vq_results_dir", train_vq, ["--config", "configs/tokenizer/vq_tiny.yaml", "--data.data_path", "{out}",
                                  "--train.results_dir", "{file}"], "train.results_dir {file} must be a folder"),
    ("image_size", preprocess_tokens, ["--stage", "tokens", "--store", "{out}", "--image-size", "0"],
     "argument --image-size: must be in [1, 2048]; got '0'"),
    ("batch_size", preprocess_tokens, ["--stage", "tokens", "--store", "{out}", "--batch-size", "0"],
     "argument --batch-size: must be >= 1; got '0'"),
    ("num_workers_flag", preprocess_tokens, ["--stage", "tokens", "--store", "{out}", "--num-workers", "-1"],
     "argument --num-workers: must be >= 0; got '-1'"),
    ("crop_range", preprocess_tokens, ["--stage", "tokens", "--store", "{out}", "--crop-range", "0.5"],
     "argument --crop-range: must be >= 1"),
    ("store_file", preprocess_tokens, ["--stage", "tokens", "--store", "{file}", "--data-path", "{out}",
                                       "--vq-ckpt", "{file}"], "--store {file} must be a folder, but it is a file"),
    ("entropy_model_c2i", preprocess_tokens, ["--stage", "entropies", "--store", "{store}", "--overwrite",
                                              "--entropy-model-checkpoint", str(GPT_CKPT)],
     "is a c2i GPT-tiny run; entropies come from an unconditional GPT"),
    ("classes_99", sample_c2i, ["--classes", "99", "--output-dir", "{out}"], "--classes 99: the model has 12 classes"),
    ("classes_null", sample_c2i, ["--classes", "12", "--output-dir", "{out}"], "(id 12 is the null class"),
    ("classes_neg", sample_c2i, ["--classes", "-1", "--output-dir", "{out}"], "argument --classes: must be >= 0"),
    ("top_k", sample_c2i, ["--top-k", "-5", "--output-dir", "{out}"], "argument --top-k: must be >= 0; got '-5'"),
    ("top_p_0", sample_c2i, ["--top-p", "0", "--output-dir", "{out}"], "argument --top-p: must be in (0, 1]; got '0'"),
    ("top_p_big", sample_c2i, ["--top-p", "1.5", "--output-dir", "{out}"], "argument --top-p: must be in (0, 1]"),
    ("temperature", sample_c2i, ["--temperature", "-1", "--output-dir", "{out}"], "argument --temperature: must be >= 0"),
    ("threshold_flag", sample_c2i, ["--threshold", "nan", "--output-dir", "{out}"],
     "argument --threshold: must be a finite number >= 0; got 'nan'"),
    ("cfg_inf", sample_c2i, ["--cfg-scale", "inf", "--output-dir", "{out}"],  # inf is >= 0: the message says finite
     "argument --cfg-scale: must be a finite number >= 0; got 'inf'"),
    ("per_class", sample_c2i, ["--per-class", "0", "--output-dir", "{out}"], "argument --per-class: must be >= 1"),
    ("output_dir_file", sample_c2i, ["--output-dir", "{file}"], "--output-dir {file} must be a folder"),
    ("uncond_run", sample_c2i, ["--experiment_dir", str(DEMO / "entropy_model"), "--output-dir", "{out}"],
     "is an unconditional model (GPT-tiny"),
    ("per_proc_batch", sample_c2i_ddp, ["--per-proc-batch-size", "0", "--output-dir", "{out}"],
     "argument --per-proc-batch-size: must be >= 1; got '0'"),
    ("fid_samples_0", sample_c2i_ddp, ["--num-fid-samples", "0", "--output-dir", "{out}"],
     "argument --num-fid-samples: must be >= 1; got '0'"),
    ("fid_samples_neg", sample_c2i_ddp, ["--num-fid-samples", "-3", "--output-dir", "{out}"],
     "argument --num-fid-samples: must be >= 1; got '-3'"),
    ("size_eval", sample_c2i_ddp, ["--image-size-eval", "0", "--output-dir", "{out}"], "argument --image-size-eval"),
    ("eval_batch", evaluator, ["{batch}", "{batch}", "--batch-size", "0"], "argument --batch-size: must be >= 1"),
    ("stats_threshold", stats, ["--store", "{store}", "--threshold", "nan"], "argument --threshold: must be a finite number >= 0"),
    ("stats_cap", stats, ["--store", "{store}", "--max-patch-length", "-1"], "argument --max-patch-length: must be >= 0"),
    ("stats_images", stats, ["--store", "{store}", "--max-images", "-1"], "argument --max-images: must be >= 0"),
    ("stats_both", stats, ["--store", "{store}", "--threshold", "1", "--target-tokens-per-patch", "1.8"],
     "argument --target-tokens-per-patch: not allowed with argument --threshold"),
    ("stats_holdout", stats, ["--store", "{store}", "--val-holdout", "100000"], "val_holdout 100000 for token store"),
    ("two_val_sets", train_global_model, ["--config", "configs/tiny/global_model_static.yaml", "--data.store", "{store}", "--train.results_dir", "{out}",
                                          "--data.val_store", "{store}", "--data.val_holdout", "5"],
     "data.val_store {store} and data.val_holdout=5 are two validation sets"),
    ("gpt_dpar_option", train_global_model, ["--config", "configs/tiny/gpt_baseline.yaml", "--data.store", "{store}",
                                             "--train.results_dir", "{out}", "--data.val_holdout", "0",
                                             "--model.decoder_injection", "residual"],
     "model.decoder_injection applies to DGPT-* models only, not GPT-tiny"),
    ("decoder_injection", train_global_model, [*TINY_GLOBAL, "--model.decoder_injection", "twice"],
     "'model.decoder_injection' must be one of"),
    ("n_dec_layer", train_global_model, [*TINY_GLOBAL, "--model.n_dec_layer", "0"], "'model.n_dec_layer' must be >= 1"),
    ("demo_output", demo, ["--output", "{root}", "--tiny"], "holds files that are not an earlier demo build's"),
    ("demo_nested", demo, ["--output", "{out}", "--work-dir", "{out}/work", "--tiny"], "must be separate folders"),
    ("static_self_entropy", sample_c2i, ["--experiment_dir", str(DEMO / "static"), "--self-entropy", "--threshold",
                                         "1", "--output-dir", "{out}"],
     "--self-entropy replaces entropy-model patching; "),
    ("negative_threshold", sample_c2i, ["--threshold=-1", "--output-dir", "{out}"], "--threshold: must be >= 0"),
    ("gpt_threshold", sample_c2i, ["--experiment_dir", str(DEMO / "gpt"), "--threshold", "2", "--output-dir", "{out}"],
     "--threshold, --max-patch-length and --self-entropy change DPAR's patching"),
    ("tokenizer_run", sample_c2i, ["--experiment_dir", str(DEMO / "tokenizer"), "--output-dir", "{out}"],
     "is not a training run of train_global_model.py"),
    ("store_is_file", train_global_model, [*TINY_GLOBAL, "--data.store", "{file}", "--train.results_dir", "{out}"],
     "{file} is a file; a token store is a folder"),
    ("experiment_name", train_global_model,
     [*TINY_GLOBAL, "--data.store", "{store}", "--train.results_dir", "{out}", "--data.val_holdout", "0",
      "--train.global_batch_size", "8", "--patcher.entropy_model_checkpoint", str(ENTROPY_CKPT),
      "--train.experiment_name", "../escape"], "train.experiment_name '../escape' must be a plain folder name"),
    ("eval_weights_empty", evaluator, ["{batch}", "{batch}", "--inception-weights", "{empty}"],
     "cannot read {empty} as pt_inception"),
    ("eval_sample_missing", evaluator, ["{batch}", "{out}/none.npz", "--inception-weights", "{empty}"],
     "batch file not found: {out}/none.npz"),  # before any reference features (none written next to {batch})
    ("ch_mult", train_vq, ["--config", "configs/tokenizer/vq_tiny.yaml", "--model.ch_mult", "[1,0]"],
     "'model.ch_mult' must be >= 1 in every entry; got [1, 0]"),
    ("global_seed", train_global_model, [*TINY_GLOBAL, "--train.global_seed", "9223372036854775807"],
     "'train.global_seed' must be in [0, 2147483647]"),
    ("seed_flag", sample_c2i, ["--seed", "99999999999999999999", "--output-dir", "{out}"],
     "argument --seed: must be in [0, 2147483647]"),
    ("empty_experiment_dir", sample_c2i, ["--experiment_dir", "", "--output-dir", "{out}"],
     "argument --experiment_dir/--experiment-dir: must be a path; got ''"),
    ("empty_experiment_dir_ddp", sample_c2i_ddp, ["--experiment_dir", "", "--output-dir", "{out}"],
     "argument --experiment_dir/--experiment-dir: must be a path; got ''"),
    ("interpolation", train_global_model, [*TINY_GLOBAL, "--train.lr", "${{train.foo}}"],
     "cannot resolve config key 'train.lr': Interpolation key 'train.foo' not found"),
    ("vq_ckpt_gpt", sample_c2i, ["--vq-ckpt", str(GPT_CKPT), "--output-dir", "{out}"],
     "is a GPT-tiny run's checkpoint, not a tokenizer's"),
    ("entropy_other_tokenizer", preprocess_tokens, ["--stage", "entropies", "--store", "{store}",
                                                    "--entropy-model-checkpoint", str(ENTROPY_CKPT), "--overwrite"],
     "was trained on the tokens of another tokenizer"),
]


def fill(argv: list[str], places: dict, out: Path) -> list[str]:
    return [a.format(out=out, **places) for a in argv]


@pytest.mark.parametrize("module,argv,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_before_anything_is_written(places, tmp_path, module, argv, fragment):
    out = tmp_path / "out"
    before = {p: p.stat().st_mtime_ns for p in places["root"].rglob("*")}
    with pytest.raises(UserError) as raised:
        module.main(fill(argv, places, out))
    message = one_line(raised.value)
    assert fragment.format(out=out, **places) in message and "\n" not in message, message
    assert not out.exists()
    assert {p: p.stat().st_mtime_ns for p in places["root"].rglob("*")} == before  # nothing touched, nothing added


@pytest.mark.parametrize("script,argv,fragment", [
    (["train_global_model.py"], [*TINY_GLOBAL, "--train.lr", "-1"], "config key 'train.lr' must be > 0"),
    (["sample_c2i.py"], ["--top-p", "0"], "argument --top-p: must be in (0, 1]"),
    (["sample_c2i_ddp.py"], ["--num-fid-samples", "-3"], "argument --num-fid-samples: must be >= 1"),
    (["preprocess_tokens.py"], ["--stage", "tokens", "--store", "x", "--image-size", "0"], "argument --image-size"),
    (["-m", "tokenizer.train_vq"], ["--config", "configs/tokenizer/vq_tiny.yaml", "--model.codebook_size", "0"],
     "'model.codebook_size' must be >= 2"),
    (["-m", "evaluations.c2i.evaluator"], ["a.npz", "b.npz", "--batch-size", "0"], "argument --batch-size"),
])
def test_scripts_exit_2_with_one_line_and_no_traceback(tmp_path, script, argv, fragment):
    proc = subprocess.run([sys.executable, *script, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and fragment in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["override", "file"])
def test_yaml_booleans_keep_their_documented_spelling(tmp_path, where):
    from dpar.config import load_config
    from dpar.training import TrainGlobalConfig
    if where == "file":
        path = tmp_path / "run.yaml"
        path.write_text("base: " + str(ROOT / "configs/tiny/global_model_entropy_row_break.yaml") +
                        "\ntrain:\n  mixed_precision: no\n")
        config = load_config(TrainGlobalConfig, path)
    else:
        config = load_config(TrainGlobalConfig, None, ["--train.mixed_precision", "no"])
    assert config.train.mixed_precision == "no"


def test_text_given_on_the_command_line_stays_text():
    from dpar.config import load_config
    from dpar.training import TrainGlobalConfig
    config = load_config(TrainGlobalConfig, None, ["--data.store", "0777", "--train.experiment_name", "no",
                                                   "--data.tokenizer_checkpoint", "1e3", "--data.val_store", "null"])
    assert (config.data.store, config.train.experiment_name) == ("0777", "no")  # not YAML's 511 and False
    assert config.data.tokenizer_checkpoint == "1e3" and config.data.val_store is None


def test_entropy_overwrite_with_the_wrong_model_keeps_the_entropies(places):
    files = sorted((places["store"] / "shards").glob("entropies_*.npy"))
    with pytest.raises(UserError, match="unconditional GPT"):
        preprocess_tokens.main(["--stage", "entropies", "--store", str(places["store"]), "--overwrite",
                                "--entropy-model-checkpoint", str(GPT_CKPT)])
    assert files and sorted((places["store"] / "shards").glob("entropies_*.npy")) == files
    assert TokenStore(places["store"]).has_entropies


# -- damaged inputs --------------------------------------------------------------------------------------------

def _copy_store(places, tmp_path) -> Path:
    import shutil
    return Path(shutil.copytree(places["store"], tmp_path / "store"))


@pytest.mark.parametrize("damage,fragment", [
    ("missing", "lacks tokens_00001.npy"),
    ("truncated", "tokens_00001.npy is damaged"),
    ("pickled", "tokens_00001.npy is damaged"),
    ("shape", "holds uint16 [8, 1, 32], meta.json promises uint16 [8, 1, 64]"),
])
def test_a_damaged_store_shard_is_named(places, tmp_path, damage, fragment):
    store = _copy_store(places, tmp_path)
    shard = shard_file(store, "tokens", 1)
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == "pickled":
        np.save(shard, np.array([{"a": 1}] * 8, dtype=object), allow_pickle=True)
    else:
        np.save(shard, np.zeros((8, 1, 32), np.uint16))
    with pytest.raises(UserError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        TokenStore(store)


def test_a_truncated_checkpoint_under_resume_is_named(tmp_path):
    weights = experiment.save_checkpoint(tmp_path, 0, {"w": torch.ones(3)}, {"step": 1}, step=1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(UserError, match=f"checkpoint {weights} is damaged"):
        experiment.resolve_run(tmp_path.parent, "x", False, str(tmp_path))


def test_evaluator_inputs_that_are_damaged_or_of_another_size(places, tmp_path):
    cut = tmp_path / "bad_crc.npz"
    data = bytearray(places["batch"].read_bytes())
    member = zipfile.ZipFile(places["batch"]).getinfo("arr_0.npy")
    data[member.header_offset + 30 + len(member.filename) + 200] ^= 0xFF  # flip a byte of the images
    cut.write_bytes(bytes(data))
    with pytest.raises(UserError, match="bad_crc.npz is damaged"):
        list(evaluator.ImageBatch(cut, 2).batches(4))
    wrong = tmp_path / "ref.npz"
    np.savez(wrong, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=np.zeros(64), sigma=np.zeros((64, 64)),
             mu_s=np.zeros(2023), sigma_s=np.zeros((2023, 2023)))
    with pytest.raises(UserError, match=r"reference statistics mu must have shape \[2048\]"):
        evaluator.reference_statistics(wrong)
    (tmp_path / "batch.txt").mkdir()  # where the report would go
    (tmp_path / "batch.npz").write_bytes(places["batch"].read_bytes())
    with pytest.raises(UserError, match="the report of sample_batch .*batch.txt must be a file, but it is a folder"):
        evaluator.main([str(places["batch"]), str(tmp_path / "batch.npz")])


def test_inception_weights_of_another_shape_are_named(tmp_path):
    from evaluations.c2i.inception import FIDInceptionV3
    state = FIDInceptionV3().state_dict()
    key = next(iter(state))
    state[key] = torch.zeros(1)
    torch.save(state, tmp_path / "inception.pth")
    with pytest.raises(UserError, match=f"tensors of other shapes \\(first '{key}'"):
        FIDInceptionV3.from_file(tmp_path / "inception.pth")


def test_an_unusable_feature_cache_is_recomputed(places, tmp_path):
    batch = tmp_path / "batch.npz"
    batch.write_bytes(places["batch"].read_bytes())
    cache = tmp_path / "batch.npz.inception.npz"
    cache.write_bytes(b"not an npz")
    computed = evaluator.BatchFeatures(np.zeros((6, 2048)), np.zeros((6, 1008)), np.zeros(2048),
                                       np.zeros((2048, 2048)), np.zeros(2023), np.zeros((2023, 2023)))
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluator, "compute_features", lambda *a: calls.append(1) or computed)
        evaluator.batch_features(evaluator.ImageBatch(batch, 2), lambda: None, "w", 4, "cpu")
        evaluator.batch_features(evaluator.ImageBatch(batch, 2), lambda: None, "w", 4, "cpu")
    assert calls == [1]  # the damaged cache was replaced, and the new one is used


# -- outputs are never silently reused -----------------------------------------------------------------------

def test_an_npz_of_another_sampling_job_is_refused(tmp_path):
    out = tmp_path / "samples"
    common = ["--output-dir", str(out), "--per-proc-batch-size", "4", "--cfg-scale", "1.0"]
    sample_c2i_ddp.main(["--num-fid-samples", "4", *common])
    npz = next(out.glob("*.npz"))
    first = npz.read_bytes()
    sample_c2i_ddp.main(["--num-fid-samples", "4", *common])  # the same job: found done
    with pytest.raises(UserError, match="from another sampling job \\(num_samples 4, this run 6\\)"):
        sample_c2i_ddp.main(["--num-fid-samples", "6", *common])
    assert npz.read_bytes() == first and not npz.with_suffix(".parts").exists()
    with np.load(npz) as data:
        assert data["arr_0"].shape[0] == 4 and json.loads(str(data["dpar_job"]))["num_samples"] == 4


def test_a_class_ordered_npz_of_an_older_version_is_not_taken_as_done(tmp_path):
    """Its Inception Score is far too low (issue 30): rerunning the same command must not keep it."""
    out = tmp_path / "samples"
    common = ["--output-dir", str(out), "--per-proc-batch-size", "4", "--cfg-scale", "1.0", "--num-fid-samples", "4"]
    sample_c2i_ddp.main(common)
    npz = next(out.glob("*.npz"))
    with np.load(npz) as data:
        job = json.loads(str(data["dpar_job"]))
        images = data["arr_0"]
    del job["label_order"], job["labels_sha256"]
    np.savez(npz, arr_0=images, dpar_job=np.array(json.dumps({**job, "class_order": "sample n has class n * 12 // N"})))
    with pytest.raises(UserError, match="from another sampling job \\(label_order None, this run 'class-balanced"):
        sample_c2i_ddp.main(common)


def test_finished_samples_clean_up_the_parts_a_kill_left(tmp_path):
    npz = tmp_path / "s.npz"
    chunks = SampleChunks(npz, 2, 1, {"seed": 0})
    chunks.start(main_process=True)
    for k in range(2):
        chunks.write(k, np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.MonkeyPatch.context() as patch:  # killed between writing the .npz and removing the parts
        patch.setattr("shutil.rmtree", lambda *a, **k: None)
        chunks.pack()
    assert chunks.parts.exists()
    assert SampleChunks(npz, 2, 1, {"seed": 0}).finished() and not chunks.parts.exists()


@pytest.mark.parametrize("folder", ["s.parts", "run"])
def test_a_second_writer_of_the_same_output_is_refused_while_the_first_lives(tmp_path, folder):
    """The lock a sampling run holds on its parts folder, a trainer on its run folder (dpar.fileio.lock_folder)."""
    (tmp_path / folder).mkdir()
    code = (f"from dpar.fileio import lock_folder; lock_folder({str(tmp_path / folder)!r}, 'x'); "
            "print('locked', flush=True); import time; time.sleep(60)")
    first = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert first.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"another run is writing {tmp_path / folder}"):
            if folder == "run":  # what both trainers do to their run folder before writing config.yaml
                lock_folder(tmp_path / folder, "a training run")
            else:
                SampleChunks(tmp_path / "s.npz", 4, 2, {"seed": 0}).start(main_process=True)
    finally:
        first.kill()
        first.wait()
    SampleChunks(tmp_path / "s.npz", 4, 2, {"seed": 0}).start(main_process=True)  # once it is gone: fine


def test_a_launched_worker_dies_with_its_launcher(tmp_path):
    code = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'from dpar.launch import set_parent_death_signal; "
            "set_parent_death_signal(); print(\"armed\", flush=True); import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True); time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = sorted(launcher.stdout.readline().strip() for _ in range(2))  # the worker's pid; "armed", its signal set
    assert lines[1] == "armed", lines
    worker = int(lines[0])
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    for _ in range(300):  # up to 30 s for the kernel's signal to land, well inside the worker's 60 s of sleep
        if not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived its launcher")


def test_a_worker_whose_launcher_died_before_it_armed_exits():
    """A spawned worker arms its death signal only after its imports; had its launcher died by then, the pid the
    launcher passed down (not the worker's own parent, by then init) says so, and the worker exits."""
    code = ("import os, signal; from dpar.launch import set_parent_death_signal; "
            "set_parent_death_signal(signal.SIGTERM, os.getppid() + 1); print('survived')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "")


# -- kill windows ----------------------------------------------------------------------------------------------

def test_a_kill_between_the_two_renames_of_a_checkpoint_leaves_one_to_resume_from(tmp_path):
    state = {"w": torch.ones(2)}
    experiment.save_step_checkpoint(tmp_path, 0, 5, state, {"step": 5})
    renames = []

    def replace_then_die(src, dst):
        renames.append((src, dst))
        if len(renames) == 2:  # latest -> latest.old done; latest.tmp -> latest never happens
            raise KeyboardInterrupt
        os.rename(src, dst)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(experiment.os, "replace", replace_then_die)
        experiment.save_step_checkpoint(tmp_path, 0, 9, state, {"step": 9})
    assert not experiment.step_checkpoint_dir(tmp_path).exists()
    point = experiment.resume_checkpoint(tmp_path)
    assert point is not None and experiment.checkpoint_step(point) == 5
    experiment.save_step_checkpoint(tmp_path, 0, 9, state, {"step": 9})  # the rerun's next save tidies up
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest"] and experiment.checkpoint_step(experiment.resume_checkpoint(tmp_path)) == 9


def test_a_kill_mid_swap_of_an_epoch_checkpoint_keeps_the_epoch(tmp_path):
    experiment.save_checkpoint(tmp_path, 2, {"w": torch.ones(2)}, step=30)
    final = experiment.checkpoint_dir(tmp_path, 2)
    os.rename(final, final.with_name(final.name + ".old"))  # the state between the two renames
    assert [epoch for epoch, _ in experiment.list_checkpoints(tmp_path)] == [2]
    assert experiment.checkpoint_step(experiment.latest_checkpoint(tmp_path)) == 30


def test_an_atomic_write_removes_what_a_killed_one_left(tmp_path):
    stale = tmp_path / ".meta.json.abc123.tmp"
    stale.write_text("half")
    atomic_write_text(tmp_path / "meta.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        experiment.save_checkpoint(tmp_path / "run", 0, {"w": torch.ones(1)}, {"step": 0})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    weights = experiment.checkpoint_dir(tmp_path / "run", 0) / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~mask
    assert weights.parent.stat().st_mode & 0o777 == 0o777 & ~mask


def test_train_vq_resume_drops_metrics_logged_past_the_checkpoint(tmp_path):
    from tests.helpers import write_image_folder
    images = write_image_folder(tmp_path / "images", classes=2, per_class=4, size=16)
    args = ["--config", "configs/tokenizer/vq_tiny.yaml", "--data.data_path", str(images), "--train.results_dir",
            str(tmp_path), "--train.global_batch_size", "4", "--train.log_every", "1", "--data.image_size", "16",
            "--data.num_workers", "0"]
    train_vq.main([*args, "--train.epochs", "1"])
    run = next(tmp_path.glob("scratch/vq_tiny/*"))
    with open(run / "metrics.jsonl", "a") as f:  # a killed epoch 1 logged these, and saved no checkpoint
        f.write(json.dumps({"step": 3, "epoch": 1, "loss": 1.0}) + "\n")
    train_vq.main([*args, "--train.epochs", "2", "--resume", str(run)])
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "epoch_summary" not in line]
    assert steps == [1, 2, 3, 4]


# -- correctness -------------------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_set_that_reaches_it():
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log().repeat(999, 1)
    uniforms = torch.linspace(0.0005, 0.9995, 999, dtype=torch.float64)
    drawn = sample_from_logits(logits, uniforms, SamplingConfig(top_p=0.75))
    assert set(drawn.tolist()) == {0, 1}  # .5 + .25 already reach .75
    assert abs(float((drawn == 0).double().mean()) - 2 / 3) < 0.01


def test_temperature_zero_is_greedy():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 4.0]])
    assert sample_from_logits(logits, torch.tensor([0.99, 0.99]), SamplingConfig(temperature=0)).tolist() == [1, 0]


def test_evaluation_resize_follows_llamagen_resize_then_quantise():
    torch.manual_seed(0)
    vq = create_vq(VQConfig(vq_model="VQ-16", codebook_size=32, codebook_embed_dim=4, ch=16, ch_mult=[1, 2, 2],
                            z_channels=16, num_res_blocks=1, norm_groups=8)).eval()
    codes = torch.randint(0, 32, (2, 36))
    with torch.no_grad():
        pixels = vq.decode_code(codes, (2, 4, 6, 6))
        # LlamaGen's sample_c2i_ddp.py: F.interpolate(decoded, bicubic), then clamp(127.5 x + 128) to uint8
        resized = torch.nn.functional.interpolate(pixels, size=(16, 16), mode="bicubic")
        expected = torch.clamp(127.5 * resized + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
        quantised_first = torch.nn.functional.interpolate(unit_to_uint8(pixels).permute(0, 3, 1, 2).float(),
                                                          size=(16, 16), mode="bicubic")
    assert torch.equal(vq.codes_to_images(codes, 6, size=16), expected)
    assert not torch.equal(quantised_first.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1), expected)


@pytest.fixture(scope="module")
def no_null_class(tmp_path_factory):
    """A GPT run trained with model.class_dropout_prob 0 (allowed): it has no null class for guidance."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from dpar.models import ModelConfig, create_model
    root = tmp_path_factory.mktemp("no_null") / "run"
    config = ModelConfig(gpt_model="GPT-tiny", image_size=32, downsample_size=4, vocab_size=DEMO_CODES, num_classes=12,
                         class_dropout_prob=0.0)
    root.mkdir()
    (root / "config.yaml").write_text(OmegaConf.to_yaml({"model": asdict(config), "data": {
        "tokenizer_checkpoint": str(demo_checkpoint("tokenizer") / "model.safetensors")}}))
    experiment.save_checkpoint(root, 0, create_model(config).state_dict())
    return root


@pytest.mark.parametrize("module", [sample_c2i, sample_c2i_ddp])
def test_guidance_without_a_null_class_is_refused_before_any_output(no_null_class, tmp_path, module):
    with pytest.raises(UserError, match="--cfg-scale 2.0: the model was trained with model.class_dropout_prob 0"):
        module.main(["--experiment_dir", str(no_null_class), "--cfg-scale", "2.0", "--output-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_a_parts_folder_without_chunks_blocks_nothing(tmp_path):
    npz = tmp_path / "s.npz"
    npz.with_suffix(".parts").mkdir()
    (npz.with_suffix(".parts") / "job.json").write_text('{"seed": 1, "num_samples": 99}')  # a run that died early
    chunks = SampleChunks(npz, 2, 1, {"seed": 0})
    chunks.start(main_process=True)
    assert json.loads((chunks.parts / "job.json").read_text())["seed"] == 0


def test_a_samples_npz_with_a_bad_crc_is_not_done(tmp_path):
    npz = tmp_path / "s.npz"
    chunks = SampleChunks(npz, 2, 2, {"seed": 0})
    chunks.start(main_process=True)
    chunks.write(0, np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3))
    chunks.pack()
    data = bytearray(npz.read_bytes())
    member = zipfile.ZipFile(npz).getinfo("arr_0.npy")
    data[member.header_offset + 30 + len(member.filename) + 150] ^= 0xFF
    npz.write_bytes(bytes(data))
    with pytest.raises(UserError, match="is damaged \\(bad CRC\\)"):
        SampleChunks(npz, 2, 2, {"seed": 0}).finished()


def test_a_metrics_line_cut_by_a_kill_is_dropped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    experiment.truncate_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_resuming_past_the_end_is_refused_before_the_config_changes(places, tmp_path):
    args = [*TINY_GLOBAL, "--data.store", str(places["store"]), "--train.results_dir", str(tmp_path),
            "--data.val_holdout", "0", "--train.global_batch_size", "8",
            "--patcher.entropy_model_checkpoint", str(ENTROPY_CKPT)]
    run = train_global_model.main([*args, "--train.epochs", "2"]) or next(tmp_path.glob("scratch/*/*"))
    saved = (run / "config.yaml").read_text()
    with pytest.raises(UserError, match="is already at step 6; train.epochs 1 / train.max_steps None end at step 3"):
        train_global_model.main([*args, "--train.epochs", "1", "--resume", str(run)])
    assert (run / "config.yaml").read_text() == saved


def test_synthetic_images_of_another_size_or_seed_are_not_mixed(tmp_path):
    from dpar.data.synthetic import write_image_folder
    write_image_folder(tmp_path / "s", 4, 16)
    write_image_folder(tmp_path / "s", 6, 16)  # the same images, continued
    with pytest.raises(UserError, match="made with {'image_size': 16, 'seed': 0}, this run asks for {'image_size': 32"):
        write_image_folder(tmp_path / "s", 8, 32)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"x")
    with pytest.raises(UserError, match="holds files that are not synthetic images"):
        write_image_folder(tmp_path / "mine", 2, 16)


def test_a_store_meta_that_is_not_a_store_is_named(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(UserError, match="is not a token store's meta.json"):
        TokenStore(tmp_path)


def test_a_reference_in_a_read_only_folder_is_evaluated_without_its_cache(places, tmp_path):
    computed = evaluator.BatchFeatures(np.zeros((6, 2048)), np.zeros((6, 1008)), np.zeros(2048),
                                       np.zeros((2048, 2048)), np.zeros(2023), np.zeros((2023, 2023)))

    def read_only(path):
        raise OSError(30, "Read-only file system")

    with pytest.MonkeyPatch.context() as patch, pytest.warns(UserWarning, match="cannot cache the features"):
        patch.setattr(evaluator, "compute_features", lambda *a: computed)
        patch.setattr(evaluator, "atomic_path", read_only)
        assert evaluator.batch_features(evaluator.ImageBatch(places["batch"], 2), lambda: None, "w", 4, "cpu") \
            is computed


# -- non-finite numbers: weights and entropies are refused where they are read, the file named ------------------

TOKENIZER_CKPT = demo_checkpoint("tokenizer") / "model.safetensors"
WEIGHT_DAMAGE = {"nan": "holds NaN", "inf": "holds inf", "int64": "is int64; model weights are floating point"}


def damage_weights(path: Path, damage: str) -> Path:
    """Rewrite a weights file with one tensor holding a NaN / an inf, or cast to int64 (in the file's format)."""
    from safetensors.torch import load_file, save_file
    state = load_file(path) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)["model"]
    key = sorted(state)[len(state) // 2]
    if damage == "int64":
        state[key] = state[key].round().to(torch.int64)
    else:
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float(damage)
    save_file(state, path) if path.suffix == ".safetensors" else torch.save({"model": state}, path)
    return path


def copied_run(run: Path, to: Path) -> tuple[Path, Path]:
    """(a copy of a demo run, its model.safetensors)."""
    import shutil
    copy = Path(shutil.copytree(run, to))
    return copy, next(copy.glob("checkpoints/epoch_*/model.safetensors"))


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE)
@pytest.mark.parametrize("which", ["dpar", "entropy_model", "tokenizer", "llamagen"])
def test_non_finite_or_integer_weights_are_refused_before_sampling(tmp_path, which, damage):
    """Before: NaN / inf weights sampled with exit 0 (every token the last code), int64 ones were cast silently."""
    out = tmp_path / "samples"
    if which == "dpar":
        run, weights = copied_run(DEMO / "dpar", tmp_path / "run")
        argv = ["--experiment_dir", str(run)]
    elif which == "entropy_model":  # the run's entropy model, named in its config
        _, weights = copied_run(DEMO / "entropy_model", tmp_path / "entropy_model")
        run, _ = copied_run(DEMO / "dpar", tmp_path / "run")
        config = (run / "config.yaml").read_text()
        config = config.replace(str(ENTROPY_CKPT.relative_to(ROOT)), str(weights))
        (run / "config.yaml").write_text(config.replace("assets/demo/entropy_model/config.yaml",
                                                        str(tmp_path / "entropy_model" / "config.yaml")))
        argv = ["--experiment_dir", str(run)]
    elif which == "tokenizer":
        _, weights = copied_run(DEMO / "tokenizer", tmp_path / "tokenizer")
        argv = ["--vq-ckpt", str(weights)]
    else:  # a released LlamaGen c2i checkpoint: {"model": state_dict} in a .pt
        from dpar.models import ModelConfig, create_model
        config = ModelConfig(gpt_model="GPT-tiny", image_size=32, downsample_size=4, vocab_size=DEMO_CODES, num_classes=12,
                             class_dropout_prob=0.1)
        weights = tmp_path / "c2i_tiny.pt"
        torch.save({"model": create_model(config).state_dict()}, weights)
        argv = ["--gpt-model", "GPT-tiny", "--gpt-ckpt", str(weights), "--vq-ckpt", str(TOKENIZER_CKPT),
                "--image-size", "32"]
    damage_weights(weights, damage)
    with pytest.raises(UserError) as raised:
        sample_c2i.main([*argv, "--output-dir", str(out)])
    message = one_line(raised.value)
    assert message.startswith(f"{weights}: weight '") and WEIGHT_DAMAGE[damage] in message, message
    assert not out.exists()


def demo_store_without_entropies(to: Path) -> Path:
    """A copy of the demo's token store (made with the demo tokenizer) whose entropies stage has not run."""
    import shutil
    store = Path(shutil.copytree(DEMO / "tokens", to))
    for path in (store / "shards").glob("entropies_*.npy"):
        path.unlink()
    meta = json.loads((store / "meta.json").read_text())
    meta.pop("entropies", None)
    (store / "meta.json").write_text(json.dumps(meta))
    return store


@pytest.mark.parametrize("damage", WEIGHT_DAMAGE)
def test_an_entropy_model_with_non_finite_or_integer_weights_writes_no_entropies(tmp_path, damage):
    """Before: an all-NaN store, marked complete."""
    store = demo_store_without_entropies(tmp_path / "store")
    _, weights = copied_run(DEMO / "entropy_model", tmp_path / "entropy_model")
    damage_weights(weights, damage)
    before = {p: p.stat().st_mtime_ns for p in store.rglob("*")}
    with pytest.raises(UserError) as raised:
        preprocess_tokens.main(["--stage", "entropies", "--store", str(store), "--entropy-model-checkpoint",
                                str(weights)])
    message = one_line(raised.value)
    assert message.startswith(f"{weights}: weight '") and WEIGHT_DAMAGE[damage] in message, message
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*")} == before


def test_entropies_that_come_out_nan_are_never_written_or_marked_complete(tmp_path):
    """Finite weights whose logits overflow (±1e38): the entropies stage computes NaN and must stop there."""
    from safetensors.torch import load_file, save_file
    store = demo_store_without_entropies(tmp_path / "store")
    _, weights = copied_run(DEMO / "entropy_model", tmp_path / "entropy_model")
    state = load_file(weights)
    state["output.weight"] = torch.sign(torch.randn(state["output.weight"].shape)) * 1e38
    save_file(state, weights)
    with pytest.raises(UserError) as raised:
        preprocess_tokens.main(["--stage", "entropies", "--store", str(store), "--entropy-model-checkpoint",
                                str(weights)])
    message = one_line(raised.value)
    assert message.startswith(f"entropy model {weights} gives entropy nan at image 0, view 0, token 1 of shard ") \
        and "its weights are unusable" in message, message
    assert not list((store / "shards").glob("entropies_*.npy"))
    assert not TokenStore(store).has_entropies
    with pytest.raises(UserError, match="has no entropies"):
        TokenStore(store).require_entropies()


def test_lpips_weights_with_nan_are_named(tmp_path):
    from tokenizer.lpips import LPIPS
    heads = {f"lin{i}.model.1.weight": torch.rand_like(LPIPS().lins[i].model[1].weight) for i in range(5)}
    heads["lin2.model.1.weight"][0, 0] = float("nan")
    torch.save(heads, tmp_path / "vgg.pth")
    with pytest.raises(UserError, match=f"^{tmp_path / 'vgg.pth'}: weight 'lin2.model.1.weight' holds NaN"):
        LPIPS.from_files(tmp_path / "vgg.pth")


ENTROPY_DAMAGE = {"nan": float("nan"), "inf": float("inf"), "minus_inf": float("-inf"), "negative": -0.5}


def damaged_entropy_store(places, tmp_path, value: float) -> Path:
    """A copy of the 24-image store with ``value`` as token 5's entropy in every image (position 0's +inf, the
    store's own mark, stays allowed)."""
    store = _copy_store(places, tmp_path)
    for path in sorted((store / "shards").glob("entropies_*.npy")):
        entropies = np.load(path)
        entropies[:, 0, 0] = np.inf
        entropies[:, 0, 5] = value
        np.save(path, entropies)
    return store


@pytest.mark.parametrize("value", ENTROPY_DAMAGE.values(), ids=ENTROPY_DAMAGE.keys())
@pytest.mark.parametrize("reader", ["stats", "calibration", "training"])
def test_a_store_with_nan_infinite_or_negative_entropies_is_refused(places, tmp_path, reader, value):
    """Before: stats and calibration (θ = -0.082 on negative entropies) and training read them silently."""
    store = damaged_entropy_store(places, tmp_path, value)
    out = tmp_path / "out"
    if reader == "training":
        module, argv = train_global_model, [*TINY_GLOBAL, "--data.store", str(store), "--train.results_dir", str(out),
                                            "--data.val_holdout", "0", "--train.global_batch_size", "8",
                                            "--patcher.entropy_model_checkpoint", str(ENTROPY_CKPT)]
    else:
        module, argv = stats, ["--store", str(store)] + (["--target-tokens-per-patch", "1.8"]
                                                         if reader == "calibration" else ["--threshold", "1.5"])
    with pytest.raises(UserError) as raised:
        module.main(argv)
    message = one_line(raised.value)
    shown = str(np.float16(value))
    assert re.fullmatch(rf"token store file {store}/shards/entropies_0000\d\.npy holds entropy {re.escape(shown)} "
                        r"at view 0, token 5 of image \d+; it is damaged: delete it and rerun preprocess_tokens\.py "
                        r"--stage entropies", message), message


# A run's config.yaml edited by hand, read by sampling, patch maps and the store look-up: (id, {dotted key: the
# YAML text that replaces its value}, fragment of the one line). The same cases in a training config: test_config.
RUN_CONFIG_EDITS = [
    ("missing_key", {"data.store": "${data.nope}"}, "'data.store'"),
    ("unset_env", {"patcher.threshold": "${oc.env:DPAR_TEST_NEVER_SET}"}, "DPAR_TEST_NEVER_SET"),
    ("cycle", {"model.vocab_size": "${train.epochs}", "train.epochs": "${model.vocab_size}"}, "Recursive"),
    ("unknown_resolver", {"model.rope": "${nope:dynamic}"}, "Unsupported interpolation type nope"),
    ("bad_grammar", {"model.rope": "${model."}, "'model.rope'"),
    ("model_5", {"model": 5}, "'model' must be a section of keys (a mapping), got 5"),
    ("data_a_list", {"data": ["a", "b"]}, "'data' must be a section of keys (a mapping), got ['a', 'b']"),
    ("missing_value", {"model.image_size": "???"}, "'model.image_size' needs a value"),
    ("wrong_type", {"model.image_size": "${model.gpt_model}"}, "'model.image_size'"),
]


def edited_demo_run(tmp_path: Path, edits: dict) -> Path:
    import shutil

    import yaml
    run = tmp_path / "run"
    shutil.copytree(DEMO / "dpar", run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    for key, value in edits.items():
        *sections, last = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[last] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run


@pytest.mark.parametrize("edits,fragment", [c[1:] for c in RUN_CONFIG_EDITS], ids=[c[0] for c in RUN_CONFIG_EDITS])
def test_a_run_config_that_does_not_read_is_one_line_naming_it(tmp_path, edits, fragment):
    from dpar import patchmap
    from PIL import Image
    run = edited_demo_run(tmp_path, edits)
    image = tmp_path / "photo.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    out = tmp_path / "out"
    for command in (lambda: sample_c2i.main(["--experiment_dir", str(run), "--output-dir", str(out)]),
                    lambda: patchmap.main([str(image), "--experiment_dir", str(run), "--output-dir", str(out)])):
        with pytest.raises(UserError) as raised:
            command()
        message = one_line(raised.value)
        assert str(run / "config.yaml") in message and fragment in message, message
        assert not out.exists()


def test_nested_yaml_aliases_in_a_run_config_stop_at_once(tmp_path):
    from tests.test_config import BILLION_LAUGHS
    run = edited_demo_run(tmp_path, {})
    (run / "config.yaml").write_text(BILLION_LAUGHS + (run / "config.yaml").read_text())
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "sample_c2i.py", "--experiment_dir", str(run), "--output-dir",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "YAML aliases (*a)" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 60  # before the fix: days, OmegaConf copying 9^9 nodes


# -- sizes checked before allocating: a run's config.yaml edited to a model its weights are not ------------------

def limited_run(args: list[str], memory_gb: int = 6, timeout: int = 300) -> subprocess.CompletedProcess:
    """A script run on the CPU in an address space of ``memory_gb``: what would allocate tens of GB ends in an
    allocator error (a traceback) instead of the OOM killer."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, env=env)


def edited_run(tmp_path: Path, run: str, edits: dict) -> Path:
    """A copy of the demo's ``run`` (dpar, gpt, tokenizer) whose config.yaml has ``edits`` ({dotted key: value}), its
    weights without their recorded config (as older runs' and LlamaGen's), so their shapes are what is compared."""
    import shutil

    import yaml
    copy = Path(shutil.copytree(DEMO / run, tmp_path / run))
    without_record(next(copy.glob("checkpoints/epoch_*/model.safetensors")))  # the shapes decide, not the record
    config = yaml.safe_load((copy / "config.yaml").read_text())
    for key, value in edits.items():
        section, name = key.split(".")
        config[section][name] = value
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


# (id, demo run, edits, the one line after "error: "; {config} the edited config.yaml, {weights} its weights)
SIZE_EDITS = [
    ("gpt_7b", "gpt", {"model.gpt_model": "GPT-7B"},
     "{config} has model.gpt_model=GPT-7B, but the weights {weights} have the shapes of model.gpt_model=GPT-tiny"),
    # a DPAR record named a GPT-* reads DPAR's former options as a GPT's (ModelConfig.upgrade_record): no single
    # key then gives the weights' shapes, and the line names the first weight that differs
    ("dpar_to_gpt_7b", "dpar", {"model.gpt_model": "GPT-7B"},
     "{weights} does not fit the model {config} describes: 224 missing (first 'layers.0.attention.wqkv.weight'); "
     "54 unexpected (first 'decoder.layers.0.attention.wo.weight'); 4 with other shapes (first "
     "'cls_embedding.embedding_table.weight': [13, 64] in file, [13, 4096] in model)"),
    ("vocab_1e9", "dpar", {"model.vocab_size": 10**9},
     "{config} has model.vocab_size=1000000000, but the weights {weights} have the shapes of model.vocab_size=" + str(DEMO_CODES)),
    ("classes", "gpt", {"model.num_classes": 1000},
     "{config} has model.num_classes=1000, but the weights {weights} have the shapes of model.num_classes=12"),
    ("null_class", "dpar", {"model.class_dropout_prob": 0.0},
     "{config} has model.num_classes=12 and model.class_dropout_prob=0.0, but the weights {weights} have the shapes "
     "of model.num_classes=13 or model.class_dropout_prob=0.1"),
    ("decoder_layers", "dpar", {"model.n_dec_layer": 40},
     "{config} has model.n_dec_layer=40, but the weights {weights} have the shapes of model.n_dec_layer=null"),
    ("image_65536", "gpt", {"model.image_size": 65536},
     "in {config}: config key 'model.image_size' must be in [1, 2048]; got 65536"),
    ("tokens_per_image", "gpt", {"model.image_size": 1024},
     "in {config}: model.image_size 1024 at model.downsample_size 4 makes 256 x 256 = 65536 tokens per image; at "
     "most 16384 (a 128 x 128 grid) are allowed"),
    ("tokenizer_width", "tokenizer", {"model.ch": 100000},
     "{config} has model.ch=100000, but the weights {weights} have the shapes of model.ch=32"),
    ("tokenizer_codebook", "tokenizer", {"model.codebook_size": 10**9},
     "{config} has model.codebook_size=1000000000, but the weights {weights} have the shapes of "
     f"model.codebook_size={DEMO_CODES}"),
    ("tokenizer_blocks", "tokenizer", {"model.num_res_blocks": 60},
     "{config} has model.num_res_blocks=60, but the weights {weights} have the shapes of model.num_res_blocks=1"),
]


@pytest.mark.parametrize("run,edits,expected", [c[1:] for c in SIZE_EDITS], ids=[c[0] for c in SIZE_EDITS])
def test_a_run_config_edited_to_another_size_is_refused_before_allocating(tmp_path, run, edits, expected):
    """Before: allocator tracebacks (GPT-7B: 28 GB, a 10^9 vocabulary: 256 GB, 65536 px: KV caches of 2^28
    tokens) or the OOM killer. Now the model is built on the meta device and compared with the file's header
    first, and the image size has a bound: one line naming the key, the value and the weights' value."""
    copy = edited_run(tmp_path, run, edits)
    weights = next(copy.glob("checkpoints/epoch_*/model.safetensors"))
    args = ["sample_c2i.py", "--device", "cpu", "--output-dir", str(tmp_path / "out")]
    args += ["--vq-ckpt", str(weights)] if run == "tokenizer" else ["--experiment_dir", str(copy)]
    proc = limited_run(args)
    expected = expected.format(config=copy / "config.yaml", weights=weights)
    assert proc.returncode == 2 and proc.stderr == f"error: {expected}: a run's config.yaml must describe its " \
        "weights\n" if "weights" in expected else proc.stderr == f"error: {expected}\n", proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_weights_no_single_key_explains_are_named_by_their_first_difference(tmp_path):
    copy = edited_run(tmp_path, "gpt", {"model.vocab_size": 1000, "model.num_classes": 1000})
    weights = next(copy.glob("checkpoints/epoch_*/model.safetensors"))
    with pytest.raises(UserError) as raised:
        sample_c2i.main(["--experiment_dir", str(copy), "--output-dir", str(tmp_path / "out")])
    assert one_line(raised.value) == (
        f"{weights} does not fit the model {copy / 'config.yaml'} describes: 3 with other shapes (first "
        "'cls_embedding.embedding_table.weight': [13, 64] in file, [1001, 64] in model)")


def test_the_shapes_of_a_torch_checkpoint_are_read_without_its_weights(tmp_path):
    from dpar.models import ModelConfig, create_model
    config = ModelConfig(gpt_model="GPT-tiny", image_size=32, downsample_size=4, vocab_size=DEMO_CODES, num_classes=12)
    state = create_model(config).state_dict()
    torch.save({"model": state, "args": None}, tmp_path / "c2i.pt")
    torch.save({"model": state}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)  # cannot be mapped
    for name in ("c2i.pt", "legacy.pt"):
        assert experiment.weight_shapes(tmp_path / name) == {key: tuple(t.shape) for key, t in state.items()}


# -- counts in a checkpoint's metadata: ASCII digits only, before they reach a file name --------------------------

def crafted_latest(tmp_path: Path, **metadata: str) -> Path:
    """A copy of the demo's DPAR whose weights sit in checkpoints/latest/ with this ``epoch`` / ``step`` metadata."""
    import shutil

    from safetensors.torch import load_file, save_file
    run = Path(shutil.copytree(DEMO / "dpar", tmp_path / "run"))
    epoch_dir = next((run / "checkpoints").glob("epoch_*"))
    (run / "checkpoints" / "latest").mkdir()
    save_file(load_file(epoch_dir / "model.safetensors"), run / "checkpoints" / "latest" / "model.safetensors",
              metadata={"epoch": "9", "step": "600", **metadata})
    shutil.rmtree(epoch_dir)
    return run


@pytest.mark.parametrize("value", ["5\n", "٣", "05", " 5", "+5", "-1", "5_0", "5.0", ""])
@pytest.mark.parametrize("key", ["epoch", "step"])
def test_crafted_checkpoint_counts_are_refused_naming_the_file(tmp_path, key, value):
    """Before: "5\\n" and "٣" (int() reads both) went into the sample file name (epoch-5\\n-step-600.png,
    epoch-٣-step-600.png) and into the resume point."""
    run = crafted_latest(tmp_path, **{key: value})
    weights = run / "checkpoints" / "latest" / "model.safetensors"
    expected = (f"checkpoint {weights}: its metadata {key!r} is {value!r}, not a count in ASCII digits (a damaged "
                "or crafted file); delete the checkpoint's folder to use an earlier one")
    with pytest.raises(UserError) as raised:
        sample_c2i.main(["--experiment_dir", str(run), "--epoch", "latest", "--output-dir", str(tmp_path / "out")])
    assert one_line(raised.value) == expected
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError) as raised:
        experiment.resume_checkpoint(run)
    assert one_line(raised.value) == expected


def test_checkpoint_folders_are_named_in_ascii_digits(tmp_path):
    import shutil
    for name in ("epoch_00000003\n", "epoch_0000000٣", "epoch_00000003.x"):
        shutil.copytree(demo_checkpoint("dpar"), tmp_path / "checkpoints" / name)
    assert experiment.list_checkpoints(tmp_path) == []
    weights = tmp_path / "checkpoints" / "epoch_0000000٣" / "model.safetensors"
    assert experiment.experiment_of(weights) is None


def test_a_sample_grid_larger_than_pillow_opens_is_refused_before_sampling(tmp_path):
    """Before: --per-class 100000 sampled the demo's 1.2M images in one batch (allocator error, or the OOM
    killer), then would have written a 1.5-gigapixel PNG no default Pillow opens."""
    proc = limited_run(["sample_c2i.py", "--device", "cpu", "--per-class", "100000", "--output-dir",
                        str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 2 and re.fullmatch(  # the label margin's width depends on Pillow's default font
        r"error: --per-class 100000 x 12 classes \(--classes\) make a 340\d{4} x 4\d\d px picture \(1,4\d\d Mpx\), "
        r"more than the 89 Mpx Pillow opens \(PIL\.Image\.MAX_IMAGE_PIXELS\); sample fewer per picture "
        r"\(sample_c2i_ddp\.py samples any number into an \.npz\)\n", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_a_billion_fid_samples_are_refused_before_any_label_or_image(tmp_path):
    """Before: all 10^9 labels were built at once (8 GB, an allocator error here), then sampling would start on
    a 3 TB .npz. Now the labels are computed per chunk and the job's room is checked before any work."""
    proc = limited_run(["sample_c2i_ddp.py", "--num-fid-samples", "1000000000", "--output-dir",
                        str(tmp_path / "out")], timeout=120)
    assert proc.returncode == 2 and re.fullmatch(
        # 10^9 x (32 x 32 x 3 bytes + an int64 label) in the .npz, 10^9 x 3,072 bytes of chunks, 1 MiB of headers
        rf"error: --num-fid-samples 1000000000: 32x32 samples need 6,152\.0 GB on {re.escape(str(tmp_path))} "
        r"\(the \.npz, and its chunks until they are packed\), which has [\d,.]+ GB free; sample fewer or choose "
        r"another --output-dir\n", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()


# -- from a second breaking pass: crafted sample files, chunks and records ----------------------------------------

def packed(tmp_path, labels=None, **overrides) -> SampleChunks:
    """A finished 4-sample job (chunks of 2), then its .npz rewritten with ``overrides`` of arr_0 / arr_1."""
    npz = tmp_path / "s.npz"
    chunks = SampleChunks(npz, 4, 2, {"seed": 0}, labels)
    chunks.start(main_process=True)
    for k in range(2):
        chunks.write(k, np.full((2, 8, 8, 3), k, np.uint8))
    chunks.pack()
    with np.load(npz) as data:
        arrays = {key: data[key] for key in data.files}
    np.savez(npz, **{**arrays, **overrides})
    return SampleChunks(npz, 4, 2, {"seed": 0}, labels)


@pytest.mark.parametrize("case, overrides, expected", [
    ("fewer", {"arr_0": np.zeros((3, 8, 8, 3), np.uint8)}, r"arr_0 is uint8 \[3, 8, 8, 3\], not uint8 \[4, H, W, 3\]"),
    ("float", {"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, r"arr_0 is float32 \[4, 8, 8, 3\], not uint8 \[4, H, W, 3\]"),
    ("labels", {"arr_1": np.array([3, 2, 1, 0])}, r"its labels \(arr_1\) are not this job's"),
])
def test_a_finished_npz_is_reused_only_when_it_holds_what_its_record_says(tmp_path, case, overrides, expected):
    """A crafted or damaged .npz with this job's record was taken as done: 23 images for 24, floats, other labels."""
    chunks = packed(tmp_path, np.arange(4), **overrides)
    with pytest.raises(UserError, match=f"records this sampling job but {expected}; delete it and rerun"):
        chunks.finished()
    assert packed(tmp_path / "ok", np.arange(4)).finished()


@pytest.mark.parametrize("bad", [np.zeros((1, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.float32),
                                 np.zeros((2, 4, 4, 3), np.uint8)], ids=["short", "float", "other_size"])
def test_a_chunk_that_is_not_its_images_is_removed_not_packed(tmp_path, bad):
    """A short chunk gave 399 images beside 400 labels (exit 0); a float one a float arr_0; another size a
    traceback after all the sampling."""
    chunks = SampleChunks(tmp_path / "s.npz", 4, 2, {"seed": 0})
    chunks.start(main_process=True)
    chunks.write(0, np.zeros((2, 8, 8, 3), np.uint8))
    chunks.write(1, bad)
    with pytest.raises(UserError, match="chunk_000001.npy was damaged .* and is removed; rerun"):
        chunks.pack()
    assert not chunks.file(1).exists() and chunks.file(0).exists() and not chunks.npz_path.exists()


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1, 2]"], ids=["deep", "list"])
def test_json_records_nested_too_deep_or_of_the_wrong_kind_are_one_line(tmp_path, text):
    """json.loads raises RecursionError, not ValueError, on deep nesting: a traceback in four readers."""
    parts = tmp_path / "s.parts"
    parts.mkdir()
    (parts / "job.json").write_text(text)
    np.save(parts / "chunk_000000.npy", np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="job.json is damaged"):
        SampleChunks(tmp_path / "s.npz", 2, 1, {"seed": 0}).start(main_process=True)
    np.savez(tmp_path / "t.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), dpar_job=np.array(text))
    with pytest.raises(UserError, match="t.npz"):
        SampleChunks(tmp_path / "t.npz", 2, 1, {"seed": 0}).finished()
    from sample_cli import sample_name
    assert sample_name(tmp_path, "s", (".parts",), {"run": "a/b", "run_id": "0" * 16})[0] != "s"  # not ours


def test_a_count_of_thousands_of_digits_is_refused_in_one_line():
    with pytest.raises(UserError, match="not a count in ASCII digits"):
        experiment.parse_count("9" * 5000, "the checkpoint's step")
    assert experiment.parse_count("590", "step") == 590


def test_a_run_name_read_from_a_sample_file_is_printed_as_printable_text(tmp_path):
    from sample_cli import RUN_KEY, sample_name
    from dpar.visual import save_png
    save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "s.png",
             {RUN_KEY: json.dumps({"run": "evil\nerror: fake line\x1b[31m", "run_id": "abc"})})
    stem, note = sample_name(tmp_path, "s", (".png",), {"run": "a/b", "run_id": "0" * 16})
    assert stem != "s" and "\n" not in note and "\x1b" not in note and "evil?error: fake line?[31m" in note
