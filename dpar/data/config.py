"""The ``data`` section of the trainers' configs (``train_global_model.py``, ``train_entropy_model.py``): which token
store they train on and how validation images are chosen. Here, below the trainer, so that what reads a run
(``dpar.runs``, ``dpar.data.preprocess``) validates a run's ``data`` section with the schema that wrote it."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..validation import Key, config_key, ranged


@dataclass
class DataConfig:
    # token store written by preprocess_tokens.py (with entropies for patcher.mode entropy).
    store: str = "data/imagenet256_tokens"
    # the VQ tokenizer that made data.store (null: filled in from the store's meta.json); sampling decodes with it.
    tokenizer_checkpoint: str | None = None
    # optional second store for validation NLL (e.g. ImageNet val tokenized with --views 1); view 0 is used.
    val_store: str | None = None
    # without val_store: hold out N images of data.store for validation (0: no validation), drawn per class in
    # proportion to its size (seeded by split_seed; dpar/data/splits.py), never "the last N" of a class-sorted store.
    val_holdout: int = ranged(0, min=0)
    # seed of the val_holdout draw: the same split for every run and seed of a study, and for θ calibration.
    split_seed: int = ranged(0, min=0, max=2**31 - 1)
    # DataLoader worker processes per process.
    num_workers: int = ranged(4, min=0)

    def check(self, key: Key = config_key("data")) -> None:
        """The rule between fields: one source of validation images. ``UserError`` naming both keys."""
        if self.val_store is not None and self.val_holdout:
            raise UserError(f"{key('val_store')} {self.val_store} and {key('val_holdout')}={self.val_holdout} are two "
                            f"validation sets; set one ({key('val_store')}=null or {key('val_holdout')}=0)")
