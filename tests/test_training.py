"""Training: every patching mode and the GPT baseline learn, resume is exact, DDP equals one process."""
import copy
import re
import json
import shutil
import fcntl
import os
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
from safetensors.torch import load_file

import train_entropy_model
import train_global_model
from dpar.data.dataset import StepBatches
from dpar.errors import UserError
from dpar.experiment import checkpoint_step, list_checkpoints, resume_checkpoint, save_checkpoint
from dpar.models import ModelConfig, create_model
from dpar.training import build_optimizer, split_global_batch, TrainConfig
from tests.helpers import finish, run_script, without_record, write_token_store

ROOT = Path(__file__).resolve().parents[1]
GRID, VOCAB, CLASSES, IMAGES, VIEWS = 4, 48, 4, 64, 2
N = GRID * GRID


def structured_tokens(seed: int = 0):
    """Class-dependent runs of equal tokens with 10% noise: learnable, and with a real entropy signal."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, IMAGES)
    base = (labels[:, None, None] * 11 + np.arange(N)[None, None, :] // 2) % VOCAB
    noise = rng.random((IMAGES, VIEWS, N)) < 0.1
    tokens = np.where(noise, rng.integers(0, VOCAB, (IMAGES, VIEWS, N)), base)
    entropies = rng.uniform(0, 6, (IMAGES, VIEWS, N))
    entropies[..., 0] = np.inf
    return tokens, labels, entropies


def fake_entropy_model(root: Path, seed: int) -> Path:
    """An entropy-model experiment dir (config.yaml + checkpoint) whose checkpoint a store can name."""
    config = ModelConfig(gpt_model="GPT-tiny", model_type="uncond", image_size=4 * GRID, downsample_size=4,
                         vocab_size=VOCAB, num_classes=CLASSES)
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml({"model": asdict(config)}))
    torch.manual_seed(seed)
    return save_checkpoint(root, 0, create_model(config).state_dict()) / "model.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    entropy_ckpt = fake_entropy_model(root / "entropy_run", seed=0)
    other_ckpt = fake_entropy_model(root / "other_entropy_run", seed=1)
    tokens, labels, entropies = structured_tokens()
    store = write_token_store(root / "store", tokens, labels, codebook_size=VOCAB, num_classes=CLASSES,
                              entropies=entropies, entropy_checkpoint=entropy_ckpt, shard_size=24)
    return root, store, entropy_ckpt, other_ckpt


def global_args(setup, results, config="configs/tiny/global_model_entropy_row_break.yaml", *extra):
    root, store, entropy_ckpt, _ = setup
    return ["--config", str(ROOT / config), "model.image_size=16", "model.downsample_size=4",
            f"model.vocab_size={VOCAB}", f"model.num_classes={CLASSES}", f"data.store={store}",
            "data.val_holdout=16", f"train.results_dir={results}", "train.epochs=3", "train.global_batch_size=8",
            "train.log_every=1", f"patcher.entropy_model_checkpoint={entropy_ckpt}", *extra]


def only_run(results: Path) -> Path:
    runs = [p for p in (results / "scratch").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "epoch_summary" not in r], [r for r in records if "epoch_summary" in r]


@pytest.mark.parametrize("config,overrides", [
    ("configs/tiny/global_model_entropy_row_break.yaml", []),
    ("configs/tiny/global_model_entropy_row_break.yaml", ["patcher.mode=static", "patcher.static_length=2"]),
    ("configs/tiny/global_model_entropy_row_break.yaml", ["patcher.mode=token"]),
    ("configs/tiny/gpt_baseline.yaml", []),
])
def test_each_mode_learns(setup, tmp_path, config, overrides):
    train_global_model.main(global_args(setup, tmp_path, config, "train.lr=3e-3", *overrides))
    run = only_run(tmp_path)
    steps, epochs = metrics(run)
    assert len(steps) == 3 * 6 and [r["step"] for r in steps] == list(range(1, 19))
    assert np.mean([r["loss"] for r in steps[-3:]]) < np.mean([r["loss"] for r in steps[:3]]) - 0.3
    assert epochs[-1]["val_nll"] < epochs[0]["val_nll"]
    tokens_per_patch = epochs[-1]["tokens_per_patch"]
    mode = "gpt" if "gpt" in config else (overrides[0].split("=")[1] if overrides else "entropy")
    expected = {"gpt": 1.0, "token": 1.0, "static": 2.0}.get(mode)
    if expected is None:  # entropy patching of uniform(0, 6) entropies at theta 4 with P 4 and row breaks
        assert 1.2 < tokens_per_patch < 2.0
    else:
        assert tokens_per_patch == pytest.approx(expected)
    assert epochs[-1]["forward_linear_gmacs_per_sample"] > 0
    assert [epoch for epoch, _ in list_checkpoints(run)] == [0, 1, 2]
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.data.tokenizer_checkpoint == "arrays"  # what the store's meta.json records, for sampling
    if mode == "entropy":  # the entropy model's config is found next to its checkpoint and recorded
        assert saved.patcher.entropy_model_checkpoint_config == str(setup[2].parents[2] / "config.yaml")


def test_dpar_costs_fewer_gmacs_than_token_level(setup, tmp_path):
    gmacs = {}
    for mode in ("entropy", "token"):
        results = tmp_path / mode
        train_global_model.main(global_args(setup, results, "configs/tiny/global_model_entropy_row_break.yaml",
                                            f"patcher.mode={mode}", "train.epochs=1"))
        gmacs[mode] = metrics(only_run(results))[1][-1]["forward_linear_gmacs_per_sample"]
    assert gmacs["entropy"] < 0.9 * gmacs["token"]


def test_entropy_model_reports_validation_nll(setup, tmp_path):
    _, store, _, _ = setup
    train_entropy_model.main(["--config", str(ROOT / "configs/tiny/entropy_model.yaml"), "model.image_size=16",
                              "model.downsample_size=4", f"model.vocab_size={VOCAB}", f"data.store={store}",
                              "data.val_holdout=16", f"train.results_dir={tmp_path}", "train.epochs=3",
                              "train.global_batch_size=8", "train.lr=3e-3", "train.log_every=3"])
    run = only_run(tmp_path)
    _, epochs = metrics(run)
    nll = [e["val_nll"] for e in epochs]
    assert nll[-1] < nll[0] < np.log(VOCAB) + 0.1  # starts near uniform over the codebook, then falls
    assert epochs[-1]["tokens_per_patch"] == 1.0
    assert run.parent.name == "entropy_model"


def test_global_batch_splits_into_processes_and_micro_batches():
    assert split_global_batch(256, 8, None) == (32, 1)
    assert split_global_batch(256, 8, 12) == (8, 4)
    assert split_global_batch(8, 1, 4) == (4, 2)
    with pytest.raises(UserError, match="global_batch_size=10 is not a positive multiple of 4"):
        split_global_batch(10, 4, None)


def test_every_split_of_a_step_trains_on_the_same_images():
    def step_images(world, micro, accumulation):
        per_rank = [list(StepBatches(40, global_batch=8, micro_batch=micro, accumulation=accumulation, rank=r,
                                     seed=3, epoch=1, first_step=2)) for r in range(world)]
        return [sorted(i for r in range(world) for b in per_rank[r][s * accumulation:(s + 1) * accumulation]
                       for i in b) for s in range(3)]
    single = step_images(1, 8, 1)
    assert step_images(2, 4, 1) == single == step_images(2, 2, 2) == step_images(1, 2, 4)
    assert len({i for step in single for i in step}) == 24  # no image twice within an epoch


def test_optimizer_groups_follow_llamagen():
    model = create_model(ModelConfig(gpt_model="GPT-tiny", image_size=16, downsample_size=4, vocab_size=VOCAB))
    groups = build_optimizer(model, TrainConfig()).param_groups
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert id(model.tok_embeddings.weight) in decayed and id(model.norm.weight) not in decayed
    exempt = build_optimizer(model, TrainConfig(decay_embeddings=False)).param_groups[0]["params"]
    assert id(model.tok_embeddings.weight) not in {id(p) for p in exempt}


def test_optimizer_is_fused_and_steps_like_torchs_plain_adamw():
    """The fused kernel (CPU here) takes the recipe's steps as torch's foreach AdamW of the same groups does;
    a state saved unfused (a run started before the optimizer was fused) stays unfused when resumed."""
    torch.manual_seed(0)
    models = [create_model(ModelConfig(gpt_model="GPT-tiny", image_size=16, downsample_size=4, vocab_size=VOCAB))]
    models.append(copy.deepcopy(models[0]))
    fused = build_optimizer(models[0], TrainConfig(lr=1e-2))
    assert fused.defaults["fused"] is True
    second = list(models[1].parameters())
    plain = torch.optim.AdamW([{"params": [p for p in second if p.dim() >= 2], "weight_decay": 0.05},  # paper 4.1
                               {"params": [p for p in second if p.dim() < 2], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.95), foreach=True)
    idx = torch.randint(0, VOCAB, (4, 16))
    for _ in range(3):
        for model, optimizer in zip(models, (fused, plain)):
            model.train()
            torch.manual_seed(1)  # the same dropout masks in both
            loss = model(idx[:, :-1], torch.tensor([0, 1, 2, 3]), targets=idx)[1]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # Adam amplifies rounding early on
    assert not torch.equal(models[0].norm.weight, torch.ones_like(models[0].norm.weight))  # it did step
    resumed = build_optimizer(models[1], TrainConfig())
    resumed.load_state_dict(plain.state_dict())
    assert resumed.param_groups[0]["fused"] is None


@pytest.mark.slow  # about 10 s on 2 CPU cores: three training runs
def test_killed_run_resumes_to_identical_weights(setup, tmp_path):
    # dropout, class dropout and EMA on: resume must restore the RNG stream and the EMA, not only weights
    extra = ["train.epochs=4", "train.global_batch_size=4", "train.ckpt_every_steps=5", "train.ema=true",
             "train.ema_decay=0.9", "model.dropout_p=0.1", "model.token_dropout_p=0.1", "train.log_every=2"]
    script = [sys.executable, "train_global_model.py"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(run_script(script + global_args(setup, straight, "configs/tiny/global_model_entropy_row_break.yaml", *extra)))

    proc = run_script(script + global_args(setup, killed, "configs/tiny/global_model_entropy_row_break.yaml", *extra))
    deadline = time.time() + 120
    while not list(killed.glob("scratch/*/*/checkpoints/latest/model.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before a mid-epoch checkpoint"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = only_run(killed)
    point = resume_checkpoint(run)
    killed_at = checkpoint_step(point)
    assert point.name == "latest" and killed_at % 12 != 0  # 48 images / batch 4 = 12 steps per epoch
    assert not (run / "checkpoints" / "epoch_00000003").exists()

    out = finish(run_script(script + global_args(setup, killed, "configs/tiny/global_model_entropy_row_break.yaml",
                                                 *extra) + ["--resume", str(run)]))
    assert f"from latest at step {killed_at}" in out
    final = run / "checkpoints" / "epoch_00000003"
    reference = only_run(straight) / "checkpoints" / "epoch_00000003"
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_file(reference / name), load_file(final / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    steps, _ = metrics(run)
    assert [r["step"] for r in steps] == [r["step"] for r in metrics(only_run(straight))[0]]  # no step logged twice
    assert not (run / "checkpoints" / "latest").exists()


@pytest.mark.slow  # about 8 s on 2 CPU cores: a one- and a two-process run
def test_two_process_ddp_matches_one_process(setup, tmp_path):
    # no dropout: two processes draw different dropout masks than one would
    extra = ["train.epochs=1", "train.max_device_batch_size=4", "model.dropout_p=0", "model.token_dropout_p=0",
             "model.class_dropout_prob=0", "train.ema=true", "train.ema_decay=0.5"]
    config = "configs/tiny/global_model_entropy_row_break.yaml"
    single, double = tmp_path / "one", tmp_path / "two"
    one = run_script([sys.executable, "train_global_model.py"] + global_args(setup, single, config, *extra))
    finish(one)
    # accelerate's Accelerator runs DDP over gloo when torchrun starts the processes with ACCELERATE_USE_CPU
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = finish(run_script(launch + ["train_global_model.py"] + global_args(setup, double, config, *extra),
                            ACCELERATE_USE_CPU="1"))
    assert "2 process(es) x micro-batch 4 x 1 accumulation" in out
    a = load_file(only_run(single) / "checkpoints" / "epoch_00000000" / "model.safetensors")
    b = load_file(only_run(double) / "checkpoints" / "epoch_00000000" / "model.safetensors")
    moved = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved < 1e-5
    start = create_model(ModelConfig(gpt_model="DGPT-tiny", image_size=16, downsample_size=4, vocab_size=VOCAB,
                                     num_classes=CLASSES, class_dropout_prob=0))
    assert any(not torch.allclose(a[k], v) for k, v in start.state_dict().items())  # training did change the weights


@pytest.mark.slow  # about 10 s on 2 CPU cores per case: a one-process and a sharded two-process run
@pytest.mark.parametrize("config, held_out", [("configs/tiny/global_model_entropy_row_break.yaml", 16),
                                              ("configs/tiny/gpt_baseline.yaml", 13)], ids=["DGPT", "GPT"])
def test_fsdp_on_two_processes_matches_one_process(setup, tmp_path, config, held_out):
    """train.fsdp=true over gloo: weights, gradients, AdamW state and EMA sharded over 2 processes, with gradient
    accumulation (micro-batch 2 x 2), clipping, bf16 autocast and validation (13 held out: 7 and 6 images, so one
    process runs an uncounted forward to match the other's); the full checkpoint rank 0 writes equals a
    one-process run's at the same global batch (dropout off), model and EMA alike."""
    extra = ["train.epochs=1", "model.dropout_p=0", "model.token_dropout_p=0", "model.class_dropout_prob=0",
             "train.ema=true", "train.ema_decay=0.5", "train.max_grad_norm=0.05", f"data.val_holdout={held_out}"]
    single, sharded = tmp_path / "one", tmp_path / "fsdp"
    finish(run_script([sys.executable, "train_global_model.py"]
                      + global_args(setup, single, config, *extra, "train.max_device_batch_size=4")))
    launcher, overrides = launch("fsdp")
    out = finish(run_script(launcher + ["train_global_model.py"]
                            + global_args(setup, sharded, config, *extra, "train.max_device_batch_size=2", *overrides),
                            ACCELERATE_USE_CPU="1"))
    assert "2 process(es) x micro-batch 2 x 2 accumulation step(s), sharded (FSDP)" in out
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(only_run(single) / "checkpoints" / "epoch_00000000" / name)
        b = load_file(only_run(sharded) / "checkpoints" / "epoch_00000000" / name)
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a), name  # full, unsharded
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5, name
    (one,), (two,) = metrics(only_run(single))[1], metrics(only_run(sharded))[1]
    assert two["val_nll"] == pytest.approx(one["val_nll"], abs=1e-4)
    norms = [r["grad_norm"] for r in metrics(only_run(sharded))[0]]
    assert max(norms) > 0.05  # clipping acted


