"""Entropy patching: which image tokens start a new patch (arXiv 2512.21867, section 3.2.1).

Token i (0-based, raster order) starts a patch iff

1. i == 0;
2. its entropy H_i > threshold;
3. the current patch already holds ``max_patch_length`` tokens; or
4. ``row_break`` is on and i is the first token of a grid row.

H_i depends on x_<i only, so the sampler can decide a boundary before sampling x_i. The same
rule serves training (vectorised over whole sequences) and sampling (one position at a time):
both go through :func:`forced_starts`, and the cap is the count since the last forced start.

Rule 2 reads H_i at one precision everywhere: rounded to the token store's float16
(:data:`BOUNDARY_DTYPE`), as training reads it from the store. Sampling, patch maps, calibration and
statistics compute H_i in float32 and round it the same way, so a token whose entropy and its
rounding fall on either side of θ (θ = 7.8: every H_i in (7.79883, 7.8] is stored as 7.80078) starts
a patch in all of them or in none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .data.store import ENTROPY_DTYPE
from .models.gpt import GPT_models
from .validation import choice, ranged

BOUNDARY_DTYPE = torch.from_numpy(np.empty(0, ENTROPY_DTYPE)).dtype  # torch.float16: the store's entropies

PATCH_MODES = ("entropy", "static", "token", "self_entropy")


@dataclass
class PatcherConfig:
    # entropy: the paper's rule; static: fixed-length patches; token: every token is a patch;
    # self_entropy (sampling only, beyond the paper): the paper's rule on DPAR's own entropy of x_i under
    # "no new patch at i" instead of the entropy model's, so sampling needs no second network.
    mode: str = choice("entropy", PATCH_MODES)
    # theta: a token whose entropy (nats) exceeds this starts a patch (7.8 at 256 px in the paper).
    threshold: float = ranged(7.8, min=0)
    # P: longest patch in tokens; null for no cap (paper Table 3, "entropy only").
    max_patch_length: int | None = ranged(4, min=1)
    # start a new patch at the first token of every grid row.
    row_break: bool = True
    # K: patch length in static mode.
    static_length: int = ranged(2, min=1)
    # config.yaml of the entropy model experiment whose entropies the token store holds.
    entropy_model_checkpoint_config: str | None = None
    # model.safetensors of that entropy model, or a released LlamaGen c2i checkpoint (see entropy_model_gpt).
    entropy_model_checkpoint: str | None = None
    # null: the entropy model is a train_entropy_model.py run. GPT-B/L/XL/XXL: entropy_model_checkpoint is a
    # LlamaGen class-conditional GPT of that size (e.g. GPT-B for c2i_B_256.pt), read at its null class:
    # H_i is the entropy of its unconditional prediction of x_i (no entropy model to train).
    entropy_model_gpt: str | None = choice(None, tuple(GPT_models))


def boundary_entropies(entropies: Tensor) -> Tensor:
    """``entropies`` (any float dtype) at the precision of every boundary decision: rounded to the token
    store's dtype (:data:`BOUNDARY_DTYPE`, round to nearest even as the store's writer rounds), as float32."""
    return entropies.to(BOUNDARY_DTYPE).float()


def forced_starts(entropies: Tensor | None, positions: Tensor, *, grid_width: int,
                  threshold: float = float("inf"), row_break: bool = True) -> Tensor:
    """Rules 1, 2 and 4 (every rule but the cap), elementwise for tokens at ``positions``; rule 2 compares
    :func:`boundary_entropies` with θ."""
    forced = positions == 0
    if row_break:
        forced = forced | (positions % grid_width == 0)
    if entropies is not None:
        forced = forced | (boundary_entropies(entropies) > threshold)
    return forced


def _cap(forced: Tensor, period: int | None) -> Tensor:
    """Add rule 3: a new patch every ``period`` tokens after the last forced start."""
    if period is None:
        return forced
    positions = torch.arange(forced.shape[-1], device=forced.device)
    last_forced = torch.where(forced, positions, 0).cummax(dim=-1).values
    return forced | ((positions - last_forced) % period == 0)


def _check_cap(max_patch_length: int | None) -> None:  # a user's P is checked by its PatcherConfig field rule
    assert max_patch_length is None or max_patch_length >= 1, \
        f"max_patch_length must be >= 1 or None, got {max_patch_length}"


def patch_start_mask(entropies: Tensor, *, grid_width: int, threshold: float,
                     max_patch_length: int | None, row_break: bool = True) -> Tensor:
    """Entropy patching of ``entropies [B, N]`` (nats; H_1 is +inf) -> ``BoolTensor [B, N]``."""
    _check_cap(max_patch_length)
    positions = torch.arange(entropies.shape[-1], device=entropies.device)
    forced = forced_starts(entropies, positions, grid_width=grid_width, threshold=threshold,
                           row_break=row_break)
    return _cap(forced, max_patch_length)


def _static_period(patch_length: int, max_patch_length: int | None) -> int:
    _check_cap(max_patch_length)
    assert patch_length >= 1, f"static patch length must be >= 1, got {patch_length}"
    return patch_length if max_patch_length is None else min(patch_length, max_patch_length)


def static_patch_start_mask(batch: int, num_tokens: int, *, grid_width: int, patch_length: int,
                            max_patch_length: int | None = None, row_break: bool = True,
                            device: torch.device | str | None = None) -> Tensor:
    """Fixed-length patches of ``patch_length`` tokens (restarting at row breaks, capped at P)."""
    period = _static_period(patch_length, max_patch_length)
    positions = torch.arange(num_tokens, device=device)
    forced = forced_starts(None, positions, grid_width=grid_width, row_break=row_break)
    return _cap(forced, period).expand(batch, num_tokens).clone()


def token_patch_start_mask(batch: int, num_tokens: int, device: torch.device | str | None = None) -> Tensor:
    """Every token its own patch: DPAR's path equivalent to token-level LlamaGen."""
    return torch.ones(batch, num_tokens, dtype=torch.bool, device=device)


