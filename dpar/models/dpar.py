"""DPAR: a token-level patch encoder, a global transformer over patches, a token-level patch decoder.

Shapes for a batch of B images of N tokens grouped into P patches in all (arXiv 2512.21867, section 3):

    tokens x [B, N] --embed--> e [B, N, d]
      PatchEncoder: causal self-attention over tokens (2D RoPE) -> h [B, N, d];
                    each patch = max-pool of its h, then cross-attends to its own tokens -> [P, d]
      global stream per image: [class, patch_1, ..., patch_{M-1}] packed over the batch -> [1, P, d]
                    LLaMA blocks with Dynamic RoPE, block-diagonal causal attention -> g [P, d]
      PatchDecoder: u_i = h_{i-1}; before each block u_i += Linear(RMSNorm(g_{p(i)-1})), causal self-attention
                    (2D RoPE)
      norm + head -> logits [B, N, vocab]; position i predicts x_i

Options (``DPARArgs``): encoder/decoder depth (paper Table 10), the pooling FFN on or off, the patch vector
injected into the decoder once or before every block (or the global output added as is), and the global RoPE
variant (Table 9).

With patch boundaries fixed, logits for x_i depend on x_<i only: h_{i-1} sees x_<i, and the global
output used by token i sees the class and the patches that end before token i's patch starts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import BACKENDS, PackedSeqs, attend
from .layers import (FeedForward, ModelArgs, RMSNorm, TransformerBlock, attach_kv_caches, class_embedder,
                     init_weights)
from .rope import ROPE_MODES, grid_rope, patch_rope

DECODER_INJECTIONS = ("once", "every_block", "residual")


@dataclass
class DPARArgs(ModelArgs):
    """LlamaGen's ``ModelArgs`` (``n_layer`` = global transformer layers) plus DPAR's own."""

    n_enc_layer: int = 1
    n_dec_layer: int = 3
    rope: str = "dynamic"  # Dynamic RoPE variant of the global transformer (paper Table 9)
    attn_backend: str = "auto"  # packed attention backend of the global transformer
    encoder_pooling_ffn: bool = False  # a SwiGLU FFN after each patch cross-attention (not in the paper's text)
    decoder_injection: str = "every_block"  # the patch vector enters the decoder before every block, once, or as is

    def __post_init__(self):  # what a user sets is checked by dpar.models.ModelConfig before it gets here
        super().__post_init__()
        assert self.n_enc_layer >= 1 and self.n_dec_layer >= 1, \
            f"DPAR needs n_enc_layer and n_dec_layer >= 1, got {self.n_enc_layer}, {self.n_dec_layer}"
        assert self.decoder_injection in DECODER_INJECTIONS, \
            f"decoder_injection must be one of {', '.join(DECODER_INJECTIONS)}, got {self.decoder_injection!r}"
        assert self.rope in ROPE_MODES, f"rope must be one of {', '.join(ROPE_MODES)}, got {self.rope!r}"
        assert self.attn_backend in ("auto",) + BACKENDS, \
            f"attn_backend must be auto or one of {', '.join(BACKENDS)}, got {self.attn_backend!r}"
        assert self.cls_token_num == 1, f"DPAR uses one class token, got cls_token_num={self.cls_token_num}"
        assert self.drop_path_rate == 0, f"DPAR has no stochastic depth, got drop_path_rate={self.drop_path_rate}"


def patch_lengths(mask: Tensor) -> Tensor:
    """Lengths of all patches of ``mask [B, N]`` (True where a patch starts), image after image, as one flat
    ``LongTensor [P]``."""
    starts = mask.reshape(-1).nonzero().squeeze(1)
    ends = torch.cat([starts[1:], starts.new_tensor([mask.numel()])])
    return ends - starts


@dataclass
class PatchLayout:
    """Everything DPAR needs to know about a batch's patches, computed once per batch.

    Patches are numbered image after image (flat index ``0 .. total-1``). Image b's global stream
    is ``[class, patch_1, ..., patch_{M_b - 1}]``, also M_b long, so stream position k holds the
    class (``stream_is_class``) or patch k-1, and its output predicts patch k.
    """

    token_patch: Tensor        # [B, N] flat index of each token's patch
    first_token: Tensor        # [P] flat token index (into B*N) of each patch's first token
    patch_length: Tensor       # [P] tokens in each patch
    patch_image: Tensor        # [P] image of each patch
    patch_row: Tensor          # [P] grid row of each patch's first token
    patch_start_col: Tensor    # [P] its grid column
    patch_end_col: Tensor      # [P] start_col + length - 1 (the end column when rows break patches)
    stream_is_class: Tensor    # [P] True at the first stream position of each image
    packed: PackedSeqs         # the global stream's sequence lengths (one per image)
    longest_patch: int         # tokens in the longest patch of the batch

    @classmethod
    def from_mask(cls, mask: Tensor, grid_width: int) -> PatchLayout:
        if mask.dim() != 2 or mask.dtype != torch.bool:
            raise ValueError(f"patch_start must be a bool tensor [B, N], got {mask.dtype} {list(mask.shape)}")
        if not bool(mask[:, 0].all()):
            raise ValueError("patch_start must be True at token 0 of every image")
        batch, num_tokens = mask.shape
        flat_start = mask.reshape(-1).nonzero().squeeze(1)
        lengths = patch_lengths(mask)
        local = flat_start % num_tokens
        per_image = mask.sum(dim=1)
        return cls(
            token_patch=mask.reshape(-1).long().cumsum(0).view(batch, num_tokens) - 1,
            first_token=flat_start,
            patch_length=lengths,
            patch_image=flat_start // num_tokens,
            patch_row=local // grid_width,
            patch_start_col=local % grid_width,
            patch_end_col=local % grid_width + lengths - 1,
            stream_is_class=local == 0,
            packed=PackedSeqs.from_seqlens(per_image.tolist(), device=mask.device),
            longest_patch=int(lengths.max()),
        )

    def to(self, device: torch.device | str) -> PatchLayout:
        moved = {name: getattr(self, name).to(device) for name in self.__dataclass_fields__
                 if isinstance(getattr(self, name), Tensor)}
        return PatchLayout(**moved, packed=self.packed.to(device), longest_patch=self.longest_patch)


class PatchCrossAttention(nn.Module):
    """Each patch (query) attends to its own tokens only (keys/values); no positions, as in BLT."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.wq = nn.Linear(config.dim, config.dim, bias=False)
        self.wkv = nn.Linear(config.dim, 2 * config.dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, patches: Tensor, tokens: Tensor, slots: Tensor, valid: Tensor) -> Tensor:
        """``patches [P, d]``, ``tokens [B*N, d]``; ``slots/valid [P, L]`` list each patch's tokens."""
        num_patches, width = slots.shape
        q = self.wq(patches).view(num_patches, 1, self.n_head, self.head_dim).transpose(1, 2)
        kv = self.wkv(tokens)[slots].view(num_patches, width, 2, self.n_head, self.head_dim)
        k, v = (t.transpose(1, 2) for t in kv.unbind(dim=2))
        out = attend(q, k, v, mask=valid[:, None, None, :])
        return self.resid_dropout(self.wo(out.reshape(num_patches, -1)))


