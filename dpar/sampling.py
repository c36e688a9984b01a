"""Batched, KV-cached generation for DPAR and the token-level GPT baseline (arXiv 2512.21867, section 3).

:func:`generate` runs ``logits = steps(i)`` ([R, vocab] for x_i; R = B, or 2B with guidance), samples x_i from
per-image uniforms (an image is the same in any batch, on any rank), then ``steps.advance(x_i, i)``. The steps are
an object: :class:`GPTSteps` (LlamaGen's ``decode_one_token``) or :class:`DPARSteps`, which for token i (1) asks
its boundary source whether x_i starts a patch, before x_i is sampled -- :class:`EntropyModel` (the paper's H_i),
:class:`OwnEntropy` (DPAR's own entropy under "no new patch"; beyond the paper) or :class:`Rules` (static and
token patching); (2) advances the global transformer for the images at a boundary (their open patch pooled by
:meth:`dpar.models.DPAR.pool_patches`); (3) decodes x_i's logits; after sampling, x_i goes through the encoder
and the boundary source reads it. :class:`StaticDPARSteps` runs every row through every stage with fixed shapes
and no host sync (CUDA graphs, ``torch.compile(mode="reduce-overhead")``) and samples the same images. CFG
halves share tokens and boundaries: the entropy model and the encoder run once per image. Stages carry profiler
labels (entropy_model, encoder, global, decoder, sample). :func:`cached_steps` builds the steps a patcher asks for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import record_function
from tqdm import tqdm

from .models import DPAR
from .patcher import PatcherConfig, logits_entropy, longest_patch, next_patch_start
from .validation import choice, ranged

CFG_SCHEDULES = ("constant", "linear")


@dataclass
class SamplingConfig:
    # classifier-free guidance scale (1.0 = no guidance, 0.0 = unconditional; the paper uses 2.0 for FID-50K).
    cfg_scale: float = ranged(1.0, min=0)
    # constant: cfg_scale at every token; linear: from 1 at the first token to cfg_scale at the last.
    cfg_schedule: str = choice("constant", CFG_SCHEDULES)
    # keep the k most likely tokens (0 = all; LlamaGen and the paper: 0).
    top_k: int = ranged(0, min=0)
    # keep the smallest set of most likely tokens whose probability reaches top_p (1.0 = all).
    top_p: float = ranged(1.0, gt=0, max=1)
    # divide the logits by this before sampling; 0 = greedy (the most likely token).
    temperature: float = ranged(1.0, min=0)


@dataclass
class Generation:
    tokens: Tensor                  # [B, N] sampled VQ tokens, raster order
    patch_start: Tensor             # [B, N] bool, the boundaries decided while sampling
    global_steps: Tensor            # [B] global-transformer steps per image (= patches; N for the GPT)
    logits: Tensor | None = None    # [R, N, vocab] raw logits used (cond rows, then uncond rows), if recorded
    entropies: Tensor | None = None  # [B, N] H_i that decided the boundaries: the entropy model's (EntropyModel)
                                     # or the model's own (OwnEntropy; +inf where the other rules decided alone)


def image_uniforms(seeds: Tensor, num_tokens: int) -> Tensor:
    """``[B, N]`` uniforms in [0, 1): image b's draws come from its own seed alone."""
    return torch.stack([torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds.tolist()])


def sample_from_logits(logits: Tensor, uniforms: Tensor, config: SamplingConfig) -> Tensor:
    """``[B, vocab]`` logits -> ``[B]`` tokens: temperature, top-k, top-p (LlamaGen's filtering), then
    the inverse CDF at ``uniforms [B]``. Temperature 0 is greedy: the most likely token.

    top-p keeps the smallest set of most likely tokens whose probability reaches ``top_p``: a token is
    dropped once the tokens before it already hold ``top_p``."""
    if config.temperature == 0:
        return logits.float().argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k > 0:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        remove = probs.cumsum(dim=-1) - probs >= config.top_p  # the tokens before it already reach top_p
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    cdf = logits.softmax(dim=-1).double().cumsum(dim=-1)
    target = uniforms.to(cdf)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, side="right").squeeze(1).clamp(max=logits.shape[-1] - 1)


