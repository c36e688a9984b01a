r"""The patches DPAR would cut any image into: the paper's Figure 2 for your own pictures (arXiv 2512.21867).

    python -m dpar.patchmap photo.jpg cat.png --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --entropy-model-checkpoint <entropy run>/checkpoints/epoch_00000299/model.safetensors [--threshold 7.8]
    python -m dpar.patchmap photo.jpg --vq-ckpt vq_ds16_c2i.pt --entropy-model-checkpoint c2i_B_256.pt \
        --entropy-model-gpt GPT-B --image-size 256            # a LlamaGen c2i GPT at its null class
    python -m dpar.patchmap photo.jpg --experiment_dir <DPAR run>   # that run's tokenizer, entropy model and patcher

Each image is center-cropped to the model's size (as the token store's one view), tokenized, and its
next-token entropies give the boundaries (section 3.2.1: θ, the cap P, the row break). Writes
``<output-dir>/<image>_patches.png``: the crop beside its patch map (each token tinted by its patch's
length, a dark line where a patch starts, a legend below) and prints tokens per patch for each image.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .config import read_section
from .data.preprocess import next_token_entropies
from .errors import ArgumentParser, UserError, run_main
from .fileio import check_output_dir, check_output_file, claim_outputs
from .models import GPT_models, ModelConfig
from .patcher import PatcherConfig, patch_starts
from .runs import load_entropy_model, run_config, run_patching, run_tokenizer
from .validation import device, field_type, number
from .visual import image_grid, patch_map, save_png, with_patch_legend
from tokenizer.transforms import load_center_crop
from tokenizer.vq_model import load_vq


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", help="image files (any size; center-cropped)")
    parser.add_argument("--experiment_dir", "--experiment-dir", default=None,
                        help="a DPAR run with entropy patching: its tokenizer, entropy model, θ, P and row break")
    parser.add_argument("--vq-ckpt", default=None, help="the tokenizer (LlamaGen's .pt or a train_vq run's; with "
                                                        "--experiment_dir: default the run's)")
    parser.add_argument("--entropy-model-checkpoint", default=None, help="a train_entropy_model.py run's weights, "
                                                                          "or a LlamaGen c2i .pt")
    parser.add_argument("--entropy-model-config", default=None, help="its config.yaml (default: next to it)")
    parser.add_argument("--entropy-model-gpt", choices=tuple(GPT_models), default=None,
                        help="the checkpoint is a LlamaGen c2i GPT of this size, read at its null class")
    parser.add_argument("--image-size", type=number(int, min=1), default=None,
                        help="crop size (default: the entropy model's; 256 for a LlamaGen checkpoint)")
    parser.add_argument("--threshold", type=field_type(PatcherConfig, "threshold"), default=None,
                        help="θ in nats (default: the run's, else 7.8, the paper's at 256 px)")
    parser.add_argument("--max-patch-length", type=number(int, min=0), default=None,
                        help="P, 0 = no cap (default: the run's, else 4)")
    parser.add_argument("--no-row-break", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--zoom", type=number(int, min=1, max=16), default=1,
                        help="draw on the crop enlarged this many times (small images)")
    parser.add_argument("--output-dir", default="patchmaps")
    parser.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such image file")
    check_output_dir(args.output_dir, "--output-dir")
    outputs = [check_output_file(Path(args.output_dir) / f"{Path(path).stem}_patches.png", f"the patch map of {path}")
               for path in args.images]
    if len(set(outputs)) < len(outputs):
        twins = [path for path, out in zip(args.images, outputs) if outputs.count(out) > 1]
        raise UserError(f"{twins[0]} and {twins[1]} would both be drawn to {outputs[args.images.index(twins[0])]}; "
                        "give images of different names")

    vq, entropy_model, patcher = _models(args)
    claim_outputs({out: f"the patch map of {path}" for path, out in zip(args.images, outputs)})
    grid = int(np.sqrt(entropy_model.block_size))
    crops = torch.stack([torch.from_numpy(load_center_crop(path, grid * vq.downsample)) for path in args.images])
    with torch.no_grad():
        tokens = vq.images_to_codes(crops.to(args.device))
        starts = patch_starts(patcher, next_token_entropies(entropy_model, tokens), grid).cpu()
    zoomed = crops.repeat_interleave(args.zoom, dim=1).repeat_interleave(args.zoom, dim=2)
    maps = patch_map(zoomed, starts, grid)
    print(f"θ {patcher.threshold} nats, P {patcher.max_patch_length}, row break {patcher.row_break}, "
          f"{grid}x{grid} tokens")
    for path, out, crop, picture, start in zip(args.images, outputs, zoomed, maps, starts):
        save_png(with_patch_legend(image_grid(torch.stack([crop, torch.from_numpy(picture)]), nrow=2)), out)
        print(f"{path}: {len(start) / int(start.sum()):.2f} tokens per patch ({int(start.sum())} patches) -> {out}")


def _models(args: argparse.Namespace):
    """(tokenizer, entropy model, patcher) from ``--experiment_dir`` or the explicit flags."""
    if args.experiment_dir is not None:
        given = [flag for flag, value in (("--image-size", args.image_size),
                                          ("--entropy-model-checkpoint", args.entropy_model_checkpoint),
                                          ("--entropy-model-config", args.entropy_model_config),
                                          ("--entropy-model-gpt", args.entropy_model_gpt)) if value is not None]
        if given:
            raise UserError(f"{given[0]} comes from --experiment_dir {args.experiment_dir}; give one or the other")
        config_path = run_config(Path(args.experiment_dir))  # the run's config only: no weights needed
        model_config = read_section(config_path, "model", ModelConfig)
        patcher, entropy_model = run_patching(config_path, model_config, args.device)
        if patcher is None or patcher.mode != "entropy":
            raise UserError(f"--experiment_dir {args.experiment_dir} does not patch by entropy (a "
                            f"{model_config.gpt_model} run{'' if patcher is None else ', mode ' + patcher.mode})")
        vq = run_tokenizer(config_path, model_config, args.vq_ckpt)[0].to(args.device)
    else:
        if not args.vq_ckpt or not args.entropy_model_checkpoint:
            raise UserError("give --vq-ckpt and --entropy-model-checkpoint (or --experiment_dir, a DPAR run)")
        if args.entropy_model_gpt is None and args.image_size is not None:
            raise UserError("--image-size is the size of a LlamaGen checkpoint (--entropy-model-gpt); a trained "
                            "entropy model's comes from its config")
        vq = load_vq(args.vq_ckpt).to(args.device)
        image_size = (args.image_size or 256) if args.entropy_model_gpt else None
        entropy_model, config = load_entropy_model(args.entropy_model_checkpoint, args.entropy_model_config,
                                                   llamagen_gpt=args.entropy_model_gpt, image_size=image_size,
                                                   downsample_size=vq.downsample, vocab_size=vq.config.codebook_size)
        if config.downsample_size != vq.downsample:
            raise UserError(f"the entropy model reads tokens of a {config.downsample_size}x tokenizer, "
                            f"--vq-ckpt {args.vq_ckpt} downsamples {vq.downsample}x")
        entropy_model, patcher = entropy_model.to(args.device), PatcherConfig()
    if args.threshold is not None:
        patcher = replace(patcher, threshold=args.threshold)
    if args.max_patch_length is not None:
        patcher = replace(patcher, max_patch_length=args.max_patch_length or None)
    if args.no_row_break:
        patcher = replace(patcher, row_break=False)
    return vq, entropy_model, patcher


if __name__ == "__main__":
    run_main(main)
