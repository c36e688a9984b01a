"""LlamaGen's GPT: the token-level baseline and, unconditional, DPAR's entropy model.

Parameter names and shapes are exactly those of LlamaGen's ``autoregressive/models/gpt.py``, so
a LlamaGen c2i checkpoint loads with ``model.load_state_dict(ckpt["model"], strict=True)`` and
gives LlamaGen's logits. The sequence is ``[class, x_1, ..., x_{N-1}]``; position t predicts x_{t+1}.

Two call forms, as in LlamaGen:

- full sequence: ``logits, loss = model(idx, cond_idx, targets=...)`` with ``idx = x[:, :-1]``;
  returns logits for all N image tokens (train and eval mode alike);
- KV-cached steps after ``setup_caches``: ``model(None, cond_idx, input_pos)`` fills the class
  position(s), then ``model(idx, None, input_pos)`` feeds one or more tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ModelArgs, RMSNorm, TransformerBlock, attach_kv_caches, class_embedder, init_weights
from .rope import grid_rope


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.n_layer = config.n_layer
        self.block_size = config.block_size
        self.model_type = config.model_type
        self.cls_token_num = config.cls_token_num
        self.cls_embedding = class_embedder(config)
        self.num_classes = self.cls_embedding.num_classes  # also the index of the null class
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(config, rate) for rate in rates)
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        init_weights(self, config.initializer_range)

    def sequence_rope(self, positions: Tensor) -> Tensor:
        """2D RoPE table for sequence positions (class positions get LlamaGen's all-zero rows)."""
        # Class positions get a negative index here and are zeroed below. No clamp(min=0): torch 2.13's
        # CPU inductor fails on a clamp followed by // and % ("vr must not be None"), so train.compile broke.
        grid_index = positions - self.cls_token_num
        width = self.config.grid_size
        table = grid_rope(grid_index // width, grid_index % width, self.config.head_dim, self.config.rope_base)
        return table.masked_fill((positions < self.cls_token_num)[..., None, None], 0.0)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype: torch.dtype,
                     static: bool | None = None) -> None:
        """KV caches for decoding; ``static``: see :class:`dpar.models.layers.KVCache` (default: not on a CPU)."""
        attach_kv_caches(self.layers, max_batch_size, max_seq_length, self.config, dtype,
                         self.tok_embeddings.weight.device, static)

    def clear_caches(self) -> None:
        attach_kv_caches(self.layers, 0, 0, self.config, torch.float32, self.tok_embeddings.weight.device)

    def forward(self, idx: Tensor | None, cond_idx: Tensor | None, input_pos: Tensor | None = None,
                targets: Tensor | None = None, valid: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        h = self.last_hidden(idx, cond_idx, input_pos)
        logits = self.output(self.norm(h)).float()
        if input_pos is None:
            logits = logits[:, self.cls_token_num - 1:].contiguous()

        loss = None
        if targets is not None:
            token_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
            if valid is None:
                loss = token_loss.mean()
            else:
                weight = valid[:, None].expand_as(targets).reshape(-1).to(token_loss.dtype)
                loss = (token_loss * weight).sum() / weight.sum().clamp(min=1)
        return logits, loss

    def last_hidden(self, idx: Tensor | None, cond_idx: Tensor | None, input_pos: Tensor | None = None) -> Tensor:
        """The last block's outputs ``[B, L, dim]`` (before the final norm): L = cls_token_num + N for a full
        sequence ``idx [B, N]``, else the positions ``input_pos`` of a KV-cached step."""
        if input_pos is None:  # full sequence: training or teacher-forced evaluation
            if idx is None:
                raise ValueError("a full forward needs idx (image tokens); KV-cached steps need input_pos")
            cond_idx = self.cls_embedding.labels_or_null(cond_idx, idx.shape[0], idx.device)
            cond = self.cls_embedding(cond_idx, train=self.training)[:, :self.cls_token_num]
            h = torch.cat([cond, self.tok_embeddings(idx)], dim=1)
            positions = torch.arange(h.shape[1], device=h.device)
        else:
            if cond_idx is not None:  # prefill: the class position(s)
                h = self.cls_embedding(cond_idx, train=self.training)[:, :self.cls_token_num]
            else:
                h = self.tok_embeddings(idx)
            positions = input_pos
        h = self.tok_dropout(h)
        rope = self.sequence_rope(positions)
        for layer in self.layers:
            h = layer(h, rope, input_pos)
        return h

    def pooled_features(self, idx: Tensor, cond_idx: Tensor) -> Tensor:
        """``[B, N]`` tokens -> ``[B, dim]``: the last block's outputs averaged over the token positions (the
        linear probe's image features, paper Table 7)."""
        return self.last_hidden(idx, cond_idx)[:, self.cls_token_num:].mean(dim=1)


GPT = Transformer


def _size(n_layer: int, n_head: int, dim: int):
    def build(**kwargs) -> Transformer:
        return Transformer(ModelArgs(n_layer=n_layer, n_head=n_head, dim=dim, **kwargs))
    return build


GPT_models = {
    "GPT-B": _size(12, 12, 768),     # 111M
    "GPT-L": _size(24, 16, 1024),    # 343M
    "GPT-XL": _size(36, 20, 1280),   # 775M
    "GPT-XXL": _size(48, 24, 1536),  # 1.4B
    "GPT-XXXL": _size(48, 40, 2560),  # 3.9B
    "GPT-1B": _size(22, 32, 2048),
    "GPT-3B": _size(24, 32, 3200),
    "GPT-7B": _size(32, 32, 4096),
    "GPT-tiny": _size(6, 2, 64),     # 0.3M + embeddings, head_dim 32: CPU tests and the embedded demo
    "GPT-small": _size(6, 4, 128),   # GPT-tiny at twice the width: the small-scale study's scale trend
}
