"""Batched, KV-cached generation for DPAR and the token-level GPT baseline (arXiv 2512.21867, section 3).

For token i of every image, in one pass over the batch:

1. DPAR: the entropy model's prediction for x_i (from x_<i only) gives H_i, and :func:`dpar.patcher.next_patch_start`
   decides whether x_i starts a patch -- before x_i is sampled. The images at a boundary (and only
   those) close their open patch (pool its tokens' encoder states) and advance the global transformer
   by one position; the others keep their last global output.
2. The decoder (DPAR) or the GPT turns the state into logits for x_i, for the conditional rows and, with
   classifier-free guidance, the unconditional rows. Both halves share tokens and boundaries, so the
   entropy model and the patch encoder run once per image, not per half.
3. Guided logits -> temperature, top-k, top-p -> x_i, drawn by inverse CDF from uniforms that depend
   only on the image's seed: an image comes out the same in any batch and on any rank.
4. DPAR: x_i goes through the encoder blocks (its states are kept for pooling); the entropy model
   reads x_i to predict H_{i+1}.

The GPT baseline is the degenerate case: no entropy model, no encoder, every token a global step.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import zipfile
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.profiler import record_function
from tqdm import tqdm

from tokenizer.vq_model import load_vq

from .config import read_section, read_yaml, recorded_path
from .data.store import file_sha256, read_meta
from .demo import DEMO_RUN
from .errors import UserError, first_line
from .fileio import atomic_path, atomic_write_text, check_output_dir, check_output_file, lock_folder
from .experiment import (CHECKPOINTS, CONFIG_FILE, EMA_FILE, MODEL_FILE, STEP_CHECKPOINT, checkpoint_metadata,
                         list_checkpoints,
                         load_entropy_model, load_llamagen_gpt, load_trained_model, step_checkpoint_dir)
from .models import DPAR, GPT_models, ModelConfig, is_dpar
from .patcher import PatcherConfig, logits_entropy, longest_patch, next_patch_start
from .validation import choice, field_type, number, ranged

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
    entropies: Tensor | None = None  # [B, N] H_i that decided the boundaries: the entropy model's (entropy mode)
                                     # or the model's own (self_entropy; +inf where the other rules decided alone)


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
def generate(model: nn.Module, labels: Tensor | None, seeds: Tensor, sampling: SamplingConfig, *,
             patcher: PatcherConfig | None = None, entropy_model: nn.Module | None = None,
             prefix: Tensor | None = None, static_shapes: bool = False, record_logits: bool = False,
             progress: bool = False) -> Generation:
    """Sample ``len(seeds)`` images from a DPAR or GPT model (eval mode) for class ``labels`` (None: unconditional).

    ``prefix [B, L]`` (image completion): tokens 0..L-1 are these instead of samples; the boundaries, caches
    and the rest run as for sampled tokens, so the continuation is sampled exactly as if the model had drawn
    the prefix itself.

    DPAR needs ``patcher`` (its mode, θ and P may differ from training: paper Table 6) and, for entropy
    patching, the unconditional GPT ``entropy_model``. In ``self_entropy`` mode no entropy model runs: H_i is
    the entropy of the model's own conditional prediction of x_i with no new patch at i (the decoder on the
    current global output); where θ, the cap or the row break then start a patch, the global transformer
    advances and the decoder runs again, else its first logits are the ones sampled from. Either way the
    logits used are a full forward's with the chosen boundaries. ``progress`` shows a bar over the token steps.
    ``static_shapes``: every step runs every row through every stage with the same shapes and no host
    synchronisation (no ``nonzero``, no data-dependent branch, static KV caches), as CUDA graphs and
    ``torch.compile(mode="reduce-overhead")`` need; the outputs of rows without a boundary are dropped. In
    self_entropy mode the global transformer then advances before H_i is known and the decoder runs once over
    both hypotheses (:func:`_self_entropy_static_step`). It samples what the default path samples (tested);
    which is faster depends on the device and batch.

    The stages carry profiler labels (entropy_model, encoder, global, decoder, sample) so that a
    profile says where the time goes (benchmarks/sample_throughput.py prints the split).
    """
    is_dpar = isinstance(model, DPAR)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch, num_tokens, width = len(seeds), model.block_size, model.config.grid_size
    guided = labels is not None and sampling.cfg_scale != 1.0
    if guided and model.cls_embedding.num_classes == model.cls_embedding.embedding_table.num_embeddings:
        raise ValueError("cfg_scale != 1 needs a model trained with class dropout (it has no null class)")
    if is_dpar and patcher is None:
        raise ValueError("DPAR sampling needs a patcher config")
    use_entropy = is_dpar and patcher.mode == "entropy"
    self_entropy = is_dpar and patcher.mode == "self_entropy"
    if use_entropy and entropy_model is None:
        raise ValueError("entropy patching needs the entropy model")
    if prefix is not None and (prefix.shape[0] != batch or prefix.shape[1] > num_tokens):
        raise ValueError(f"prefix {list(prefix.shape)} must be [{batch}, <= {num_tokens}]")

    if labels is None:
        rows_labels = model.cls_embedding.null_labels(batch, device)
    else:
        rows_labels = labels.to(device)
        if guided:
            rows_labels = torch.cat([rows_labels, model.cls_embedding.null_labels(batch, device)])
    rows = len(rows_labels)
    halves = rows // batch  # 2 with guidance: both halves share each image's tokens and boundaries
    uniforms = image_uniforms(seeds, num_tokens).to(device)

    tokens = torch.zeros(batch, num_tokens, dtype=torch.long, device=device)
    starts = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    logits_log = torch.empty(rows, num_tokens, model.vocab_size, device=device) if record_logits else None
    entropies = torch.full((batch, num_tokens), float("inf"), device=device) if use_entropy or self_entropy else None
    # self_entropy with static shapes: the global transformer advances every row before H_i is known, and the
    # decoder runs once over both hypotheses (no new patch / new patch at i), 2x rows in its caches
    both_hypotheses = self_entropy and static_shapes
    cache_static = True if static_shapes else None  # else the device's default (dpar.models.layers.KVCache)
    if is_dpar:
        model.setup_caches(rows, dtype, decoder_rows=2 * rows if both_hypotheses else rows, static=cache_static)
        states = [torch.zeros(batch, num_tokens, model.config.dim, device=device, dtype=dtype)
                  for _ in model.encoder.layers]
        g = torch.zeros(rows, model.config.dim, device=device, dtype=dtype)
        patches = torch.zeros(batch, dtype=torch.long, device=device)      # global steps so far
        patch_first = torch.zeros(batch, dtype=torch.long, device=device)  # first token of the open patch
        longest = longest_patch(patcher, width, num_tokens)
    else:
        model.setup_caches(rows, num_tokens, dtype, static=cache_static)
    if use_entropy:
        entropy_model.setup_caches(batch, num_tokens + 1, dtype, static=cache_static)
        start_token = entropy_model.cls_embedding.null_labels(batch, device)
        entropy_model(None, start_token, input_pos=torch.tensor([0], device=device))  # its prediction of x_0 is unused

    try:
        for i in tqdm(range(num_tokens), desc="tokens", unit="step", leave=False, disable=not progress):
            if is_dpar and both_hypotheses:
                logits = _self_entropy_static_step(model, patcher, i, rows_labels, halves, states, g, patches,
                                                   patch_first, longest, entropies, starts)
            elif is_dpar:
                run_length = i - patch_first
                previous = None if i == 0 else states[-1][:, i - 1].repeat(halves, 1)
                unchanged = None  # self_entropy: the logits under "no new patch at i", kept where none starts
                if self_entropy and i > 0 and not next_patch_start(
                        patcher, torch.full_like(entropies[:, i], -torch.inf), i, run_length, width).all():
                    with record_function("decoder"):
                        unchanged = model.decode_step(previous, g, i)
                    entropies[:, i] = logits_entropy(unchanged[:batch])  # the conditional rows' prediction
                start = next_patch_start(patcher, None if entropies is None else entropies[:, i], i, run_length, width)
                starts[:, i] = start
                with record_function("global"):
                    _global_step(model, start, i, rows_labels, halves, states, g, patches, patch_first,
                                 longest if static_shapes else None)
                if unchanged is not None and not start.any():
                    logits = unchanged
                else:
                    with record_function("decoder"):
                        logits = model.decode_step(previous, g, i)
            else:
                with record_function("global"):  # the GPT is all global transformer
                    previous = None if i == 0 else tokens[:, i - 1:i].repeat(halves, 1)
                    logits = model(previous, rows_labels if i == 0 else None,
                                   input_pos=torch.tensor([i], device=device))[0][:, -1]
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

            if is_dpar:
                with record_function("encoder"):
                    for layer_states, state in zip(states, model.encode_step(tokens[:, i], i)):
                        layer_states[:, i] = state
            if use_entropy and i + 1 < num_tokens:
                with record_function("entropy_model"):
                    next_logits = entropy_model(tokens[:, i:i + 1], None,
                                                input_pos=torch.tensor([i + 1], device=device))[0]
                    entropies[:, i + 1] = logits_entropy(next_logits[:, -1])
    finally:
        model.clear_caches()
        if use_entropy:
            entropy_model.clear_caches()

    global_steps = patches if is_dpar else torch.full((batch,), num_tokens, device=device)
    return Generation(tokens, starts if is_dpar else torch.ones_like(starts), global_steps, logits_log, entropies)


def _global_step(model: DPAR, start: Tensor, position: int, rows_labels: Tensor, halves: int,
                 states: list[Tensor], g: Tensor, patches: Tensor, patch_first: Tensor,
                 longest: int | None = None) -> None:
    """Advance the global stream of the images at a boundary; update ``g``, ``patches``, ``patch_first`` in place.

    By default only those images' cache rows run (a boundary comes every 1.8 tokens on ImageNet-256, so this
    skips about 45% of the global work). With ``longest`` (static shapes) every row runs, its open patch
    pooled over ``longest`` slots; the rows without a boundary keep their old output, and the cache slot they
    wrote (their next stream position) is written again before any query reads it.
    """
    if longest is None:
        images = start.nonzero().squeeze(1)
        if images.numel() == 0:
            return
        rows, outputs = _global_outputs(model, images, position, rows_labels, halves, states, patches,
                                        patch_first, int((position - patch_first[images]).max()))
        g[rows] = outputs
        patches[images] += 1
        patch_first[images] = position
    else:
        _, outputs = _global_outputs(model, torch.arange(len(start), device=start.device), position, rows_labels,
                                     halves, states, patches, patch_first, longest)
        _keep_global_outputs(start, position, outputs, halves, g, patches, patch_first)


def _keep_global_outputs(start: Tensor, position: int, outputs: Tensor, halves: int, g: Tensor, patches: Tensor,
                         patch_first: Tensor) -> None:
    """Static shapes: ``outputs [R, d]`` of every row's global step become ``g`` where a patch starts at
    ``position``, and those images' patch counts and open patches advance; the other rows keep theirs."""
    g.copy_(torch.where(start.repeat(halves)[:, None], outputs, g))
    patches += start.long()
    patch_first.copy_(torch.where(start, position, patch_first))


