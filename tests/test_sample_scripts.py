"""sample_c2i.py (grid + patch map) and sample_c2i_ddp.py (sharded, resumable, ADM .npz) on a tiny run."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageFont
from safetensors.torch import load_file

import sample_c2i
import sample_c2i_ddp
import sample_cli
from dpar.data.preprocess import next_token_entropies
from dpar.errors import UserError, one_line
from dpar.experiment import save_checkpoint, save_step_checkpoint
from dpar.models import ModelConfig, create_model
from dpar.patcher import PatcherConfig
from dpar.runs import Sampler
from dpar.sampling import SamplingConfig
from dpar.visual import with_row_labels
from tests.helpers import finish, labelled_grid, randomize, run_script
from tokenizer.transforms import load_center_crop
from tokenizer.vq_model import VQConfig, create_vq

ROOT = Path(__file__).resolve().parents[1]
VOCAB, CLASSES, SIZE = 48, 4, 16
VQ = VQConfig(vq_model="VQ-16", codebook_size=VOCAB, codebook_embed_dim=4, ch=16, ch_mult=[1, 2, 2], z_channels=16,
              num_res_blocks=1, norm_groups=8)


def run_dir(root: Path, model: torch.nn.Module, sections: dict) -> Path:
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(sections))
    return save_checkpoint(root, 3, model.state_dict()) / "model.safetensors"


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    torch.manual_seed(0)
    vq_ckpt = run_dir(root / "vq", create_vq(VQ), {"model": asdict(VQ)})
    entropy = ModelConfig(gpt_model="GPT-tiny", model_type="uncond", image_size=SIZE, downsample_size=4,
                          vocab_size=VOCAB, num_classes=CLASSES)
    entropy_model = randomize(create_model(entropy), std=0.2).eval()
    entropy_ckpt = run_dir(root / "entropy", entropy_model, {"model": asdict(entropy)})
    # the median entropy of random sequences: about half the tokens start a patch
    threshold = float(next_token_entropies(entropy_model, torch.randint(0, VOCAB, (16, 16)))[:, 1:].median())
    dpar = ModelConfig(gpt_model="DGPT-tiny", image_size=SIZE, downsample_size=4, vocab_size=VOCAB, num_classes=CLASSES)
    patcher = PatcherConfig(threshold=threshold, max_patch_length=3, entropy_model_checkpoint=str(entropy_ckpt),
                            entropy_model_checkpoint_config=str(root / "entropy" / "config.yaml"))
    run_dir(root / "dpar", randomize(create_model(dpar), std=0.1, seed=1),
            {"model": asdict(dpar), "patcher": asdict(patcher), "data": {"store": str(root / "no_store")}})
    return root / "dpar", vq_ckpt


def test_sample_c2i_writes_a_grid_and_a_patch_map(experiment, tmp_path, capsys):
    run, vq_ckpt = experiment
    sample_c2i.main(["--experiment_dir", str(run), "--output-dir", str(tmp_path), "--vq-ckpt", str(vq_ckpt),
                     "--per-class", "3", "--cfg-scale", "2.0"])
    stem = "epoch-3-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0"
    grid = labelled_grid(np.asarray(Image.open(tmp_path / f"{stem}.png")), CLASSES, 3, SIZE)
    patches = np.asarray(Image.open(tmp_path / f"{stem}_patches.png"))
    legend = patches.shape[0] - grid.shape[0]
    assert legend > 10 and not (patches[-legend:] == 255).all()  # the colour legend below the map
    assert not np.array_equal(grid, labelled_grid(patches[:-legend], CLASSES, 3, SIZE))
    out = capsys.readouterr().out
    tokens_per_patch = float(out.split(" tokens per patch")[0].split()[-1])
    assert 1.0 < tokens_per_patch <= 3.0 and "s/image" in out


def recorded_sampling(monkeypatch) -> list:
    """Sampler.sample, recording (labels, tokens, patch starts) of each call."""
    calls, sample = [], Sampler.sample

    def recording(self, labels, *args, **kwargs):
        images, out = sample(self, labels, *args, **kwargs)
        calls.append((labels.cpu(), out.tokens.cpu(), out.patch_start.cpu()))
        return images, out
    monkeypatch.setattr(Sampler, "sample", recording)
    return calls


@pytest.mark.parametrize("prefix", [False, True])
def test_sample_c2i_samples_in_batches_that_do_not_change_the_tokens(experiment, tmp_path, monkeypatch, prefix):
    """Issue 30: --per-class 100000 sampled all 1.2M images in one batch (39 GB). Now in --batch-size batches;
    image n keeps its seed, so batches of 1 and one batch of all give the same tokens and boundaries."""
    run, vq_ckpt = experiment
    png = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(png)
    common = ["--experiment_dir", str(run), "--vq-ckpt", str(vq_ckpt), "--per-class", "3", "--cfg-scale", "2.0",
              "--device", "cpu"]  # a GPU may pick other kernels for other batch sizes
    common += ["--prefix-image", str(png), "--prefix-rows", "2"] if prefix else []
    results = {}
    for batch in (1, 5, 12):
        calls = recorded_sampling(monkeypatch)
        sample_c2i.main([*common, "--output-dir", str(tmp_path / str(batch)), "--batch-size", str(batch)])
        assert [len(labels) for labels, _, _ in calls] == [min(batch, 12 - i) for i in range(0, 12, batch)]
        results[batch] = [torch.cat(parts) for parts in zip(*calls)]
    labels, tokens, starts = results[12]
    assert torch.equal(labels, torch.arange(CLASSES).repeat_interleave(3))
    assert len({row.numpy().tobytes() for row in tokens}) == 12  # twelve different images
    for batch in (1, 5):
        assert all(torch.equal(a, b) for a, b in zip(results[batch], results[12])), batch


def test_the_picture_bound_is_the_size_of_the_picture(experiment, tmp_path, monkeypatch):
    """Refused before sampling: a picture (with its label margin and legend) larger than Pillow opens by default.
    The bound is checked against the pictures written: one pixel fewer is refused, their size passes."""
    run, vq_ckpt = experiment
    args = ["--experiment_dir", str(run), "--vq-ckpt", str(vq_ckpt), "--per-class", "3", "--classes", "1", "2"]
    sample_c2i.main([*args, "--output-dir", str(tmp_path / "a")])
    sizes = [Image.open(path).size for path in sorted((tmp_path / "a").glob("*.png"))]
    largest = max(width * height for width, height in sizes)
    width, height = next(size for size in sizes if size[0] * size[1] == largest)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", largest - 1)
    calls = recorded_sampling(monkeypatch)
    with pytest.raises(UserError) as raised:
        sample_c2i.main([*args, "--output-dir", str(tmp_path / "b")])
    assert one_line(raised.value) == (
        f"--per-class 3 x 2 classes (--classes) make a {width} x {height} px picture (0 Mpx), more than the 0 Mpx "
        "Pillow opens (PIL.Image.MAX_IMAGE_PIXELS); sample fewer per picture (sample_c2i_ddp.py samples any "
        "number into an .npz)")
    assert not calls and not (tmp_path / "b").exists()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", largest)
    sample_c2i.main([*args, "--output-dir", str(tmp_path / "c")])


def bitmap_font(monkeypatch):
    """Pillow's default font as Pillow 10.0 gives it (requirements allow it): the bitmap font, latin-1 only."""
    monkeypatch.setattr("PIL.ImageFont.load_default", lambda *a, **k: ImageFont.load_default_imagefont())


