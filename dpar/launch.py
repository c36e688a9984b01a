"""One place that creates the accelerate ``Accelerator`` for every multi-process script."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux; a no-op elsewhere), and
    exit at once if the parent is already gone. Launched workers then never outlive their launcher.

    ``parent``: the launcher's pid, taken in the launcher (``os.getpid()``) and passed down, so that a parent
    that died before this call (a spawned worker calls it only after importing its modules) is noticed; without
    it, the parent is whoever is the parent when this is called."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def check_joined_launch(environ: dict[str, str] = os.environ) -> None:
    """``UserError`` for a process that a launcher started to join others but that has no process group to
    join, so it would train alone. The case: ``accelerate launch --cpu`` with ``--num_processes`` or
    ``--num_machines`` above 1 and no MPI hostfile. Accelerate's simple launcher then starts ONE plain
    process per machine, with ``MASTER_ADDR`` / ``MASTER_PORT`` set (it sets them only for several processes
    or machines) and ``ACCELERATE_USE_CPU``, but no ``WORLD_SIZE`` / ``RANK`` (torchrun sets those; MPI sets
    ``PMI_SIZE`` / ``OMPI_COMM_WORLD_SIZE``)."""
    launched_by_accelerate = "ACCELERATE_USE_CPU" in environ and "MASTER_ADDR" in environ
    joined = any(key in environ for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"))
    if launched_by_accelerate and not joined:
        raise UserError("accelerate launch started this process to join others (MASTER_ADDR is set) but gave it "
                        "no process group: with --cpu it runs one plain process per machine, which would train "
                        "alone; on CPUs launch with ACCELERATE_USE_CPU=1 torchrun --nnodes M --nproc_per_node N "
                        "... (gloo)")


ACCELERATE_PLUGINS = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED",
                      "ACCELERATE_USE_MEGATRON_LM": "MEGATRON_LM"}  # what `accelerate launch` exports for each


def check_no_accelerate_plugin(environ: dict[str, str] = os.environ) -> None:
    """``UserError`` for a launch whose accelerate config asks accelerate itself to shard or offload
    (``distributed_type: FSDP``, ``DEEPSPEED``, ``MEGATRON_LM``, seen in the variable ``accelerate launch``
    exports), before accelerate acts on it: the project shards with ``train.fsdp=true`` under a plain
    multi-GPU launch (configs/accelerate/), and the plugin's settings would be half applied."""
    for variable, name in ACCELERATE_PLUGINS.items():
        if environ.get(variable, "").lower() in ("1", "true", "yes"):
            raise UserError(f"this launch's accelerate config sets distributed_type {name}, which this project does "
                            "not use; launch with a plain multi-GPU config (configs/accelerate/) and shard training "
                            "with train.fsdp=true")


def make_accelerator(**kwargs) -> Accelerator:
    """An ``Accelerator``, refusing a launch where each process would run alone (all writing the same files):
    :func:`check_joined_launch`, :func:`check_no_accelerate_plugin`, and a launch whose process count
    accelerate does not see.

    A process started by a launcher (``torchrun`` / ``accelerate launch``) ends with it, so a killed launch
    leaves no worker writing behind it. On CPUs ``accelerate launch --cpu`` starts one process; several need
    ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N script.py ...`` (gloo).
    """
    from accelerate import Accelerator

    check_joined_launch()
    check_no_accelerate_plugin()
    if "LOCAL_RANK" in os.environ:
        set_parent_death_signal()
    accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != accelerator.num_processes:
        raise UserError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}; on CPUs "
                        "set ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...)")
    return accelerator
