"""Experiment dirs and checkpoints: atomic layout, pruning, resume lookup, strict loading, the run object."""
import json
from dataclasses import dataclass, field
from datetime import datetime
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from dpar.errors import UserError
from dpar.experiment import (RESUMABLE_TRAIN_KEYS, BaseTrainConfig, Run, checkpoint_step, experiment_of,
                             latest_checkpoint, list_checkpoints, load_model_weights, new_experiment_dir,
                             read_state_dict, resolve_run, resume_checkpoint, save_checkpoint, save_step_checkpoint)
from dpar.training import TrainConfig
from tokenizer.train_vq import TrainVQConfig

STATE = {"w": torch.arange(6.0).view(2, 3)}


def test_prod_and_scratch_dirs():
    now = datetime(2026, 1, 2, 13, 4, 5)
    assert new_experiment_dir("runs", "cfg", prod=True, now=now).as_posix() == "runs/cfg/20260102_13"
    assert new_experiment_dir("runs", "cfg", prod=False, now=now).as_posix() == "runs/scratch/cfg/20260102_130405"


def test_checkpoints_are_pruned_keeping_last_and_every(tmp_path):
    for epoch in range(7):
        save_checkpoint(tmp_path, epoch, STATE, {"epoch": epoch}, keep_last=2, keep_every=3)
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [0, 3, 5, 6]


def test_half_written_checkpoints_are_ignored(tmp_path):
    save_checkpoint(tmp_path, 0, STATE)
    (tmp_path / "checkpoints" / "epoch_00000001.tmp").mkdir()  # a run killed while writing epoch 1
    (tmp_path / "checkpoints" / "epoch_00000002").mkdir()  # no model file
    assert latest_checkpoint(tmp_path).name == "epoch_00000000"
    save_checkpoint(tmp_path, 1, {"w": STATE["w"] + 1})
    assert torch.equal(read_state_dict(latest_checkpoint(tmp_path) / "model.safetensors")["w"], STATE["w"] + 1)
    assert not (tmp_path / "checkpoints" / "epoch_00000001.tmp").exists()


def test_resolve_run(tmp_path):
    run, checkpoint = resolve_run(tmp_path, "cfg", prod=False, resume=None)
    assert checkpoint is None and run.parent == tmp_path / "scratch" / "cfg"
    with pytest.raises(UserError, match="no scratch run of 'cfg'"):
        resolve_run(tmp_path, "cfg", prod=False, resume="latest")
    save_checkpoint(run, 4, STATE)
    assert resolve_run(tmp_path, "cfg", prod=False, resume="latest") == (run, run / "checkpoints" / "epoch_00000004")
    assert resolve_run(tmp_path, "cfg", prod=False, resume=str(run))[1].name == "epoch_00000004"
    with pytest.raises(UserError, match="no checkpoints"):
        resolve_run(tmp_path, "cfg", prod=False, resume=str(tmp_path / "elsewhere"))
    assert experiment_of(run / "checkpoints" / "epoch_00000004" / "model.safetensors") == run.resolve()
    assert experiment_of(tmp_path / "model.safetensors") is None


def test_resume_takes_the_later_of_epoch_and_mid_epoch_checkpoints(tmp_path):
    save_checkpoint(tmp_path, 0, STATE, {}, step=10, ema_state=STATE)
    assert (tmp_path / "checkpoints" / "epoch_00000000" / "ema.safetensors").is_file()
    save_step_checkpoint(tmp_path, 1, 14, {"w": STATE["w"] + 1}, {"step": 14})
    assert resume_checkpoint(tmp_path).name == "latest" and checkpoint_step(resume_checkpoint(tmp_path)) == 14
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [0]  # sampling never sees the mid-epoch one
    assert resolve_run(tmp_path.parent, "x", prod=False, resume=str(tmp_path))[1].name == "latest"
    save_checkpoint(tmp_path, 1, STATE, {}, step=20)
    assert not (tmp_path / "checkpoints" / "latest").exists()
    assert resume_checkpoint(tmp_path).name == "epoch_00000001"


