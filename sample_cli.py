"""The flags sample_c2i.py and sample_c2i_ddp.py share, and what they build: a :class:`dpar.runs.Sampler`, a
:class:`dpar.sampling.SamplingConfig` and the ADM-style sample file name. LlamaGen's flag names."""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

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
    parser.add_argument("--output-dir", default="samples", help="where the samples go (default: %(default)s)")
    parser.add_argument("--cfg-scale", type=field_type(SamplingConfig, "cfg_scale"), default=cfg_scale,
                        help="classifier-free guidance, >= 0 (1.0 = none; default: %(default)s)")
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
                     max_patch_length: int | None = None, self_entropy: bool = False, ema: bool = False) -> str:
    """ADM-style sample file name, e.g. ``epoch-299-topk-0-topp-1.0-temperature-1.0-cfg-2.0-seed-0``
    (``name``: :attr:`Sampler.name`); ``-ema`` when the EMA weights are sampled (other weights of the same run,
    whose grid would otherwise replace the plain weights' one)."""
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
    if ema:
        stem += "-ema"
    return stem


# -- whose file a sample name is --------------------------------------------------------------------------------

RUN_KEY = "dpar_run"  # a sample PNG's text chunk naming the run that made it (an .npz records it in its job)
RUN_SUFFIX_BYTES = 64  # the longest run suffix of a sample file name


def run_record(sampler: Sampler) -> dict:
    """The run a sampler samples, as its sample files record it: ``run`` (``<experiment name>/<run folder>``,
    or ``<folder>/<checkpoint>`` for a LlamaGen checkpoint; no full path, since sample PNGs get shared) and
    ``run_id`` (from the resolved path: two runs of one name in different places differ)."""
    source = (sampler.config_path.parent if sampler.config_path is not None else sampler.weights).resolve()
    name = source.stem if sampler.config_path is None else source.name
    return {"run": f"{source.parent.name}/{name}" if source.parent.name else name,
            "run_id": hashlib.sha256(str(source).encode()).hexdigest()[:16]}


def sample_name(folder: str | Path, stem: str, suffixes: tuple[str, ...], record: dict,
                weights: Path | None = None) -> tuple[str, str | None]:
    """The stem this run's sample files take in ``folder`` (files ``<stem><suffix>``), and a line to print
    when it is not the plain ``stem``.

    The plain stem (epoch and sampling flags: the reference README's name) belongs to whichever run first
    writes it. When another run's file holds it (or a file that records no run), this run appends itself:
    ``<stem>-<experiment name>-<run folder>``, then, should that be taken too, its id. A name this run
    already holds is found again first, so a rerun finds its own file (whether it is the same sampling job
    is :class:`sample_c2i_ddp.SampleChunks`' to decide). ``weights`` recognises an ``.npz`` of an older
    version, which records its weights but not its run."""
    folder = Path(folder)
    suffix = _safe(record["run"].replace("/", "-"))
    candidates = [stem, f"{stem}-{suffix}", f"{stem}-{suffix}-{record['run_id'][:8]}"]
    owners = [_owners(folder, candidate, suffixes) for candidate in candidates]

    def ours(recorded: dict) -> bool:
        if "run_id" in recorded:
            return recorded["run_id"] == record["run_id"]
        return weights is not None and recorded.get("weights") == str(weights.resolve())

    chosen = next((c for c, found in zip(candidates, owners) if found and all(map(ours, found))), None)
    chosen = chosen or next((c for c, found in zip(candidates, owners) if not found), None)
    if chosen is None:
        raise UserError(f"{folder / stem}{suffixes[0]} and its run-named variants belong to other runs; choose "
                        "another --output-dir")
    if chosen == stem:
        return stem, None
    if not owners[0]:
        return chosen, f"{folder / chosen}{suffixes[0]} is this run's ({record['run']}); writing there again"
    taken = next(r for r in owners[0] if not ours(r))
    # a name read from a file is printed as printable ASCII: a crafted one cannot forge lines or colours
    whose = (f"run {re.sub(r'[^ -~]', '?', str(taken['run']))[:80]}'s" if "run" in taken
             else "a file of no recorded run")
    return chosen, (f"{folder / stem}{suffixes[0]} is {whose}; this run ({record['run']}) writes "
                    f"{folder / chosen}{suffixes[0]}")


def _safe(text: str) -> str:
    """``text`` as a file-name part: letters, digits and ``. _ + = , -`` kept, anything else ``_``, at most
    :data:`RUN_SUFFIX_BYTES` bytes (cut at a character)."""
    text = re.sub(r"[^\w.+=,-]", "_", text)
    while len(text.encode()) > RUN_SUFFIX_BYTES:
        text = text[:-1]
    return text


def _owners(folder: Path, stem: str, suffixes: tuple[str, ...]) -> list[dict]:
    """The runs the existing files ``<stem><suffix>`` record (``{}``: one that records none); [] when the
    name is free. A ``.parts`` folder counts while it holds an unfinished run's chunks."""
    found = []
    for suffix in suffixes:
        path = folder / f"{stem}{suffix}"
        if path.suffix == ".parts":
            if path.is_dir() and any(path.glob("chunk_*.npy")):
                try:
                    found.append(_run_of(json.loads((path / "job.json").read_text())))
                except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
                    found.append({})
        elif path.exists():
            found.append(_recorded_run(path))
    return found


def _run_of(job) -> dict:
    """The run fields of a sampling job record (an older one: its weights)."""
    if not isinstance(job, dict):
        return {}
    run = job.get("run")
    if isinstance(run, dict) and "run_id" in run:
        return run
    return {"weights": job["weights"]} if "weights" in job else {}


def _recorded_run(path: Path) -> dict:
    """The run an existing sample file records: an ``.npz``'s job (``dpar_job``), a PNG's :data:`RUN_KEY`
    text chunk. ``UserError`` for a file that cannot be read (it might be this run's: it is not passed by)."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                return _run_of(json.loads(str(data["dpar_job"]))) if "dpar_job" in data.files else {}
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(RUN_KEY)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, UnidentifiedImageError,
            SyntaxError, RecursionError) as error:
        raise UserError(f"{path} exists but cannot be read ({type(error).__name__}: {error}); delete it") from None
    try:
        return _run_of({"run": json.loads(text)}) if text else {}
    except (ValueError, RecursionError):
        return {}