@pytest.mark.parametrize("font", ["default", "bitmap"])
def test_any_text_can_label_a_grid(font, monkeypatch):
    if font == "bitmap":
        bitmap_font(monkeypatch)
    picture = np.zeros((2 * (8 + 2) + 2, 3 * (8 + 2) + 2, 3), np.uint8)
    labelled = with_row_labels(picture, ["café 東京 🙂", "two\nlines"], 8)
    assert np.array_equal(labelled_grid(labelled, 2, 3, 8), picture)
    # what the font cannot draw is replaced, the rest drawn as it is
    assert np.array_equal(labelled, with_row_labels(picture, ["café ?? ?", "two lines"], 8))
    assert not np.array_equal(labelled, with_row_labels(picture, ["cafe ?? ?", "two lines"], 8))


def test_text_is_drawn_in_one_place():
    """Labels, legends and any later annotation go through dpar/visual.py, which makes any text drawable."""
    listing = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                             capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout")
    drawing = [path for path in sorted(set(listing.stdout.split())) if not path.startswith("tests/")
               and (ROOT / path).is_file() and re.search(r"\bImage(Draw|Font)\b", (ROOT / path).read_text())]
    assert drawing == ["dpar/visual.py"]


@pytest.mark.parametrize("font", ["default", "bitmap"])
def test_class_names_outside_latin_1_cannot_lose_the_samples(experiment, tmp_path, font, monkeypatch):
    """Issue 30: a class name Pillow 10.0's default bitmap font cannot encode raised UnicodeEncodeError after
    all sampling; a line break in one fails to measure on any Pillow. "bitmap" stands for Pillow 10.0."""
    run, vq_ckpt = experiment
    named = tmp_path / "run"
    shutil.copytree(run, named)
    names = ["café 東京 🙂", "two\nlines", "tab\tand\x00nul", "x" * 500]
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "meta.json").write_text(json.dumps({
        "tokens": {"shard_images": []}, "grid": SIZE // 4, "views": 1, "codebook_size": VOCAB, "image_size": SIZE,
        "class_names": names}))
    config = OmegaConf.load(named / "config.yaml")
    config.data.store = str(tmp_path / "store")
    OmegaConf.save(config, named / "config.yaml")
    if font == "bitmap":
        bitmap_font(monkeypatch)
    sample_c2i.main(["--experiment_dir", str(named), "--output-dir", str(tmp_path / "out"), "--vq-ckpt",
                     str(vq_ckpt), "--per-class", "2"])
    pictures = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(pictures) == 2 and pictures[0].endswith(".png"), pictures
    grid = np.asarray(Image.open(tmp_path / "out" / pictures[0]))
    labelled_grid(grid, CLASSES, 2, SIZE)  # every row labelled
    assert grid.shape[1] < 1000  # the 500-character name is cut


