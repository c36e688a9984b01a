r"""How much of an image a tokenizer keeps: encode -> decode every image of an ADM batch, report PSNR (and LPIPS
when its weights are given) and the codes in use, and write the reconstructions as an ADM batch, so the
evaluator scores them like samples (LlamaGen's ``tokenizer/tokenizer_image/reconstruction_vq_ddp.py`` does the
same for ImageNet's validation set, whose reconstructions then go to the ADM evaluator for rFID).

    python -m evaluations.reconstruction --vq-ckpt assets/demo/tokenizer/checkpoints/<epoch>/model.safetensors \
        assets/demo/classifier/reference.npz /tmp/reconstructions.npz
    python -m evaluations.c2i.evaluator assets/demo/classifier/reference.npz /tmp/reconstructions.npz \
        --features assets/demo/classifier/classifier.safetensors     # rFID, class accuracy of reconstructions

The input is an ADM batch (``arr_0`` uint8 ``[N, H, W, 3]``; ``arr_1`` labels, copied to the output when
present), e.g. a reference batch from ``python -m evaluations.c2i.reference_batch``. Its side must be a multiple
of the tokenizer's downsampling. PSNR is per image (peak 255, over all pixels and channels) and averaged over
the images, as LlamaGen reports it; an image reconstructed exactly counts as :data:`PSNR_CAP` dB. LPIPS (VGG16,
``tokenizer.lpips``) needs its weight files (nothing downloads): ``--lpips-weights`` and, when those hold no VGG
trunk, ``--vgg16-weights``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dpar.errors import ArgumentParser, UserError, run_main
from dpar.fileio import atomic_path, check_output_file, claim_output
from dpar.validation import number
from tokenizer.lpips import LPIPS
from tokenizer.vq_model import load_vq, uint8_to_unit

from .c2i.evaluator import ImageBatch, batch_labels

PSNR_CAP = 100.0  # dB for an image reconstructed exactly (its MSE is 0)


def psnr(original: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 ``[N, H, W, 3]`` images (peak 255), capped at :data:`PSNR_CAP`."""
    mse = ((original.astype(np.float64) - reconstructed.astype(np.float64)) ** 2).reshape(len(original), -1).mean(1)
    with np.errstate(divide="ignore"):
        return np.minimum(10 * np.log10(255.0 ** 2 / mse), PSNR_CAP)


def check_size(vq: torch.nn.Module, batch: ImageBatch) -> None:
    """One line unless the batch's images are square with a side the tokenizer's downsampling divides."""
    if batch.shape[1] != batch.shape[2] or batch.shape[1] % vq.downsample:
        raise UserError(f"{batch.path}: {batch.shape[1]}x{batch.shape[2]} px images; the tokenizer needs square "
                        f"images whose side is a multiple of its downsampling {vq.downsample}")


@torch.no_grad()
def reconstruct(vq: torch.nn.Module, batch: ImageBatch, batch_size: int = 64,
                lpips: LPIPS | None = None) -> tuple[np.ndarray, dict]:
    """(reconstructions uint8 ``[N, H, W, 3]``, summary): mean PSNR (dB), mean LPIPS (when ``lpips``), the number
    of distinct codes used over the batch and the codebook size."""
    check_size(vq, batch)
    side = batch.shape[1]
    outputs, psnrs, distances, used = [], [], [], torch.zeros(vq.config.codebook_size, dtype=torch.bool)
    for images in tqdm(batch.batches(batch_size), total=-(-len(batch) // batch_size), desc="reconstruct",
                       unit="batch"):
        x = torch.from_numpy(images.copy())
        codes = vq.images_to_codes(x)
        used[codes.unique()] = True
        rebuilt = vq.codes_to_images(codes, side // vq.downsample).numpy()
        outputs.append(rebuilt)
        psnrs.append(psnr(images, rebuilt))
        if lpips is not None:
            distances.append(lpips(uint8_to_unit(x), uint8_to_unit(torch.from_numpy(rebuilt))).flatten().numpy())
    summary = {"images": len(batch), "psnr_db": float(np.concatenate(psnrs).mean()),
               "codes_used": int(used.sum()), "codebook_size": int(vq.config.codebook_size)}
    if lpips is not None:
        summary["lpips"] = float(np.concatenate(distances).mean())
    return np.concatenate(outputs), summary


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", type=Path, help="ADM batch of real images (.npz: arr_0, optional arr_1)")
    parser.add_argument("output", type=Path, help="the reconstructions as an ADM batch (.npz); must not exist")
    parser.add_argument("--vq-ckpt", required=True, help="the tokenizer (model.safetensors of a train_vq run)")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS linear heads (vgg.pth); without: no LPIPS")
    parser.add_argument("--vgg16-weights", default=None, help="torchvision's VGG16, if --lpips-weights has no trunk")
    parser.add_argument("--batch-size", type=number(int, min=1), default=64, help="images per forward")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.vgg16_weights and not args.lpips_weights:
        raise UserError("--vgg16-weights is the trunk of LPIPS: give --lpips-weights too")
    batch = ImageBatch(args.reference, minimum=1)
    labels = batch_labels(args.reference, len(batch))  # copied to the output: checked as the evaluator checks them
    outputs = {args.output: "the output"} | ({args.json: "--json"} if args.json else {})
    if args.json and args.json.resolve() == args.output.resolve():
        raise UserError(f"--json {args.json} is the output file; give another name")
    for path, what in outputs.items():
        if path.exists() or path.resolve() == args.reference.resolve():
            raise UserError(f"{what} {path} exists; delete it first or choose another name")
        check_output_file(path, what)
    vq = load_vq(args.vq_ckpt)
    check_size(vq, batch)
    lpips = LPIPS.from_files(args.lpips_weights, args.vgg16_weights) if args.lpips_weights else None
    claims = [claim_output(path, what) for path, what in outputs.items()]
    images, summary = reconstruct(vq, batch, args.batch_size, lpips)
    with atomic_path(args.output) as tmp, open(tmp, "wb") as f:
        np.savez(f, images, *([] if labels is None else [labels]))
    lpips_text = f", LPIPS {summary['lpips']:.4f}" if "lpips" in summary else " (no LPIPS: give --lpips-weights)"
    print(f"{summary['images']} images: PSNR {summary['psnr_db']:.2f} dB{lpips_text}; {summary['codes_used']} of "
          f"{summary['codebook_size']} codes in use -> {args.output}")
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(summary, indent=1) + "\n")
    del claims


if __name__ == "__main__":
    run_main(main)
