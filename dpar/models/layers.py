"""LLaMA building blocks shared by the GPT baseline and DPAR, with LlamaGen's parameter names.

``RMSNorm``, ``FeedForward`` (SwiGLU), ``Attention`` (fused ``wqkv``, optional KV cache) and
``TransformerBlock`` keep the attribute names of LlamaGen's ``autoregressive/models/gpt.py`` so
that checkpoints load with ``strict=True``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import PackedSeqs, attend
from .rope import apply_rotary

MODEL_TYPES = ("c2i", "uncond")


@dataclass
class ModelArgs:
    """LlamaGen's ``ModelArgs`` for class-conditional (``c2i``) and unconditional (``uncond``) models."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02

    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0

    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"

    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # image tokens per sample: grid_size ** 2

    def __post_init__(self):  # what a user sets is checked by dpar.models.ModelConfig before it gets here
        assert self.model_type in MODEL_TYPES, \
            f"model_type must be one of {', '.join(MODEL_TYPES)}, got {self.model_type!r}"
        assert self.dim % self.n_head == 0, f"dim {self.dim} is not divisible by n_head {self.n_head}"
        assert self.grid_size ** 2 == self.block_size, f"block_size must be a square token grid, got {self.block_size}"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def grid_size(self) -> int:
        return int(round(self.block_size ** 0.5))


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU with LlamaGen's hidden size: 2/3 of 4*dim, rounded up to ``multiple_of``."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        hidden = int(2 * 4 * config.dim / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Key/value cache ``[B, H_kv, max_len, D]``; not part of the state dict. ``static``: every query reads the
    whole cache under a mask (fixed shapes, for CUDA graphs); else each row reads only its filled prefix."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_head: int, head_dim: int,
                 dtype: torch.dtype, static: bool = False):
        super().__init__()
        self.static = static
        shape = (max_batch_size, n_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, rows: Tensor | None = None) -> Tensor:
        """Write ``k, v [B, H_kv, S, D]`` at ``input_pos`` (``[S]`` shared, or ``[B, S]`` per row), then return
        the attention ``[B, H, S, D]`` of ``q [B, H, S, D]`` over the entries each query may see: its own
        position and the earlier ones of its row.

        ``rows`` names the cache rows the B inputs belong to (default: the first B), so a step can advance
        only some sequences (DPAR's global stream, for the images at a patch boundary). A ``static`` cache
        has every query read the whole cache under a mask: the fixed shapes CUDA graphs need, with no
        position read on the host. Otherwise (reading positions syncs a GPU: meant for the CPU) each row
        reads only its filled prefix, all rows at once when they share positions and row by row when not:
        no cache row is gathered, and no row's result depends on another row's length, so an image does not
        depend on its batch. On a CPU this is faster than reading the whole cache under a mask, and than
        gathering the rows a step advances (benchmarks/results/cpu-2026-12-03-sampling.md).
        """
        batch, groups = k.shape[0], q.shape[1] // k.shape[1]
        shared = rows is None and input_pos.dim() == 1  # all rows at the same positions
        positions = input_pos.expand(batch, -1) if input_pos.dim() == 1 else input_pos
        if shared:
            self.k_cache[:batch, :, input_pos] = k
            self.v_cache[:batch, :, input_pos] = v
        else:
            index = (torch.arange(batch, device=k.device) if rows is None else rows)[:, None]
            self.k_cache[index, :, positions] = k.transpose(1, 2)
            self.v_cache[index, :, positions] = v.transpose(1, 2)

        def attend_over(queries: Tensor, cached: slice | Tensor, seen_by: Tensor, filled: int, masked: bool) -> Tensor:
            """``queries`` over cache rows ``cached`` (a slice, or an index), slots ``0 .. filled-1``; with
            ``masked``, each query only up to its position in ``seen_by``."""
            keys, values = (repeat_kv((cache[cached] if isinstance(cached, slice) else cache.index_select(0, cached))
                                      [:, :, :filled], groups) for cache in (self.k_cache, self.v_cache))
            mask = (torch.arange(filled, device=q.device) <= seen_by[..., None]).unsqueeze(-3) if masked else None
            return attend(queries, keys, values, mask=mask)

        if self.static:
            return attend_over(q, slice(0, batch) if rows is None else rows, input_pos, self.k_cache.shape[2], True)
        if shared:
            return attend_over(q, slice(0, batch), input_pos, int(input_pos.max()) + 1, len(input_pos) > 1)
        cache_rows = range(batch) if rows is None else rows.tolist()
        return torch.cat([attend_over(q[j:j + 1], slice(row, row + 1), positions[j], int(positions[j].max()) + 1,
                                      positions.shape[1] > 1) for j, row in enumerate(cache_rows)])