def test_missing_epoch_and_tokenizer_are_one_line_errors(experiment, tmp_path):
    run, vq_ckpt = experiment
    for extra, message in ((["--epoch", "7", "--vq-ckpt", str(vq_ckpt)], "has no checkpoint of epoch 7; it has epochs 3"),
                           ([], "cannot find the tokenizer")):
        proc = subprocess.run([sys.executable, "sample_c2i.py", "--experiment_dir", str(run), *extra], cwd=ROOT,
                              capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def ddp_command(run: Path, vq_ckpt: Path, output: Path, *extra: str) -> list[str]:
    return ["sample_c2i_ddp.py", "--experiment_dir", str(run), "--vq-ckpt", str(vq_ckpt), "--output-dir", str(output),
            "--cfg-scale", "2.0", "--num-fid-samples", "20", "--per-proc-batch-size", "3", *extra]




NPZ = "epoch-3-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz"


@pytest.mark.slow  # about 5 s on 2 CPU cores: a one- and a two-process run
def test_ddp_sampling_gives_the_same_npz_on_one_and_two_processes(experiment, tmp_path):
    run, vq_ckpt = experiment
    finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "one")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    finish(run_script(torchrun + ddp_command(run, vq_ckpt, tmp_path / "two"), ACCELERATE_USE_CPU="1"))
    one, two = (dict(np.load(tmp_path / d / NPZ)) for d in ("one", "two"))
    assert one.keys() == two.keys() == {"arr_0", "arr_1", "dpar_job"}
    assert all(np.array_equal(one[key], two[key]) for key in one)
    # labels (ADM's arr_1): class-balanced, in a seeded random order, not sorted by class (issue 30)
    assert np.array_equal(one["arr_1"], sample_c2i_ddp.fid_labels(20, CLASSES, seed=0))
    assert (np.bincount(one["arr_1"]) == 20 // CLASSES).all() and (np.diff(one["arr_1"]) < 0).any()
    assert json.loads(str(one["dpar_job"]))["label_order"] == sample_c2i_ddp.LABEL_ORDER
    one = one["arr_0"]
    assert one.shape == (20, SIZE, SIZE, 3) and one.dtype == np.uint8
    assert len({image.tobytes() for image in one}) == 20  # no image twice
    assert not (tmp_path / "one" / NPZ.replace(".npz", ".parts")).exists()


@pytest.mark.parametrize("num_samples", [1, 2, 3, 7, 12, 1000, 4097, 50_000])
def test_fid_labels_are_class_balanced_in_a_seeded_order_of_any_range(num_samples):
    classes = 7
    labels = sample_c2i_ddp.FidLabels(num_samples, classes, seed=3)
    positions = labels.position(np.arange(num_samples))
    assert np.array_equal(np.sort(positions), np.arange(num_samples))  # a bijection of [0, N)
    every = np.asarray(labels)
    assert every.dtype == np.int64 and len(every) == num_samples
    counts = np.bincount(every, minlength=classes)
    assert counts.sum() == num_samples and counts.min() >= num_samples // classes
    assert counts.max() <= -(-num_samples // classes)  # N // C or N // C + 1 each
    cuts = sorted({0, num_samples, *np.random.default_rng(num_samples).integers(0, num_samples, 3).tolist()})
    assert np.array_equal(np.concatenate([labels[a:b] for a, b in zip(cuts, cuts[1:])]), every)
    picked = np.random.default_rng(1).integers(0, num_samples, 10)
    assert np.array_equal(labels[picked], every[picked])
    assert np.array_equal(np.asarray(sample_c2i_ddp.FidLabels(num_samples, classes, seed=3)), every)
    if num_samples >= 12:
        assert not np.array_equal(np.asarray(sample_c2i_ddp.FidLabels(num_samples, classes, seed=4)), every)
        assert (np.diff(every) < 0).any()  # not in class order


def test_fid_label_splits_of_5000_hold_nearly_every_class():
    """ADM's IS averages over splits of 5,000: in class order each split of 50K ImageNet samples held 100 of the
    1,000 classes; a uniformly random order holds 995 on average (1000 * (1 - 0.9^50))."""
    labels = sample_c2i_ddp.fid_labels(50_000, 1000, seed=0)
    assert (np.bincount(labels) == 50).all()
    held = [len(np.unique(labels[start:start + 5000])) for start in range(0, 50_000, 5000)]
    assert min(held) >= 985 and 990 <= np.mean(held) <= 999, held
    assert max(np.bincount(labels[start:start + 5000]).max() for start in range(0, 50_000, 5000)) <= 20


def test_fid_labels_of_a_billion_samples_are_computed_per_range():
    import tracemalloc
    tracemalloc.start()
    labels = sample_c2i_ddp.FidLabels(10**9, 1000, seed=0)
    last = labels[10**9 - 5000:]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5_000_000 and len(last) == 5000 and 0 <= last.min() and last.max() < 1000


def test_a_fid_job_the_disk_cannot_hold_is_refused_before_sampling(experiment, tmp_path, monkeypatch):
    import shutil as shutil_module
    run, vq_ckpt = experiment
    usage = shutil_module.disk_usage(tmp_path)
    monkeypatch.setattr(sample_c2i_ddp.shutil, "disk_usage", lambda path: usage._replace(free=1_500_000))
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(UserError) as raised:
        sample_c2i_ddp.main(ddp_command(run, vq_ckpt, tmp_path / "out", "--num-fid-samples", "1000")[1:])
    assert one_line(raised.value) == (
        f"--num-fid-samples 1000: {SIZE}x{SIZE} samples need 0.0 GB on {tmp_path} (the .npz, and its chunks until "
        "they are packed), which has 0.0 GB free; sample fewer or choose another --output-dir")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # about 8 s on 2 CPU cores: three sampling runs
def test_killed_ddp_sampling_resumes_to_the_same_npz(experiment, tmp_path):
    run, vq_ckpt = experiment
    extra = ["--num-fid-samples", "60", "--per-proc-batch-size", "2"]
    finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "straight", *extra)))
    proc = run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "killed", *extra))
    parts = tmp_path / "killed" / NPZ.replace(".npz", ".parts")
    deadline = time.time() + 120
    while len(list(parts.glob("chunk_*.npy"))) < 3:
        assert proc.poll() is None and time.time() < deadline, "sampling ended before it could be killed"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("chunk_*.npy")))
    assert 3 <= done < 30 and not (tmp_path / "killed" / NPZ).exists()
    out = finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "killed", *extra)))
    assert f"resuming: {done} of 30 chunks of {parts} are done" in out  # says what it reuses
    straight, resumed = (np.load(tmp_path / d / NPZ)["arr_0"] for d in ("straight", "killed"))
    assert resumed.shape == (60, SIZE, SIZE, 3) and np.array_equal(straight, resumed)


