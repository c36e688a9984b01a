"""Experiment dirs and checkpoints: atomic layout, pruning, resume lookup, strict loading."""
from datetime import datetime

import pytest
import torch

from dpar.errors import UserError
from dpar.experiment import (checkpoint_step, experiment_of, latest_checkpoint, list_checkpoints, load_model_weights,
                             new_experiment_dir, read_state_dict, resolve_run, resume_checkpoint, save_checkpoint,
                             save_step_checkpoint)

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