def guidance_scale(config: SamplingConfig, position: int, num_tokens: int) -> float:
    if config.cfg_schedule == "linear":
        return 1.0 + (config.cfg_scale - 1.0) * position / max(num_tokens - 1, 1)
    return config.cfg_scale


@torch.no_grad()
def generate(steps: GPTSteps | DPARSteps, labels: Tensor | None, seeds: Tensor, sampling: SamplingConfig, *,
             prefix: Tensor | None = None, record_logits: bool = False, progress: bool = False) -> Generation:
    """Sample ``len(seeds)`` images with ``steps`` (a model in eval mode, see :func:`cached_steps`) for class
    ``labels [B]`` (None: unconditional); ``seeds [B]`` fix each image's draws.

    ``prefix [B, L]`` (image completion): tokens 0..L-1 are these instead of samples; boundaries and caches run
    as for sampled tokens, so the continuation is sampled as if the model had drawn the prefix itself.
    ``record_logits`` keeps the raw logits of every step; ``progress`` shows a bar over the token steps.
    Guidance (``cfg_scale != 1``) needs a model with a null class (trained with class dropout).
    """
    model = steps.model
    device = next(model.parameters()).device
    batch, num_tokens = len(seeds), model.block_size
    guided = labels is not None and sampling.cfg_scale != 1.0
    assert not guided or model.cls_embedding.has_null, "cfg_scale != 1 needs a model with class dropout: no null class"
    assert prefix is None or (prefix.shape[0] == batch and prefix.shape[1] <= num_tokens), prefix.shape
    null = model.cls_embedding.null_labels(batch, device)
    rows_labels = null if labels is None else torch.cat([labels.to(device), null] if guided else [labels.to(device)])
    uniforms = image_uniforms(seeds, num_tokens).to(device)
    tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    logits_log = torch.empty(len(rows_labels), num_tokens, model.vocab_size, device=device) if record_logits else None

    steps.start(rows_labels, batch)
    try:
        for i in tqdm(range(num_tokens), desc="tokens", unit="step", leave=False, disable=not progress):
            logits = steps(i)
            if logits_log is not None:
                logits_log[:, i] = logits
            with record_function("sample"):
                if prefix is not None and i < prefix.shape[1]:
                    tokens[:, i] = prefix[:, i]
                else:
                    if guided:
                        cond, uncond = logits.chunk(2)
                        logits = uncond + (cond - uncond) * guidance_scale(sampling, i, num_tokens)
                    tokens[:, i] = sample_from_logits(logits, uniforms[:, i], sampling)
            steps.advance(tokens[:, i], i)
    finally:
        steps.close()
    patch_start, global_steps, entropies = steps.record()
    return Generation(tokens, patch_start, global_steps, logits_log, entropies)


# -- the GPT: every token one step of the whole transformer ------------------------------------------------------

class GPTSteps:
    """LlamaGen's cached decoding: step i feeds x_{i-1} (the class at i = 0) and returns the logits of x_i."""

    static_caches: bool | None = None  # the device's default KV cache (dpar.models.layers.KVCache)

    def __init__(self, model: nn.Module):
        self.model = model

    def start(self, rows_labels: Tensor, batch: int) -> None:
        parameter = next(self.model.parameters())
        self.rows_labels, self.halves, self.batch = rows_labels, len(rows_labels) // batch, batch
        self.model.setup_caches(len(rows_labels), self.model.block_size, parameter.dtype, static=self.static_caches)

    def __call__(self, i: int) -> Tensor:
        with record_function("global"):  # the GPT is all global transformer
            previous = None if i == 0 else self.last.repeat(self.halves, 1)
            at = torch.tensor([i], device=self.rows_labels.device)
            return self.model(previous, self.rows_labels if i == 0 else None, input_pos=at)[0][:, -1]

    def advance(self, token: Tensor, i: int) -> None:
        self.last = token[:, None]

    def record(self) -> tuple[Tensor, Tensor, None]:
        """(patch starts ``[B, N]``: every token, global steps ``[B]``: N, no entropies)."""
        num_tokens, device = self.model.block_size, self.rows_labels.device
        return (torch.ones(self.batch, num_tokens, dtype=torch.bool, device=device),
                torch.full((self.batch,), num_tokens, device=device), None)

    def close(self) -> None:
        self.model.clear_caches()