def _global_outputs(model: DPAR, images: Tensor, position: int, rows_labels: Tensor, halves: int,
                    states: list[Tensor], patches: Tensor, patch_first: Tensor,
                    longest: int) -> tuple[Tensor, Tensor]:
    """One global step for ``images`` (all their CFG rows): at position 0 the class, else the open patch,
    pooled over ``longest`` slots, closes. Returns the cache rows that ran ``[R']`` and their outputs ``[R', d]``."""
    batch, num_tokens = states[0].shape[:2]
    width = model.config.grid_size
    if position == 0:
        inputs = model.class_stream_input(rows_labels)
        rows = torch.arange(len(rows_labels), device=rows_labels.device)
        zeros = torch.zeros_like(rows)
        outputs = model.global_step(inputs, zeros, zeros, zeros, torch.ones_like(rows, dtype=torch.bool),
                                    zeros, rows)
    else:
        first, length = patch_first[images], position - patch_first[images]
        # only the closing patches' slots, gathered, reach the pooling's projections (not all B*N tokens)
        slots = ((images * num_tokens + first)[:, None] + torch.arange(longest, device=images.device)).flatten()
        gathered = [layer_states.reshape(batch * num_tokens, -1)[slots.clamp(max=batch * num_tokens - 1)]
                    for layer_states in states]
        closed = model.encoder.pool(gathered, torch.arange(len(images), device=images.device) * longest, length,
                                    longest)
        rows = torch.cat([images + h * batch for h in range(halves)])
        column = first % width
        outputs = model.global_step(closed.repeat(halves, 1), (first // width).repeat(halves),
                                    column.repeat(halves), (column + length - 1).repeat(halves),
                                    torch.zeros_like(rows, dtype=torch.bool), patches[images].repeat(halves), rows)
    return rows, outputs


def _self_entropy_static_step(model: DPAR, patcher: PatcherConfig, position: int, rows_labels: Tensor, halves: int,
                              states: list[Tensor], g: Tensor, patches: Tensor, patch_first: Tensor, longest: int,
                              entropies: Tensor, starts: Tensor) -> Tensor:
    """One self_entropy step with static shapes; returns the logits ``[R, vocab]`` to sample x_position from.

    The global transformer's input at a boundary (the patch that closes before ``position``) does not depend
    on H_position, so every row advances first; the decoder then runs once on ``2R`` rows, the hypotheses
    "no new patch" (the current ``g``) and "new patch" (the proposed output). H_position comes from the
    first, the patcher's rule chooses per image, and the chosen hypothesis's logits, global output and
    decoder cache entry are kept. One pass over the decoder's weights instead of two (weight reads bound a
    small batch's step); every row runs every stage, as static shapes need.
    """
    batch, width = len(patches), model.config.grid_size
    previous = None if position == 0 else states[-1][:, position - 1].repeat(2 * halves, 1)
    with record_function("global"):
        _, proposed = _global_outputs(model, torch.arange(batch, device=g.device), position, rows_labels, halves,
                                      states, patches, patch_first, longest)
    with record_function("decoder"):
        unchanged, restarted = model.decode_step(previous, torch.cat([g, proposed]), position).chunk(2)
    if position > 0:
        entropies[:, position] = logits_entropy(unchanged[:batch])  # the conditional rows' prediction
    start = next_patch_start(patcher, entropies[:, position], position, position - patch_first, width)
    starts[:, position] = start
    restart = start.repeat(halves)
    model.keep_decoder_hypothesis(restart, position)
    _keep_global_outputs(start, position, proposed, halves, g, patches, patch_first)
    return torch.where(restart[:, None], restarted, unchanged)


@dataclass
class Sampler:
    """A model ready to sample -- a training run's or a released LlamaGen GPT's -- with its patcher, entropy
    model and tokenizer, on one device."""

    model: nn.Module
    model_config: ModelConfig
    patcher: PatcherConfig | None
    entropy_model: nn.Module | None
    vq: nn.Module | None
    epoch: int | str | None  # the run's checkpoint epoch, "latest" (its mid-epoch checkpoint), None for LlamaGen's
    name: str            # what sample files are named after: epoch-299, epoch-3-step-1200, GPT-B-c2i_B_256-size-256
    weights: Path        # the model.safetensors (or ema.safetensors, or LlamaGen .pt) sampled from
    vq_checkpoint: Path | None  # the tokenizer that decodes
    class_names: list[str] | None = None  # from the run's token store, where it is here
    config_path: Path | None = None       # the run's config.yaml (None for a LlamaGen checkpoint)

    @classmethod
    def from_experiment(cls, experiment_dir: str | Path, epoch: int | str | None = None, *, ema: bool = False,
                        vq_checkpoint: str | None = None, device: str | torch.device = "cpu",
                        threshold: float | None = None, max_patch_length: int | None = None,
                        self_entropy: bool = False, tokenizer: bool = True) -> Sampler:
        """Load ``experiment_dir``'s checkpoint of ``epoch`` (default: the newest epoch; ``"latest"``: the
        mid-epoch ``checkpoints/latest``) and what it needs (``tokenizer=False``: all but the tokenizer, for
        work on tokens such as the linear probe; ``vq`` is then None).

        ``threshold`` / ``max_patch_length`` / ``self_entropy`` change the trained patcher at inference (paper
        Table 6; see :func:`run_patching`); ``max_patch_length=0`` removes the cap.
        """
        experiment = Path(experiment_dir)
        config_path = run_config(experiment)
        checkpoint, epoch, name = _checkpoint_of(experiment, epoch)
        weights = checkpoint / (EMA_FILE if ema else MODEL_FILE)
        if not weights.is_file():
            raise UserError(f"--ema: {weights} does not exist (the run kept no EMA: train.ema false)")
        model, model_config = load_trained_model(weights, config_path)
        model = model.to(device)
        patcher, entropy_model = run_patching(config_path, model_config, device, threshold, max_patch_length,
                                              self_entropy)
        sampler = cls(model, model_config, patcher, entropy_model, None, epoch, name, weights, None,
                      _class_names_of(config_path), config_path)
        return sampler.load_tokenizer(vq_checkpoint) if tokenizer else sampler

    def load_tokenizer(self, vq_checkpoint: str | Path | None = None) -> Sampler:
        """Load ``vq_checkpoint`` (default: the run's tokenizer) as :attr:`vq`, on the model's device; returns
        self. ``UserError`` when none is found or it does not fit the model."""
        self.vq, self.vq_checkpoint = run_tokenizer(self.config_path, self.model_config, vq_checkpoint)
        self.vq = self.vq.to(next(self.model.parameters()).device)
        return self

    @classmethod
    def from_llamagen(cls, gpt_model: str, gpt_checkpoint: str | Path, vq_checkpoint: str | Path, image_size: int,
                      device: str | torch.device = "cpu") -> Sampler:
        """A released LlamaGen c2i GPT (``--gpt-model GPT-L --gpt-ckpt c2i_L_256.pt --vq-ckpt vq_ds16_c2i.pt
        --image-size 256``, LlamaGen's flags), so that the baseline is sampled and evaluated like DPAR."""
        vq_checkpoint = Path(vq_checkpoint)
        vq = load_vq(vq_checkpoint)
        model, model_config = load_llamagen_gpt(gpt_checkpoint, gpt_model, image_size, vq.downsample)
        _tokenizer_for(vq_checkpoint, model_config, vq)
        name = f"{gpt_model}-{Path(gpt_checkpoint).stem}-size-{image_size}"
        return cls(model.to(device), model_config, None, None, vq.to(device), None, name, Path(gpt_checkpoint),
                   vq_checkpoint)

    @property
    def grid(self) -> int:
        return self.model_config.image_size // self.model_config.downsample_size

    def check(self, sampling: SamplingConfig) -> None:
        """Refuse, before any output, sampling this model cannot do: guidance without a null class."""
        if sampling.cfg_scale != 1.0 and self.model_config.class_dropout_prob == 0:
            raise UserError(f"--cfg-scale {sampling.cfg_scale}: the model was trained with model.class_dropout_prob "
                            "0, so it has no null class for guidance; use --cfg-scale 1.0")

    def sample(self, labels: Tensor | None, seeds: Tensor, sampling: SamplingConfig, progress: bool = False,
               image_size: int | None = None, prefix: Tensor | None = None,
               static_shapes: bool = False) -> tuple[Tensor, Generation]:
        """uint8 images ``[B, H, W, 3]`` and the generation record for ``labels`` and per-image ``seeds``;
        ``image_size`` resizes the decoded images before quantisation (LlamaGen's ``--image-size-eval``);
        ``prefix [B, L]`` keeps the first L tokens (image completion, see :func:`generate`)."""
        out = generate(self.model, labels, seeds, sampling, patcher=self.patcher, entropy_model=self.entropy_model,
                       prefix=prefix, static_shapes=static_shapes, progress=progress)
        return self.vq.codes_to_images(out.tokens, self.grid, size=image_size), out

    def identity(self) -> dict:
        """What, besides the sampling flags, decides the images: the weights, the tokenizer and the patcher."""
        return {"weights": str(self.weights.resolve()), "weights_sha256": file_sha256(self.weights),
                "tokenizer": str(self.vq_checkpoint.resolve()), "tokenizer_sha256": file_sha256(self.vq_checkpoint),
                "patcher": None if self.patcher is None else asdict(self.patcher)}


def run_config(experiment: Path) -> Path:
    """The ``config.yaml`` of a class-conditional training run of ``train_global_model.py``; ``UserError`` for
    any other folder (missing, a tokenizer or an entropy model run)."""
    config_path = experiment / CONFIG_FILE
    if not config_path.is_file():
        if experiment.resolve() == DEMO_RUN:
            raise UserError(f"the embedded demo {DEMO_RUN} is missing; rebuild it with python -m dpar.demo")
        raise UserError(f"{experiment} is not an experiment dir (no {CONFIG_FILE})")
    model = read_yaml(config_path).get("model") or {}
    if "gpt_model" not in model:
        raise UserError(f"{experiment} is not a training run of train_global_model.py (its config has no "
                        "model.gpt_model; a tokenizer run?)")
    if model.get("model_type", "c2i") != "c2i":
        raise UserError(f"{experiment} is an unconditional model ({model.gpt_model}, e.g. an entropy model); "
                        "class-conditional sampling needs a c2i run")
    return config_path


def run_patching(config_path: Path, model_config: ModelConfig, device: str | torch.device,
                 threshold: float | None = None, max_patch_length: int | None = None, self_entropy: bool = False
                 ) -> tuple[PatcherConfig | None, nn.Module | None]:
    """(patcher, entropy model on ``device``) of the run ``config_path`` describes: (None, None) for a GPT,
    no entropy model unless it patches by entropy. ``threshold`` / ``max_patch_length`` (0: no cap) override
    the trained patcher (paper Table 6); ``self_entropy`` switches it to ``self_entropy`` mode at
    ``threshold`` (required: θ on the model's own entropies is not the entropy model's). Needs the run's config
    only, not its weights (``dpar.patchmap``)."""
    if not is_dpar(model_config.gpt_model):
        if threshold is not None or max_patch_length is not None or self_entropy:
            raise UserError(f"--threshold, --max-patch-length and --self-entropy change DPAR's patching; "
                            f"{config_path.parent} is a {model_config.gpt_model} run, which has none")
        return None, None
    patcher = read_section(config_path, "patcher", PatcherConfig)
    if self_entropy:
        if patcher.mode != "entropy":
            raise UserError(f"--self-entropy replaces entropy-model patching; {config_path.parent} patches in "
                            f"{patcher.mode} mode")
        if threshold is None:
            raise UserError("--self-entropy needs --threshold: θ for the model's own entropies (calibrate it with "
                            "benchmarks/self_entropy.py), which differs from the entropy model's")
        patcher = replace(patcher, mode="self_entropy")
    if threshold is not None and patcher.mode not in ("entropy", "self_entropy"):
        raise UserError(f"--threshold changes entropy patching; {config_path.parent} patches in {patcher.mode} mode")
    if threshold is not None:
        patcher = replace(patcher, threshold=threshold)
    if max_patch_length is not None:
        patcher = replace(patcher, max_patch_length=max_patch_length or None)
    if patcher.mode != "entropy":
        return patcher, None
    keys = ("entropy_model_checkpoint",) + (  # the config: named, else the run's next to the weights
        ("entropy_model_checkpoint_config",) if patcher.entropy_model_checkpoint_config else ())
    for key in keys:
        if not getattr(patcher, key) or not recorded_path(getattr(patcher, key)).is_file():
            raise UserError(f"{config_path}: patcher.{key} {getattr(patcher, key)!r} is not a file here")
        setattr(patcher, key, str(recorded_path(getattr(patcher, key))))
    entropy_model, _ = load_entropy_model(patcher.entropy_model_checkpoint, patcher.entropy_model_checkpoint_config,
                                          llamagen_gpt=patcher.entropy_model_gpt, image_size=model_config.image_size,
                                          downsample_size=model_config.downsample_size,
                                          vocab_size=model_config.vocab_size)
    return patcher, entropy_model.to(device)


def run_tokenizer(config_path: Path, model_config: ModelConfig, vq_checkpoint: str | Path | None = None,
                  ) -> tuple[nn.Module, Path]:
    """(tokenizer in eval mode, its checkpoint): ``vq_checkpoint``, else the one the run's config names.
    ``UserError`` when none is found or it does not fit the model."""
    path = Path(vq_checkpoint or _tokenizer_of(config_path))
    return _tokenizer_for(path, model_config), path


def _checkpoint_of(experiment: Path, epoch: int | str | None) -> tuple[Path, int | str, str]:
    """(checkpoint dir, epoch, sample-file name) of a run's ``epoch``: an int, None (the newest) or "latest"."""
    checkpoints = dict(list_checkpoints(experiment))
    if epoch == "latest":
        latest = step_checkpoint_dir(experiment)
        if not (latest / MODEL_FILE).is_file():
            newest = f"; its newest epoch checkpoint is {max(checkpoints)}" if checkpoints else ""
            raise UserError(f"--epoch latest: {experiment} has no {CHECKPOINTS}/{STEP_CHECKPOINT}/{MODEL_FILE} (it is "
                            f"removed once an epoch checkpoint supersedes it){newest}")
        metadata = checkpoint_metadata(latest)
        return latest, epoch, f"epoch-{metadata.get('epoch', 'unknown')}-step-{metadata.get('step', 'unknown')}"
    if not checkpoints:
        hint = (" yet; a run shorter than one epoch has its mid-epoch checkpoint: --epoch latest"
                if (step_checkpoint_dir(experiment) / MODEL_FILE).is_file() else "")
        raise UserError(f"{experiment} has no {CHECKPOINTS}/epoch_*/{MODEL_FILE}{hint}")
    epoch = max(checkpoints) if epoch is None else epoch
    if epoch not in checkpoints:
        raise UserError(f"{experiment} has no checkpoint of epoch {epoch}; it has epochs "
                        f"{', '.join(map(str, sorted(checkpoints)))}")
    return checkpoints[epoch], epoch, f"epoch-{epoch}"


def _tokenizer_for(vq_checkpoint: Path, model_config: ModelConfig, vq: nn.Module | None = None) -> nn.Module:
    """The tokenizer at ``vq_checkpoint``, refused unless its codebook and downsampling fit the model."""
    vq = vq or load_vq(vq_checkpoint)
    if vq.config.codebook_size != model_config.vocab_size or vq.downsample != model_config.downsample_size:
        raise UserError(f"the tokenizer {vq_checkpoint} has {vq.config.codebook_size} codes and downsamples "
                        f"{vq.downsample}x, the model expects {model_config.vocab_size} and "
                        f"{model_config.downsample_size}x")
    return vq


def _store_meta(config_path: Path) -> dict | None:
    """The ``meta.json`` of the run's token store (``data.store``), if that store is here."""
    store = (read_yaml(config_path).get("data") or {}).get("store")
    return read_meta(recorded_path(store)) if store and recorded_path(store).is_dir() else None


def _class_names_of(config_path: Path) -> list[str] | None:
    """The class names the run's token store records, if that store is here."""
    try:
        meta = _store_meta(config_path)
    except UserError:  # a damaged store: the grid is labelled with class ids
        return None
    return list(meta["class_names"]) if meta and meta.get("class_names") else None


def _tokenizer_of(config_path: Path) -> str:
    """The tokenizer the run's config names (``data.tokenizer_checkpoint``), else the one its store records."""
    data = read_yaml(config_path).get("data") or {}
    checkpoint = data.get("tokenizer_checkpoint") or \
        ((_store_meta(config_path) or {}).get("tokenizer", {}).get("checkpoint"))
    if not checkpoint or not recorded_path(checkpoint).is_file():
        raise UserError(f"cannot find the tokenizer of {config_path} (data.tokenizer_checkpoint / its token store "
                        f"{data.get('store')!r} name {checkpoint!r}); give --vq-ckpt")
    return str(recorded_path(checkpoint))


def add_sampling_arguments(parser: argparse.ArgumentParser, cfg_scale: float = 1.0) -> None:
    """The flags sample_c2i.py and sample_c2i_ddp.py share (LlamaGen's names; ``cfg_scale`` its default)."""
    parser.add_argument("--experiment_dir", "--experiment-dir", default=None,
                        help="a training run's directory (default: the embedded demo's DPAR, assets/demo/dpar)")
    parser.add_argument("--epoch", type=epoch_choice, default=None,
                        help="checkpoint epoch, or 'latest' for the mid-epoch checkpoints/latest (default: the "
                             "newest epoch)")
    parser.add_argument("--output-dir", default="samples")
    parser.add_argument("--cfg-scale", type=field_type(SamplingConfig, "cfg_scale"), default=cfg_scale,
                        help="classifier-free guidance, >= 0 (1.0 = none)")
    parser.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="constant")
    parser.add_argument("--top-k", type=field_type(SamplingConfig, "top_k"), default=0,
                        help="keep the k most likely tokens, >= 0 (0 = all)")
    parser.add_argument("--top-p", type=field_type(SamplingConfig, "top_p"), default=1.0,
                        help="keep the most likely tokens holding this probability, in (0, 1] (1 = all)")
    parser.add_argument("--temperature", type=field_type(SamplingConfig, "temperature"), default=1.0,
                        help=">= 0; 0 = greedy")
    parser.add_argument("--seed", type=number(int, min=0, max=2**31 - 1), default=0)
    parser.add_argument("--threshold", type=field_type(PatcherConfig, "threshold"), default=None,
                        help="DPAR: entropy threshold at inference (default: the trained one; paper Table 6)")
    parser.add_argument("--max-patch-length", type=number(int, min=0), default=None,
                        help="DPAR: longest patch at inference, 0 = no cap (default: the trained one)")
    parser.add_argument("--self-entropy", action="store_true",
                        help="DPAR: boundaries from the model's own entropy at --threshold θ, no entropy model "
                             "(beyond the paper)")
    parser.add_argument("--static-shapes", action="store_true",
                        help="DPAR: every row through every stage at every step, no host sync (CUDA graphs, "
                             "torch.compile reduce-overhead); samples the same images (a GPT's steps are static "
                             "already: no effect)")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights (ema.safetensors)")
    parser.add_argument("--vq-ckpt", default=None, help="tokenizer (default: the one the training store records; "
                                                        "with --gpt-ckpt: required, e.g. vq_ds16_c2i.pt)")
    llamagen = parser.add_argument_group("a released LlamaGen checkpoint instead of a run (LlamaGen's flags)")
    llamagen.add_argument("--gpt-ckpt", default=None, help="LlamaGen c2i GPT weights, e.g. c2i_L_256.pt")
    llamagen.add_argument("--gpt-model", choices=tuple(GPT_models), default=None, help="its size (default GPT-B)")
    llamagen.add_argument("--image-size", type=number(int, min=1), default=None,
                          help="the size it was trained at (default 256)")


