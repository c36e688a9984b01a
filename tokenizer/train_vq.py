r"""Train a VQ tokenizer (LlamaGen's VQ-16 / VQ-8 or a tiny one) on an image folder.

    python -m tokenizer.train_vq --config configs/tokenizer/vq_tiny.yaml --data.data_path my_images
    accelerate launch -m tokenizer.train_vq --config configs/tokenizer/vq_16.yaml --data.data_path imagenet/train --prod

Losses: reconstruction (L1/L2), codebook and commitment, LPIPS when its weights are given by path,
PatchGAN hinge loss from ``loss.disc_start`` on. Writes the experiment-dir layout of
``dpar/experiment.py``, a reconstruction grid per ``train.recon_every`` epochs, and resumes with
``--resume [DIR]`` (or by itself when the ``--prod`` dir of this hour already has checkpoints).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader
from tqdm import tqdm

from dpar.config import to_dataclass
from dpar.errors import UserError, first_line, run_main
from dpar.experiment import RESUMABLE_TRAIN_KEYS, RESUME_HINT, BaseTrainConfig, Run, parse_trainer_cli
from dpar.launch import make_accelerator
from dpar.validation import MAX_IMAGE_SIZE, Key, config_key, ranged
from dpar.visual import image_grid, save_png
from tokenizer.images import EpochPermutation, RandomCropImages, list_images
from tokenizer.lpips import LPIPS
from tokenizer.transforms import center_crop_arr, open_rgb
from tokenizer.vq_loss import VQLoss, VQLossConfig
from tokenizer.vq_model import VQConfig, create_vq, uint8_to_unit, unit_to_uint8


# what a resumed run may change; anything else (architecture, data, batch, optimizer) it must keep
RESUMABLE_KEYS = RESUMABLE_TRAIN_KEYS | {"train.recon_every", "data.num_workers"}


@dataclass
class VQDataConfig:
    data_path: str = MISSING
    image_size: int = ranged(256, min=1, max=MAX_IMAGE_SIZE)
    num_workers: int = ranged(4, min=0)


@dataclass
class VQTrainConfig(BaseTrainConfig):
    """The shared ``train`` keys (:class:`dpar.experiment.BaseTrainConfig`; Adam, no weight decay) and this one."""
    # save a grid of originals above their reconstructions every N epochs (and after the last).
    recon_every: int = ranged(1, min=1)


@dataclass
class TrainVQConfig:
    model: VQConfig = field(default_factory=VQConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)
    data: VQDataConfig = field(default_factory=VQDataConfig)
    # LlamaGen's VQ recipe (tokenizer/tokenizer_image/vq_train.py): 40 epochs of batch 128, runs apart from the GPTs'.
    train: VQTrainConfig = field(default_factory=lambda: VQTrainConfig(results_dir="results_tokenizer", epochs=40,
                                                                       global_batch_size=128))

    def check(self, key: Key = config_key()) -> None:
        """The rule between sections (each section checks its own): whole token grids. ``UserError``."""
        if self.data.image_size % self.model.downsample:
            raise UserError(f"{key('data.image_size')}={self.data.image_size} is not a multiple of the tokenizer's "
                            f"downsampling factor {self.model.downsample} ({key('model.vq_model')} / "
                            f"{key('model.ch_mult')})")


def main(argv: list[str] | None = None) -> None:
    args, config, name = parse_trainer_cli(TrainVQConfig, __doc__, argv, "vq")
    cfg: TrainVQConfig = to_dataclass(config)
    accelerator = make_accelerator(mixed_precision=cfg.train.mixed_precision)
    run = Run(accelerator, cfg.train, name, prod=args.prod, resume=args.resume, what="a tokenizer training run")
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.train.global_batch_size % world:
        raise UserError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by {world} processes")
    per_device_batch = cfg.train.global_batch_size // world

    paths, _, _ = list_images(cfg.data.data_path)
    if len(paths) < cfg.train.global_batch_size:
        raise UserError(f"{cfg.data.data_path} has {len(paths)} images, fewer than "
                        f"train.global_batch_size={cfg.train.global_batch_size}")
    torch.manual_seed(cfg.train.global_seed)
    try:  # built before the run dir is touched (its rules: VQConfig.check, run by parse_cli)
        model = create_vq(cfg.model)
    except RuntimeError as error:  # torch could not allocate it
        raise UserError(f"model: {first_line(error)}") from None
    perceptual = (LPIPS.from_files(cfg.loss.lpips_weights, cfg.loss.vgg16_weights)
                  if cfg.loss.lpips_weights else None)
    loss_fn = VQLoss(cfg.loss, perceptual)
    steps_per_epoch = len(paths) // cfg.train.global_batch_size
    state_keys = ("epoch", "step", "optimizer") + (("discriminator", "disc_optimizer") if loss_fn.discriminator is not None else ())
    experiment = run.find().start(config, RESUMABLE_KEYS, cfg.train.epochs * steps_per_epoch, state_keys).dir
    betas = (cfg.train.beta1, cfg.train.beta2)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, betas=betas)
    disc_optimizer = (torch.optim.Adam(loss_fn.discriminator.parameters(), lr=cfg.train.lr, betas=betas)
                      if loss_fn.discriminator is not None else None)
    dataset = RandomCropImages(paths, cfg.data.image_size, cfg.train.global_seed)
    sampler = EpochPermutation(len(dataset), cfg.train.global_seed)
    loader = DataLoader(dataset, batch_size=per_device_batch, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=False)

    start_epoch, step, warned_collapse = 0, 0, False
    if run.resume_from is not None:
        state = run.load(model)
        optimizer.load_state_dict(state["optimizer"])
        if disc_optimizer is not None:
            loss_fn.discriminator.load_state_dict(state["discriminator"])
            disc_optimizer.load_state_dict(state["disc_optimizer"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        accelerator.print(f"resuming {experiment} after epoch {state['epoch']} (step {step})")
    run.truncate_metrics(step)  # a killed run may have logged past its checkpoint

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if loss_fn.discriminator is not None:
        loss_fn, disc_optimizer = accelerator.prepare(loss_fn, disc_optimizer)
    else:
        loss_fn = loss_fn.to(accelerator.device)
    vq = accelerator.unwrap_model(model)
    preview = _preview_images(paths, cfg.data.image_size)
    accelerator.print(f"{len(paths)} images, {world} process(es) x batch {per_device_batch}, "
                      f"VQ parameters {sum(p.numel() for p in vq.parameters()):,}; writing to {experiment}")

    for epoch in range(start_epoch, cfg.train.epochs):
        # Seeding per (epoch, rank) makes a resumed run draw what an uninterrupted one would.
        torch.manual_seed(cfg.train.global_seed * 1_000_003 + epoch * world + rank)
        model.train()
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        started, totals = time.time(), {}
        bar = tqdm(loader, desc=f"epoch {epoch}", disable=not accelerator.is_local_main_process, unit="batch")
        for images in bar:
            x = uint8_to_unit(images)
            with accelerator.autocast():
                reconstructions, codebook_losses = model(x)
                loss, logs = loss_fn(x, reconstructions, codebook_losses, step, vq.decoder.last_layer)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            optimizer.step()
            if disc_optimizer is not None:
                with accelerator.autocast():
                    disc_loss, disc_logs = loss_fn(x, reconstructions, step=step, discriminator_step=True)
                disc_optimizer.zero_grad(set_to_none=True)
                accelerator.backward(disc_loss)
                accelerator.clip_grad_norm_(loss_fn.parameters(), cfg.train.max_grad_norm)
                disc_optimizer.step()
                logs.update(disc_logs)
            step += 1
            logs["loss"] = loss.detach()
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value
            if step % cfg.train.log_every == 0:
                record = {k: float(v) for k, v in logs.items()}
                if not np.isfinite(record["loss"]):
                    raise UserError(f"VQ loss is {record['loss']} at step {step}; the last good checkpoint "
                                    f"in {experiment} is intact")
                record["codebook_usage"] = codebook_losses[3]
                bar.set_postfix(loss=f"{record['loss']:.4f}", rec=f"{record['rec_loss']:.4f}",
                                usage=f"{record['codebook_usage']:.3f}")
                run.log({"step": step, "epoch": epoch, **record})

        summary = {k: float(v) / max(1, len(loader)) for k, v in totals.items()}
        summary.update(epoch=epoch, step=step, codebook_usage=codebook_losses[3],
                       images_per_s=len(loader) * cfg.train.global_batch_size / max(time.time() - started, 1e-9))
        if not np.isfinite(summary["loss"]):
            raise UserError(f"VQ loss is {summary['loss']} in epoch {epoch}; the last good checkpoint "
                            f"in {experiment} is intact")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            last = epoch == cfg.train.epochs - 1
            if (epoch + 1) % cfg.train.recon_every == 0 or last:
                summary["preview_rec_mse"] = _save_reconstructions(vq, preview, experiment, epoch)
            run.log({"epoch_summary": True, **summary})
            accelerator.print(f"epoch {epoch}: loss {summary['loss']:.4f}, rec_loss {summary['rec_loss']:.4f}, "
                              f"codebook usage {summary['codebook_usage']:.3f}, "
                              f"{summary['images_per_s']:.1f} images/s")
            collapse = collapse_warning(summary["codebook_usage"], cfg.model.codebook_size, epoch)
            if collapse and not warned_collapse:
                print(f"warning: {collapse}", file=sys.stderr)
                warned_collapse = True
            if (epoch + 1) % cfg.train.ckpt_every == 0 or last:
                state = {"epoch": epoch, "step": step, "optimizer": optimizer.state_dict()}
                if disc_optimizer is not None:
                    state["discriminator"] = accelerator.unwrap_model(loss_fn).discriminator.state_dict()
                    state["disc_optimizer"] = disc_optimizer.state_dict()
                run.save(epoch, vq.state_dict(), state, step=step)
        accelerator.wait_for_everyone()
    accelerator.print(f"done: {experiment}")


COLLAPSED_USAGE = 0.05  # a codebook of which fewer codes are in use has collapsed (a healthy run: most codes)


def collapse_warning(usage: float, codebook_size: int, epoch: int) -> str | None:
    """One line when the codes in use (``usage``: the fraction of the codebook seen over the quantizer's window
    of recent tokens) fall under :data:`COLLAPSED_USAGE`; None otherwise. A collapsed codebook decodes many
    images to the same few codes (flat colours): its tokens cannot carry shapes."""
    if usage >= COLLAPSED_USAGE:
        return None
    used = round(usage * codebook_size)
    return (f"codebook collapse: {used} of {codebook_size} codes in use at the end of epoch {epoch}; the tokens "
            "cannot carry the images' shapes. Turn the codebook entropy loss on (--model.entropy_loss_ratio 0.1) "
            "or lower --train.lr, and start again")


def _preview_images(paths: list[Path], image_size: int, count: int = 8) -> torch.Tensor:
    """Center crops of the first images: a fixed batch whose reconstructions are saved over training."""
    return torch.from_numpy(np.stack([np.asarray(center_crop_arr(open_rgb(p), image_size)) for p in paths[:count]]))


@torch.no_grad()
def _save_reconstructions(vq, images: torch.Tensor, experiment: Path, epoch: int) -> float:
    """Originals above reconstructions as PNG; returns the reconstruction MSE in [-1, 1] units."""
    was_training = vq.training
    vq.eval()
    x = uint8_to_unit(images.to(vq.quant_conv.weight.device))
    quant, _, _ = vq.encode(x)
    decoded = vq.decode(quant)
    vq.train(was_training)
    grid = image_grid(torch.cat([images, unit_to_uint8(decoded).cpu()]), nrow=len(images))
    save_png(grid, experiment / "reconstructions" / f"epoch_{epoch:08d}.png")
    return float((decoded.float().clamp(-1, 1) - x).pow(2).mean())


if __name__ == "__main__":
    run_main(main, interrupted=RESUME_HINT)
