"""Training data from a token store: one random view per image per epoch, in a resumable order, packed
into DPAR batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dpar.errors import UserError
from dpar.models.dpar import PatchLayout
from dpar.patcher import PatcherConfig, patch_starts
from tokenizer.images import epoch_order

from .store import TokenStore


class TokenDataset(Dataset):
    """Item ``i``: tokens [N], label, and (with ``entropies``) float32 entropies [N] of one view of an image.

    ``images`` selects the store's images (default all; e.g. a :func:`~dpar.data.splits.holdout_split` part). The view
    of item ``i`` in epoch ``e`` is drawn from (seed, e, i) alone: the same with any number of workers
    or processes, and again after a resume. ``view`` fixes it instead (validation uses view 0).
    """

    def __init__(self, store: TokenStore, entropies: bool, seed: int = 0, images: Sequence[int] | None = None,
                 view: int | None = None):
        if entropies:
            store.require_entropies()
        self.images = range(len(store)) if images is None else images
        if len(self.images) and not 0 <= min(self.images) <= max(self.images) < len(store):
            raise ValueError(f"images lie outside the store's {len(store)} images")
        self.store, self.with_entropies, self.seed, self.view, self.epoch = store, entropies, seed, view, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        view = self.view
        if view is None:
            view = int(np.random.default_rng([self.seed, self.epoch, index]).integers(self.store.views))
        image = self.images[index]
        item = {"tokens": torch.from_numpy(self.store.tokens(image)[view].astype(np.int64)),
                "label": torch.tensor(int(self.store.labels[image]), dtype=torch.long)}
        if self.with_entropies:
            item["entropies"] = torch.from_numpy(self.store.entropies(image)[view].astype(np.float32))
        return item


class StepBatches(Sampler[list[int]]):
    """This process's micro-batches for optimizer steps ``first_step ..`` of one epoch.

    Step s of epoch e trains on items ``order[s*G : (s+1)*G]`` of the epoch's shuffled order (G the
    global batch; the remainder of an epoch is dropped). Process r takes its contiguous share of
    those G and cuts it into ``accumulation`` micro-batches, so every split of G over processes and
    micro-batches trains on the same images at every step, and a resumed run starts at ``first_step``.
    """

    def __init__(self, num_items: int, *, global_batch: int, micro_batch: int, accumulation: int, rank: int,
                 seed: int, epoch: int, first_step: int = 0):
        self.num_items, self.global_batch, self.micro_batch = num_items, global_batch, micro_batch
        self.accumulation, self.rank, self.seed, self.epoch = accumulation, rank, seed, epoch
        self.first_step = first_step
        self.share = micro_batch * accumulation
        if (rank + 1) * self.share > global_batch:
            raise ValueError(f"rank {rank} x {self.share} items per step exceeds the global batch {global_batch}")

    @property
    def steps(self) -> int:
        """Optimizer steps in a whole epoch."""
        return self.num_items // self.global_batch

    def __len__(self) -> int:
        return max(0, self.steps - self.first_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.num_items, self.seed, self.epoch)
        for step in range(self.first_step, self.steps):
            start = step * self.global_batch + self.rank * self.share
            for k in range(self.accumulation):
                yield order[start + k * self.micro_batch:start + (k + 1) * self.micro_batch]


@dataclass
class PackedBatch:
    tokens: torch.Tensor                 # [B, N] int64
    labels: torch.Tensor                 # [B] int64
    patch_start: torch.Tensor | None     # [B, N] bool, None for the token-level GPT
    layout: PatchLayout | None           # packed global-stream metadata (cumulative sequence lengths)

    @property
    def positions(self) -> int:
        """Positions of the big transformer: patches for DPAR, tokens for the GPT baseline."""
        return self.tokens.numel() if self.layout is None else self.layout.packed.total

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.tokens.to(device), self.labels.to(device),
                           None if self.patch_start is None else self.patch_start.to(device),
                           None if self.layout is None else self.layout.to(device))


class PackedCollate:
    """Stack items and, for DPAR, cut patches with the config's rule and build the packed layout.

    Boundaries come from the stored entropies at collate time, so θ, P and row break can change
    without preprocessing again. With ``patcher=None`` (GPT baseline) no patches are made.
    """

    def __init__(self, patcher: PatcherConfig | None, grid_width: int):
        self.patcher, self.grid_width = patcher, grid_width

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> PackedBatch:
        tokens = torch.stack([item["tokens"] for item in items])
        labels = torch.stack([item["label"] for item in items])
        if self.patcher is None:
            return PackedBatch(tokens, labels, None, None)
        if "entropies" in items[0]:
            entropies = torch.stack([item["entropies"] for item in items])
        elif self.patcher.mode == "entropy":
            raise UserError("patcher.mode 'entropy' needs the store's entropies (build TokenDataset with entropies=True)")
        else:
            entropies = torch.zeros(tokens.shape)  # static and token patching ignore them
        mask = patch_starts(self.patcher, entropies, self.grid_width)
        return PackedBatch(tokens, labels, mask, PatchLayout.from_mask(mask, self.grid_width))