def launch(layout: str) -> tuple[list[str], list[str]]:
    """(launcher, overrides) of a layout: "1" one process, "2" two DDP processes, "fsdp" two sharded processes."""
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return {"1": ([sys.executable], []), "2": (two, []), "fsdp": (two, ["train.fsdp=true"])}[layout]


@pytest.mark.slow  # about 20 s on 2 CPU cores per case: three training runs, one or two of them on 2 processes
@pytest.mark.parametrize("straight_layout, before, after", [("1", "1", "2"), ("1", "2", "1"), ("fsdp", "fsdp", "fsdp"),
                                                            ("1", "fsdp", "1"), ("1", "1", "fsdp")],
                         ids=["1_to_2", "2_to_1", "fsdp_to_fsdp", "fsdp_to_1", "1_to_fsdp"])
def test_a_run_killed_mid_epoch_resumes_on_another_process_count(setup, tmp_path, straight_layout, before, after):
    """Same global batch, dropout off: the resumed run ends where an uninterrupted run does, up to float
    reassociation (with dropout on it warns in one line: test_a_resume_that_changes_the_random_masks...). FSDP
    (train.fsdp=true, 2 processes) writes the same full checkpoints, so a run goes from and to it too."""
    extra = ["train.epochs=2", "train.global_batch_size=4", "train.ckpt_every_steps=5", "model.dropout_p=0",
             "model.token_dropout_p=0", "model.class_dropout_prob=0", "train.ema=true", "train.ema_decay=0.9"]
    config = "configs/tiny/global_model_entropy_row_break.yaml"

    def command(layout: str, results: Path) -> list[str]:
        launcher, overrides = launch(layout)
        return launcher + ["train_global_model.py"] + global_args(setup, results, config, *extra, *overrides)

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    finish(run_script(command(straight_layout, straight), ACCELERATE_USE_CPU="1"))
    proc = run_script(command(before, killed), ACCELERATE_USE_CPU="1")
    deadline = time.time() + 120
    while not list(killed.glob("scratch/*/*/checkpoints/latest/model.safetensors")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before a mid-epoch checkpoint"
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # torchrun's workers follow it (dpar.launch: parent-death signal)
    proc.wait()
    run = only_run(killed)
    folder = os.open(run, os.O_RDONLY)
    while True:  # until every killed process has let go of the run folder's lock
        try:
            fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            assert time.time() < deadline, "a killed worker still holds the run folder"
            time.sleep(0.01)
    os.close(folder)
    assert checkpoint_step(resume_checkpoint(run)) % 12 != 0  # killed inside an epoch (12 steps each)
    out = finish(run_script(command(after, killed) + ["--resume", str(run)], ACCELERATE_USE_CPU="1"))
    assert ("2 process(es)" if after == "fsdp" else f"{after} process(es)") in out
    assert ("sharded (FSDP)" in out) == (after == "fsdp")
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_file(only_run(straight) / "checkpoints" / "epoch_00000001" / name)
        b = load_file(run / "checkpoints" / "epoch_00000001" / name)
        # Float reassociation (2 processes sum gradients in another order), amplified by AdamW over the steps
        # after it: 0 to 2e-5 here, depending on the patches (and so on θ). A wrong resume is far larger: one
        # AdamW step moves weights by up to lr (1e-3), the second epoch by 1e-2.
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4, name


@pytest.mark.slow  # about 15 s on 2 CPU cores per case: a one-process run and two one-process "nodes"
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_nodes_over_loopback_train_as_one_job(setup, tmp_path, launcher):
    """The per-node commands of docs/training.md, in their CPU form: two "machines" (node ranks 0 and 1, one
    process each, gloo over 127.0.0.1) write ONE run folder whose weights equal a one-process run's. torchrun, and
    accelerate launch with the shipped 2-node config file (its GPU counts and address overridden by flags;
    ACCELERATE_USE_CPU=1 makes the torchrun it starts run on CPUs)."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    extra = ["train.epochs=1", "train.max_device_batch_size=4", "model.dropout_p=0", "model.token_dropout_p=0",
             "model.class_dropout_prob=0"]
    config = "configs/tiny/global_model_entropy_row_break.yaml"
    single, nodes = tmp_path / "one", tmp_path / "nodes"
    finish(run_script([sys.executable, "train_global_model.py"] + global_args(setup, single, config, *extra)))
    def node(rank: int) -> list[str]:
        if launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank),
                    "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs/accelerate/2nodes_8gpu.yaml"), "--num_processes", "2", "--machine_rank", str(rank),
                "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]

    launches = [run_script(node(rank) + ["train_global_model.py"] + global_args(setup, nodes, config, *extra),
                           ACCELERATE_USE_CPU="1") for rank in (0, 1)]
    outs = [finish(proc) for proc in launches]
    assert "2 process(es) x micro-batch 4 x 1 accumulation" in outs[0]
    a = load_file(only_run(single) / "checkpoints" / "epoch_00000000" / "model.safetensors")
    b = load_file(only_run(nodes) / "checkpoints" / "epoch_00000000" / "model.safetensors")  # one folder
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


@pytest.mark.slow  # about 10 s on 2 CPU cores per case: one accelerate launch
@pytest.mark.parametrize("file, flags, processes", [("cpu.yaml", [], 1), ("1node_8gpu.yaml", ["--num_processes", "2"], 2)])
def test_the_shipped_cpu_accelerate_config_trains(setup, tmp_path, file, flags, processes):
    """`accelerate launch --config_file configs/accelerate/<file> train_global_model.py ...`: the one-CPU-process file,
    and the CPU form of the README's one-node line (the 8-GPU file with 2 processes; ACCELERATE_USE_CPU=1 makes the
    torchrun that accelerate starts run on CPUs, gloo). The 2-node file: test_two_nodes_over_loopback_train_as_one_job."""
    out = finish(run_script([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "configs/accelerate" / file), *flags, "train_global_model.py"]
                            + global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                          "train.max_steps=2"), ACCELERATE_USE_CPU="1"))
    assert f"{processes} process(es)" in out
    assert resume_checkpoint(only_run(tmp_path)) is not None


@pytest.mark.slow  # about 10 s: accelerate launch starting one process
def test_an_accelerate_fsdp_config_is_refused_before_accelerate_acts_on_it(setup, tmp_path):
    """configs/accelerate/cpu.yaml with distributed_type FSDP: accelerate itself failed with a traceback ("FSDP
    parameter initialization ... is not supported on cpu") before the trainer's check ran. Now one line, exit 2,
    no run folder."""
    config = (ROOT / "configs/accelerate/cpu.yaml").read_text()
    assert "distributed_type: 'NO'" in config
    fsdp = tmp_path / "fsdp.yaml"
    fsdp.write_text(config.replace("distributed_type: 'NO'", "distributed_type: FSDP"))
    proc = run_script([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(fsdp),
                       "train_global_model.py"] + global_args(setup, tmp_path / "runs",
                                                              "configs/tiny/global_model_entropy_row_break.yaml",
                                                              "train.max_steps=2"), ACCELERATE_USE_CPU="1")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "error: this launch's accelerate config sets distributed_type FSDP" in err  # (the launcher's own
    assert "not supported on cpu" not in err                                         # traceback follows it)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # about 15 s on 2 CPU cores: two one-process "nodes" and a one-process run
def test_the_slurm_node_script_over_loopback(setup, tmp_path):
    """tools/slurm/node.sh, the per-node part of tools/slurm/train.sbatch, run twice by hand as srun would run it on
    two nodes: SLURM's variables set here, and a stand-in `scontrol show hostnames` on PATH that expands the node
    list (the first host, 127.0.0.1, hosts the rendezvous). The two train one job in one run folder, with the
    weights of a one-process run."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo "$3" | tr , "\\n"\n')
    (bin_dir / "scontrol").chmod(0o755)
    extra = ["train.epochs=1", "train.max_device_batch_size=4", "model.dropout_p=0", "model.token_dropout_p=0",
             "model.class_dropout_prob=0"]
    config = "configs/tiny/global_model_entropy_row_break.yaml"
    single, nodes = tmp_path / "one", tmp_path / "nodes"
    finish(run_script([sys.executable, "train_global_model.py"] + global_args(setup, single, config, *extra)))
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               ACCELERATE_USE_CPU="1", NPROC_PER_NODE="1", SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1,localhost",
               SLURM_JOB_ID="77", MASTER_PORT=str(port))
    launches = [subprocess.Popen(["bash", "tools/slurm/node.sh", "train_global_model.py"]
                                 + global_args(setup, nodes, config, *extra), cwd=ROOT, text=True,
                                 env={**env, "SLURM_NODEID": str(rank), "SLURM_PROCID": str(rank)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for rank in (0, 1)]
    outs = [finish(proc) for proc in launches]
    assert "2 process(es) x micro-batch 4 x 1 accumulation" in outs[0]
    a = load_file(only_run(single) / "checkpoints" / "epoch_00000000" / "model.safetensors")
    b = load_file(only_run(nodes) / "checkpoints" / "epoch_00000000" / "model.safetensors")  # one folder
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_the_slurm_node_script_outside_slurm_stops_in_one_line():
    proc = subprocess.run(["bash", "tools/slurm/node.sh", "train_global_model.py"], cwd=ROOT, capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"]})
    assert proc.returncode == 2 and proc.stderr == ("error: SLURM_NNODES is not set: run tools/slurm/node.sh through "
                                                    "srun (tools/slurm/train.sbatch)\n")


def one_line_error(args: list[str], after_progress: bool = False) -> str:
    proc = subprocess.run([sys.executable, "train_global_model.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.splitlines()[-1] + "\n" if after_progress else proc.stderr  # after the progress bar's lines
    assert message.startswith("error: ") and message.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    return message


def test_config_errors_are_one_line(setup, tmp_path):
    _, _, _, other_ckpt = setup
    assert "'train.epochz'" in one_line_error(global_args(setup, tmp_path) + ["train.epochz=3"])
    assert "holds the entropies of" in one_line_error(
        global_args(setup, tmp_path) + [f"patcher.entropy_model_checkpoint={other_ckpt}"])
    assert "no token store at" in one_line_error(global_args(setup, tmp_path) + [f"data.store={tmp_path / 'none'}"])
    assert "needs patcher.entropy_model_checkpoint" in one_line_error(
        global_args(setup, tmp_path) + ["patcher.entropy_model_checkpoint=null"])
    assert "model.vocab_size is 99" in one_line_error(global_args(setup, tmp_path) + ["model.vocab_size=99"])
    assert "unknown tracker 'nope'" in one_line_error(global_args(setup, tmp_path) + ["train.trackers=[nope]"])
    assert "training loss is nan" in one_line_error(global_args(setup, tmp_path) + ["train.lr=1e30"], True)
    assert not list(tmp_path.glob("scratch/*/*/checkpoints/*"))  # nothing saved from a diverged model


def test_resume_refuses_changed_settings(setup, tmp_path):
    train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                        "train.epochs=1"))
    run = only_run(tmp_path)
    with pytest.raises(UserError, match="was started with train.lr=0.001, this run has 0.002"):
        train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                            "train.epochs=2", "train.lr=2e-3") + ["--resume", str(run)])
    train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                        "train.epochs=2") + ["--resume", str(run)])
    assert [epoch for epoch, _ in list_checkpoints(run)] == [0, 1]


