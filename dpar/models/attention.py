"""One entry point for attention: dense batches, masked attention and packed variable-length streams.

DPAR's global transformer runs on one packed stream holding every image's patches back to back
(no padding), so its attention is block-diagonal causal. Backends for that case, tried in order:

- ``xformers``: ``memory_efficient_attention`` with ``BlockDiagonalCausalMask`` (CUDA, optional install);
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA flash kernels, fp16/bf16);
- ``flex``: FlexAttention with a document mask (compiled on CUDA; on CPU only when asked for,
  since eager FlexAttention materialises the scores like the reference does);
- ``padded``: each sequence in its own row of a zero-padded batch, causal SDPA: O(n L_max^2) work instead
  of the reference's O((sum of L)^2), so the CPU default;
- ``sdpa``: scaled_dot_product_attention with an explicit block-diagonal causal mask, the reference,
  on any device.

Tensors use SDPA's layout ``[B, H, L, D]``; a packed stream has ``B == 1``.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("xformers", "varlen", "flex", "padded", "sdpa")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class PackedSeqs:
    """Lengths of the sequences laid back to back in a packed stream.

    Backend masks are built once per batch and cached here, so every layer reuses them and the
    host list of lengths (needed by xformers) never costs a device sync in the hot loop.
    """

    cu_seqlens: Tensor  # int32 [n + 1], offsets of each sequence in the stream
    max_seqlen: int
    seqlens: tuple[int, ...]
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_seqlens(cls, seqlens: Sequence[int], device: torch.device | str | None = None) -> PackedSeqs:
        seqlens = tuple(int(n) for n in seqlens)
        if not seqlens or min(seqlens) < 1:
            raise ValueError(f"packed sequences need at least one element each, got lengths {seqlens}")
        cu = torch.tensor((0, *itertools.accumulate(seqlens)), dtype=torch.int32, device=device)
        return cls(cu_seqlens=cu, max_seqlen=max(seqlens), seqlens=seqlens)

    @property
    def total(self) -> int:
        return sum(self.seqlens)

    def to(self, device: torch.device | str) -> PackedSeqs:
        return PackedSeqs(self.cu_seqlens.to(device), self.max_seqlen, self.seqlens)

    def sequence_ids(self) -> Tensor:
        """``[total]`` index of the sequence each stream position belongs to."""
        lengths = torch.tensor(self.seqlens, device=self.cu_seqlens.device)
        return torch.repeat_interleave(torch.arange(len(self.seqlens), device=lengths.device), lengths,
                                       output_size=self.total)

    def cached(self, key: str, build):
        if key not in self._masks:
            self._masks[key] = build()
        return self._masks[key]


def block_causal_mask(packed: PackedSeqs) -> Tensor:
    """Explicit ``[T, T]`` boolean mask: attend to earlier positions of the same sequence only."""
    ids = packed.sequence_ids()
    pos = torch.arange(ids.numel(), device=ids.device)
    return (ids[:, None] == ids[None, :]) & (pos[None, :] <= pos[:, None])


@functools.cache
def _has_xformers() -> bool:
    """xformers is installed and imports; a build that does not import (e.g. one made for another torch)
    is skipped with a warning instead of breaking every packed-attention call."""
    if importlib.util.find_spec("xformers") is None:
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:
        warnings.warn(f"xformers is installed but does not import ({type(error).__name__}: {error}); packed "
                      "attention uses the next backend")
        return False
    return True


def _has_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def available_backends(device: torch.device | str, dtype: torch.dtype, *, dropout: bool = False,
                       grad: bool = False) -> list[str]:
    """Packed backends usable for tensors on ``device`` of ``dtype``, fastest first.

    ``dropout``: attention dropout is needed; ``grad``: a backward pass is needed (FlexAttention has
    none on CPU).
    """
    device_type = torch.device(device).type
    names = []
    if device_type == "cuda" and _has_xformers():
        names.append("xformers")
    if device_type == "cuda" and not dropout and dtype in _HALF_DTYPES and _has_varlen():
        names.append("varlen")
    if not dropout and (device_type == "cuda" or (device_type == "cpu" and not grad)):
        names.append("flex")
    names += ["padded", "sdpa"]
    return names


def default_backend(device: torch.device | str, dtype: torch.dtype, *, dropout: bool = False,
                    grad: bool = False) -> str:
    """The backend ``auto`` resolves to: the first available one, but not eager FlexAttention on CPU."""
    names = available_backends(device, dtype, dropout=dropout, grad=grad)
    if torch.device(device).type != "cuda":
        names = [n for n in names if n != "flex"]
    return names[0]


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, mask: Tensor | None = None,
           packed: PackedSeqs | None = None, dropout_p: float = 0.0, backend: str = "auto") -> Tensor:
    """Attention over ``[B, H, L, D]`` tensors.

    Without ``packed`` this is SDPA (``causal`` or an explicit boolean ``mask``, True = attend).
    With ``packed``, q/k/v hold one stream (``B == 1``) and attention is causal within each of
    its sequences, on ``backend`` (``auto`` picks the fastest available one).
    """
    if packed is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              is_causal=causal and mask is None)
    if mask is not None or not causal:
        raise ValueError("packed attention is always causal within sequences and takes no extra mask")
    if q.shape[0] != 1 or q.shape[2] != packed.total:
        raise ValueError(f"packed stream must have shape [1, H, {packed.total}, D], got {list(q.shape)}")
    needs = dict(dropout=dropout_p > 0, grad=any(t.requires_grad for t in (q, k, v)))
    if backend == "auto":
        backend = default_backend(q.device, q.dtype, **needs)
    elif backend not in available_backends(q.device, q.dtype, **needs):
        raise ValueError(f"attention backend {backend!r} is not available for {q.device.type}/{q.dtype}"
                         f"{' with dropout' if needs['dropout'] else ''}{' with gradients' if needs['grad'] else ''}; "
                         f"available: {', '.join(available_backends(q.device, q.dtype, **needs))}")
    return _PACKED[backend](q, k, v, packed, dropout_p)


def _packed_sdpa(q, k, v, packed, dropout_p):
    mask = packed.cached("sdpa", lambda: block_causal_mask(packed))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _packed_padded(q, k, v, packed, dropout_p):
    """Sequence i in row i of a ``[n, H, L_max, D]`` batch padded with zeros after its end; causal SDPA hides
    the padding from every real query (it lies after all of them), and only real rows are gathered back."""
    heads, dim = q.shape[1], q.shape[3]
    n, longest = len(packed.seqlens), packed.max_seqlen
    def build() -> Tensor:  # stream position -> row * L_max + position within its sequence
        ids = packed.sequence_ids().to(q.device)
        return torch.arange(packed.total, device=q.device) - packed.cu_seqlens.to(q.device).long()[ids] + ids * longest

    slots = packed.cached("padded", build)

    def pad(t: Tensor) -> Tensor:
        rows = t.new_zeros(n * longest, heads, dim).index_put((slots,), t[0].transpose(0, 1))
        return rows.view(n, longest, heads, dim).transpose(1, 2)

    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True, dropout_p=dropout_p)
    return out.transpose(1, 2).reshape(n * longest, heads, dim)[slots].transpose(0, 1)[None]


def _packed_flex(q, k, v, packed, dropout_p):
    from torch.nn.attention.flex_attention import create_block_mask

    def build():
        ids = packed.sequence_ids()

        def same_sequence_causal(b, h, q_idx, kv_idx):
            return (ids[q_idx] == ids[kv_idx]) & (kv_idx <= q_idx)

        return create_block_mask(same_sequence_causal, None, None, packed.total, packed.total,
                                 device=q.device)

    return _run_flex(q, k, v, packed.cached("flex", build))


_compiled_flex = None


def _run_flex(q, k, v, block_mask):
    """Compiled FlexAttention on CUDA (the fused kernel); eager elsewhere, where compiling gains nothing."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        return _compiled_flex(q, k, v, block_mask=block_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask)


def _packed_varlen(q, k, v, packed, dropout_p):
    from torch.nn.attention.varlen import varlen_attn
    cu = packed.cu_seqlens.to(q.device)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # [T, H, D]
    out = varlen_attn(q, k, v, cu, cu, packed.max_seqlen, packed.max_seqlen, window_size=(-1, 0))
    return out.transpose(0, 1)[None]


def _packed_xformers(q, k, v, packed, dropout_p):
    from xformers.ops import fmha, memory_efficient_attention
    bias = packed.cached("xformers", lambda: fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(
        list(packed.seqlens)))
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [1, T, H, D]
    return memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout_p).transpose(1, 2)


_PACKED = {"xformers": _packed_xformers, "varlen": _packed_varlen, "flex": _packed_flex, "padded": _packed_padded,
           "sdpa": _packed_sdpa}