def epoch_choice(text: str) -> int | str:
    """An argparse ``type`` for ``--epoch``: an epoch number >= 0 or ``latest``."""
    if text == "latest":
        return text
    try:
        return number(int, min=0)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be an epoch number >= 0 or 'latest'; got {text!r}") from None


def sampler_from_args(args: argparse.Namespace, device: str | torch.device) -> Sampler:
    """The :class:`Sampler` the shared flags name: ``--gpt-ckpt`` (LlamaGen's) or ``--experiment_dir``."""
    if args.gpt_ckpt is None:
        given = [flag for flag, value in (("--gpt-model", args.gpt_model), ("--image-size", args.image_size))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]} describes a LlamaGen checkpoint; give it with --gpt-ckpt (a training run's "
                            "model comes from its config)")
        return Sampler.from_experiment(args.experiment_dir or DEMO_RUN, args.epoch, ema=args.ema,
                                       vq_checkpoint=args.vq_ckpt, device=device, threshold=args.threshold,
                                       max_patch_length=args.max_patch_length, self_entropy=args.self_entropy)
    run_flags = [flag for flag, value in (("--experiment_dir", args.experiment_dir), ("--epoch", args.epoch),
                                          ("--ema", args.ema or None), ("--threshold", args.threshold),
                                          ("--max-patch-length", args.max_patch_length),
                                          ("--self-entropy", args.self_entropy or None)) if value is not None]
    if run_flags:
        raise UserError(f"{run_flags[0]} belongs to a training run; --gpt-ckpt {args.gpt_ckpt} is a LlamaGen "
                        "checkpoint (a GPT: no epochs, EMA or patching)")
    if args.vq_ckpt is None:
        raise UserError(f"--gpt-ckpt {args.gpt_ckpt} needs --vq-ckpt, the tokenizer it was trained on (LlamaGen's "
                        "vq_ds16_c2i.pt)")
    return Sampler.from_llamagen(args.gpt_model or "GPT-B", args.gpt_ckpt, args.vq_ckpt, args.image_size or 256,
                                 device)


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(cfg_scale=args.cfg_scale, cfg_schedule=args.cfg_schedule, top_k=args.top_k,
                          top_p=args.top_p, temperature=args.temperature)


