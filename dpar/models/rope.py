"""Rotary position embeddings: LlamaGen's 2D RoPE for tokens and Dynamic RoPE for patches.

A rotation table has shape ``[..., head_dim // 2, 2]`` (cos, sin per rotary pair) and rotates
interleaved pairs ``(x[2k], x[2k+1])`` exactly as LlamaGen does, so LlamaGen checkpoints give
LlamaGen's logits. Tables are built from integer coordinates on the fly (always float32), which
keeps them correct on any device and dtype and for any patch geometry.

An axis with ``n`` rotary pairs uses LlamaGen's 2D frequencies ``base ** (-k / n)``, ``k = 0 .. n-1``; a
``shift`` of one half moves them to ``base ** (-(k + 1/2) / n)``, the frequencies that lie between
(``dynamic_complementary``). Class positions get an all-zero table, as in LlamaGen's
``precompute_freqs_cis_2d`` (which zeroes their queries and keys, not an identity rotation).
"""
from __future__ import annotations

import torch
from torch import Tensor

ROPE_MODES = ("dynamic", "dynamic_complementary", "dynamic_no_redundancy", "2d")


def axis_angles(positions: Tensor, n_pairs: int, base: float, shift: float = 0.0) -> Tensor:
    """Rotation angles ``[..., n_pairs]`` that encode one integer coordinate, at frequencies
    ``base ** (-(k + shift) / n_pairs)``."""
    exponents = (torch.arange(n_pairs, device=positions.device, dtype=torch.float32) + shift) / n_pairs
    freqs = 1.0 / (base ** exponents)
    return positions.to(torch.float32)[..., None] * freqs


def rope_table(axes: list[tuple], base: float) -> Tensor:
    """Concatenate per-axis angles (``(coordinates, n_pairs)`` or ``(coordinates, n_pairs, shift)``, in head
    order) into a cos/sin table."""
    angles = torch.cat([axis_angles(pos, n, base, *shift) for pos, n, *shift in axes], dim=-1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def grid_rope(rows: Tensor, cols: Tensor, head_dim: int, base: float) -> Tensor:
    """LlamaGen 2D RoPE: the first half of the pairs rotate by row, the second half by column."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    return rope_table([(rows, quarter), (cols, quarter)], base)


def patch_rope(rows: Tensor, start_cols: Tensor, end_cols: Tensor, head_dim: int, base: float,
               mode: str = "dynamic") -> Tensor:
    """Dynamic RoPE (paper Eq. 9) for patches lying in row ``rows`` over columns ``start..end``.

    - ``dynamic``: first half of the head is a 2D RoPE of (row, start), second half of (row, end), each
      at half the 2D RoPE's frequencies (``base ** (-k / (head_dim/8))``): the row is encoded twice with the
      same coarse frequencies (one reading of the paper's stripped Eq. 9: "repeating the start and end
      positional encodings", its best variant in Table 9).
    - ``dynamic_complementary``: the same layout, but the second half uses the frequencies between the
      first half's (``base ** (-(k + 1/2) / (head_dim/8))``). Together the halves hold exactly the 2D RoPE
      frequency set, so a one-token patch (start = end) is encoded as finely as a token by the GPT's 2D RoPE,
      and start != end adds the span (the reading that keeps 2D RoPE's resolution).
    - ``dynamic_no_redundancy``: head_dim/4 pairs for the row, head_dim/8 for start, head_dim/8 for end.
    - ``2d``: plain 2D RoPE of the patch's first token.
    """
    if head_dim % 8:
        raise ValueError(f"Dynamic RoPE needs head_dim divisible by 8, got {head_dim}")
    eighth, quarter = head_dim // 8, head_dim // 4
    if mode == "dynamic":
        axes = [(rows, eighth), (start_cols, eighth), (rows, eighth), (end_cols, eighth)]
    elif mode == "dynamic_complementary":
        axes = [(rows, eighth), (start_cols, eighth), (rows, eighth, 0.5), (end_cols, eighth, 0.5)]
    elif mode == "dynamic_no_redundancy":
        axes = [(rows, quarter), (start_cols, eighth), (end_cols, eighth)]
    elif mode == "2d":
        axes = [(rows, quarter), (start_cols, quarter)]
    else:
        raise ValueError(f"unknown rope mode {mode!r}; valid: {', '.join(ROPE_MODES)}")
    return rope_table(axes, base)


def apply_rotary(x: Tensor, table: Tensor) -> Tensor:
    """Rotate ``x [B, L, H, D]`` by ``table [L | B, L, D/2, 2]`` in float32, return x's dtype."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    table = table.unsqueeze(-3)  # broadcast over heads
    cos, sin = table[..., 0], table[..., 1]
    rotated = torch.stack([
        pairs[..., 0] * cos - pairs[..., 1] * sin,
        pairs[..., 1] * cos + pairs[..., 0] * sin,
    ], dim=-1)
    return rotated.flatten(-2).type_as(x)