def test_a_resume_may_change_dpar_options_of_a_gpt_only(setup, tmp_path):
    """A DPAR run resumes only with the architecture it began with. A GPT-* run records DPAR's options but does
    not use them: one whose config.yaml and weights hold DPAR's former defaults (as runs from before the defaults
    became the paper's text do) resumes under today's, and its earlier weights still load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dpar.experiment import MODEL_RECORD
    from dpar.runs import load_trained_model
    paper = ["model.encoder_pooling_ffn=false", "model.decoder_injection=every_block"]  # configs/tiny: true, once
    dpar_config, gpt_config = "configs/tiny/global_model_entropy_row_break.yaml", "configs/tiny/gpt_baseline.yaml"
    train_global_model.main(global_args(setup, tmp_path / "dpar", dpar_config, "train.epochs=1"))
    run = only_run(tmp_path / "dpar")
    with pytest.raises(UserError, match="was started with model.encoder_pooling_ffn=True, this run has False"):
        train_global_model.main(global_args(setup, tmp_path / "dpar", dpar_config, "train.epochs=2", *paper) +
                                ["--resume", str(run)])
    train_global_model.main(global_args(setup, tmp_path / "gpt", gpt_config, "train.epochs=1"))
    run = only_run(tmp_path / "gpt")
    former = {"encoder_pooling_ffn": True, "decoder_injection": "once"}
    saved = OmegaConf.load(run / "config.yaml")
    saved.model.update(former)
    OmegaConf.save(saved, run / "config.yaml")
    for weights in run.glob("checkpoints/*/model.safetensors"):
        with safe_open(weights, framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        metadata[MODEL_RECORD] = json.dumps({**json.loads(metadata[MODEL_RECORD]), **former})
        save_file(tensors, weights, metadata=metadata)
    train_global_model.main(global_args(setup, tmp_path / "gpt", gpt_config, "train.epochs=2") + ["--resume", str(run)])
    checkpoints = list_checkpoints(run)
    assert [epoch for epoch, _ in checkpoints] == [0, 1]
    assert OmegaConf.load(run / "config.yaml").model.decoder_injection == "every_block"
    load_trained_model(checkpoints[0][1] / "model.safetensors")  # its weights record decoder_injection once


def test_a_dpar_run_recorded_before_its_options_were_keys_resumes_as_it_was_trained(setup, tmp_path):
    """Found by a breaking pass: a run whose config.yaml lacks encoder_pooling_ffn / decoder_injection (recorded
    before they were keys, with a pooling FFN and one injection) was read with today's defaults: resumed as it
    began, it was refused with a false "started with False"; resumed with today's defaults, its config.yaml was
    rewritten before the weights failed to load."""
    config = "configs/tiny/global_model_entropy_row_break.yaml"  # a pooling FFN and one injection
    train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=1"))
    run = only_run(tmp_path)
    saved = run / "config.yaml"
    saved.write_text("".join(line for line in saved.read_text().splitlines(keepends=True)
                             if not line.strip().startswith(("encoder_pooling_ffn:", "decoder_injection:"))))
    before = saved.read_bytes()
    with pytest.raises(UserError, match="was started with model.encoder_pooling_ffn=True, this run has False"):
        train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=2", "model.encoder_pooling_ffn=false",
                                            "model.decoder_injection=every_block") + ["--resume", str(run)])
    assert saved.read_bytes() == before
    train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=2") + ["--resume", str(run)])
    assert [epoch for epoch, _ in list_checkpoints(run)] == [0, 1]


def test_a_broken_resume_point_is_refused_before_the_config_is_rewritten(setup, tmp_path):
    """Found by a breaking pass: a resume without the run's config.yaml took any settings, and one whose
    training state (or EMA weights) was missing rewrote config.yaml before failing."""
    config = "configs/tiny/global_model_entropy_row_break.yaml"
    train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=1", "train.ema=true"))
    run = only_run(tmp_path)
    checkpoint = run / "checkpoints" / "epoch_00000000"
    saved = (run / "config.yaml").read_text()
    resume = ["--resume", str(run)]
    for remove, expected in (("training_state.pt", "has no training_state.pt"),
                             ("ema.safetensors", "has no ema.safetensors (train.ema is on)")):
        (checkpoint / remove).rename(tmp_path / remove)
        with pytest.raises(UserError, match=re.escape(expected)):
            train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=2", "train.ema=true") + resume)
        assert (run / "config.yaml").read_text() == saved
        (tmp_path / remove).rename(checkpoint / remove)
    torch.save([1, 2], checkpoint / "training_state.pt")
    with pytest.raises(UserError, match="is not a training state"):
        train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=2", "train.ema=true") + resume)
    assert (run / "config.yaml").read_text() == saved
    torch.save({"epoch": 0, "step": 3, "optimizer": {}}, checkpoint / "training_state.pt")  # the tokenizer's
    with pytest.raises(UserError, match=r"lacks steps_per_epoch, images_seen, .* \(not a training state of this"):
        train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=2", "train.ema=true") + resume)
    assert (run / "config.yaml").read_text() == saved
    (run / "config.yaml").unlink()
    with pytest.raises(UserError, match="has no config.yaml to compare"):
        train_global_model.main(global_args(setup, tmp_path, config, "train.epochs=2", "train.ema=true",
                                            "train.lr=5e-3") + resume)


def test_an_attention_backend_that_cannot_train_here_is_refused_before_the_run_folder(setup, tmp_path):
    from dpar.models.attention import BACKENDS, available_backends
    missing = [name for name in BACKENDS if name not in available_backends("cpu", torch.float32, grad=True)]
    assert missing  # on a CPU: xformers and varlen need CUDA, flex has no CPU backward
    for backend in missing:
        with pytest.raises(UserError, match=f"model.attn_backend '{backend}' cannot train on cpu"):
            train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                                "train.max_steps=1", "train.mixed_precision=no",
                                                f"model.attn_backend={backend}"))
    assert not (tmp_path / "scratch").exists()


def test_tensorboard_tracker_logs_into_the_run(setup, tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                        "train.epochs=1", "train.trackers=[tensorboard]"))
    events = sorted((only_run(tmp_path) / "logs").rglob("events.out.tfevents.*"))
    scalars = set()
    for path in events:
        accumulator = event_accumulator.EventAccumulator(str(path))
        accumulator.Reload()
        scalars |= set(accumulator.Tags()["scalars"])
    assert {"loss", "tokens_per_s", "val_nll"} <= scalars


@pytest.mark.slow  # about 80 s on 2 CPU cores, nearly all of it compiling
def test_compiled_model_trains_like_the_eager_one(setup, tmp_path):
    """The compiled graph computes what eager code computes. Dropout off: inductor draws its random masks with its
    own generator, so with dropout on the two take different masks from the second step on (the tiny config's
    0.1 ends step 2 about 2e-4 apart); class dropout stays on, it draws outside the compiled blocks."""
    losses = {}
    no_dropout = [f"model.{key}=0.0" for key in ("token_dropout_p", "dropout_p", "class_dropout_prob")]
    for compiled in (False, True):
        results = tmp_path / str(compiled)
        train_global_model.main(global_args(setup, results, "configs/tiny/global_model_entropy_row_break.yaml",
                                            "train.max_steps=3", f"train.compile={compiled}", *no_dropout))
        losses[compiled] = [r["loss"] for r in metrics(only_run(results))[0]]
    assert len(losses[True]) == 3 and np.allclose(losses[True], losses[False], rtol=1e-4)


DROPOUTS = ("dropout_p", "token_dropout_p", "class_dropout_prob")


def test_only_dropout_makes_the_batch_split_matter(setup, tmp_path):
    """One process's step of 8 images as 1 x 8 or as 2 micro-batches x 4: with every dropout 0 the same weights up
    to float rounding (which Adam amplifies in its first steps); with dropout on, other random masks (drawn per
    micro-batch), so other weights, 100 times further apart: the limit docs/training.md states (the DDP test
    above covers 2 processes, the slow compile test compiling)."""
    apart = {}
    for p in (0.0, 0.1):
        weights = []
        for micro in ("null", "4"):
            results = tmp_path / f"{p}-{micro}"
            train_global_model.main(global_args(setup, results, "configs/tiny/global_model_entropy_row_break.yaml",
                                                "train.epochs=1", f"train.max_device_batch_size={micro}",
                                                *(f"model.{key}={p}" for key in DROPOUTS)))
            weights.append(load_file(only_run(results) / "checkpoints" / "epoch_00000000" / "model.safetensors"))
        apart[p] = max(float((weights[0][k] - weights[1][k]).abs().max()) for k in weights[0])
    assert apart[0.0] < 1e-4 and apart[0.1] > 1e-3, apart


@pytest.mark.parametrize("p", [0.1, 0.0])
def test_a_resume_that_changes_the_random_masks_says_so_in_one_line(setup, tmp_path, capsys, p):
    args = global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                       *(f"model.{key}={p}" for key in DROPOUTS))
    train_global_model.main(args + ["train.epochs=1"])
    run = only_run(tmp_path)
    capsys.readouterr()
    train_global_model.main(args + ["train.epochs=2", "train.max_device_batch_size=4", "--resume", str(run)])
    warned = capsys.readouterr().err.count("warning:")
    train_global_model.main(args + ["train.epochs=3", "train.max_device_batch_size=4", "--resume", str(run)])
    again = capsys.readouterr().err
    assert again.count("warning:") == 0  # resumed as it was trained since
    if p == 0:
        assert warned == 0  # nothing random: the split changes float rounding only
        return
    train_global_model.main(args + ["train.epochs=4", "--resume", str(run)])
    line = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert len(line) == 1 and warned == 1, line
    assert ("trained as 1 process(es) x micro-batch 4 and resumes as 1 process(es) x micro-batch 8; with "
            "model.dropout_p 0.1, model.token_dropout_p 0.1, model.class_dropout_prob 0.1") in line[0]


def test_the_weights_record_their_model_config_and_an_edited_config_is_refused(setup, tmp_path):
    from dpar.experiment import recorded_model_config
    from dpar.runs import Sampler
    train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                        "train.epochs=1", "train.ema=true"))
    run = only_run(tmp_path)
    saved = OmegaConf.load(run / "config.yaml")
    for name in ("model.safetensors", "ema.safetensors"):
        assert recorded_model_config(run / "checkpoints" / "epoch_00000000" / name) == \
            OmegaConf.to_container(saved.model)
    Sampler.from_experiment(run, tokenizer=False)
    text = (run / "config.yaml").read_text()
    assert "attn_backend: auto" in text
    (run / "config.yaml").write_text(text.replace("attn_backend: auto", "attn_backend: sdpa"))
    Sampler.from_experiment(run, tokenizer=False)  # how attention is computed may change, not what
    assert "rope: dynamic" in text
    (run / "config.yaml").write_text(text.replace("rope: dynamic", "rope: 2d"))
    for ema in (False, True):
        with pytest.raises(UserError) as info:
            Sampler.from_experiment(run, tokenizer=False, ema=ema)
        assert "model.rope='2d'" in str(info.value) and "model.rope='dynamic'" in str(info.value), info.value
    with pytest.raises(UserError, match="model.rope='2d', but the weights"):  # resumed with the edited config
        train_global_model.main(global_args(setup, tmp_path, "configs/tiny/global_model_entropy_row_break.yaml",
                                            "train.epochs=2", "train.ema=true", "model.rope=2d") + ["--resume", str(run)])
    old = Path(shutil.copytree(ROOT / "assets" / "demo" / "dpar", tmp_path / "old"))  # weights written before the
    weights = without_record(next((old / "checkpoints").glob("epoch_*")) / "model.safetensors")  # record: loaded
    assert recorded_model_config(weights) is None                                                 # as before
    Sampler.from_experiment(old, tokenizer=False)


def test_sharded_state_is_saved_and_loaded_in_the_unsharded_format(tmp_path):
    """full_weights / full_optimizer_state of an FSDP-sharded model (a one-process gloo group here) give what the
    same model unsharded gives: state_dict() and optimizer.state_dict() by parameter index, so either resumes the
    other; load_optimizer_state puts a saved state back into the shards."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from dpar.training import full_optimizer_state, full_weights, load_optimizer_state, shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        config = ModelConfig(gpt_model="DGPT-tiny", image_size=16, downsample_size=4, vocab_size=VOCAB,
                             num_classes=CLASSES, class_dropout_prob=0, dropout_p=0, token_dropout_p=0)
        torch.manual_seed(0)
        plain = create_model(config)
        sharded = shard(copy.deepcopy(plain), init_device_mesh("cpu", (1,)))
        idx, labels = torch.randint(0, VOCAB, (2, N)), torch.tensor([0, 1])
        starts = torch.rand(2, N) < 0.5
        starts[:, 0] = True
        optimizers = []
        for model in (plain, sharded):
            optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
            model(idx, labels, starts, targets=idx)[1].backward()
            optimizer.step()
            optimizers.append(optimizer)
        weights = full_weights(sharded, True)
        assert weights.keys() == plain.state_dict().keys()
        assert all(torch.allclose(weights[k], v, atol=1e-6) for k, v in plain.state_dict().items())
        saved, expected = full_optimizer_state(sharded, optimizers[1], True), optimizers[0].state_dict()
        assert [g["params"] for g in saved["param_groups"]] == [g["params"] for g in expected["param_groups"]]
        for i, moments in expected["state"].items():
            assert torch.allclose(saved["state"][i]["exp_avg"], moments["exp_avg"], atol=1e-6), i
        fresh = shard(copy.deepcopy(plain), init_device_mesh("cpu", (1,)))
        reloaded = build_optimizer(fresh, TrainConfig(lr=1e-2))
        load_optimizer_state(fresh, reloaded, expected, True)  # an unsharded run's state into the shards
        again = full_optimizer_state(fresh, reloaded, True)
        assert all(torch.equal(again["state"][i]["exp_avg_sq"], m["exp_avg_sq"]) for i, m in expected["state"].items())
    finally:
        dist.destroy_process_group()


