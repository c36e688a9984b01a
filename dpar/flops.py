"""Parameter and FLOP accounting, measured by running the real modules on the meta device.

Nothing here is a formula: the model is built on ``meta`` (no memory, so even DGPT-XXL answers in
seconds) and one forward per sample runs under ``torch.utils.flop_counter.FlopCounterMode``.

- ``linear_gmacs``: forward multiply-accumulates per sample in linear layers (matrix products with
  a weight: ``aten.mm`` / ``aten.addmm``), the convention of the paper's Table 8, which leaves out
  attention score/value products.
- ``gflops``: all forward FLOPs per sample (2 per MAC), attention included; attention is counted as
  dense products, the way FlopCounterMode counts SDPA.

DPAR's cost depends on the number of patches M = N / tokens_per_patch. When M is fractional the
sample is a mix of the two nearest integer patch counts with that mean, each measured for real.

    python -m dpar.flops --model DGPT-L --image-size 256 --json
    python -m dpar.flops --tables        # paper Tables 1 and 8, reproduced
    python -m dpar.flops --model DGPT-L --n-enc-layer 2 --n-dec-layer 3   # Table 10's E2D3
    python -m dpar.flops --memory --micro-batch 32 --gpus 16   # per-GPU training memory, DDP and FSDP
"""
from __future__ import annotations

import argparse
import json
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import ArgumentParser, UserError, run_main
from .models import (DPAR_OPTIONS, MODEL_NAMES, DPAR_models, GPT_models, ModelConfig, PatchLayout, architecture,
                     is_dpar)
from .models.dpar import DECODER_INJECTIONS
from .models.rope import ROPE_MODES
from .validation import check_flags, number

# Paper Table 6 / section 4.1: mean tokens per patch on ImageNet with the default patcher.
PAPER_TOKENS_PER_PATCH = {256: 1.81, 384: 2.06}
# Parameters: DPAR from paper Table 1, LlamaGen from paper Table 2 (LlamaGen's own figures).
PAPER_PARAMS = {"GPT-B": 111e6, "GPT-L": 343e6, "GPT-XL": 775e6, "GPT-XXL": 1.4e9,
                "DGPT-B": 120e6, "DGPT-L": 352e6, "DGPT-XL": 789e6, "DGPT-XXL": 1.4e9}
# Paper Table 8: forward linear GMACs per sample (the paper's column header says GFLOPs).
PAPER_LINEAR_GMACS = {
    ("GPT-B", 256): 24.98, ("GPT-L", 256): 83.26, ("GPT-XL", 256): 192.69,
    ("GPT-B", 384): 56.21, ("GPT-L", 384): 187.35, ("GPT-XL", 384): 433.57,
    ("DGPT-B", 256): 19.21, ("DGPT-L", 256): 56.74, ("DGPT-XL", 256): 125.52,
    ("DGPT-B", 384): 40.92, ("DGPT-L", 384): 117.92, ("DGPT-XL", 384): 258.53,
}
_LINEAR_OPS = (torch.ops.aten.mm, torch.ops.aten.addmm)


def build_on_meta(name: str, grid_size: int, vocab_size: int = 16384, num_classes: int = 1000,
                  **architecture) -> torch.nn.Module:
    """Model ``name`` on the meta device; ``architecture``: DPAR options (``dpar.models.architecture``)."""
    zoo = DPAR_models if is_dpar(name) else GPT_models
    with torch.device("meta"):
        model = zoo[name](vocab_size=vocab_size, block_size=grid_size ** 2, num_classes=num_classes, **architecture)
    return model.eval()


def measure_forward(model: torch.nn.Module, *inputs, **kwargs) -> tuple[int, int]:
    """(linear MACs, all FLOPs) of one forward."""
    with FlopCounterMode(display=False) as counter:
        model(*inputs, **kwargs)
    counts = counter.get_flop_counts()["Global"]
    linear_flops = sum(n for op, n in counts.items() if op in _LINEAR_OPS)
    return linear_flops // 2, counter.get_total_flops()