def repeat_kv(t: Tensor, groups: int) -> Tensor:
    """Grouped-query attention: each of ``t [B, H_kv, L, D]``'s heads repeated for its ``groups`` query heads."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def attach_kv_caches(blocks, max_batch_size: int, max_seq_length: int, config: ModelArgs,
                     dtype: torch.dtype, device: torch.device, static: bool | None = None) -> None:
    """Give each block's attention a KV cache (``None`` for ``max_batch_size=0`` removes them); ``static``
    (:class:`KVCache`) defaults to True except on the CPU."""
    n_kv_head = config.n_kv_head or config.n_head
    static = torch.device(device).type != "cpu" if static is None else static
    for block in blocks:
        block.attention.kv_cache = None if max_batch_size == 0 else KVCache(
            max_batch_size, find_multiple(max_seq_length, 8), n_kv_head, config.head_dim, dtype, static).to(device)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs, backend: str = "auto"):
        super().__init__()
        self.dim = config.dim
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_dim = config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.wqkv = nn.Linear(config.dim, config.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.backend = backend

    def forward(self, x: Tensor, rope: Tensor | None, input_pos: Tensor | None = None,
                packed: PackedSeqs | None = None, cache_rows: Tensor | None = None) -> Tensor:
        bsz, seqlen, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_head, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))

        if input_pos is not None and self.kv_cache is not None:  # decoding: the cache says what each query sees
            out = self.kv_cache.attend(q, k, v, input_pos, cache_rows)
        else:
            groups = self.n_head // self.n_kv_head
            out = attend(q, repeat_kv(k, groups), repeat_kv(v, groups), causal=True, packed=packed,
                         backend=self.backend, dropout_p=self.attn_dropout_p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.dim)
        return self.resid_dropout(self.wo(out))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability ``p``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, drop_path: float = 0.0, backend: str = "auto"):
        super().__init__()
        self.attention = Attention(config, backend)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, rope: Tensor | None, input_pos: Tensor | None = None,
                packed: PackedSeqs | None = None, cache_rows: Tensor | None = None) -> Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, input_pos, packed, cache_rows))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class embeddings with one extra "null" class for classifier-free guidance (index ``num_classes``).

    Unconditional models have ``num_classes = 0``: the null class is their learned start token.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, with_null: bool):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    @property
    def has_null(self) -> bool:
        """Whether the table has the null class (c2i models trained with class dropout; every uncond model)."""
        return self.embedding_table.num_embeddings > self.num_classes

    def null_labels(self, batch: int, device: torch.device | str | None = None) -> Tensor:
        """The null class: CFG's unconditional half, or an unconditional model's start token."""
        return torch.full((batch,), self.num_classes, dtype=torch.long, device=device)

    def labels_or_null(self, labels: Tensor | None, batch: int, device: torch.device) -> Tensor:
        """``labels``, or the null class for an unconditional model called without them."""
        if labels is not None:
            return labels
        if self.num_classes > 0:
            raise ValueError("a class-conditional model needs cond_idx")
        return self.null_labels(batch, device)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        """``[B]`` labels -> ``[B, 1, dim]``; in training, labels become null with ``dropout_prob``."""
        if force_drop_ids is not None:
            labels = torch.where(force_drop_ids == 1, self.num_classes, labels)
        elif train and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels).unsqueeze(1)


def class_embedder(config: ModelArgs) -> LabelEmbedder:
    """LlamaGen's table size for c2i (a null row only when class dropout is on); one start row for uncond."""
    if config.model_type == "uncond":
        return LabelEmbedder(0, config.dim, 0.0, with_null=True)
    return LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob,
                         with_null=config.class_dropout_prob > 0)


def init_weights(module: nn.Module, std: float) -> None:
    """LlamaGen's initialisation: N(0, std) for linear and embedding weights, zero output head."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
    nn.init.zeros_(module.output.weight)
