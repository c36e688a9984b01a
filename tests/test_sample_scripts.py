"""sample_c2i.py (grid + patch map) and sample_c2i_ddp.py (sharded, resumable, ADM .npz) on a tiny run."""
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
from PIL import Image

import sample_c2i
from dpar.data.preprocess import next_token_entropies
from dpar.experiment import save_checkpoint
from dpar.models import ModelConfig, create_model
from dpar.patcher import PatcherConfig
from dpar.sampling import Sampler, SamplingConfig
from tests.helpers import finish, randomize, run_script
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
    grid = np.asarray(Image.open(tmp_path / f"{stem}.png"))
    patches = np.asarray(Image.open(tmp_path / f"{stem}_patches.png"))
    assert grid.shape == patches.shape == (CLASSES * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)
    assert not np.array_equal(grid, patches)
    out = capsys.readouterr().out
    tokens_per_patch = float(out.split(" tokens per patch")[0].split()[-1])
    assert 1.0 < tokens_per_patch <= 3.0 and "s/image" in out


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


def test_ddp_sampling_gives_the_same_npz_on_one_and_two_processes(experiment, tmp_path):
    run, vq_ckpt = experiment
    finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "one")))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    finish(run_script(torchrun + ddp_command(run, vq_ckpt, tmp_path / "two"), ACCELERATE_USE_CPU="1"))
    one, two = (np.load(tmp_path / d / NPZ)["arr_0"] for d in ("one", "two"))
    assert one.shape == (20, SIZE, SIZE, 3) and one.dtype == np.uint8
    assert np.array_equal(one, two)
    assert len({image.tobytes() for image in one}) == 20  # no image twice
    assert not (tmp_path / "one" / NPZ.replace(".npz", ".parts")).exists()


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
    finish(run_script([sys.executable] + ddp_command(run, vq_ckpt, tmp_path / "killed", *extra)))
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