def test_samples_can_be_resized_for_evaluation(experiment, tmp_path):
    run, vq_ckpt = experiment
    finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path, "--num-fid-samples", "4",
                                                     "--image-size-eval", "8")))
    assert np.load(tmp_path / NPZ)["arr_0"].shape == (4, 8, 8, 3)


def test_the_tokenizer_named_in_the_config_is_used(experiment, tmp_path):
    run, vq_ckpt = experiment
    named = tmp_path / "named"
    shutil.copytree(run, named)
    config = OmegaConf.load(named / "config.yaml")
    config.data.tokenizer_checkpoint = str(vq_ckpt)
    OmegaConf.save(config, named / "config.yaml")
    sampler = Sampler.from_experiment(named)
    images, _ = sampler.sample(torch.tensor([0, 1]), torch.tensor([5, 6]), SamplingConfig())
    assert images.shape == (2, SIZE, SIZE, 3) and images.dtype == torch.uint8


# -- a released LlamaGen checkpoint, --epoch latest, image completion -------------------------------------------

STEM = "epoch-3-topk-0-topp-1.0-temperature-1.0-cfg-4.0-seed-0"  # sample_c2i.py's default flags

def llamagen_checkpoint(path: Path, key: str | None, seed: int = 2) -> tuple[Path, torch.nn.Module]:
    """A c2i GPT-tiny saved as LlamaGen saves (``{key: state_dict}``; None: the bare state dict)."""
    config = ModelConfig(gpt_model="GPT-tiny", image_size=SIZE, downsample_size=4, vocab_size=VOCAB,
                         num_classes=CLASSES)
    model = randomize(create_model(config), std=0.1, seed=seed).eval()
    torch.save(model.state_dict() if key is None else {key: model.state_dict(), "steps": 7}, path)
    return path, model


# one key in the fast tier; the other three (about 4 s each on 2 CPU cores: two sampling runs) are slow
@pytest.mark.parametrize("key", ["model", *(pytest.param(key, marks=pytest.mark.slow)
                                            for key in ("module", "state_dict", None))])
