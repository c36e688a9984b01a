r"""Preprocess an image dataset once: VQ tokens of every view (--stage tokens), then entropies (--stage entropies).

    python preprocess_tokens.py --stage tokens --data-path imagenet/train --store data/imagenet256_tokens \
        --vq-ckpt pretrained_models/vq_ds16_c2i.pt --image-size 256 --views 20
    python preprocess_tokens.py --stage entropies --store data/imagenet256_tokens \
        --entropy-model-checkpoint <dir>/checkpoints/epoch_00000299/model.safetensors
    # or, without training an entropy model, a released LlamaGen c2i GPT at its null class:
    python preprocess_tokens.py --stage entropies --store data/imagenet256_tokens \
        --entropy-model-checkpoint pretrained_models/c2i_B_256.pt --entropy-model-gpt GPT-B

Both stages shard over processes with ``accelerate launch`` and continue where a killed run stopped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator

from tokenizer.images import list_images
from dpar.data.preprocess import (TokenJob, entropy_shards, finish_entropies, finish_tokens, listing_hash,
                                  next_token_entropies, start_entropies, start_store, tokenize_shards,
                                  trained_tokenizer_sha256)
from dpar.data.store import TokenStore, file_sha256, read_meta
from dpar.errors import ArgumentParser, UserError, run_main
from dpar.runs import load_entropy_model
from dpar.models import GPT_models
from dpar.fileio import check_output_dir
from dpar.launch import make_accelerator
from dpar.validation import MAX_IMAGE_SIZE, field_type, number
from tokenizer.transforms import VIEW_COUNTS
from tokenizer.vq_model import VQ_models, VQConfig, load_vq


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            allow_abbrev=False)
    parser.add_argument("--stage", choices=("tokens", "entropies"), required=True)
    parser.add_argument("--store", required=True, help="token store directory (created by --stage tokens)")
    parser.add_argument("--batch-size", type=number(int, min=1), default=64,
                        help="tokens: images per tokenizer call (x views); entropies: sequences per forward")
    tokens = parser.add_argument_group("--stage tokens")
    tokens.add_argument("--data-path", help="ImageFolder directory (<class>/<image>) or a '<path> <label>' list file")
    tokens.add_argument("--vq-ckpt", help="LlamaGen's vq_ds16_c2i.pt, or a train_vq run's model.safetensors")
    tokens.add_argument("--vq-model", choices=tuple(VQ_models), default="VQ-16", help="for a LlamaGen .pt")
    tokens.add_argument("--codebook-size", type=field_type(VQConfig, "codebook_size"), default=16384,
                        help="for a LlamaGen .pt")
    tokens.add_argument("--codebook-embed-dim", type=field_type(VQConfig, "codebook_embed_dim"), default=8,
                        help="for a LlamaGen .pt")
    tokens.add_argument("--image-size", type=number(int, min=1, max=MAX_IMAGE_SIZE), default=256,
                        help="crop size in pixels (256 or 384 in the paper)")
    tokens.add_argument("--views", type=int, choices=VIEW_COUNTS, default=20,
                        help="1 center crop; 2 + flip; 10 ten-crop (flips included); 20 ten-crop at 1.1 and 1.05")
    tokens.add_argument("--crop-range", type=number(float, min=1), default=1.1,
                        help="ten-crop source size / image size, >= 1")
    tokens.add_argument("--shard-size", type=number(int, min=1), default=10000,
                        help="images per shard (the unit of resumption)")
    tokens.add_argument("--num-workers", type=number(int, min=0), default=8, help="image-decoding DataLoader workers")
    entropies = parser.add_argument_group("--stage entropies")
    entropies.add_argument("--entropy-model-checkpoint",
                           help="the entropy model's model.safetensors (or a LlamaGen c2i .pt, see --entropy-model-gpt)")
    entropies.add_argument("--entropy-model-config", help="its config.yaml (default: the run's, next to it)")
    entropies.add_argument("--entropy-model-gpt", choices=tuple(GPT_models), default=None,
                           help="the checkpoint is a released LlamaGen c2i GPT of this size (e.g. GPT-B for "
                                "c2i_B_256.pt): entropies of its null-class predictions, no entropy model to train")
    entropies.add_argument("--overwrite", action="store_true", help="replace entropies of another entropy model")
    return parser.parse_args(argv)


def stage_tokens(args: argparse.Namespace, accelerator: Accelerator) -> None:
    if not args.data_path or not args.vq_ckpt:
        raise UserError("--stage tokens needs --data-path and --vq-ckpt")
    store = check_output_dir(args.store, "--store")
    paths, labels, class_names = list_images(args.data_path)
    vq_config = VQConfig(vq_model=args.vq_model, codebook_size=args.codebook_size,
                         codebook_embed_dim=args.codebook_embed_dim)
    vq = load_vq(args.vq_ckpt, None if args.vq_ckpt.endswith(".safetensors") else vq_config)
    if args.image_size % vq.downsample:
        raise UserError(f"--image-size {args.image_size} is not a multiple of the tokenizer's downsampling "
                        f"factor {vq.downsample}")
    if vq.config.codebook_size > 65536:
        raise UserError(f"codebook of {vq.config.codebook_size} codes does not fit the store's uint16 tokens")
    vq = vq.to(accelerator.device)
    root = Path(args.data_path) if Path(args.data_path).is_dir() else Path(args.data_path).parent
    job = TokenJob(image_size=args.image_size, views=args.views, crop_range=args.crop_range,
                   grid=args.image_size // vq.downsample, codebook_size=vq.config.codebook_size,
                   tokenizer={"checkpoint": str(args.vq_ckpt), "sha256": file_sha256(args.vq_ckpt),
                              "downsample": vq.downsample},
                   shard_size=args.shard_size, num_inputs=len(paths),
                   listing_sha256=listing_hash(paths, labels, root), class_names=class_names)
    meta = start_store(store, job) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    accelerator.print(f"{len(paths)} images in {len(class_names)} classes -> {store} "
                      f"({job.grid}x{job.grid} tokens, {args.views} views, {accelerator.num_processes} process(es))")
    tokenize_shards(store, job, paths, labels, vq.images_to_codes, rank=accelerator.process_index,
                    world=accelerator.num_processes, batch_size=args.batch_size, num_workers=args.num_workers,
                    root=root, show_progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = finish_tokens(store, meta)
        print(f"token store complete: {meta['tokens']['images']} images, {meta['tokens']['skipped']} skipped "
              f"(listed in {store / 'skipped.txt'})")


def stage_entropies(args: argparse.Namespace, accelerator: Accelerator) -> None:
    if not args.entropy_model_checkpoint:
        raise UserError("--stage entropies needs --entropy-model-checkpoint")
    store = TokenStore(args.store)
    # checked before start_entropies may delete another model's entropies
    model, config = load_entropy_model(args.entropy_model_checkpoint, args.entropy_model_config,
                                       llamagen_gpt=args.entropy_model_gpt, image_size=store.meta["image_size"],
                                       downsample_size=store.meta["image_size"] // store.grid,
                                       vocab_size=store.codebook_size)
    trained_on = trained_tokenizer_sha256(args.entropy_model_checkpoint, args.entropy_model_config)
    if trained_on is not None and trained_on != store.meta["tokenizer"]["sha256"]:
        raise UserError(f"--entropy-model-checkpoint {args.entropy_model_checkpoint} was trained on the tokens of "
                        f"another tokenizer than {store.path}'s ({store.meta['tokenizer']['checkpoint']}); its "
                        "entropies would be of other codes")
    model = model.to(accelerator.device)
    identity = {"checkpoint": str(args.entropy_model_checkpoint), "sha256": file_sha256(args.entropy_model_checkpoint),
                "gpt_model": config.gpt_model}
    if accelerator.is_main_process:
        if args.overwrite:  # every token is read before another model's entropies are deleted
            for shard in range(len(store.shard_images)):
                store.shard_tokens(shard)
        start_entropies(store.path, store.meta, identity, args.overwrite)
    accelerator.wait_for_everyone()
    shards = list(range(accelerator.process_index, len(store.shard_images), accelerator.num_processes))
    entropy_shards(store.path, shards, store.shard_tokens,
                   lambda tokens: next_token_entropies(model, tokens.to(accelerator.device)),
                   batch_size=args.batch_size, show_progress=accelerator.is_local_main_process)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish_entropies(store.path, read_meta(store.path))
        print(f"entropies complete for {len(store)} images x {store.views} views in {store.path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    accelerator = make_accelerator()
    with torch.no_grad():
        (stage_tokens if args.stage == "tokens" else stage_entropies)(args, accelerator)


if __name__ == "__main__":
    run_main(main, interrupted="the shards finished so far are kept: rerun the same command to continue")