def patch_starts(config: PatcherConfig, entropies: Tensor, grid_width: int) -> Tensor:
    """Patch-start mask for ``entropies [B, N]`` under a :class:`PatcherConfig`."""
    batch, num_tokens = entropies.shape
    if config.mode == "entropy":
        return patch_start_mask(entropies, grid_width=grid_width, threshold=config.threshold,
                                max_patch_length=config.max_patch_length, row_break=config.row_break)
    if config.mode == "static":
        return static_patch_start_mask(batch, num_tokens, grid_width=grid_width,
                                       patch_length=config.static_length,
                                       max_patch_length=config.max_patch_length,
                                       row_break=config.row_break, device=entropies.device)
    # a user's mode is checked by its field rule, and training's refusal of self_entropy by its config's check
    assert config.mode != "self_entropy", ("self_entropy boundaries come from the model being sampled "
                                           "(dpar.sampling.generate); train with entropy, static or token patching")
    assert config.mode == "token", f"unknown patcher mode {config.mode!r}; valid: {', '.join(PATCH_MODES)}"
    return token_patch_start_mask(batch, num_tokens, device=entropies.device)


def calibrate_threshold(entropies: Tensor, grid_width: int, target: float, *, max_patch_length: int | None = 4,
                        row_break: bool = True, iterations: int = 40) -> float:
    """The θ at which ``entropies [B, N]`` give the mean patch length closest to ``target`` tokens per patch.
    How the paper chose θ=7.8 for 1.81 tokens per patch at 256 px (arXiv 2512.21867, section 4.1).

    Bisection finds the stored entropy e* at which the mean patch length (which only grows with θ) crosses
    ``target``; the two patchings on either side of e* are then compared and the closer one kept. The θ
    returned lies midway between e* and its neighbouring stored entropy (0.5 nats beyond e* where it has
    none), never on a stored value, so a rounded θ patches alike. Entropies that take few distinct values
    may leave the target far away: compare :func:`patch_stats` at the θ returned. The stored entropies are
    :func:`boundary_entropies`, the values the rule compares, so θ lies between two of them as the rule sees
    them (live float32 entropies too). Non-finite entries (a store marks position 0, which always starts a
    patch, with inf) are ignored; ``ValueError`` if none is finite.
    """
    rounded = boundary_entropies(entropies)
    finite = rounded[torch.isfinite(rounded)]
    if finite.numel() == 0:
        raise ValueError("no finite entropies to calibrate a threshold on")

    def tokens_per_patch(theta: float) -> float:
        starts = patch_start_mask(entropies, grid_width=grid_width, threshold=theta,
                                  max_patch_length=max_patch_length, row_break=row_break)
        return entropies.numel() / float(starts.sum())

    low, high = float(finite.min()) - 1.0, float(finite.max()) + 1.0
    for _ in range(iterations):
        theta = (low + high) / 2
        low, high = (theta, high) if tokens_per_patch(theta) < target else (low, theta)
    values = torch.unique(finite)
    # the last stored value <= high, compared in float32 as forced_starts compares
    cut = max(int(torch.searchsorted(values, torch.tensor(high, dtype=values.dtype), right=True)) - 1, 0)
    cut_value = float(values[cut])  # e*: θ below it splits more, θ at or above it merges more
    below = (float(values[cut - 1]) + cut_value) / 2 if cut > 0 else cut_value - 0.5
    above = (cut_value + float(values[cut + 1])) / 2 if cut + 1 < len(values) else cut_value + 0.5
    return min((below, above), key=lambda theta: abs(tokens_per_patch(theta) - target))