def sample_file_stem(name: str, sampling: SamplingConfig, seed: int, threshold: float | None = None,
                     max_patch_length: int | None = None, self_entropy: bool = False) -> str:
    """ADM-style sample file name, e.g. ``epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0``
    (``name``: :attr:`Sampler.name`)."""
    stem = (f"{name}-topk-{sampling.top_k}-topp-{sampling.top_p}-temperature-{sampling.temperature}-"
            f"cfg-{sampling.cfg_scale}-seed-{seed}")
    if sampling.cfg_schedule != "constant":
        stem += f"-schedule-{sampling.cfg_schedule}"
    if self_entropy:
        stem += "-self-entropy"
    if threshold is not None:
        stem += f"-threshold-{threshold}"
    if max_patch_length is not None:
        stem += f"-maxlen-{max_patch_length or 'none'}"
    return stem


def class_order_labels(num_samples: int, num_classes: int) -> Tensor:
    """Labels of samples 0..N-1 in class order, N/num_classes per class (50 per class for 50K on ImageNet)."""
    return torch.arange(num_samples) * num_classes // num_samples


class SampleChunks:
    """Resumable output of a sharded sampling run: ``<name>.parts/chunk_*.npy``, then one ADM ``<name>.npz``.

    Chunk k holds samples ``k * chunk .. (k + 1) * chunk - 1`` and belongs to process ``k % processes``.
    Each chunk is written atomically, so a killed run redoes only missing chunks, and ``pack`` writes
    exactly ``num_samples`` images in sample order. The ``.npz`` also records ``job`` (key ``dpar_job``,
    JSON): everything that decides its images. An existing ``.npz`` is reused only by the same job; another
    job's is refused, never silently kept. While a run writes, every process holds a lock on the parts
    folder, so a second run on the same output is refused while any process of the first lives.
    """

    JOB_KEY = "dpar_job"

    def __init__(self, npz_path: str | Path, num_samples: int, chunk: int, job: dict):
        self.npz_path, self.num_samples, self.chunk = Path(npz_path), num_samples, chunk
        self.parts = self.npz_path.with_suffix(".parts")
        self.job = {**job, "num_samples": num_samples}
        self.count = -(-num_samples // chunk)
        self._lock: int | None = None

    def finished(self) -> bool:
        """Whether this job's ``.npz`` exists (parts a killed run left next to it are removed). Raises
        :class:`UserError` for an ``.npz`` of another job, or one that does not say which job made it."""
        check_output_file(self.npz_path, "the samples file")
        check_output_dir(self.parts, "the samples' parts folder")
        if not self.npz_path.exists():
            return False
        recorded = _recorded_job(self.npz_path, self.JOB_KEY)
        if zipfile.ZipFile(self.npz_path).testzip() is not None:  # reads it all: a bad CRC is not "done"
            raise UserError(f"{self.npz_path} is damaged (bad CRC); delete it and rerun")
        changed = [key for key in self.job if recorded.get(key) != self.job[key]]
        if changed:
            key = changed[0]
            raise UserError(f"{self.npz_path} exists from another sampling job ({key} {recorded.get(key)!r}, this "
                            f"run {self.job[key]!r}); delete it or choose another --output-dir")
        shutil.rmtree(self.parts, ignore_errors=True)
        return True

    def start(self, main_process: bool) -> None:
        """Take this run's lock on the parts folder; the main process first checks that an unfinished run
        there was the same job, then creates the folder. Call on the main process, then on the others."""
        job = {**self.job, "chunk": self.chunk}
        job_file = self.parts / "job.json"
        if main_process:
            if job_file.is_file() and any(self.parts.glob("chunk_*.npy")):  # parts with no chunk block nothing
                try:
                    previous = json.loads(job_file.read_text())
                except (OSError, ValueError):
                    raise UserError(f"{job_file} is damaged; delete {self.parts} to start over") from None
                changed = [k for k in job if previous.get(k) != job[k]]
                if changed:
                    raise UserError(f"{self.parts} holds an unfinished run with {changed[0]}="
                                    f"{previous.get(changed[0])!r}; this run has {job[changed[0]]!r} (delete the "
                                    "folder to start over)")
            self.parts.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(self.parts, "a sampling run", shared=not main_process)
        if main_process:
            fcntl.flock(self._lock, fcntl.LOCK_SH)  # others of this run may now join
            if not job_file.is_file() or not any(self.parts.glob("chunk_*.npy")):
                atomic_write_text(job_file, json.dumps(job, indent=1) + "\n")

    def file(self, k: int) -> Path:
        return self.parts / f"chunk_{k:06d}.npy"

    def todo(self, rank: int, processes: int) -> list[int]:
        return [k for k in range(rank, self.count, processes) if not self.file(k).is_file()]

    def indices(self, k: int) -> Tensor:
        return torch.arange(k * self.chunk, min((k + 1) * self.chunk, self.num_samples))

    def _chunk(self, k: int) -> np.ndarray:
        """Chunk ``k``; a damaged one is removed, so that the rerun samples it again."""
        try:
            return np.load(self.file(k), allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            self.file(k).unlink(missing_ok=True)
            raise UserError(f"{self.file(k)} was damaged ({first_line(error)}) and is removed; rerun the same "
                            "command to sample it again") from None

    def write(self, k: int, images: np.ndarray) -> None:
        with atomic_path(self.file(k)) as tmp, open(tmp, "wb") as f:
            np.save(f, images)

    def pack(self) -> Path:
        """All chunks -> ``arr_0 uint8 [N, H, W, 3]`` in sample order and the job, written atomically; parts
        removed."""
        missing = [k for k in range(self.count) if not self.file(k).is_file()]
        if missing:
            raise UserError(f"{self.parts} lacks chunk {missing[0]}; rerun the same command to finish it")
        images = np.concatenate([self._chunk(k) for k in range(self.count)])
        with atomic_path(self.npz_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, arr_0=images, **{self.JOB_KEY: np.array(json.dumps(self.job, sort_keys=True))})
        shutil.rmtree(self.parts)
        return self.npz_path


def _recorded_job(npz_path: Path, key: str) -> dict:
    """The job an ``.npz`` of :class:`SampleChunks` records; UserError for a file that records none."""
    try:
        with np.load(npz_path) as data:
            if key not in data.files:
                raise UserError(f"{npz_path} exists but does not record the sampling job that made it (an older "
                                "version or another tool wrote it); delete it or choose another --output-dir")
            return json.loads(str(data[key]))
    except (OSError, ValueError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise UserError(f"{npz_path} exists but cannot be read ({type(error).__name__}: {error}); delete it") from None
