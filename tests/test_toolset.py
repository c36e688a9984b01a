"""After training: a LlamaGen GPT as the entropy model, the linear probe, patch maps of any image, the trainers'
--help and an editable install that runs from any directory."""
import json
import re
import subprocess
import sys
import sysconfig
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import preprocess_tokens
import train_global_model
from dpar import patchmap
from dpar.data.preprocess import next_token_entropies
from dpar.data.store import TokenStore
from dpar.errors import UserError
from dpar.experiment import save_checkpoint
from dpar.models import ModelConfig, create_model
from dpar.patcher import PatcherConfig, patch_starts
from dpar.runs import Sampler
from dpar.sampling import SamplingConfig
from evaluations import linear_probe
from tests.helpers import ROOT, finish, randomize, run_script, write_token_store
from tokenizer.transforms import load_center_crop
from tokenizer.vq_model import VQConfig, create_vq

GRID, VOCAB, CLASSES, IMAGES = 4, 48, 4, 96
SIZE = 4 * GRID
VQ = VQConfig(vq_model="VQ-16", codebook_size=VOCAB, codebook_embed_dim=4, ch=16, ch_mult=[1, 2, 2], z_channels=16,
              num_res_blocks=1, norm_groups=8)


def model_config(gpt_model: str, **overrides) -> ModelConfig:
    return ModelConfig(**{"gpt_model": gpt_model, "image_size": SIZE, "downsample_size": 4, "vocab_size": VOCAB,
                          "num_classes": CLASSES, **overrides})


def run_dir(root: Path, model: torch.nn.Module, sections: dict) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(sections))
    save_checkpoint(root, 0, model.state_dict())
    return root


def class_tokens(labels: np.ndarray, seed: int) -> np.ndarray:
    """[I, 1, N] tokens whose distribution depends on the class: 90% of tokens from the class's own 12 codes."""
    rng = np.random.default_rng(seed)
    own = labels[:, None] * 12 + rng.integers(0, 12, (len(labels), GRID * GRID))
    return np.where(rng.random(own.shape) < 0.9, own, rng.integers(0, VOCAB, own.shape))[:, None, :]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toolset")
    torch.manual_seed(0)
    vq_dir = run_dir(root / "vq", create_vq(VQ).eval(), {"model": asdict(VQ)})
    llamagen = randomize(create_model(model_config("GPT-tiny")), std=0.2, seed=3).eval()
    torch.save({"model": llamagen.state_dict()}, root / "c2i_tiny.pt")
    labels = np.arange(IMAGES) % CLASSES
    store = write_token_store(root / "store", class_tokens(labels, 0), labels, codebook_size=VOCAB,
                              num_classes=CLASSES)
    return {"root": root, "vq": vq_dir / "checkpoints" / "epoch_00000000" / "model.safetensors",
            "llamagen": root / "c2i_tiny.pt", "llamagen_model": llamagen, "store": store, "labels": labels}


# -- a LlamaGen c2i GPT as the entropy model (its null class) ------------------------------------------------

