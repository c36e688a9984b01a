"""The two preprocessing stages behind ``preprocess_tokens.py``: images -> tokens, tokens -> entropies.

Work is done shard by shard (see :mod:`dpar.data.store`); shard ``k`` goes to process
``k % world_size``. A shard's result depends only on its inputs, so an interrupted and resumed run
writes byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dpar.config import read_section
from dpar.errors import UserError
from dpar.experiment import CONFIG_FILE, experiment_of
from dpar.fileio import atomic_write_text, remove_stale_temporaries
from dpar.patcher import logits_entropy
from tokenizer.transforms import ImageError, image_views, open_rgb

from .config import DataConfig
from .store import (ENTROPY_DTYPE, META_FILE, SHARDS, SKIPPED_FILE, entropy_problem, file_sha256, read_meta, shard_file,
                    write_array, write_json)


@dataclass
class TokenJob:
    """What the tokens stage makes; the identity a resumed run must match."""
    image_size: int
    views: int
    crop_range: float
    grid: int
    codebook_size: int
    tokenizer: dict[str, Any]
    shard_size: int
    num_inputs: int
    listing_sha256: str
    class_names: list[str]


def listing_hash(paths: list[Path], labels: list[int], root: Path) -> str:
    digest = hashlib.sha256()
    for path, label in zip(paths, labels):
        digest.update(f"{_relative(path, root)}\t{label}\n".encode())
    return digest.hexdigest()[:16]


def start_store(store: Path, job: TokenJob) -> dict[str, Any]:
    """Create ``meta.json`` for a new store, or check that an existing one was made the same way."""
    meta = read_meta(store)
    identity = asdict(job)
    nothing_done = not any((store / SHARDS).glob("tokens_*.npy"))
    if meta is None or (nothing_done and not meta["tokens"].get("complete")):  # a run that wrote nothing blocks none
        meta = {"version": 1, **identity, "tokens": {"complete": False}}
        write_json(store / META_FILE, meta)
        return meta
    for key, value in identity.items():
        if meta.get(key) != value:
            raise UserError(f"token store {store} was made with {key}={_short(meta.get(key))}, this run has "
                            f"{_short(value)}; use another --store or delete it")
    return meta


class _ShardImages(Dataset):
    """The views of one shard's images; an unreadable image yields its error message instead."""

    def __init__(self, paths: list[Path], image_size: int, views: int, crop_range: float):
        self.paths, self.image_size, self.views, self.crop_range = paths, image_size, views, crop_range

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            return image_views(open_rgb(self.paths[index]), self.image_size, self.views, self.crop_range), None
        except ImageError as error:
            return None, str(error)


def tokenize_shards(store: Path, job: TokenJob, paths: list[Path], labels: list[int], encode: Callable,
                    *, rank: int, world: int, batch_size: int, num_workers: int, root: Path,
                    show_progress: bool) -> None:
    """Write every unfinished shard assigned to ``rank``. ``encode`` maps uint8 [B, H, W, 3] to [B, N] codes."""
    shards = math.ceil(len(paths) / job.shard_size)
    todo = [k for k in range(rank, shards, world) if not _tokens_done(store, k)]
    remaining = sum(len(paths[k * job.shard_size:(k + 1) * job.shard_size]) for k in todo)
    bar = tqdm(total=remaining, desc=f"tokens (rank {rank})", unit="img", disable=not show_progress)
    for k in todo:
        lo, hi = k * job.shard_size, min((k + 1) * job.shard_size, len(paths))
        loader = DataLoader(_ShardImages(paths[lo:hi], job.image_size, job.views, job.crop_range),
                            batch_size=batch_size, num_workers=num_workers, collate_fn=list)
        codes, kept, skipped = [], [], []
        for number, items in enumerate(loader):
            offset = number * batch_size
            good = [(lo + offset + i, views) for i, (views, error) in enumerate(items) if views is not None]
            skipped += [[_relative(paths[lo + offset + i], root), error]
                        for i, (_, error) in enumerate(items) if error is not None]
            if good:
                pixels = torch.from_numpy(np.concatenate([views for _, views in good]))
                codes.append(encode(pixels).view(len(good), job.views, -1).cpu().numpy().astype(np.uint16))
                kept += [index for index, _ in good]
            bar.update(len(items))
        tokens = np.concatenate(codes) if codes else np.zeros((0, job.views, job.grid ** 2), np.uint16)
        write_json(shard_file(store, "tokens", k, ".json"), {"images": len(kept), "skipped": skipped})
        write_array(shard_file(store, "labels", k), np.asarray([labels[i] for i in kept], dtype=np.int16))
        write_array(shard_file(store, "tokens", k), tokens)
    bar.close()


