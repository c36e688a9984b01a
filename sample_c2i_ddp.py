r"""Sample N images (50,000 by default) across processes and pack them into an ADM-format .npz for FID.

    accelerate launch sample_c2i_ddp.py --experiment_dir <run> --cfg-scale 2.0 --output-dir samples
    -> samples/epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz   (arr_0: uint8 [N, H, W, 3])

Images come in class order (N / classes per class); image n uses seed ``seed * 1000003 + n``, so the file
is the same on any number of processes. Chunks of ``--per-proc-batch-size`` images are saved as they
finish: rerun the same command after a kill and only missing chunks are sampled. 384 px samples can be
resized for FID with ``--image-size-eval 256`` (bicubic, as the paper and LlamaGen do).
"""
import argparse
import time
from pathlib import Path

from tqdm import tqdm

from dpar.errors import run_main
from dpar.launch import make_accelerator
from dpar.sampling import (Sampler, SampleChunks, add_sampling_arguments, class_order_labels, sample_file_stem,
                           sampling_from_args)
from dpar.visual import resize_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--num-fid-samples", type=int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=int, default=32, help="images per step and per saved chunk")
    parser.add_argument("--image-size-eval", type=int, default=None, help="resize samples to this size (e.g. 256)")
    args = parser.parse_args(argv)
    accelerator = make_accelerator()
    sampler = Sampler.from_experiment(args.experiment_dir, args.epoch, ema=args.ema, vq_checkpoint=args.vq_ckpt,
                                      device=accelerator.device, threshold=args.threshold,
                                      max_patch_length=args.max_patch_length)
    sampling = sampling_from_args(args)
    npz = Path(args.output_dir) / f"{sample_file_stem(sampler.epoch, sampling, args.seed, args.threshold, args.max_patch_length)}.npz"
    if npz.exists():
        accelerator.print(f"{npz} exists; nothing to do")
        return
    job = {"experiment_dir": str(Path(args.experiment_dir).resolve()), "ema": args.ema,
           "image_size_eval": args.image_size_eval}
    chunks = SampleChunks(npz, args.num_fid_samples, args.per_proc_batch_size, job)
    if accelerator.is_main_process:
        chunks.start()
    accelerator.wait_for_everyone()

    labels = class_order_labels(args.num_fid_samples, sampler.model_config.num_classes)
    todo = chunks.todo(accelerator.process_index, accelerator.num_processes)
    started, done, steps, tokens = time.perf_counter(), 0, 0, 0
    bar = tqdm(todo, desc="sampling", unit="chunk", disable=not accelerator.is_local_main_process)
    for k in bar:
        index = chunks.indices(k)
        images, out = sampler.sample(labels[index].to(accelerator.device), args.seed * 1_000_003 + index, sampling)
        if args.image_size_eval:
            images = resize_images(images, args.image_size_eval)
        chunks.write(k, images.cpu().numpy())
        done, steps, tokens = done + len(index), steps + int(out.global_steps.sum()), tokens + out.tokens.numel()
        bar.set_postfix(img_s=f"{done * accelerator.num_processes / (time.perf_counter() - started):.2f}",
                        tok_patch=f"{tokens / steps:.2f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        chunks.pack()
        accelerator.print(f"{args.num_fid_samples} samples -> {npz}")


if __name__ == "__main__":
    run_main(main)