class StaticGPTSteps(GPTSteps):
    static_caches = True  # masked whole-cache KV caches; the GPT's steps have fixed shapes already


# -- DPAR's boundary sources: does x_i start a patch? -----------------------------------------------------------

class Rules:
    """Boundaries from the patcher's rules alone (static and token patching): no entropy is computed."""

    from_decoder = False  # whether H_i comes from the DPAR decoder's own prediction of x_i

    def __init__(self, patcher: PatcherConfig):
        self.patcher = patcher
        self.entropies: Tensor | None = None

    def start(self, batch: int, num_tokens: int, dtype: torch.dtype, device: torch.device,
              static_caches: bool | None) -> None:
        pass

    def entropy(self, steps: DPARSteps, i: int) -> tuple[Tensor | None, Tensor | None]:
        """(H_i ``[B]`` or None, the decoder's logits under "no new patch at i" if they were computed)."""
        return None, None

    def advance(self, token: Tensor, i: int) -> None:
        pass

    def close(self) -> None:
        pass


class EntropyModel(Rules):
    """H_i = entropy of the unconditional GPT's prediction of x_i given x_<i (paper section 3.2.1). A LlamaGen
    c2i GPT is read at its null class."""

    def __init__(self, patcher: PatcherConfig, model: nn.Module):
        super().__init__(patcher)
        self.model = model

    def start(self, batch, num_tokens, dtype, device, static_caches) -> None:
        self.entropies = torch.full((batch, num_tokens), float("inf"), device=device)
        self.model.setup_caches(batch, num_tokens + 1, dtype, static=static_caches)
        start_token = self.model.cls_embedding.null_labels(batch, device)
        self.model(None, start_token, input_pos=torch.tensor([0], device=device))  # its prediction of x_0 is unused

    def entropy(self, steps, i):
        return self.entropies[:, i], None

    def advance(self, token: Tensor, i: int) -> None:
        """Read x_i: H_{i+1}."""
        if i + 1 < self.entropies.shape[1]:
            with record_function("entropy_model"):
                at = torch.tensor([i + 1], device=token.device)
                self.entropies[:, i + 1] = logits_entropy(self.model(token[:, None], None, input_pos=at)[0][:, -1])

    def close(self) -> None:
        self.model.clear_caches()


class OwnEntropy(Rules):
    """H_i = entropy of DPAR's own conditional prediction of x_i with no new patch at i (the decoder on the
    current global output). Where θ, the cap or the row break then start a patch, the global transformer
    advances and the decoder runs again; else its first logits are the ones sampled from. Beyond the paper."""

    from_decoder = True

    def start(self, batch, num_tokens, dtype, device, static_caches) -> None:
        self.entropies = torch.full((batch, num_tokens), float("inf"), device=device)

    def entropy(self, steps, i):
        unchanged = None
        if i > 0 and not steps.forced_starts(i).all():  # some image's boundary depends on H_i
            unchanged = steps.decode(i)
            self.entropies[:, i] = logits_entropy(unchanged[:steps.batch])  # the conditional rows' prediction
        return self.entropies[:, i], unchanged


# -- DPAR: boundary, global step at boundaries, decoder ----------------------------------------------------------