def test_a_llamagen_checkpoint_samples_like_a_run_of_the_same_weights(experiment, tmp_path, key):
    run, vq_ckpt = experiment
    checkpoint, model = llamagen_checkpoint(tmp_path / "c2i_tiny.pt", key)
    llamagen = ["--gpt-model", "GPT-tiny", "--gpt-ckpt", str(checkpoint), "--vq-ckpt", str(vq_ckpt),
                "--image-size", str(SIZE), "--cfg-scale", "2.0", "--num-fid-samples", "6", "--per-proc-batch-size", "4"]
    out = finish(run_script([sys.executable, "sample_c2i_ddp.py", "--output-dir", str(tmp_path / "a"), *llamagen]))
    assert f"sampling {checkpoint} (GPT-tiny-c2i_tiny-size-{SIZE})" in out
    npz = tmp_path / "a" / f"GPT-tiny-c2i_tiny-size-{SIZE}-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz"
    samples = np.load(npz)["arr_0"]
    # the same weights as a training run of this project: the same images
    gpt_run = tmp_path / "gpt_run"
    run_dir(gpt_run, model, {"model": asdict(ModelConfig(gpt_model="GPT-tiny", image_size=SIZE, downsample_size=4,
                                                         vocab_size=VOCAB, num_classes=CLASSES))})
    finish(run_script([sys.executable, "sample_c2i_ddp.py", "--experiment_dir", str(gpt_run), "--vq-ckpt",
                       str(vq_ckpt), "--output-dir", str(tmp_path / "b"), "--cfg-scale", "2.0", "--num-fid-samples",
                       "6", "--per-proc-batch-size", "4"]))
    assert np.array_equal(samples, np.load(tmp_path / "b" / NPZ)["arr_0"])