def null_class_entropies(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """The softmax entropy of a full forward at the null class, written out (+inf for the first token)."""
    logits, _ = model(tokens[:, :-1], torch.full((len(tokens),), model.num_classes))
    probs = logits.double().softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    entropy[:, 0] = float("inf")
    return entropy


def test_llamagen_entropy_model_fills_the_store_with_null_class_entropies(world, tmp_path):
    store = tmp_path / "store"
    labels = world["labels"]
    write_token_store(store, class_tokens(labels, 1), labels, codebook_size=VOCAB, num_classes=CLASSES)
    preprocess_tokens.main(["--stage", "entropies", "--store", str(store), "--entropy-model-checkpoint",
                            str(world["llamagen"]), "--entropy-model-gpt", "GPT-tiny", "--batch-size", "16"])
    tokens = TokenStore(store)
    stored = torch.from_numpy(np.stack([tokens.entropies(i)[0] for i in range(IMAGES)]).astype(np.float64))
    sequences = torch.from_numpy(np.stack([tokens.tokens(i)[0] for i in range(IMAGES)]).astype(np.int64))
    expected = null_class_entropies(world["llamagen_model"], sequences)
    torch.testing.assert_close(stored[:, 1:], expected[:, 1:], atol=5e-3, rtol=1e-3)  # stored as float16
    model = world["llamagen_model"]
    class_logits, _ = model(sequences[:, :-1], torch.from_numpy(labels))
    null_logits, _ = model(sequences[:, :-1], torch.full((IMAGES,), CLASSES))
    assert not torch.allclose(class_logits, null_logits, atol=1e-3)  # its class-conditional prediction differs

    # DPAR trains on those entropies with the LlamaGen checkpoint named as its entropy model (no run config)
    common = ["--config", str(ROOT / "configs/tiny/global_model_entropy_row_break.yaml"), "model.image_size=16",
              "model.downsample_size=4", f"model.vocab_size={VOCAB}", f"model.num_classes={CLASSES}",
              f"data.store={store}", "data.val_holdout=8", f"train.results_dir={tmp_path / 'runs'}",
              "train.epochs=1", "train.global_batch_size=16", "patcher.threshold=2.5",
              f"patcher.entropy_model_checkpoint={world['llamagen']}"]
    with pytest.raises(UserError, match="not inside an experiment dir"):  # without saying it is a LlamaGen GPT
        train_global_model.main(common)
    train_global_model.main(common + ["patcher.entropy_model_gpt=GPT-tiny"])
    run = next((tmp_path / "runs" / "scratch").glob("*/*"))

    # and samples with it: the boundaries come from the null-class entropies of what it samples
    sampler = Sampler.from_experiment(run, vq_checkpoint=str(world["vq"]))
    out = sampler.sample(torch.arange(CLASSES), torch.arange(CLASSES), SamplingConfig(cfg_scale=2.0))[1]
    expected = null_class_entropies(world["llamagen_model"], out.tokens)
    torch.testing.assert_close(out.entropies[:, 1:].double(), expected[:, 1:], atol=1e-4, rtol=1e-4)
    assert torch.equal(out.patch_start, patch_starts(sampler.patcher, expected.float(), GRID))


# -- linear probe ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def probe_runs(world):
    root = world["root"] / "probe_runs"
    entropy = randomize(create_model(model_config("GPT-tiny", model_type="uncond", num_classes=1)), std=0.2,
                        seed=4).eval()
    entropy_dir = run_dir(root / "entropy", entropy, {"model": asdict(model_config("GPT-tiny", model_type="uncond",
                                                                                   num_classes=1))})
    threshold = float(next_token_entropies(entropy, torch.randint(0, VOCAB, (16, GRID * GRID)))[:, 1:].median())
    patcher = PatcherConfig(threshold=threshold, max_patch_length=3, entropy_model_checkpoint=str(
        entropy_dir / "checkpoints" / "epoch_00000000" / "model.safetensors"))
    runs = {"gpt": run_dir(root / "gpt", randomize(create_model(model_config("GPT-tiny")), std=0.2, seed=5),
                           {"model": asdict(model_config("GPT-tiny"))}),
            "dpar": run_dir(root / "dpar", randomize(create_model(model_config("DGPT-tiny")), std=0.2, seed=6),
                            {"model": asdict(model_config("DGPT-tiny")), "patcher": asdict(patcher)})}
    return runs


@pytest.mark.parametrize("which", ["gpt", "dpar"])
def test_linear_probe_reads_the_class_from_class_dependent_tokens_only(world, probe_runs, tmp_path, which, capsys):
    output = tmp_path / "probe.json"
    linear_probe.main(["--experiment_dir", str(probe_runs[which]), "--store", str(world["store"]),
                       "--val-holdout", "24", "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["val_images"] == 24 and result["train_images"] == IMAGES - 24 and result["classes"] == CLASSES
    assert result["top1"] >= 0.7 and result["top5"] == 1.0, result  # chance is 0.25: the features carry the class
    assert "top-1" in capsys.readouterr().out
    # the same tokens under shuffled labels: chance, so the probe is not reading the label from elsewhere
    shuffled = np.random.default_rng(0).permutation(world["labels"])
    store = write_token_store(tmp_path / "shuffled", class_tokens(world["labels"], 0), shuffled,
                              codebook_size=VOCAB, num_classes=CLASSES)
    linear_probe.main(["--experiment_dir", str(probe_runs[which]), "--store", str(store), "--val-holdout", "24",
                       "--output", str(tmp_path / "shuffled.json")])
    assert json.loads((tmp_path / "shuffled.json").read_text())["top1"] < 0.5


def test_dpar_features_of_an_image_do_not_depend_on_its_batch(probe_runs):
    sampler = Sampler.from_experiment(probe_runs["dpar"], tokenizer=False)
    tokens = torch.randint(0, VOCAB, (5, GRID * GRID))
    together = linear_probe.pooled_features(sampler, tokens)
    alone = torch.cat([linear_probe.pooled_features(sampler, tokens[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_example_commands_name_only_files_of_a_fresh_clone():
    """Issue 30: linear_probe's --help named assets/demo.work/tokens, which only a rebuilt demo has. Every
    assets/ path in a command example (a line running python, accelerate or torchrun) of an app's or a
    module's text is in the repository as committed."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    files = set(tracked.stdout.split())
    folders = {str(Path(f).parents[k]) for f in files for k in range(len(Path(f).parents) - 1)}
    named = {}
    for source in sorted(f for f in files if f.endswith(".py") and not f.startswith("tests/")):
        for line in (ROOT / source).read_text().splitlines():
            if re.search(r"\b(python|accelerate launch|torchrun)\b", line):
                for path in re.findall(r"\bassets/[\w./-]*\w", line):
                    named.setdefault(path, source)
    assert named and "evaluations/linear_probe.py" in named.values()
    missing = {path: source for path, source in named.items() if path not in files | folders}
    assert not missing, f"example commands name paths a fresh clone lacks: {missing}"


def test_a_missing_store_names_commands_that_exist(tmp_path):
    """Issue 30: the probe's "no store" error advised preprocess_tokens.py with no command to run. It names the
    flag, a preprocess_tokens.py command whose flags that script takes, and the demo's store, which a fresh
    clone has; and it comes before any model is loaded."""
    absent = tmp_path / "demo.work" / "tokens"
    with pytest.raises(UserError) as raised:
        linear_probe.main(["--experiment_dir", str(tmp_path / "no_run"), "--store", str(absent)])
    message = str(raised.value)
    assert message.startswith(f"--store {absent}: no token store there") and "\n" not in message
    command = re.search(r"python (preprocess_tokens\.py [^,]*), or", message).group(1).split()
    assert (ROOT / command[0]).is_file()
    args = preprocess_tokens.parse_args([arg.replace("<", "").replace(">", "") for arg in command[1:]])
    assert args.stage == "tokens" and args.store == str(absent) and args.data_path and args.vq_ckpt
    demo = message.rsplit("--store ", 1)[1]
    assert TokenStore(Path(demo).resolve()).num_tokens > 0  # relative to the working folder


@pytest.mark.parametrize("extra, message", [
    (["--val-store", "{store}", "--val-holdout", "5"], "with --val-store give one of the two"),
    (["--val-holdout", "96"], "--val-holdout 96: "),
    (["--val-store", "{root}/absent"], "absent"),
])
def test_linear_probe_bad_input_is_one_line(world, probe_runs, extra, message):
    names = {"store": world["store"], "root": world["root"]}
    proc = subprocess.run([sys.executable, "-m", "evaluations.linear_probe", "--experiment_dir",
                           str(probe_runs["gpt"]), "--store", str(world["store"]),
                           *(arg.format(**names) for arg in extra)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


# -- patch map of any image ---------------------------------------------------------------------------------

def test_patchmap_draws_the_patches_the_entropy_model_gives(world, probe_runs, tmp_path, capsys):
    images = []
    for k, shape in enumerate([(20, 24, 3), (40, 33, 3)]):
        images.append(tmp_path / f"photo{k}.png")
        Image.fromarray(np.random.default_rng(k).integers(0, 256, shape, dtype=np.uint8)).save(images[-1])
    run = probe_runs["dpar"]
    entropy_ckpt = run.parent / "entropy" / "checkpoints" / "epoch_00000000" / "model.safetensors"
    patchmap.main([*map(str, images), "--vq-ckpt", str(world["vq"]), "--entropy-model-checkpoint", str(entropy_ckpt),
                   "--threshold", "3.0", "--max-patch-length", "2", "--zoom", "2", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    sampler = Sampler.from_experiment(run, vq_checkpoint=str(world["vq"]))
    patcher = PatcherConfig(threshold=3.0, max_patch_length=2)
    for k, path in enumerate(images):
        tokens = sampler.vq.images_to_codes(torch.from_numpy(load_center_crop(path, SIZE))[None])
        starts = patch_starts(patcher, next_token_entropies(sampler.entropy_model, tokens), GRID)
        assert f"{path}: {GRID * GRID / int(starts.sum()):.2f} tokens per patch ({int(starts.sum())} patches)" in out
        picture = np.asarray(Image.open(tmp_path / f"photo{k}_patches.png"))
        assert picture.shape[0] > 2 * SIZE + 4 and picture.shape[1] >= 2 * (2 * SIZE + 2) + 2  # crop | map, legend


def test_patchmap_bad_input_is_one_line(world, probe_runs, tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(png)
    for extra, message in ((["--vq-ckpt", str(world["vq"])], "give --vq-ckpt and --entropy-model-checkpoint"),
                           (["--experiment_dir", str(probe_runs["gpt"])], "does not patch by entropy"),
                           (["--experiment_dir", str(probe_runs["dpar"]), "--threshold", "2", "--image-size", "32"],
                            "--image-size comes from --experiment_dir")):
        proc = subprocess.run([sys.executable, "-m", "dpar.patchmap", str(png), *extra, "--output-dir",
                               str(tmp_path / "maps")], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "maps").exists()


# -- usability ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train_global_model.py", "train_entropy_model.py"])
def test_trainer_help_lists_every_config_key_and_where_it_is_documented(script):
    text = finish(run_script([sys.executable, script, "--help"]))
    for section, schema, source in (("model", ModelConfig, "dpar/models/__init__.py"),
                                    ("data", None, "dpar/training.py"), ("train", None, "dpar/training.py")):
        assert f"  {section}: " in text and source in text
    flat = " ".join(text.split())
    for key in ModelConfig.__dataclass_fields__:
        assert key in flat


@pytest.mark.slow  # about 5 s on 2 CPU cores: a virtual environment and an install
def test_editable_install_runs_the_tools_from_any_directory(tmp_path):
    """``pip install -e .`` into a fresh environment (that sees this one's packages), then the demo's sampler
    and a library import from another directory."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                              "--no-build-isolation", "--no-index", "-e", str(ROOT)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    check = ("import dpar, tokenizer.vq_model, evaluations.linear_probe, evaluations.c2i.evaluator, sample_c2i; "
             "print(dpar.__file__)")
    proc = subprocess.run([str(python), "-c", check], cwd=elsewhere, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == str(ROOT / "dpar" / "__init__.py"), proc.stderr
    proc = subprocess.run([str(python), "-m", "sample_c2i", "--classes", "0", "1", "--per-class", "1",
                           "--output-dir", "out"], cwd=elsewhere, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and "2 images of 2 classes" in proc.stdout, proc.stderr[-2000:]
    assert len(list((elsewhere / "out").glob("*.png"))) == 2


def test_patchmap_of_a_run_uses_its_patcher(world, probe_runs, tmp_path, capsys):
    png = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(png)
    patchmap.main([str(png), "--experiment_dir", str(probe_runs["dpar"]), "--vq-ckpt", str(world["vq"]),
                   "--output-dir", str(tmp_path)])
    patcher = OmegaConf.load(probe_runs["dpar"] / "config.yaml").patcher
    assert f"θ {patcher.threshold} nats, P {patcher.max_patch_length}, row break True" in capsys.readouterr().out


def test_every_module_imports_first():
    """Each module of the project imported before any other of it (a fresh start for each): no import cycle
    that only some entry points hit (``python -m dpar.data.stats`` once did)."""
    code = """
import importlib, pathlib, sys
names = [".".join(p.with_suffix("").parts) for root in ("dpar", "tokenizer", "evaluations")
         for p in pathlib.Path(root).rglob("*.py") if p.name != "__init__.py"]
for name in sorted(names):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("dpar", "tokenizer", "evaluations")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print(len(names))
"""
    count = int(finish(run_script([sys.executable, "-c", code])))
    assert count > 30


# -- bad input found by a breaking pass: one line, before anything is written ------------------------------

def one_line_error(args: list[str], cwd: Path = ROOT) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    return proc.stderr


def test_training_refuses_an_entropy_model_that_does_not_load_as_described(world, probe_runs, tmp_path):
    uncond = probe_runs["dpar"].parent / "entropy" / "checkpoints" / "epoch_00000000" / "model.safetensors"
    common = ["train_global_model.py", "--config", str(ROOT / "configs/tiny/global_model_entropy_row_break.yaml"),
              "model.image_size=16", "model.downsample_size=4", f"model.vocab_size={VOCAB}",
              f"model.num_classes={CLASSES}", f"data.store={world['store']}", "data.val_holdout=8",
              f"train.results_dir={tmp_path / 'runs'}", "train.epochs=1"]
    assert "is an unconditional GPT" in one_line_error(  # a trained entropy model declared a LlamaGen one
        common + [f"patcher.entropy_model_checkpoint={uncond}", "patcher.entropy_model_gpt=GPT-tiny"])
    assert "does not fit the model" in one_line_error(  # a LlamaGen checkpoint of another size
        common + [f"patcher.entropy_model_checkpoint={world['llamagen']}", "patcher.entropy_model_gpt=GPT-B"])
    assert not (tmp_path / "runs").exists()


def test_a_llamagen_size_far_larger_than_the_file_is_refused_from_shapes(world):
    from dpar.runs import load_llamagen_gpt
    with pytest.raises(UserError, match="does not fit the model: .* missing"):
        load_llamagen_gpt(world["llamagen"], "GPT-7B", SIZE, 4)  # 27 GB if it were built: it is not


def test_output_names_are_checked_before_sampling(world, tmp_path):
    long_name = tmp_path / ("x" * 240 + ".png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "short.png")
    long_name.write_bytes((tmp_path / "short.png").read_bytes())
    out = tmp_path / "out"
    assert "the file system allows" in one_line_error(
        ["sample_c2i.py", "--gpt-ckpt", str(world["llamagen"]), "--gpt-model", "GPT-tiny", "--image-size", str(SIZE),
         "--vq-ckpt", str(world["vq"]), "--prefix-image", str(long_name), "--prefix-rows", "1",
         "--output-dir", str(out)])
    assert not out.exists()
    (out / "photo_patches.png").mkdir(parents=True)  # an output name taken by a folder
    (tmp_path / "short.png").rename(tmp_path / "photo.png")
    assert "must be a file, but it is a folder" in one_line_error(
        ["-m", "dpar.patchmap", str(tmp_path / "photo.png"), "--vq-ckpt", str(world["vq"]),
         "--entropy-model-checkpoint", str(world["llamagen"]), "--entropy-model-gpt", "GPT-tiny", "--image-size",
         str(SIZE), "--output-dir", str(out)])
    assert [p.name for p in out.iterdir()] == ["photo_patches.png"]


def test_patchmap_refuses_two_images_of_one_name_and_needs_no_weights(world, probe_runs, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / folder / "photo.png")
    assert "would both be drawn to" in one_line_error(
        ["-m", "dpar.patchmap", str(tmp_path / "a" / "photo.png"), str(tmp_path / "b" / "photo.png"),
         "--experiment_dir", str(probe_runs["dpar"]), "--vq-ckpt", str(world["vq"]), "--output-dir",
         str(tmp_path / "maps")])
    assert not (tmp_path / "maps").exists()
    young = tmp_path / "young"  # a run with only its mid-epoch checkpoint, or none at all: the map needs its config
    young.mkdir()
    (young / "config.yaml").write_text((probe_runs["dpar"] / "config.yaml").read_text())
    patchmap.main([str(tmp_path / "a" / "photo.png"), "--experiment_dir", str(young), "--vq-ckpt", str(world["vq"]),
                   "--output-dir", str(tmp_path / "maps")])
    assert (tmp_path / "maps" / "photo_patches.png").is_file()


def test_damaged_stores_are_named(world, probe_runs, tmp_path):
    tokens = class_tokens(world["labels"], 0)
    tokens[5, 0, 3] = VOCAB + 7  # a token outside the codebook
    bad = write_token_store(tmp_path / "bad", tokens, world["labels"], codebook_size=VOCAB, num_classes=CLASSES)
    probe = ["-m", "evaluations.linear_probe", "--experiment_dir", str(probe_runs["gpt"]), "--store"]
    assert f"holds token {VOCAB + 7}, outside the codebook of {VOCAB}" in one_line_error(probe + [str(bad)])
    meta = json.loads((bad / "meta.json").read_text())
    (bad / "meta.json").write_text(json.dumps({**meta, "grid": "4"}))
    assert "meta.json is damaged: grid '4'" in one_line_error(probe + [str(bad)])
    empty = write_token_store(tmp_path / "empty", tokens[:0], world["labels"][:0], codebook_size=VOCAB,
                              num_classes=CLASSES, shard_size=1)
    assert f"--val-store {empty} holds no images" in one_line_error(
        probe + [str(world["store"]), "--val-store", str(empty)])


def test_overwriting_entropies_reads_every_token_before_deleting_any(world, tmp_path):
    tokens = class_tokens(world["labels"], 0)
    tokens[-1, 0, -1] = VOCAB  # the last token of the last shard is outside the codebook
    entropies = np.random.default_rng(0).uniform(0, 4, tokens.shape)
    store = write_token_store(tmp_path / "store", tokens, world["labels"], codebook_size=VOCAB, num_classes=CLASSES,
                              entropies=entropies, entropy_checkpoint=world["vq"], shard_size=32)
    before = {p.name: p.read_bytes() for p in (store / "shards").glob("entropies_*.npy")}
    assert "outside the codebook" in one_line_error(
        ["preprocess_tokens.py", "--stage", "entropies", "--store", str(store), "--overwrite",
         "--entropy-model-checkpoint", str(world["llamagen"]), "--entropy-model-gpt", "GPT-tiny"])
    assert len(before) == 3 and {p.name: p.read_bytes() for p in (store / "shards").glob("entropies_*.npy")} == before
    assert TokenStore(store).has_entropies