def test_fsdp_refuses_compile_and_accelerates_own_sharding_in_one_line():
    from dpar.launch import check_no_accelerate_plugin
    with pytest.raises(UserError, match=r"train.fsdp=true and train.compile=true: .* set train.compile=false"):
        TrainConfig(fsdp=True, compile=True).check()
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        with pytest.raises(UserError, match=f"distributed_type {name}, .* shard training with train.fsdp=true"):
            check_no_accelerate_plugin({variable: "true"})
    check_no_accelerate_plugin({"ACCELERATE_USE_FSDP": "false"})
    check_no_accelerate_plugin({})


def test_fsdp_on_one_process_runs_the_sharded_code_and_equals_unsharded(setup, tmp_path):
    """Plain python, one process: train.fsdp makes a one-process group of its own (gone after the run), so one GPU
    runs the sharded code path (the GPU suite's check); its checkpoint equals an unsharded run's."""
    import torch.distributed as dist
    extra = ["train.max_steps=3", "train.ema=true", "train.ema_decay=0.5", "model.dropout_p=0",
             "model.token_dropout_p=0", "model.class_dropout_prob=0"]
    for name, fsdp in (("plain", "false"), ("fsdp", "true")):
        train_global_model.main(global_args(setup, tmp_path / name, "configs/tiny/global_model_entropy_row_break.yaml",
                                            *extra, f"train.fsdp={fsdp}"))
        assert not dist.is_initialized()
    for file in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(resume_checkpoint(only_run(tmp_path / name)) / file) for name in ("plain", "fsdp"))
        assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6, file
