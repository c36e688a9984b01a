"""Training data from a token store: one random view per image per epoch, packed into DPAR batches."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from dpar.errors import UserError
from dpar.models.dpar import PatchLayout
from dpar.patcher import PatcherConfig, patch_starts

from .store import TokenStore


class TokenDataset(Dataset):
    """Item ``i``: tokens [N], label, and (with ``entropies``) float32 entropies [N] of one view.

    The view of image ``i`` in epoch ``e`` is drawn from (seed, e, i) alone: the same with any number
    of workers or processes, and again after a resume.
    """

    def __init__(self, store: TokenStore, entropies: bool, seed: int = 0):
        if entropies:
            store.require_entropies()
        self.store, self.with_entropies, self.seed, self.epoch = store, entropies, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        view = int(np.random.default_rng([self.seed, self.epoch, index]).integers(self.store.views))
        item = {"tokens": torch.from_numpy(self.store.tokens(index)[view].astype(np.int64)),
                "label": torch.tensor(int(self.store.labels[index]), dtype=torch.long)}
        if self.with_entropies:
            item["entropies"] = torch.from_numpy(self.store.entropies(index)[view].astype(np.float32))
        return item


@dataclass
class PackedBatch:
    tokens: torch.Tensor                 # [B, N] int64
    labels: torch.Tensor                 # [B] int64
    patch_start: torch.Tensor | None     # [B, N] bool, None for the token-level GPT
    layout: PatchLayout | None           # packed global-stream metadata (cumulative sequence lengths)

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
