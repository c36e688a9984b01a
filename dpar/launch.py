"""One place that creates the accelerate ``Accelerator`` for every multi-process script."""
from __future__ import annotations

import os

from accelerate import Accelerator

from .errors import UserError


def make_accelerator(**kwargs) -> Accelerator:
    """An ``Accelerator``, refusing a launch where each process would run alone (all writing the same files).

    On CPUs ``accelerate launch --cpu`` starts one process; several need
    ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N script.py ...`` (gloo).
    """
    accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != accelerator.num_processes:
        raise UserError(f"{launched} processes were launched but accelerate sees {accelerator.num_processes}; on CPUs "
                        "set ACCELERATE_USE_CPU=1 (e.g. ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 ...)")
    return accelerator
