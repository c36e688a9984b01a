r"""Sample N images (50,000 by default) across processes and pack them into an ADM-format .npz for FID.

    accelerate launch sample_c2i_ddp.py --experiment_dir <run> --cfg-scale 2.0 --output-dir samples
    -> samples/epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz   (arr_0: uint8 [N, H, W, 3])
    accelerate launch sample_c2i_ddp.py --gpt-model GPT-L --gpt-ckpt c2i_L_256.pt --vq-ckpt vq_ds16_c2i.pt \
        --image-size 256 --cfg-scale 2.0     # a released LlamaGen checkpoint, same sampler and file format
    -> samples/GPT-L-c2i_L_256-size-256-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0.npz

Images come in class order (N / classes per class); image n uses seed ``seed * 1000003 + n``, so its tokens
are the same on any number of processes (its pixels too where the tokenizer's decoder runs the same kernels:
the same batch size and thread count on CPUs). Chunks of ``--per-proc-batch-size`` images are saved as they
finish: rerun the same command after a kill and only missing chunks are sampled. The .npz records the job
that made it (sample count, weights, tokenizer, every sampling flag): rerunning the same command finds it
done, another job's file under the same name is refused. 384 px samples can be resized for FID with
``--image-size-eval 256`` (the decoder's output, bicubic, before quantisation, as LlamaGen does).
"""
import argparse
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from dpar.errors import ArgumentParser, run_main
from dpar.fileio import check_output_dir
from dpar.launch import make_accelerator
from dpar.sampling import (SampleChunks, add_sampling_arguments, class_order_labels, sample_file_stem,
                           sampler_from_args, sampling_from_args)
from dpar.validation import number


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_arguments(parser)
    parser.add_argument("--num-fid-samples", type=number(int, min=1), default=50_000)
    parser.add_argument("--per-proc-batch-size", type=number(int, min=1), default=32,
                        help="images per step and per saved chunk")
    parser.add_argument("--image-size-eval", type=number(int, min=1), default=None,
                        help="resize samples to this size (e.g. 256)")
    args = parser.parse_args(argv)
    check_output_dir(args.output_dir, "--output-dir")
    accelerator = make_accelerator()
    sampler = sampler_from_args(args, accelerator.device)
    sampling = sampling_from_args(args)
    sampler.check(sampling)
    accelerator.print(f"sampling {sampler.weights} ({sampler.name})")
    stem = sample_file_stem(sampler.name, sampling, args.seed, args.threshold, args.max_patch_length,
                            sampler.patcher is not None and sampler.patcher.mode == "self_entropy")
    npz = Path(args.output_dir) / f"{stem}.npz"
    num_classes = sampler.model_config.num_classes
    job = {**sampler.identity(), "epoch": sampler.epoch, "ema": args.ema, "seed": args.seed,
           "class_order": f"sample n has class n * {num_classes} // N", "sampling": asdict(sampling),
           "image_size_eval": args.image_size_eval}
    chunks = SampleChunks(npz, args.num_fid_samples, args.per_proc_batch_size, job)
    if chunks.finished():
        accelerator.print(f"{npz} exists with these {args.num_fid_samples} samples; nothing to do")
        return
    if accelerator.is_main_process:
        chunks.start(main_process=True)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        chunks.start(main_process=False)

    labels = class_order_labels(args.num_fid_samples, num_classes)
    todo = chunks.todo(accelerator.process_index, accelerator.num_processes)
    started, done, steps, tokens = time.perf_counter(), 0, 0, 0
    bar = tqdm(todo, desc="sampling", unit="chunk", disable=not accelerator.is_local_main_process)
    for k in bar:
        index = chunks.indices(k)
        images, out = sampler.sample(labels[index].to(accelerator.device), args.seed * 1_000_003 + index, sampling,
                                     image_size=args.image_size_eval, static_shapes=args.static_shapes)
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