def finish_tokens(store: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Once every shard exists: counts, the skipped-image log, ``tokens.complete``."""
    shards = math.ceil(meta["num_inputs"] / meta["shard_size"])
    missing = [k for k in range(shards) if not _tokens_done(store, k)]
    if missing:
        raise UserError(f"token store {store} still lacks shard {missing[0]} (of {shards}); rerun to finish it")
    _remove_stale_temporaries(store)
    records = [json.loads(shard_file(store, "tokens", k, ".json").read_text()) for k in range(shards)]
    skipped = [entry for record in records for entry in record["skipped"]]
    atomic_write_text(store / SKIPPED_FILE, "".join(f"{path}\t{reason}\n" for path, reason in skipped))
    meta["tokens"] = {"complete": True, "shard_images": [r["images"] for r in records],
                      "images": sum(r["images"] for r in records), "skipped": len(skipped)}
    write_json(store / META_FILE, meta)
    return meta


def start_entropies(store: Path, meta: dict[str, Any], identity: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """Record which entropy model fills the store; refuse to mix two models' entropies."""
    previous = meta.get("entropies")
    if previous and previous["model"]["sha256"] != identity["sha256"]:
        if not overwrite:
            raise UserError(f"token store {store} holds entropies of another entropy model "
                            f"({previous['model']['checkpoint']}); pass --overwrite to replace them")
        for path in (store / SHARDS).glob("entropies_*.npy"):
            path.unlink()
        previous = None
    if previous is None:
        meta["entropies"] = {"complete": False, "model": identity}
        write_json(store / META_FILE, meta)
    return meta


def entropy_shards(store: Path, shards: list[int], token_shard: Callable[[int], np.ndarray],
                   entropies_of: Callable[[torch.Tensor], torch.Tensor], *, batch_size: int,
                   show_progress: bool) -> None:
    """Write ``entropies_k.npy`` for the unfinished ``shards``; ``entropies_of`` maps [B, N] tokens to [B, N].
    ``UserError`` naming the entropy model (from ``meta.json``) when a shard's entropies are not usable (see
    :func:`~dpar.data.store.entropy_problem`, e.g. NaN from weights that overflow): that shard is not written,
    so the store is never marked complete with them."""
    todo = [k for k in shards if not shard_file(store, "entropies", k).exists()]
    bar = tqdm(total=sum(token_shard(k).shape[0] * token_shard(k).shape[1] for k in todo), desc="entropies",
               unit="seq", disable=not show_progress)
    for k in todo:
        tokens = np.asarray(token_shard(k))
        images, views, length = tokens.shape
        flat = torch.from_numpy(tokens.reshape(-1, length).astype(np.int64))
        out = np.empty((images * views, length), dtype=ENTROPY_DTYPE)
        for lo in range(0, len(flat), batch_size):
            out[lo:lo + batch_size] = entropies_of(flat[lo:lo + batch_size]).cpu().numpy().astype(ENTROPY_DTYPE)
            bar.update(min(lo + batch_size, len(flat)) - lo)
        out = out.reshape(images, views, length)
        problem = entropy_problem(out)
        if problem is not None:
            model = ((read_meta(store) or {}).get("entropies") or {}).get("model", {}).get("checkpoint", "?")
            raise UserError(f"entropy model {model} gives {problem} of shard {k} of token store {store} (entropies "
                            f"are finite and >= 0): its weights are unusable; nothing written for the shard")
        write_array(shard_file(store, "entropies", k), out)
    bar.close()


def trained_tokenizer_sha256(checkpoint: str | Path, config_path: str | Path | None = None) -> str | None:
    """The hash of the tokenizer whose tokens a model was trained on, where its run says (its
    ``data.tokenizer_checkpoint``, else the ``meta.json`` of its ``data.store``); None when it cannot be told."""
    experiment = experiment_of(checkpoint)
    path = Path(config_path) if config_path else (experiment / CONFIG_FILE if experiment else None)
    if path is None or not path.is_file():
        return None
    data = read_section(path, "data", DataConfig, required=False)  # validated, as the trainer wrote it
    if data is None:
        return None
    if data.tokenizer_checkpoint and Path(data.tokenizer_checkpoint).is_file():
        return file_sha256(data.tokenizer_checkpoint)
    meta = read_meta(data.store) if data.store and Path(data.store).is_dir() else None
    return meta["tokenizer"]["sha256"] if meta else None


def finish_entropies(store: Path, meta: dict[str, Any]) -> dict[str, Any]:
    shards = len(meta["tokens"]["shard_images"])
    missing = [k for k in range(shards) if not shard_file(store, "entropies", k).exists()]
    if missing:
        raise UserError(f"token store {store} still lacks entropies for shard {missing[0]}; rerun to finish")
    _remove_stale_temporaries(store)
    meta["entropies"]["complete"] = True
    write_json(store / META_FILE, meta)
    return meta


@torch.no_grad()
def next_token_entropies(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Entropy (nats, fp32) of a GPT's unconditional prediction of each token of ``tokens [B, N]`` -> ``[B, N]``;
    the first is +inf. The GPT reads its null class: an unconditional model's start token, or a c2i model's
    class-free prediction (a LlamaGen checkpoint as entropy model)."""
    null = model.cls_embedding.null_labels(len(tokens), tokens.device)
    logits, _ = model(tokens[:, :-1], null)
    entropy = logits_entropy(logits)
    entropy[:, 0] = float("inf")
    return entropy


def _remove_stale_temporaries(store: Path) -> None:
    """Half-written files of a killed run (a clean exit removes its own; a live writer's stay)."""
    remove_stale_temporaries(store / SHARDS)


def _tokens_done(store: Path, shard: int) -> bool:
    return shard_file(store, "tokens", shard).exists() and shard_file(store, "tokens", shard, ".json").exists()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."