def evenly_spaced_patches(num_tokens: int, num_patches: int) -> torch.Tensor:
    """A ``[1, N]`` patch-start mask with ``num_patches`` patches of near-equal length."""
    mask = torch.zeros(1, num_tokens, dtype=torch.bool)
    mask[0, torch.arange(num_patches) * num_tokens // num_patches] = True
    return mask


def count(name: str, image_size: int, tokens_per_patch: float | None = None, downsample_size: int = 16,
          vocab_size: int = 16384, num_classes: int = 1000, **architecture) -> dict:
    """Parameters and per-sample forward cost of model ``name`` at ``image_size`` pixels.

    ``architecture``: DPAR's options as ``DPARArgs`` keywords (``n_enc_layer``, ``n_dec_layer``,
    ``encoder_pooling_ffn``, ``decoder_injection``, ``rope``), e.g. from ``dpar.models.architecture``; a
    model whose :class:`~dpar.models.ModelConfig` passes its ``check``. ``UserError`` for a DPAR without a
    tokens-per-patch figure (given, or the paper's at this size) in [1, tokens per image] (``--tokens-per-patch``).
    """
    assert name in MODEL_NAMES and image_size % downsample_size == 0, (name, image_size, downsample_size)
    grid = image_size // downsample_size
    num_tokens = grid * grid
    model = build_on_meta(name, grid, vocab_size, num_classes, **architecture)
    params = sum(p.numel() for p in model.parameters())
    label = torch.zeros(1, dtype=torch.long, device="meta")

    if not is_dpar(name):
        tokens = torch.zeros(1, num_tokens - 1, dtype=torch.long, device="meta")
        linear, total = measure_forward(model, tokens, label)
        tokens_per_patch, patches = 1.0, float(num_tokens)
    else:
        if tokens_per_patch is None:
            tokens_per_patch = PAPER_TOKENS_PER_PATCH.get(image_size)
            if tokens_per_patch is None:
                raise UserError(f"give --tokens-per-patch for image size {image_size} (the paper reports "
                                f"{', '.join(f'{k} px: {v}' for k, v in PAPER_TOKENS_PER_PATCH.items())})")
        if not 1.0 <= tokens_per_patch <= num_tokens:
            raise UserError(f"--tokens-per-patch must lie in [1, {num_tokens}] at image size {image_size}, got "
                            f"{tokens_per_patch}")
        patches = num_tokens / tokens_per_patch
        tokens = torch.zeros(1, num_tokens, dtype=torch.long, device="meta")
        low, high = math.floor(patches), math.ceil(patches)
        weight_high = patches - low
        linear, total = 0.0, 0.0
        for num_patches, weight in ((low, 1 - weight_high), (high, weight_high)):
            if weight == 0:
                continue
            mask = evenly_spaced_patches(num_tokens, num_patches)
            layout = PatchLayout.from_mask(mask, grid).to("meta")
            run_linear, run_total = measure_forward(model, tokens, label, mask.to("meta"), layout=layout)
            linear += weight * run_linear
            total += weight * run_total

    return {
        "model": name,
        "image_size": image_size,
        "grid_size": grid,
        "tokens": num_tokens,
        "tokens_per_patch": tokens_per_patch,
        "patches_per_image": patches,
        "params": int(params),
        "linear_gmacs": linear / 1e9,
        "gflops": total / 1e9,
        "attention_gflops": (total - 2 * linear) / 1e9,
        **architecture,
    }


def saved_activation_bytes(model: torch.nn.Module, *inputs, **kwargs) -> int:
    """Bytes of the tensors one forward saves for backward (the activations a training step holds at its peak,
    before backward frees them), counted on whatever device ``model`` is on (``meta``: no memory). Each storage
    counts once (views share it); the parameters, which backward also keeps, are not activations."""
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: set[int] = set()
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        storage = tensor.untyped_storage()
        if storage._cdata not in weights and storage._cdata not in seen:
            seen.add(storage._cdata)
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(*inputs, **kwargs)
    return total


def training_memory(name: str, image_size: int, micro_batch: int, gpus: int = 8,
                    tokens_per_patch: float | None = None, ema: bool = True, downsample_size: int = 16,
                    vocab_size: int = 16384, num_classes: int = 1000, **architecture) -> dict:
    """Bytes per GPU of training model ``name`` (fp32 weights, gradients and AdamW's two moments as this
    trainer keeps them, EMA weights when ``ema``) at ``micro_batch`` images per GPU, under DDP (every GPU holds
    all of it) and under full sharding over ``gpus`` GPUs (FSDP / ZeRO-3: the weight, gradient, optimizer and
    EMA bytes divided by ``gpus``, plus one block's weights and gradients gathered whole). Activations are
    what one training forward (train mode, loss included) saves for backward, measured on the meta device in
    fp32: bf16 autocast stores most of them in half the bytes. Allocator slack, kernels' workspaces and the
    CUDA context (~0.5-1 GB) come on top. DPAR is measured at ``tokens_per_patch`` (default: the paper's)."""
    assert name in MODEL_NAMES and image_size % downsample_size == 0 and micro_batch >= 1 and gpus >= 1
    grid = image_size // downsample_size
    num_tokens = grid * grid
    model = build_on_meta(name, grid, vocab_size, num_classes, **architecture).train()
    params = sum(p.numel() for p in model.parameters())
    labels = torch.zeros(micro_batch, dtype=torch.long, device="meta")
    tokens = torch.zeros(micro_batch, num_tokens, dtype=torch.long, device="meta")
    if is_dpar(name):
        per_patch = tokens_per_patch or PAPER_TOKENS_PER_PATCH.get(image_size)
        if per_patch is None or not 1.0 <= per_patch <= num_tokens:
            raise UserError(f"--tokens-per-patch must be given in [1, {num_tokens}] at image size {image_size}")
        mask = evenly_spaced_patches(num_tokens, round(num_tokens / per_patch)).expand(micro_batch, -1)
        layout = PatchLayout.from_mask(mask, grid).to("meta")
        activations = saved_activation_bytes(model, tokens, labels, mask.to("meta"), targets=tokens, layout=layout)
    else:
        activations = saved_activation_bytes(model, tokens[:, :-1], labels, targets=tokens)
    blocks = [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]
    largest_block = max((sum(p.numel() for p in block[0].parameters()) for block in blocks if len(block)), default=0)
    parts = {"weights": 4 * params, "gradients": 4 * params, "adamw_state": 8 * params,
             "ema": 4 * params if ema else 0}
    states = sum(parts.values())
    return {"model": name, "image_size": image_size, "micro_batch": micro_batch, "gpus": gpus, "params": params,
            **{f"{key}_gb": value / 2**30 for key, value in parts.items()},
            "activations_gb": activations / 2**30,
            "ddp_gb": (states + activations) / 2**30,
            "fsdp_gb": (states / gpus + 8 * largest_block + activations) / 2**30}


def _pct(measured: float, paper: float) -> str:
    return f"{100 * (measured - paper) / paper:+.1f}%"


def tables_markdown() -> str:
    """Paper Tables 1 and 8 next to the figures this code measures."""
    lines = ["Parameters (paper Table 1 for DPAR, Table 2 for LlamaGen):", "",
             "| model | paper | measured | diff |", "|---|---|---|---|"]
    for name, paper in PAPER_PARAMS.items():
        params = count(name, 256)["params"]
        lines.append(f"| {name} | {paper / 1e6:,.0f}M | {params / 1e6:,.1f}M | {_pct(params, paper)} |")
    lines += ["", "Forward linear GMACs per sample (paper Table 8; DPAR at 1.81 tokens/patch at 256 px, "
              "2.06 at 384 px):", "",
              "| variant | LlamaGen paper | LlamaGen measured | diff | DPAR paper | DPAR measured | diff |",
              "|---|---|---|---|---|---|---|"]
    for size in ("B", "L", "XL"):
        for image_size in (256, 384):
            row = [f"{size}-{image_size}"]
            for name in (f"GPT-{size}", f"DGPT-{size}"):
                paper = PAPER_LINEAR_GMACS[(name, image_size)]
                measured = count(name, image_size)["linear_gmacs"]
                row += [f"{paper:.2f}", f"{measured:.2f}", _pct(measured, paper)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


MEMORY_MODELS = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B", "GPT-7B", "DGPT-B", "DGPT-L", "DGPT-XL", "DGPT-XXL")


def memory_markdown(micro_batch: int, gpus: int, ema: bool = True) -> str:
    """:func:`training_memory` of every size at 256 and 384 px, one markdown table."""
    lines = [f"GB per GPU at micro-batch {micro_batch} (fp32 weights, gradients, AdamW"
             f"{', EMA' if ema else ''}; activations measured in fp32; FSDP: fully sharded over {gpus} GPUs):", "",
             "| model | px | params | weights + grads + AdamW + EMA | activations | DDP | FSDP |",
             "|---|---|---|---|---|---|---|"]
    for name in MEMORY_MODELS:
        for image_size in (256, 384):
            m = training_memory(name, image_size, micro_batch, gpus, ema=ema)
            states = m["weights_gb"] + m["gradients_gb"] + m["adamw_state_gb"] + m["ema_gb"]
            lines.append(f"| {name} | {image_size} | {m['params'] / 1e6:,.0f}M | {states:.1f} | "
                         f"{m['activations_gb']:.1f} | {m['ddp_gb']:.1f} | {m['fsdp_gb']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m dpar.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=MODEL_NAMES, default="DGPT-B")
    parser.add_argument("--image-size", type=number(int, min=1), default=256)
    parser.add_argument("--tokens-per-patch", type=number(float, min=1), default=None,
                        help="DPAR only; default: the paper's 1.81 (256 px) / 2.06 (384 px)")
    parser.add_argument("--n-enc-layer", type=number(int, min=1), default=None,
                        help="DPAR: patch-encoder blocks (default: the size's own; paper Table 10)")
    parser.add_argument("--n-dec-layer", type=number(int, min=1), default=None,
                        help="DPAR: patch-decoder blocks (default: the size's own)")
    parser.add_argument("--encoder-pooling-ffn", action=argparse.BooleanOptionalAction,
                        default=ModelConfig.encoder_pooling_ffn,
                        help="DPAR: a SwiGLU FFN after the encoder's patch cross-attention (not in the paper; "
                             "default: %(default)s)")
    parser.add_argument("--decoder-injection", choices=DECODER_INJECTIONS, default=ModelConfig.decoder_injection,
                        help="DPAR: the patch vector enters the decoder before every block (the paper), once, or "
                             "the global output as is (residual; default: %(default)s)")
    parser.add_argument("--rope", choices=ROPE_MODES, default="dynamic",
                        help="DPAR: RoPE of the global transformer (paper Table 9; no linear-layer cost)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--tables", action="store_true", help="print paper Tables 1 and 8 with measured values")
    memory = parser.add_argument_group("memory plan (--memory)")
    memory.add_argument("--memory", action="store_true",
                        help="per-GPU training memory of every size at 256 and 384 px, DDP and FSDP")
    memory.add_argument("--micro-batch", type=number(int, min=1), default=32, help="images per GPU and step")
    memory.add_argument("--gpus", type=number(int, min=1), default=8, help="GPUs that FSDP shards over")
    memory.add_argument("--no-ema", dest="ema", action="store_false", help="without EMA weights (train.ema false)")
    args = parser.parse_args(argv)
    if args.tables:
        print(tables_markdown())
        return
    if args.memory:
        print(memory_markdown(args.micro_batch, args.gpus, args.ema))
        return
    options = ModelConfig(gpt_model=args.model, image_size=args.image_size, rope=args.rope,
                          n_enc_layer=args.n_enc_layer, n_dec_layer=args.n_dec_layer,
                          encoder_pooling_ffn=args.encoder_pooling_ffn, decoder_injection=args.decoder_injection)
    check_flags(options, {name: "--" + name.replace("_", "-") for name in DPAR_OPTIONS + ("image_size",)} |
                {"gpt_model": "--model",
                 "downsample_size": "the VQ-16 downsampling factor"})
    result = count(args.model, args.image_size, args.tokens_per_patch, **architecture(options))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>19}: {value:,.3f}" if isinstance(value, float) else f"{key:>19}: {value}")


if __name__ == "__main__":
    run_main(main)
