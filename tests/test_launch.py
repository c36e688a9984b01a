"""Launches that would leave each process training or sampling alone are refused before any output."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpar.errors import UserError
from dpar.launch import check_joined_launch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("environ, refused", [
    ({}, False),                                                              # plain python
    ({"ACCELERATE_USE_CPU": "True"}, False),                                  # accelerate launch --cpu, 1 process
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, True),  # --num_processes 2
    ({"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "h", "WORLD_SIZE": "2", "RANK": "0"}, False),      # torchrun
    ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "h", "PMI_SIZE": "2"}, False),                 # mpirun
    ({"MASTER_ADDR": "h", "MASTER_PORT": "1"}, False),                        # a SLURM shell's exports, plain python
])
def test_a_process_meant_to_join_others_without_a_group_is_refused(environ, refused):
    if refused:
        with pytest.raises(UserError, match="started this process to join others .* would train alone"):
            check_joined_launch(environ)
    else:
        check_joined_launch(environ)


@pytest.mark.slow  # about 20 s on 2 CPU cores: two accelerate launches
@pytest.mark.parametrize("layout", [["--num_processes", "2"],
                                    ["--num_machines", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
                                     "--main_process_port", "29533"]], ids=["2_processes", "2_machines"])
def test_accelerate_launch_cpu_of_several_processes_is_refused_before_any_output(tmp_path, layout):
    """It used to run one plain process per machine: each sampled (or trained) alone, with no error."""
    out = tmp_path / "samples"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", *layout,
                           "--mixed_precision", "no", "--dynamo_backend", "no", "sample_c2i_ddp.py",
                           "--num-fid-samples", "4", "--output-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: accelerate launch started this")]
    assert len(ours) == 1, proc.stderr[-2000:]  # (accelerate then repeats it inside its own traceback)
    assert not out.exists()


LAYOUTS = {"1node_8gpu": (1, 8), "2nodes_8gpu": (2, 16), "cpu": (1, 1)}  # (machines, processes over all)


def test_every_shipped_accelerate_config_loads_with_accelerates_own_loader():
    """configs/accelerate/*.yaml as `accelerate launch --config_file` reads them: the layout each is named for,
    DDP or one CPU process (the trainer shards itself with train.fsdp and refuses accelerate's FSDP)."""
    from accelerate.commands.config.config_args import load_config_from_file
    files = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    assert [path.stem for path in files] == sorted(LAYOUTS)
    for path in files:
        config = load_config_from_file(str(path))
        machines, processes = LAYOUTS[path.stem]
        assert (config.num_machines, config.num_processes) == (machines, processes), path.name
        if config.use_cpu:
            assert config.distributed_type.name == "NO"
        else:
            assert config.distributed_type.name == "MULTI_GPU" and config.mixed_precision == "bf16", path.name
        if machines > 1:
            assert config.main_process_ip and config.main_process_port and config.rdzv_backend == "static"


@pytest.mark.parametrize("variables,expected", [
    ("SLURM_NNODES=1 SLURM_NODEID=0", "SLURM_JOB_NODELIST is not set"),
    ("SLURM_NNODES=2 SLURM_NODEID=0 SLURM_JOB_NODELIST=n[1-2]", "scontrol is not on PATH"),
    ("SLURM_NNODES=1 SLURM_NODEID=0 MASTER_ADDR=x SLURM_JOB_ID=abc", "SLURM_JOB_ID=abc: must be an integer >= 0"),
    ("SLURM_NNODES=abc SLURM_NODEID=0", "SLURM_NNODES=abc: must be an integer >= 1"),
    ("SLURM_NNODES=1 SLURM_NODEID=0 MASTER_ADDR=x MASTER_PORT=99999", "MASTER_PORT=99999: must be an integer >= 1 and"),
    ("SLURM_NNODES=1 SLURM_NODEID=0 MASTER_ADDR=x NPROC_PER_NODE=0", "NPROC_PER_NODE=0: must be an integer >= 1"),
    ("SLURM_NNODES=1 SLURM_NODEID=3 MASTER_ADDR=x", "SLURM_NODEID=3: must be an integer >= 0 and <= 0"),
    ("SLURM_NODEID=0", "SLURM_NNODES is not set"),
])
def test_the_slurm_node_script_refuses_bad_variables_in_one_line(tmp_path, variables, expected):
    """tools/slurm/node.sh before torchrun starts: each of these was a bash error, a torchrun traceback (exit 1) or a
    node that waited forever (node 3 of 1)."""
    env = {"PATH": "/usr/bin:/bin", **dict(pair.split("=", 1) for pair in variables.split())}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "slurm" / "node.sh"), "train_global_model.py"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and proc.stderr == f"error: {proc.stderr[7:].strip()}\n" and expected in proc.stderr
    assert not list(tmp_path.iterdir())