def test_strict_loading_names_the_problem(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save({"model": {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}, "steps": 5}, tmp_path / "ok.pt")
    load_model_weights(model, tmp_path / "ok.pt")
    assert model.weight.abs().sum() == 0
    torch.save({"model": {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}}, tmp_path / "shape.pt")
    with pytest.raises(UserError, match=r"'weight': \[3, 3\] in file, \[2, 3\] in model"):
        load_model_weights(model, tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read .*junk.pt"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save({"model": torch.nn.Linear(1, 1)}, tmp_path / "pickled.pt")  # arbitrary objects are refused
    with pytest.raises(UserError, match="weights-only"):
        read_state_dict(tmp_path / "pickled.pt")
    with pytest.raises(UserError, match="not found"):
        read_state_dict(tmp_path / "absent.safetensors")


WEIGHTS = {"weight": STATE["w"]}  # a Linear(3, 2) without bias


@dataclass
class RunSchema:
    train: BaseTrainConfig = field(default_factory=BaseTrainConfig)


def one_process(main: bool = True):
    """What Run needs of an accelerate.Accelerator: the rank and the barrier."""
    return SimpleNamespace(is_main_process=main, wait_for_everyone=lambda: None)


def test_the_trainers_share_one_base_config():
    shared = set(BaseTrainConfig.__dataclass_fields__)
    assert shared <= set(TrainConfig.__dataclass_fields__) and shared <= set(TrainVQConfig().train.__dataclass_fields__)
    assert issubclass(TrainConfig, BaseTrainConfig) and isinstance(TrainVQConfig().train, BaseTrainConfig)
    assert (TrainVQConfig().train.results_dir, TrainVQConfig().train.epochs) == ("results_tokenizer", 40)


def test_run_owns_its_experiment_dir(tmp_path):
    config = OmegaConf.structured(RunSchema(BaseTrainConfig(results_dir=str(tmp_path), keep_last=1)))
    with pytest.raises(UserError, match="must be a plain folder name"):
        Run(one_process(), config.train, "../escape", prod=False, resume=None)
    run = Run(one_process(), config.train, "cfg", prod=False, resume=None)
    assert not any(tmp_path.iterdir())  # nothing written before start()
    run.find().start(config, RESUMABLE_TRAIN_KEYS, total_steps=100)
    assert run.resume_from is None and run.resume_step == -1 and run.dir.parent == tmp_path / "scratch" / "cfg"
    assert OmegaConf.load(run.dir / "config.yaml").train.keep_last == 1
    for step in (1, 2, 3):
        run.log({"step": step})
    run.save(0, WEIGHTS, {"epoch": 0}, step=2)
    run.save(1, {"weight": STATE["w"] + 1}, {"epoch": 1}, step=4)
    run.save(1, WEIGHTS, {"epoch": 1}, step=5, end_of_epoch=False)
    assert [epoch for epoch, _ in list_checkpoints(run.dir)] == [1]  # train.keep_last 1

    resumed = Run(one_process(), config.train, "cfg", prod=False, resume="latest").find()
    assert resumed.dir == run.dir and resumed.resume_from.name == "latest" and resumed.resume_step == 5
    model = torch.nn.Linear(3, 2, bias=False)
    assert resumed.load(model) == {"epoch": 1} and torch.equal(model.weight, STATE["w"])
    with pytest.raises(UserError, match="has no ema.safetensors"):
        resumed.load(model, ema=torch.nn.Linear(3, 2, bias=False))
    resumed.truncate_metrics(2)
    assert [json.loads(line)["step"] for line in (run.dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    changed = OmegaConf.structured(RunSchema(BaseTrainConfig(results_dir=str(tmp_path), keep_last=1, lr=1.0)))
    with pytest.raises(UserError, match="was started with train.lr=0.0001, this run has 1.0"):
        resumed.start(changed, RESUMABLE_TRAIN_KEYS, total_steps=100)
    with pytest.raises(UserError, match="is already at step 5; train.epochs 300 / train.max_steps None end at step 5"):
        resumed.start(config, RESUMABLE_TRAIN_KEYS, total_steps=5)  # every trainer: nothing left to train
    with pytest.raises(UserError, match="was started with train.lr"):  # another run's settings: named first
        resumed.start(changed, RESUMABLE_TRAIN_KEYS, total_steps=5)
    with pytest.raises(UserError, match="training_state.pt lacks scheduler"):
        resumed.start(config, RESUMABLE_TRAIN_KEYS, total_steps=100, state_keys=("epoch", "scheduler"))
    resumed.start(OmegaConf.merge(config, {"train": {"epochs": 9}}), RESUMABLE_TRAIN_KEYS, 100)  # a resumable key


def test_run_on_another_rank_reads_and_never_writes(tmp_path, monkeypatch):
    """Rank 0 resolves the dir and broadcasts it; the other ranks load the checkpoint but write nothing."""
    experiment = tmp_path / "scratch" / "cfg" / "run"
    save_checkpoint(experiment, 0, WEIGHTS, {"epoch": 0}, step=3)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    broadcast = []
    monkeypatch.setattr("accelerate.utils.broadcast_object_list",
                        lambda objects: broadcast.append(objects) or [(experiment, latest_checkpoint(experiment))])
    config = OmegaConf.structured(RunSchema(BaseTrainConfig(results_dir=str(tmp_path))))
    run = Run(one_process(main=False), config.train, "cfg", prod=False, resume=str(experiment)).find()
    assert broadcast == [[None]] and run.dir == experiment and run.resume_step == 3  # resolved by rank 0 only
    run.start(config, RESUMABLE_TRAIN_KEYS, total_steps=100)
    run.log({"step": 4})
    run.save(1, WEIGHTS, {"epoch": 1}, step=6)
    run.truncate_metrics(0)
    model = torch.nn.Linear(3, 2, bias=False)
    assert run.load(model) == {"epoch": 0} and torch.equal(model.weight, STATE["w"])
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
