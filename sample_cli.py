"""The flags sample_c2i.py and sample_c2i_ddp.py share, and what they build: a :class:`dpar.runs.Sampler`, a
:class:`dpar.sampling.SamplingConfig` and the ADM-style sample file name. LlamaGen's flag names."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpar.config import REPO
from dpar.errors import UserError
from dpar.experiment import CONFIG_FILE
from dpar.models import GPT_models, ModelConfig
from dpar.patcher import PatcherConfig
from dpar.runs import Sampler
from dpar.sampling import CFG_SCHEDULES, SamplingConfig
from dpar.validation import epoch_choice, field_type, number, path

DEMO_RUN = REPO / "assets" / "demo" / "dpar"  # the default --experiment_dir: the embedded demo's DPAR (python -m dpar.demo)


def add_sampling_arguments(parser: argparse.ArgumentParser, cfg_scale: float = 1.0) -> None:
    """The flags sample_c2i.py and sample_c2i_ddp.py share (LlamaGen's names; ``cfg_scale`` its default)."""
    parser.add_argument("--experiment_dir", "--experiment-dir", type=path, default=None,
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
    llamagen.add_argument("--image-size", type=field_type(ModelConfig, "image_size"), default=None,
                          help="the size it was trained at (default 256)")


def sampler_from_args(args: argparse.Namespace, device: str | torch.device) -> Sampler:
    """The :class:`Sampler` the shared flags name: ``--gpt-ckpt`` (LlamaGen's) or ``--experiment_dir``."""
    if args.gpt_ckpt is None:
        given = [flag for flag, value in (("--gpt-model", args.gpt_model), ("--image-size", args.image_size))
                 if value is not None]
        if given:
            raise UserError(f"{given[0]} describes a LlamaGen checkpoint; give it with --gpt-ckpt (a training run's "
                            "model comes from its config)")
        experiment = Path(args.experiment_dir or DEMO_RUN)
        if experiment.resolve() == DEMO_RUN and not (DEMO_RUN / CONFIG_FILE).is_file():
            raise UserError(f"the embedded demo {DEMO_RUN} is missing; rebuild it with python -m dpar.demo")
        return Sampler.from_experiment(experiment, args.epoch, ema=args.ema,
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
