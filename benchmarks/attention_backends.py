r"""Every packed-attention backend on the shapes of DPAR's global stream, checked against the reference.

    python benchmarks/attention_backends.py                                 # DGPT-tiny's shapes on a CPU
    python benchmarks/attention_backends.py --model DGPT-L --image-size 256 --downsample 16 \
        --batch-size 64 --device cuda                                         # bf16 on CUDA

The stream is one batch of images whose patch boundaries come from the paper's rule at the paper's mean
patch length (benchmarks/workloads.py), so its sequence lengths vary as in training. For each backend
``dpar.models.attention.attend`` can use here: forward and forward+backward time, and the largest
error of its output and input gradients against SDPA with the explicit block-diagonal causal mask
computed in fp32. ``padded`` is what packing replaces: the images padded to the longest one and run
through causal SDPA as a dense batch (compared on the real positions). Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workloads import check_grid, device_name, median_seconds, realistic_patch_starts  # noqa: E402
from dpar.flops import PAPER_TOKENS_PER_PATCH, build_on_meta  # noqa: E402
from dpar.errors import ArgumentParser, run_main  # noqa: E402
from dpar.models import MODEL_NAMES, PatchLayout  # noqa: E402
from dpar.models.attention import PackedSeqs, attend, available_backends  # noqa: E402
from dpar.validation import device, number  # noqa: E402


def padded_attention(q, k, v, packed: PackedSeqs):
    """Pad each sequence of the stream to the longest, run dense causal SDPA, and pack the result back."""
    starts = packed.cu_seqlens.tolist()
    heads, dim = q.shape[1], q.shape[3]

    def pad(t):
        out = t.new_zeros(len(packed.seqlens), heads, packed.max_seqlen, dim)
        for i, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            out[i, :, : hi - lo] = t[0, :, lo:hi]
        return out

    dense = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), is_causal=True)
    return torch.cat([dense[i, :, :n] for i, n in enumerate(packed.seqlens)], dim=1)[None]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DGPT-tiny", choices=MODEL_NAMES, metavar="MODEL",
                        help="DPAR size whose heads and head width are used (%(choices)s)")
    parser.add_argument("--image-size", type=number(int, min=1), default=32)
    parser.add_argument("--downsample", type=number(int, min=1), default=4)
    parser.add_argument("--batch-size", type=number(int, min=1), default=64, help="images in the packed stream")
    parser.add_argument("--tokens-per-patch", type=number(float, min=1), default=None,
                        help="mean patch length (default: the paper's figure for the image size, else 1.81)")
    parser.add_argument("--repeats", type=number(int, min=1), default=20, help="timed calls (median reported)")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    args = parser.parse_args(argv)
    check_grid([args.image_size], args.downsample)
    dtype = getattr(torch, args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32"))
    grid = args.image_size // args.downsample
    config = build_on_meta(args.model, grid).config
    tokens_per_patch = args.tokens_per_patch or PAPER_TOKENS_PER_PATCH.get(args.image_size, 1.81)
    starts = realistic_patch_starts(args.batch_size, grid, tokens_per_patch)
    packed = PatchLayout.from_mask(starts, grid).packed.to(args.device)

    generator = torch.Generator(device=args.device).manual_seed(0)
    shape = (1, config.n_head, packed.total, config.head_dim)
    q, k, v = (torch.randn(shape, generator=generator, device=args.device) for _ in range(3))
    grad_out = torch.randn(shape, generator=generator, device=args.device)

    def forward_backward(fn, dtype_, grad: bool):
        inputs = [t.detach().to(dtype_).requires_grad_(grad) for t in (q, k, v)]  # fresh leaves each call
        out = fn(*inputs)
        if not grad:
            return out.float(), None
        out.backward(grad_out.to(dtype_))
        return out.float(), [t.grad.float() for t in inputs]

    reference, reference_grads = forward_backward(lambda *t: attend(*t, causal=True, packed=packed, backend="sdpa"),
                                                  torch.float32, True)
    candidates = {name: (lambda *t, name=name: attend(*t, causal=True, packed=packed, backend=name))
                  for name in available_backends(args.device, dtype)}
    candidates["padded"] = lambda *t: padded_attention(*t, packed)
    trainable = set(available_backends(args.device, dtype, grad=True)) | {"padded"}

    print(f"device {device_name(args.device)}, torch {torch.__version__}, {dtype}, {args.model} heads "
          f"{config.n_head} x {config.head_dim}, {args.batch_size} images, {packed.total} positions "
          f"({grid * grid * args.batch_size / packed.total:.2f} tokens/patch), longest sequence {packed.max_seqlen}\n")
    print("| backend | forward ms | forward+backward ms | max abs error (output) | max abs error (gradients) |")
    print("|---|---|---|---|---|")
    for name, fn in candidates.items():
        grad = name in trainable
        out, grads = forward_backward(fn, dtype, grad)
        error = (out - reference).abs().max().item()
        grad_error = max((g - r).abs().max().item() for g, r in zip(grads, reference_grads)) if grad else None
        with torch.no_grad():
            inputs = [t.to(dtype) for t in (q, k, v)]
            forward_ms = 1e3 * median_seconds(lambda: fn(*inputs), args.device, args.repeats)
        train_ms = (1e3 * median_seconds(lambda: forward_backward(fn, dtype, True), args.device, args.repeats)
                    if grad else None)
        print(f"| {name} | {forward_ms:.3f} | {'' if train_ms is None else f'{train_ms:.3f}'} | {error:.2e} | "
              f"{'no backward here' if grad_error is None else f'{grad_error:.2e}'} |", flush=True)


if __name__ == "__main__":
    run_main(main)