def next_patch_start(config: PatcherConfig, entropy: Tensor | None, position: int, run_length: Tensor,
                     grid_width: int) -> Tensor:
    """Does token ``position`` start a patch, for each image? :func:`patch_starts` one step at a time.

    ``entropy [B]`` is H_position (entropy and self_entropy modes; -inf asks which images the other rules
    alone start), ``run_length [B]`` the tokens already in each image's open patch. Decided before
    x_position is sampled: the rule never looks at x_position.
    """
    positions = torch.full_like(run_length, position)
    if config.mode == "token":
        return torch.ones_like(run_length, dtype=torch.bool)
    if config.mode in ("entropy", "self_entropy"):
        _check_cap(config.max_patch_length)
        forced = forced_starts(entropy, positions, grid_width=grid_width, threshold=config.threshold,
                               row_break=config.row_break)
        period = config.max_patch_length
    else:
        assert config.mode == "static", f"unknown patcher mode {config.mode!r}; valid: {', '.join(PATCH_MODES)}"
        forced = forced_starts(None, positions, grid_width=grid_width, row_break=config.row_break)
        period = _static_period(config.static_length, config.max_patch_length)
    return forced if period is None else forced | (run_length >= period)


def longest_patch(config: PatcherConfig, grid_width: int, num_tokens: int) -> int:
    """The most tokens one patch can hold under ``config``'s rules (the static-shape sampler pools this many)."""
    if config.mode == "token":
        return 1
    longest = min(filter(None, (config.max_patch_length, grid_width if config.row_break else num_tokens)))
    return min(longest, config.static_length) if config.mode == "static" else longest


def logits_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats, fp32) of the softmax of ``logits`` over the last dimension."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def patch_ids(mask: Tensor) -> Tensor:
    """``[B, N]`` index of each token's patch within its image (0-based)."""
    return mask.long().cumsum(dim=-1) - 1


def patch_stats(entropies: Tensor, *, grid_width: int, threshold: float, max_patch_length: int | None,
                row_break: bool = True) -> dict[str, float]:
    """Mean tokens per patch and patches per image for a batch of entropies (paper Table 6)."""
    mask = patch_start_mask(entropies, grid_width=grid_width, threshold=threshold,
                            max_patch_length=max_patch_length, row_break=row_break)
    patches = mask.sum().item()
    return {"tokens_per_patch": mask.numel() / patches, "patches_per_image": patches / mask.shape[0]}