@pytest.mark.parametrize("extra, message", [
    (["--gpt-ckpt", "{ckpt}"], "--gpt-ckpt {ckpt} needs --vq-ckpt"),
    (["--gpt-ckpt", "{ckpt}", "--vq-ckpt", "{vq}", "--epoch", "3"], "--epoch belongs to a training run"),
    (["--gpt-ckpt", "{ckpt}", "--vq-ckpt", "{vq}", "--threshold", "2"], "--threshold belongs to a training run"),
    (["--gpt-model", "GPT-B"], "--gpt-model describes a LlamaGen checkpoint; give it with --gpt-ckpt"),
    (["--gpt-ckpt", "{ckpt}", "--vq-ckpt", "{vq}", "--gpt-model", "GPT-B", "--image-size", str(SIZE)],
     "does not fit the model"),
    (["--gpt-ckpt", "{ckpt}", "--vq-ckpt", "{vq}", "--gpt-model", "GPT-tiny", "--image-size", "17"],
     "--image-size 17 is not a multiple of the tokenizer's downsampling factor 4"),
    (["--gpt-ckpt", "{vq}", "--vq-ckpt", "{vq}", "--gpt-model", "GPT-tiny"], "is not a LlamaGen GPT checkpoint"),
    (["--experiment_dir", "{run}", "--epoch", "latest", "--vq-ckpt", "{vq}"], "--epoch latest: "),
    (["--epoch", "newest"], "--epoch: must be an epoch number >= 0 or 'latest'; got 'newest'"),
    (["--prefix-rows", "2"], "--prefix-image and --prefix-rows go together"),
    (["--experiment_dir", "{run}", "--vq-ckpt", "{vq}", "--prefix-image", "{png}", "--prefix-rows", "4"],
     "--prefix-rows 4: the model's images have 4 token rows; keep 1 to 3 of them"),
    (["--prefix-image", "{out}/absent.png", "--prefix-rows", "1"], "--prefix-image {out}/absent.png: no such file"),
])
def test_bad_sampling_sources_are_one_line_before_any_output(experiment, tmp_path, extra, message):
    run, vq_ckpt = experiment
    checkpoint, _ = llamagen_checkpoint(tmp_path / "c2i_tiny.pt", "model")
    png = tmp_path / "photo.png"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(png)
    names = {"ckpt": checkpoint, "vq": vq_ckpt, "run": run, "png": png, "out": tmp_path}
    proc = subprocess.run([sys.executable, "sample_c2i.py", "--output-dir", str(tmp_path / "samples"),
                           *(arg.format(**names) for arg in extra)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert message.format(**names) in proc.stderr, proc.stderr
    assert not (tmp_path / "samples").exists()


@pytest.mark.slow  # about 4 s on 2 CPU cores: three sampling runs
def test_epoch_latest_samples_a_run_shorter_than_one_epoch(experiment, tmp_path):
    run, vq_ckpt = experiment
    young = tmp_path / "young"
    (young / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", young / "config.yaml")
    weights = load_file(run / "checkpoints" / "epoch_00000003" / "model.safetensors")
    save_step_checkpoint(young, 0, 5, weights, {})
    proc = subprocess.run([sys.executable, "sample_c2i.py", "--experiment_dir", str(young), "--vq-ckpt", str(vq_ckpt),
                           "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "a run shorter than one epoch has its mid-epoch checkpoint: --epoch latest" in \
        proc.stderr, proc.stderr
    out = finish(run_script([sys.executable, "sample_c2i.py", "--experiment_dir", str(young), "--vq-ckpt",
                             str(vq_ckpt), "--output-dir", str(tmp_path), "--epoch", "latest", "--per-class", "1"]))
    assert f"sampling {young / 'checkpoints' / 'latest' / 'model.safetensors'} (epoch-0-step-5)" in out
    from_latest = np.asarray(Image.open(tmp_path / f"{STEM.replace('epoch-3', 'epoch-0-step-5')}.png"))
    finish(run_script([sys.executable, "sample_c2i.py", "--experiment_dir", str(run), "--vq-ckpt", str(vq_ckpt),
                       "--output-dir", str(tmp_path), "--per-class", "1"]))
    assert np.array_equal(from_latest, np.asarray(Image.open(tmp_path / f"{STEM}.png")))  # the same weights


def test_image_completion_writes_the_image_then_its_completions(experiment, tmp_path, capsys):
    run, vq_ckpt = experiment
    png = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(png)
    sample_c2i.main(["--experiment_dir", str(run), "--vq-ckpt", str(vq_ckpt), "--output-dir", str(tmp_path),
                     "--prefix-image", str(png), "--prefix-rows", "2", "--classes", "1", "3", "--per-class", "3"])
    stem = f"{STEM}_completion-photo-rows-2"
    picture = labelled_grid(np.asarray(Image.open(tmp_path / f"{stem}.png")), 2, 4, SIZE)
    assert (tmp_path / f"{stem}_patches.png").is_file()
    cells = [picture[2 + r * (SIZE + 2):2 + r * (SIZE + 2) + SIZE, 2 + c * (SIZE + 2):2 + c * (SIZE + 2) + SIZE]
             for r in range(2) for c in range(4)]
    crop = load_center_crop(png, SIZE)
    cut = SIZE * 2 // 4 - 1  # the last pixel row of the 2 kept token rows is drawn red
    assert np.array_equal(np.delete(cells[0], cut, axis=0), np.delete(crop, cut, axis=0))
    assert (cells[0][cut] == [230, 30, 30]).all()
    assert not np.array_equal(cells[1], cells[2])  # the completions differ below the prefix
    assert not np.array_equal(cells[1][SIZE // 2:], cells[1 + 4][SIZE // 2:])  # and across classes


def test_self_entropy_sampling_needs_no_entropy_model_and_a_threshold(experiment, tmp_path):
    run, vq_ckpt = experiment
    args = ["sample_c2i.py", "--experiment_dir", str(run), "--vq-ckpt", str(vq_ckpt), "--output-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, *args, "--self-entropy"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "--self-entropy needs --threshold" in proc.stderr, proc.stderr
    config = OmegaConf.load(run / "config.yaml")  # the entropy model is gone: self-entropy does not need it
    config.patcher.entropy_model_checkpoint = str(tmp_path / "absent.safetensors")
    (tmp_path / "run").mkdir()
    shutil.copytree(run / "checkpoints", tmp_path / "run" / "checkpoints")
    OmegaConf.save(config, tmp_path / "run" / "config.yaml")
    args[2] = str(tmp_path / "run")
    out = finish(run_script([sys.executable, *args, "--self-entropy", "--threshold", "2.0", "--per-class", "2"]))
    assert "tokens per patch" in out
    assert (tmp_path / f"{STEM}-self-entropy-threshold-2.0.png").is_file()


@pytest.mark.slow  # about 12 s on 2 CPU cores: a θ calibration and sampling runs
def test_self_entropy_benchmark_on_the_demo(tmp_path):
    """From another folder: its default runs are the repository's demo runs wherever it starts (issue 30)."""
    (tmp_path / "elsewhere").mkdir()
    out = finish(run_script([sys.executable, str(ROOT / "benchmarks" / "self_entropy.py"), "--calibration-images",
                             "48", "--pairs", "1", "--timing-batch", "4", "--per-class", "1", "--output",
                             str(tmp_path / "report")], cwd=tmp_path / "elsewhere"))
    assert "| self-entropy |" in out and "| entropy model |" in out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "report_self_entropy.png").is_file()
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert abs(rows["self-entropy"]["tokens_per_patch"] - rows["entropy model"]["tokens_per_patch"]) < 0.2


# -- two runs sampled into one folder (issue 30, item 10) -------------------------------------------------------

def copied_run(run: Path, where: Path, epoch: int | None = None) -> Path:
    """Another run of the same weights at ``where`` (optionally saved as ``epoch``): its own folder, its own name."""
    where.parent.mkdir(parents=True, exist_ok=True)
    if epoch is None:
        shutil.copytree(run, where)
    else:
        where.mkdir()
        shutil.copy(run / "config.yaml", where / "config.yaml")
        save_checkpoint(where, epoch, load_file(run / "checkpoints" / "epoch_00000003" / "model.safetensors"))
    return where


def test_two_runs_sample_into_one_folder_without_refusal_or_overwrite(experiment, tmp_path, capsys):
    """Issue 30: a second run sampled into the README's --output-dir samples was refused (the names carry the
    epoch and flags, not the run). The first keeps the plain name, the second appends itself; each rerun
    finds its own file."""
    run, vq_ckpt = experiment
    other = copied_run(run, tmp_path / "exp_b" / "run_2")
    out = tmp_path / "samples"

    def ddp(experiment_dir: Path) -> str:
        sample_c2i_ddp.main(["--experiment_dir", str(experiment_dir), "--vq-ckpt", str(vq_ckpt), "--output-dir",
                             str(out), "--cfg-scale", "2.0", "--num-fid-samples", "4", "--per-proc-batch-size", "4"])
        return capsys.readouterr().out

    ddp(run)
    assert sorted(p.name for p in out.iterdir()) == [NPZ]
    first = (out / NPZ).read_bytes()
    said = ddp(other)
    second = out / NPZ.replace(".npz", "-exp_b-run_2.npz")
    assert sorted(p.name for p in out.iterdir()) == sorted([NPZ, second.name])
    assert f"{out / NPZ} is run {run.parent.name}/{run.name}'s; this run (exp_b/run_2) writes {second}" in said
    assert (out / NPZ).read_bytes() == first
    for path, made_by in ((out / NPZ, run), (second, other)):
        with np.load(path) as data:
            job = json.loads(str(data["dpar_job"]))
        assert job["run"]["run"] == f"{made_by.parent.name}/{made_by.name}"
        assert job["weights"].startswith(str(made_by.resolve()))
    second_bytes = second.read_bytes()
    assert "nothing to do" in ddp(run) and "nothing to do" in ddp(other)  # each rerun finds its own file
    assert (out / NPZ).read_bytes() == first and second.read_bytes() == second_bytes
    assert len(list(out.iterdir())) == 2

    # sample_c2i.py's PNGs: the same names, the run recorded in a text chunk
    def grid(experiment_dir: Path) -> str:
        sample_c2i.main(["--experiment_dir", str(experiment_dir), "--vq-ckpt", str(vq_ckpt), "--output-dir",
                         str(out), "--per-class", "1"])
        return capsys.readouterr().out

    grid(run)
    said = grid(other)
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures == sorted([f"{STEM}.png", f"{STEM}_patches.png", f"{STEM}-exp_b-run_2.png",
                               f"{STEM}-exp_b-run_2_patches.png"])
    assert f"this run (exp_b/run_2) writes {out / STEM}-exp_b-run_2.png" in said
    for name, made_by in ((f"{STEM}.png", run), (f"{STEM}-exp_b-run_2_patches.png", other)):
        with Image.open(out / name) as picture:
            assert json.loads(picture.text["dpar_run"])["run"] == f"{made_by.parent.name}/{made_by.name}"
    grid(other)
    grid(run)  # each rerun writes its own files again, no third name
    assert len(list(out.glob("*.png"))) == 4


def test_the_reference_command_keeps_the_reference_readme_name(experiment, tmp_path, capsys):
    """The reference README: `accelerate launch sample_c2i_ddp.py --experiment_dir .../20250820_13/ --cfg-scale 2.0
    --output-dir samples` -> samples/epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz; another run
    sampled next to it gets ...-seed-0-<experiment name>-<run folder>.npz."""
    run, vq_ckpt = experiment
    checkpoints = tmp_path / "data" / "model_checkpoints" / "global_model_entropy_row_break_b"
    reference = copied_run(run, checkpoints / "20250820_13", epoch=299)
    later = copied_run(run, checkpoints / "20250901_08", epoch=299)
    for experiment_dir in (reference, later):
        sample_c2i_ddp.main(["--experiment_dir", f"{experiment_dir}/", "--cfg-scale", "2.0", "--output-dir",
                             str(tmp_path / "samples"), "--vq-ckpt", str(vq_ckpt), "--num-fid-samples", "4"])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0-global_model_entropy_row_break_b-20250901_08.npz",
        "epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz"]


def test_the_ema_weights_of_a_run_sample_beside_its_plain_weights(experiment, tmp_path):
    """--ema samples other weights of the same run: they were refused in one folder (.npz) or replaced the
    plain weights' grid (PNG); the name says -ema."""
    run, vq_ckpt = experiment
    copy = copied_run(run, tmp_path / "exp" / "run")
    checkpoint = copy / "checkpoints" / "epoch_00000003"
    shutil.copy(checkpoint / "model.safetensors", checkpoint / "ema.safetensors")
    common = ["--experiment_dir", str(copy), "--vq-ckpt", str(vq_ckpt), "--output-dir", str(tmp_path / "out")]
    for ema in ([], ["--ema"]):
        sample_c2i_ddp.main([*common, "--cfg-scale", "2.0", "--num-fid-samples", "4", *ema])
        sample_c2i.main([*common, "--per-class", "1", *ema])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([
        NPZ, NPZ.replace(".npz", "-ema.npz"), f"{STEM}.png", f"{STEM}_patches.png", f"{STEM}-ema.png",
        f"{STEM}-ema_patches.png"])


def test_a_sample_name_belongs_to_the_first_run_that_writes_it(tmp_path):
    """sample_cli.sample_name, case by case: a free name, an unfinished run's parts, an older version's .npz,
    a file that records no run, a run-named variant taken too, and a long or odd run name."""
    a = {"run": "exp/a", "run_id": "a" * 16}
    b = {"run": "exp/b", "run_id": "b" * 16}
    suffixes = (".npz", ".parts")
    assert sample_cli.sample_name(tmp_path, "s", suffixes, a) == ("s", None)
    parts = tmp_path / "s.parts"
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"run": a}))
    assert sample_cli.sample_name(tmp_path, "s", suffixes, b) == ("s", None)  # parts without a chunk block nothing
    (parts / "chunk_000000.npy").write_bytes(b"")
    assert sample_cli.sample_name(tmp_path, "s", suffixes, a) == ("s", None)  # a killed run resumes its parts
    stem, note = sample_cli.sample_name(tmp_path, "s", suffixes, b)
    assert stem == "s-exp-b" and note == f"{tmp_path / 's.npz'} is run exp/a's; this run (exp/b) writes " \
                                         f"{tmp_path / 's-exp-b.npz'}"
    # an .npz of an older version records its weights, not its run
    weights = tmp_path / "w.safetensors"
    np.savez(tmp_path / "old.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8),
             dpar_job=np.array(json.dumps({"weights": str(weights.resolve())})))
    assert sample_cli.sample_name(tmp_path, "old", suffixes, a, weights) == ("old", None)
    assert sample_cli.sample_name(tmp_path, "old", suffixes, a, tmp_path / "x")[0] == "old-exp-a"
    np.savez(tmp_path / "bare.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))  # another tool's file
    stem, note = sample_cli.sample_name(tmp_path, "bare", suffixes, a)
    assert stem == "bare-exp-a" and "is a file of no recorded run" in note
    # the run-named variant taken by another run of the same name (elsewhere): the run's id is appended
    np.savez(tmp_path / "bare-exp-a.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8),
             dpar_job=np.array(json.dumps({"run": {"run": "exp/a", "run_id": "c" * 16}})))
    assert sample_cli.sample_name(tmp_path, "bare", suffixes, a)[0] == "bare-exp-a-aaaaaaaa"
    # a file that cannot be read might be this run's: one line, not passed by
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="bad.npz exists but cannot be read"):
        sample_cli.sample_name(tmp_path, "bad", suffixes, b)
    (tmp_path / "p.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="p.png exists but cannot be read"):
        sample_cli.sample_name(tmp_path, "p", (".png",), b)
    # the run's part of a name: file-name safe, bounded
    odd = {"run": "my exp: v2/run #1 " + "é" * 80, "run_id": "d" * 16}
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "q.png")
    stem = sample_cli.sample_name(tmp_path, "q", (".png",), odd)[0]
    assert stem.startswith("q-my_exp__v2-run__1_éé") and len(stem[2:].encode()) <= sample_cli.RUN_SUFFIX_BYTES


@pytest.mark.slow  # about 30 s on 2 CPU cores: each script on one process and on two one-process "nodes"
def test_preprocessing_and_fid_sampling_on_two_nodes_over_loopback(experiment, tmp_path):
    """The per-node lines of docs/training.md#several-nodes for preprocess_tokens.py and sample_c2i_ddp.py in their
    CPU form: two "nodes" (torchrun node ranks 0 and 1, one process each, gloo over 127.0.0.1) write what one
    process writes: the same token arrays, the same .npz."""
    import socket
    from tests.helpers import write_image_folder
    run, vq_ckpt = experiment
    images = write_image_folder(tmp_path / "images", classes=2, per_class=5, size=SIZE)

    def on_two_nodes(argv: list[str]) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launches = [run_script([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                                "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
                               + argv, ACCELERATE_USE_CPU="1") for rank in (0, 1)]
        outs = [finish(proc) for proc in launches]
        assert "2 process(es)" in outs[0] or argv[0] == "sample_c2i_ddp.py"

    tokens = ["preprocess_tokens.py", "--stage", "tokens", "--data-path", str(images), "--vq-ckpt", str(vq_ckpt),
              "--image-size", str(SIZE), "--views", "2", "--num-workers", "0", "--shard-size", "4"]
    finish(run_script([sys.executable] + tokens + ["--store", str(tmp_path / "store_one")]))
    on_two_nodes(tokens + ["--store", str(tmp_path / "store_two")])
    arrays = {store: {path.relative_to(tmp_path / store): np.load(path) for path in (tmp_path / store).rglob("*.npy")}
              for store in ("store_one", "store_two")}
    assert arrays["store_one"] and arrays["store_one"].keys() == arrays["store_two"].keys()
    assert all(np.array_equal(a, arrays["store_two"][name]) for name, a in arrays["store_one"].items())

    finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "one")))
    on_two_nodes(ddp_command(run, vq_ckpt, tmp_path / "two"))
    one, two = (dict(np.load(tmp_path / d / NPZ)) for d in ("one", "two"))
    assert one.keys() == two.keys() and all(np.array_equal(one[key], two[key]) for key in one)