class DPARSteps:
    """DPAR's cached step (module docstring): only the images at a boundary advance the global transformer, over
    their own cache rows (at 1.8 tokens per patch, 45% of the global work is skipped)."""

    static_caches: bool | None = None  # the device's default KV cache (dpar.models.layers.KVCache)

    def __init__(self, model: DPAR, boundaries: Rules):
        self.model, self.boundaries, self.patcher = model, boundaries, boundaries.patcher

    def start(self, rows_labels: Tensor, batch: int) -> None:
        model, parameter = self.model, next(self.model.parameters())
        dtype, device, num_tokens = parameter.dtype, parameter.device, model.block_size
        self.rows_labels, self.batch, self.halves = rows_labels, batch, len(rows_labels) // batch
        self.width = model.config.grid_size
        model.setup_caches(len(rows_labels), dtype, decoder_rows=self.decoder_rows(len(rows_labels)),
                           static=self.static_caches)
        self.states = [torch.zeros(batch, num_tokens, model.config.dim, device=device, dtype=dtype)
                       for _ in model.encoder.layers]  # each encoder block's token states, for pooling
        self.g = torch.zeros(len(rows_labels), model.config.dim, device=device, dtype=dtype)  # last global output
        self.patches = torch.zeros(batch, dtype=torch.long, device=device)      # global steps so far
        self.patch_first = torch.zeros(batch, dtype=torch.long, device=device)  # first token of the open patch
        self.starts = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
        self.boundaries.start(batch, num_tokens, dtype, device, self.static_caches)

    def decoder_rows(self, rows: int) -> int:
        return rows

    def forced_starts(self, i: int) -> Tensor:
        """``[B]`` whether the rules other than the entropy's (first token, cap, row break) start a patch at i."""
        return next_patch_start(self.patcher, torch.full((self.batch,), -torch.inf, device=self.patches.device), i,
                                i - self.patch_first, self.width)

    def previous(self, i: int, copies: int = 1) -> Tensor | None:
        """h_{i-1} of every row ``[copies * R, d]`` (None at i = 0: the decoder's start vector)."""
        return None if i == 0 else self.states[-1][:, i - 1].repeat(copies * self.halves, 1)

    def decode(self, i: int) -> Tensor:
        with record_function("decoder"):
            return self.model.decode_step(self.previous(i), self.g, i)

    def __call__(self, i: int) -> Tensor:
        entropy, unchanged = self.boundaries.entropy(self, i)
        start = next_patch_start(self.patcher, entropy, i, i - self.patch_first, self.width)
        self.starts[:, i] = start
        with record_function("global"):
            self.advance_global(start, i)
        return unchanged if unchanged is not None and not start.any() else self.decode(i)

    def advance_global(self, start: Tensor, i: int) -> None:
        """The images at a boundary advance the global stream; ``g``, ``patches``, ``patch_first`` follow."""
        images = start.nonzero().squeeze(1)
        if images.numel() == 0:
            return
        rows, outputs = self.global_outputs(images, i, int((i - self.patch_first[images]).max()))
        self.g[rows] = outputs
        self.patches[images] += 1
        self.patch_first[images] = i

    def global_outputs(self, images: Tensor, i: int, longest: int) -> tuple[Tensor, Tensor]:
        """One global step for ``images`` (all their CFG rows): at i = 0 the class, else their open patch, pooled
        over ``longest`` slots, closes. Returns the cache rows that ran ``[R']`` and their outputs ``[R', d]``."""
        model, halves = self.model, self.halves
        if i == 0:
            rows = torch.arange(len(self.rows_labels), device=images.device)
            zeros = torch.zeros_like(rows)
            return rows, model.global_step(model.class_stream_input(self.rows_labels), zeros, zeros, zeros,
                                           torch.ones_like(rows, dtype=torch.bool), zeros, rows)
        first, length = self.patch_first[images], i - self.patch_first[images]
        closed = model.pool_patches(self.states, images, first, length, longest)
        rows = torch.cat([images + h * self.batch for h in range(halves)])
        column = first % self.width
        return rows, model.global_step(closed.repeat(halves, 1), (first // self.width).repeat(halves),
                                       column.repeat(halves), (column + length - 1).repeat(halves),
                                       torch.zeros_like(rows, dtype=torch.bool), self.patches[images].repeat(halves),
                                       rows)

    def advance(self, token: Tensor, i: int) -> None:
        """x_i through the encoder blocks (its states kept for pooling); the boundary source reads it."""
        with record_function("encoder"):
            for layer_states, state in zip(self.states, self.model.encode_step(token, i)):
                layer_states[:, i] = state
        self.boundaries.advance(token, i)

    def record(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """(patch starts ``[B, N]``, global steps ``[B]``, the entropies that decided them or None)."""
        return self.starts, self.patches, self.boundaries.entropies

    def close(self) -> None:
        self.model.clear_caches()
        self.boundaries.close()


class StaticDPARSteps(DPARSteps):
    """:class:`DPARSteps` with the same shapes at every step: every row runs every stage (its open patch pooled
    over the longest a patch can be), the outputs of rows without a boundary are dropped, and no position is
    read on the host. With :class:`OwnEntropy` the global transformer advances before H_i is known and the
    decoder runs once over both hypotheses (:meth:`two_hypothesis_step`)."""

    static_caches = True

    def start(self, rows_labels: Tensor, batch: int) -> None:
        super().start(rows_labels, batch)
        self.longest = longest_patch(self.patcher, self.width, self.model.block_size)
        self.everyone = torch.arange(batch, device=rows_labels.device)

    def decoder_rows(self, rows: int) -> int:
        return 2 * rows if self.boundaries.from_decoder else rows

    def __call__(self, i: int) -> Tensor:
        return self.two_hypothesis_step(i) if self.boundaries.from_decoder else super().__call__(i)

    def advance_global(self, start: Tensor, i: int) -> None:
        _, outputs = self.global_outputs(self.everyone, i, self.longest)
        self.keep_global_outputs(start, i, outputs)

    def keep_global_outputs(self, start: Tensor, i: int, outputs: Tensor) -> None:
        """``outputs [R, d]`` become ``g`` where a patch starts at i, and those images' counts advance. A row without
        a boundary wrote the cache slot of its next stream position, written again before any query reads it."""
        self.g.copy_(torch.where(start.repeat(self.halves)[:, None], outputs, self.g))
        self.patches += start.long()
        self.patch_first.copy_(torch.where(start, i, self.patch_first))

    def two_hypothesis_step(self, i: int) -> Tensor:
        """OwnEntropy under static shapes: the global input at a boundary (the patch closing before i) does not
        depend on H_i, so every row advances first; the decoder then runs once on 2R rows, "no new patch" (``g``)
        and "new patch" (the proposed output). H_i comes from the first, the rule chooses per image, and the
        chosen logits, global output and decoder cache entry are kept: one pass over the decoder's weights."""
        with record_function("global"):
            _, proposed = self.global_outputs(self.everyone, i, self.longest)
        with record_function("decoder"):
            unchanged, restarted = self.model.decode_step(self.previous(i, copies=2), torch.cat([self.g, proposed]),
                                                          i).chunk(2)
        entropies = self.boundaries.entropies
        if i > 0:
            entropies[:, i] = logits_entropy(unchanged[:self.batch])  # the conditional rows' prediction
        start = next_patch_start(self.patcher, entropies[:, i], i, i - self.patch_first, self.width)
        self.starts[:, i] = start
        restart = start.repeat(self.halves)
        self.model.keep_decoder_hypothesis(restart, i)
        self.keep_global_outputs(start, i, proposed)
        return torch.where(restart[:, None], restarted, unchanged)


def cached_steps(model: nn.Module, patcher: PatcherConfig | None = None, entropy_model: nn.Module | None = None,
                 static_shapes: bool = False) -> GPTSteps | DPARSteps:
    """The step object for ``model``: a GPT's, or DPAR's with the boundary source ``patcher.mode`` names
    (``entropy`` needs the unconditional GPT ``entropy_model``); ``static_shapes`` picks the static step type."""
    if not isinstance(model, DPAR):
        return StaticGPTSteps(model) if static_shapes else GPTSteps(model)
    assert patcher is not None, "DPAR sampling needs a patcher config"
    if patcher.mode == "entropy":
        assert entropy_model is not None, "entropy patching needs the entropy model"
        boundaries = EntropyModel(patcher, entropy_model)
    else:
        boundaries = OwnEntropy(patcher) if patcher.mode == "self_entropy" else Rules(patcher)
    return (StaticDPARSteps if static_shapes else DPARSteps)(model, boundaries)