class PatchPoolingBlock(nn.Module):
    """Cross-attention from patches to their tokens + residual (the paper's Eq. 5, BLT's local encoder), then,
    with ``encoder_pooling_ffn`` (an option, not in the paper), a SwiGLU FFN + residual."""

    def __init__(self, config: DPARArgs):
        super().__init__()
        self.query_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.token_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.cross_attention = PatchCrossAttention(config)
        if config.encoder_pooling_ffn:
            self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
            self.feed_forward = FeedForward(config)
        self.with_ffn = config.encoder_pooling_ffn

    def forward(self, patches: Tensor, tokens: Tensor, slots: Tensor, valid: Tensor) -> Tensor:
        patches = patches + self.cross_attention(self.query_norm(patches), self.token_norm(tokens), slots, valid)
        return patches + self.feed_forward(self.ffn_norm(patches)) if self.with_ffn else patches


class PatchEncoder(nn.Module):
    """Tokens -> token states h and one vector per patch (paper Eq. 4-5)."""

    def __init__(self, config: DPARArgs):
        super().__init__()
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_enc_layer))
        self.cross_layers = nn.ModuleList(PatchPoolingBlock(config) for _ in range(config.n_enc_layer))

    def forward(self, x: Tensor, rope: Tensor, layout: PatchLayout) -> tuple[Tensor, Tensor]:
        states = []
        for block in self.layers:
            x = block(x, rope)
            states.append(x.reshape(-1, x.shape[-1]))
        return x, self.pool(states, layout.first_token, layout.patch_length, layout.longest_patch)

    def pool(self, states: list[Tensor], first_token: Tensor, length: Tensor, longest: int) -> Tensor:
        """Patch vectors ``[P, d]`` from the token states after each block (``[B*N, d]`` each, flat).

        Patch p covers flat tokens ``first_token[p] .. first_token[p] + length[p] - 1``: max-pooled from
        the first block's states, then refined by cross-attention to each block's states.
        """
        offsets = torch.arange(longest, device=first_token.device)
        valid = offsets < length[:, None]
        slots = (first_token[:, None] + offsets).clamp(max=states[0].shape[0] - 1)
        patches = states[0][slots].masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        for tokens, cross in zip(states, self.cross_layers):
            patches = cross(patches, tokens, slots, valid)
        return patches


class PatchInjection(nn.Module):
    """Linear(RMSNorm(g)): a global output as a later decoder block adds it to its token states."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.patch_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.patch_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, g: Tensor) -> Tensor:
        return self.patch_proj(self.patch_norm(g))


class PatchDecoder(nn.Module):
    """Global outputs -> per-token states: u_i = h_{i-1}, plus Linear(RMSNorm(g_{p(i)-1})) before causal blocks.

    ``decoder_injection="every_block"`` (the paper's section 3.2.4) adds the patch vector before every block,
    each with its own norm + linear; ``"once"`` only before the first block; ``"residual"`` adds
    the global output as it is (no norm, no linear) before the first block, so the global transformer's residual
    stream runs on into the decoder as a GPT's runs on into its next block.
    """

    def __init__(self, config: DPARArgs):
        super().__init__()
        self.start = nn.Parameter(torch.zeros(config.dim))  # h_0, stands before the first token
        self.as_is = config.decoder_injection == "residual"
        if not self.as_is:
            self.patch_norm = RMSNorm(config.dim, eps=config.norm_eps)  # the first block's injection
            self.patch_proj = nn.Linear(config.dim, config.dim, bias=False)
        later = config.n_dec_layer - 1 if config.decoder_injection == "every_block" else 0
        self.block_injections = nn.ModuleList(PatchInjection(config) for _ in range(later))
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_dec_layer))

    def injections(self, g: Tensor) -> list[Tensor | None]:
        """What each block adds to its input (``None``: nothing), from the global outputs ``g [..., d]``."""
        first = g if self.as_is else self.patch_proj(self.patch_norm(g))
        return [first] + [inject(g) for inject in self.block_injections] + \
            [None] * (len(self.layers) - 1 - len(self.block_injections))

    def forward(self, h: Tensor, g: Tensor, rope: Tensor, layout: PatchLayout) -> Tensor:
        u = torch.cat([self.start.expand(h.shape[0], 1, -1).to(h.dtype), h[:, :-1]], dim=1)
        for layer, added in zip(self.layers, self.injections(g)):
            u = layer(u if added is None else u + added[layout.token_patch], rope)
        return u


class DPAR(nn.Module):
    def __init__(self, config: DPARArgs):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.block_size = config.block_size
        self.model_type = config.model_type
        self.cls_embedding = class_embedder(config)
        self.num_classes = self.cls_embedding.num_classes  # also the index of the null class
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.encoder = PatchEncoder(config)
        self.global_layers = nn.ModuleList(TransformerBlock(config, backend=config.attn_backend)
                                           for _ in range(config.n_layer))
        self.decoder = PatchDecoder(config)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        init_weights(self, config.initializer_range)
        nn.init.normal_(self.decoder.start, std=config.initializer_range)

    def token_rope(self, num_tokens: int, device: torch.device) -> Tensor:
        positions = torch.arange(num_tokens, device=device)
        width = self.config.grid_size
        return grid_rope(positions // width, positions % width, self.config.head_dim, self.config.rope_base)

    def global_rope(self, layout: PatchLayout) -> Tensor:
        """Dynamic RoPE of each stream position's input patch (patch k-1); zero rows for the class."""
        table = patch_rope(layout.patch_row, layout.patch_start_col, layout.patch_end_col,
                           self.config.head_dim, self.config.rope_base, self.config.rope)
        return table.roll(1, dims=0).masked_fill(layout.stream_is_class[:, None, None], 0.0)

    def forward(self, idx: Tensor, cond_idx: Tensor | None, patch_start: Tensor | None,
                targets: Tensor | None = None, layout: PatchLayout | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx [B, N]`` tokens, ``patch_start [B, N]`` bool -> logits ``[B, N, vocab]`` (position i predicts x_i).

        ``layout`` may be passed precomputed (e.g. by the data loader) to skip building it from the mask.
        """
        if layout is None:
            layout = PatchLayout.from_mask(patch_start, self.config.grid_size)
        h, g, token_rope = self._encode_and_global(idx, cond_idx, layout)
        u = self.decoder(h, g, token_rope, layout)
        logits = self.output(self.norm(u)).float()
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def _encode_and_global(self, idx: Tensor, cond_idx: Tensor | None,
                           layout: PatchLayout) -> tuple[Tensor, Tensor, Tensor]:
        """(encoder token states ``[B, N, d]``, global outputs ``[S, d]`` over the packed stream, token RoPE)."""
        batch, num_tokens = idx.shape
        if num_tokens > self.block_size:
            raise ValueError(f"idx has {num_tokens} tokens, the model was built for block_size={self.block_size}")
        cond_idx = self.cls_embedding.labels_or_null(cond_idx, batch, idx.device)
        token_rope = self.token_rope(num_tokens, idx.device)
        h, patches = self.encoder(self.tok_dropout(self.tok_embeddings(idx)), token_rope, layout)
        cls = self.tok_dropout(self.cls_embedding(cond_idx, train=self.training)[:, 0])
        stream = torch.where(layout.stream_is_class[:, None], cls[layout.patch_image], patches.roll(1, dims=0))
        g, global_rope = stream[None], self.global_rope(layout)
        for layer in self.global_layers:
            g = layer(g, global_rope, packed=layout.packed)
        return h, g[0], token_rope

    def pooled_features(self, idx: Tensor, cond_idx: Tensor, patch_start: Tensor) -> Tensor:
        """``[B, N]`` tokens and boundaries -> ``[B, dim]``: the last global layer's outputs averaged over each
        image's patch positions (the class position left out; the linear probe's features, paper Table 7)."""
        layout = PatchLayout.from_mask(patch_start, self.config.grid_size)
        _, g, _ = self._encode_and_global(idx, cond_idx, layout)
        keep = (~layout.stream_is_class).to(g.dtype)
        sums = torch.zeros(len(idx), g.shape[1], device=g.device, dtype=g.dtype)
        sums.index_add_(0, layout.patch_image, g * keep[:, None])
        counts = torch.zeros(len(idx), device=g.device, dtype=g.dtype).index_add_(0, layout.patch_image, keep)
        return sums / counts.clamp(min=1)[:, None]

    # -- one token at a time, with KV caches (the steps of dpar/sampling.py) ---------------------------------------

    def setup_caches(self, max_batch_size: int, dtype: torch.dtype, decoder_rows: int | None = None,
                     static: bool | None = None) -> None:
        """KV caches for the encoder, global transformer and decoder (rows: images, or 2x with CFG);
        ``decoder_rows`` (default ``max_batch_size``): 2x for two-hypothesis decoder steps; ``static``: see
        :class:`dpar.models.layers.KVCache` (default: not on a CPU)."""
        device = self.tok_embeddings.weight.device
        for blocks, rows in ((self.encoder.layers, max_batch_size), (self.global_layers, max_batch_size),
                             (self.decoder.layers, decoder_rows or max_batch_size)):
            attach_kv_caches(blocks, rows, self.block_size, self.config, dtype, device, static)

    def clear_caches(self) -> None:
        for blocks in (self.encoder.layers, self.global_layers, self.decoder.layers):
            attach_kv_caches(blocks, 0, 0, self.config, torch.float32, self.tok_embeddings.weight.device)

    def encode_step(self, tokens: Tensor, position: int) -> list[Tensor]:
        """Token ``x_position`` of each image ``[B]`` -> its state after each encoder block (``[B, d]`` each).

        The last state is h_position, which the decoder adds to the input for the next token.
        """
        x = self.tok_dropout(self.tok_embeddings(tokens))[:, None]
        rope = self.token_rope(position + 1, tokens.device)[position:]
        at = torch.tensor([position], device=tokens.device)
        states = []
        for block in self.encoder.layers:
            x = block(x, rope, at)
            states.append(x[:, 0])
        return states

    def pool_patches(self, states: list[Tensor], images: Tensor, first: Tensor, length: Tensor,
                     longest: int) -> Tensor:
        """The patch vectors ``[n, d]`` of patches that close while sampling: image ``images[k]``'s tokens
        ``first[k] .. first[k] + length[k] - 1`` (``[n]`` each), pooled from ``states`` (each encoder block's
        token states kept so far, ``[B, N, d]`` each) over ``longest`` >= ``length.max()`` slots."""
        batch, num_tokens = states[0].shape[:2]
        # only the closing patches' slots, gathered, reach the pooling's projections (not all B*N tokens)
        slots = ((images * num_tokens + first)[:, None] + torch.arange(longest, device=images.device)).flatten()
        gathered = [layer_states.reshape(batch * num_tokens, -1)[slots.clamp(max=batch * num_tokens - 1)]
                    for layer_states in states]
        return self.encoder.pool(gathered, torch.arange(len(images), device=images.device) * longest, length, longest)

    def class_stream_input(self, labels: Tensor) -> Tensor:
        """The global stream's first input for each row: its class embedding ``[R, d]``."""
        return self.tok_dropout(self.cls_embedding(labels, train=False)[:, 0])

    def global_step(self, inputs: Tensor, patch_row: Tensor, start_col: Tensor, end_col: Tensor,
                    is_class: Tensor, positions: Tensor, rows: Tensor) -> Tensor:
        """Advance cache ``rows`` of the global stream by one input ``[R, d]`` each, at stream ``positions [R]``.

        An input is a class embedding (``is_class``) or the patch that just closed, lying in grid row
        ``patch_row`` over columns ``start_col .. end_col`` (Dynamic RoPE); returns the outputs ``[R, d]``.
        """
        rope = patch_rope(patch_row, start_col, end_col, self.config.head_dim, self.config.rope_base,
                          self.config.rope).masked_fill(is_class[:, None, None], 0.0)[:, None]
        g = inputs[:, None]
        for layer in self.global_layers:
            g = layer(g, rope, positions[:, None], cache_rows=rows)
        return g[:, 0]

    def decode_step(self, previous: Tensor | None, g: Tensor, position: int) -> Tensor:
        """Logits ``[R, vocab]`` for token ``x_position`` from h_{position-1} (``None`` at position 0)
        and the global output ``g [R, d]`` of the stream position its patch is predicted from."""
        u = (self.decoder.start.expand(g.shape[0], -1).to(g.dtype) if previous is None else previous)[:, None]
        rope = self.token_rope(position + 1, g.device)[position:]
        at = torch.tensor([position], device=g.device)
        for layer, added in zip(self.decoder.layers, self.decoder.injections(g)):
            u = layer(u if added is None else u + added[:, None], rope, at)
        return self.output(self.norm(u[:, 0])).float()


    def keep_decoder_hypothesis(self, restart: Tensor, position: int) -> None:
        """After a :meth:`decode_step` over two hypotheses, rows ``[no new patch; new patch]`` (``2R``), write
        the chosen one's cache entry at ``position`` (``restart [R]``: the new patch) into both halves, so
        the next step's two hypotheses share the same past."""
        for layer in self.decoder.layers:
            cache = layer.attention.kv_cache
            for entries in (cache.k_cache[:, :, position], cache.v_cache[:, :, position]):
                unchanged, restarted = entries.chunk(2)
                chosen = torch.where(restart[:, None, None], restarted, unchanged)
                entries.copy_(torch.cat([chosen, chosen]))


def _size(n_enc_layer: int, n_layer: int, n_dec_layer: int, dim: int, n_head: int):
    """A size preset; ``n_enc_layer`` / ``n_dec_layer`` passed to the builder override its own (Table 10)."""
    def build(**kwargs) -> DPAR:
        kwargs = {"n_enc_layer": n_enc_layer, "n_dec_layer": n_dec_layer, **kwargs}
        return DPAR(DPARArgs(n_layer=n_layer, dim=dim, n_head=n_head, **kwargs))
    return build


# Paper Table 1: encoder / global / decoder layers, hidden size, heads.
DPAR_models = {
    "DGPT-B": _size(1, 8, 3, 768, 12),     # 120M
    "DGPT-L": _size(1, 19, 4, 1024, 16),   # 352M
    "DGPT-XL": _size(1, 30, 5, 1280, 20),  # 789M
    "DGPT-XXL": _size(1, 41, 6, 1536, 24),  # 1.4B
    "DGPT-tiny": _size(1, 3, 2, 64, 2),     # as deep as GPT-tiny (head_dim 32): CPU tests and the embedded demo
    "DGPT-small": _size(1, 3, 2, 128, 4),   # DGPT-tiny at twice the width: the small-scale study's scale trend
}
DPAR_models.update({name.replace("DGPT", "DPAR"): build for name, build in list(DPAR_models.items())})
