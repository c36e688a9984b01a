"""Experiment directories and checkpoints: one layout for every trainer in the project.

::

    <root>/<config name>/<YYYYMMDD_HH>/            with --prod (the reference layout)
    <root>/scratch/<config name>/<YYYYMMDD_HHMMSS>/ without it: trial runs never mix with real ones
        config.yaml                                 the fully resolved config
        metrics.jsonl                               one JSON object per logged step / epoch
        checkpoints/epoch_{epoch:08d}/              the end of an epoch (0-based), kept per keep_last / keep_every
            model.safetensors                       the model weights (what sampling loads)
            ema.safetensors                         the EMA weights, when the run keeps an EMA
            training_state.pt                       optimizers, counters, data order (what resume loads)
        checkpoints/latest/                         the mid-epoch resume point, replaced every few steps
                                                    and removed once a newer epoch checkpoint exists

A checkpoint directory is written under a temporary name (``<name>.tmp``) and renamed into place; one that
replaces an older copy first moves that aside as ``<name>.old``, which counts as the checkpoint until the
new one is in place. So at every instant of a killed write a complete checkpoint can be found. Resuming takes whichever of the
newest epoch checkpoint and ``latest/`` is further along (the ``step`` in the weights' metadata). Weights are read with
``torch.load(weights_only=True)`` or safetensors; nothing unpickles arbitrary objects.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import flatten, load_config, read_section, save_config
from .errors import UserError, first_line
from .fileio import atomic_write_text, umask
from .models import GPT_models, ModelConfig, create_model
from .validation import flag_key

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STEP_CHECKPOINT = "latest"
STATE_FILE = "training_state.pt"
SCRATCH = "scratch"
_CHECKPOINT_NAME = re.compile(r"^epoch_(\d{8})$")
_REPLACED = ".old"  # a checkpoint moved aside while its replacement is renamed into place


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Every trainer's ``--prod`` and ``--resume [DIR]`` (see :func:`resolve_run`)."""
    parser.add_argument("--prod", action="store_true",
                        help="write to <results_dir>/<name>/<YYYYMMDD_HH>/ instead of <results_dir>/scratch/")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                        help="continue DIR, or without DIR the newest run of this config")


def new_experiment_dir(root: str | Path, config_name: str, prod: bool, now: datetime | None = None) -> Path:
    """The directory a new run writes to (not created here)."""
    now = now or datetime.now()
    if prod:
        return Path(root) / config_name / now.strftime("%Y%m%d_%H")
    return Path(root) / SCRATCH / config_name / now.strftime("%Y%m%d_%H%M%S")


def latest_experiment_dir(root: str | Path, config_name: str, prod: bool) -> Path | None:
    """The most recent run of ``config_name`` (prod or scratch) that has a checkpoint, if any (older runs are
    not opened: a damaged one blocks nothing)."""
    parent = Path(root) / config_name if prod else Path(root) / SCRATCH / config_name
    for run in sorted((p for p in parent.glob("*") if p.is_dir()), reverse=True):
        if resume_checkpoint(run) is not None:
            return run
    return None


def resolve_run(root: str | Path, config_name: str, prod: bool, resume: str | None) -> tuple[Path, Path | None]:
    """(experiment dir, checkpoint to continue from or None) for a trainer's ``--prod`` / ``--resume``.

    ``config_name`` (the run's name) must be a plain folder name: no ``/``, not ``.`` or ``..``.

    ``resume`` is None (a new run; a same-hour ``--prod`` dir that already has checkpoints continues),
    ``"latest"`` (the newest run of this config) or an experiment dir.
    """
    if not config_name or Path(config_name).name != config_name or config_name in (".", ".."):
        raise UserError(f"train.experiment_name {config_name!r} must be a plain folder name (no '/', not '.' or "
                        "'..'): runs stay inside train.results_dir")
    if resume is None:
        experiment = new_experiment_dir(root, config_name, prod)
    elif resume == "latest":
        experiment = latest_experiment_dir(root, config_name, prod)
        if experiment is None:
            kind = "--prod" if prod else "scratch"
            raise UserError(f"--resume: no {kind} run of {config_name!r} with a checkpoint under {root}")
    else:
        experiment = Path(resume)
        if resume_checkpoint(experiment) is None:
            raise UserError(f"--resume {experiment}: no {CHECKPOINTS}/epoch_*/{MODEL_FILE} there")
    return experiment, resume_checkpoint(experiment)


def checkpoint_dir(experiment_dir: str | Path, epoch: int) -> Path:
    return Path(experiment_dir) / CHECKPOINTS / f"epoch_{epoch:08d}"


def list_checkpoints(experiment_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, dir), oldest first."""
    found = {}
    for path in (Path(experiment_dir) / CHECKPOINTS).glob("epoch_*"):  # epoch_X, or epoch_X.old mid-swap
        match = _CHECKPOINT_NAME.match(path.name.removesuffix(_REPLACED))
        complete = _complete(path.with_name(match.group(0))) if match else None
        if complete is not None:
            found[int(match.group(1))] = complete
    return sorted(found.items())


def _complete(path: Path) -> Path | None:
    """``path`` if it holds weights, else the ``.old`` copy a write killed between its two renames left."""
    for candidate in (path, path.with_name(path.name + _REPLACED)):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    return None


def experiment_of(checkpoint: str | Path) -> Path | None:
    """The experiment dir a ``checkpoints/epoch_*/model.safetensors`` file belongs to, else None."""
    path = Path(checkpoint).resolve()
    if len(path.parents) > 2 and path.parents[1].name == CHECKPOINTS and _CHECKPOINT_NAME.match(path.parent.name):
        return path.parents[2]
    return None


def latest_checkpoint(experiment_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(experiment_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(experiment_dir: str | Path, epoch: int, model_state: dict[str, torch.Tensor],
                    training_state: dict[str, Any] | None = None, keep_last: int = 0, keep_every: int = 0, *,
                    ema_state: dict[str, torch.Tensor] | None = None, step: int | None = None) -> Path:
    """Write the checkpoint of the end of ``epoch`` atomically, then prune (see :func:`prune_checkpoints`)."""
    final = _write_checkpoint(checkpoint_dir(experiment_dir, epoch), model_state, training_state, ema_state,
                              {"epoch": epoch, "step": step})
    shutil.rmtree(step_checkpoint_dir(experiment_dir), ignore_errors=True)
    prune_checkpoints(experiment_dir, keep_last, keep_every)
    return final


def save_step_checkpoint(experiment_dir: str | Path, epoch: int, step: int, model_state: dict[str, torch.Tensor],
                         training_state: dict[str, Any], *, ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Replace the mid-epoch resume point ``checkpoints/latest/`` atomically."""
    return _write_checkpoint(step_checkpoint_dir(experiment_dir), model_state, training_state, ema_state,
                             {"epoch": epoch, "step": step})


def step_checkpoint_dir(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / CHECKPOINTS / STEP_CHECKPOINT


def resume_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The checkpoint a resumed run continues from: the newest epoch one or ``latest/``, whichever is later."""
    candidates = [path for path in (latest_checkpoint(experiment_dir), _complete(step_checkpoint_dir(experiment_dir)))
                  if path is not None]
    return max(candidates, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a checkpoint was written at (-1 when its metadata does not say)."""
    return int(checkpoint_metadata(checkpoint).get("step", -1))


def checkpoint_metadata(checkpoint: str | Path) -> dict[str, str]:
    """The ``epoch`` and ``step`` a checkpoint dir's weights record (strings; absent when not recorded)."""
    path = Path(checkpoint) / MODEL_FILE
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
        int(metadata.get("step", -1)), int(metadata.get("epoch", -1))
        return metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"checkpoint {path} is damaged ({error}); delete its folder to use an earlier one") from None


def _write_checkpoint(final: Path, model_state: dict[str, torch.Tensor], training_state: dict[str, Any] | None,
                      ema_state: dict[str, torch.Tensor] | None, metadata: dict[str, int | None]) -> Path:
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    metadata = {key: str(value) for key, value in metadata.items() if value is not None}
    for name, state in ((MODEL_FILE, model_state), (EMA_FILE, ema_state)):
        if state is not None:
            tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
            save_file(tensors, staging / name, metadata=metadata)
            os.chmod(staging / name, 0o666 & ~umask())  # safetensors creates its files 0600
    if training_state is not None:
        torch.save(training_state, staging / STATE_FILE)
    replaced = final.with_name(final.name + _REPLACED)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def prune_checkpoints(experiment_dir: str | Path, keep_last: int, keep_every: int) -> None:
    """Keep the newest ``keep_last`` checkpoints and every epoch divisible by ``keep_every``.

    ``keep_last=0`` keeps everything. The newest checkpoint is never removed.
    """
    if keep_last <= 0:
        return
    checkpoints = list_checkpoints(experiment_dir)
    for epoch, path in checkpoints[:-keep_last]:
        if not (keep_every > 0 and epoch % keep_every == 0):
            shutil.rmtree(path)


# Where a torch checkpoint keeps its weights, in the order LlamaGen's sample_c2i.py looks (a bare state dict,
# e.g. LlamaGen's FSDP consolidated files, also loads).
STATE_DICT_KEYS = ("model", "module", "state_dict")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file or a torch checkpoint: ``checkpoint[key]`` for the first of
    :data:`STATE_DICT_KEYS` it has (LlamaGen's ``{"model": ...}``, DeepSpeed's ``"module"``, Lightning's
    ``"state_dict"``), else the checkpoint itself. ``UserError`` for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
    checkpoint = load_torch_file(path)
    if isinstance(checkpoint, dict):
        key = next((key for key in STATE_DICT_KEYS if isinstance(checkpoint.get(key), dict)), None)
        checkpoint = checkpoint if key is None else checkpoint[key]
    if (not isinstance(checkpoint, dict) or not checkpoint
            or not all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
        raise UserError(f"{path} holds no state dict (expected tensors, or a dict with one under "
                        f"{' / '.join(map(repr, STATE_DICT_KEYS))})")
    return checkpoint


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``; also admits the argparse.Namespace LlamaGen stores as ``args``."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean the same to the user
        message = first_line(error)
        raise UserError(f"cannot read {path} as a weights-only torch checkpoint: {message}") from None


def load_model_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load weights strictly; a mismatch is one line naming the first missing/unexpected/misshapen key."""
    state = read_state_dict(path)
    check_fits(model, state, path)
    model.load_state_dict(state, strict=True)


def check_fits(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """``UserError`` (one line naming the first missing / unexpected / misshapen key) unless ``state`` has
    exactly ``model``'s keys and shapes. ``model`` may live on the meta device (nothing allocated)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or misshapen:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (first {missing[0]!r})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        if misshapen:
            k = misshapen[0]
            details.append(f"{len(misshapen)} with other shapes (first {k!r}: "
                           f"{list(state[k].shape)} in file, {list(own[k].shape)} in model)")
        raise UserError(f"{path} does not fit the model: " + "; ".join(details))


def append_metrics(experiment_dir: str | Path, record: dict[str, Any]) -> None:
    with open(Path(experiment_dir) / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(experiment_dir: str | Path, step: int) -> None:
    """Drop the records logged after ``step`` (by a killed run, past its last checkpoint) and any line a kill
    cut short, so that a resumed run's ``metrics.jsonl`` reads as one uninterrupted run. Every trainer calls
    it when it (re)starts."""
    path = Path(experiment_dir) / METRICS_FILE
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        atomic_write_text(path, "".join(kept))


def write_run_config(config: DictConfig, experiment: Path, resuming: bool, resumable_keys: set[str]) -> None:
    """Save a run's resolved ``config.yaml``; a resumed run may change only ``resumable_keys`` (dotted)."""
    path = experiment / CONFIG_FILE
    if resuming and path.is_file():
        differs = config_difference(config, path, resumable_keys)
        if differs:
            key, saved, value = differs
            raise UserError(f"{path} was started with {key}={saved!r}, this run has {value!r}; resume "
                            "with the same settings or start a new run (e.g. another --train.experiment_name)")
    save_config(config, path)


def config_difference(config: DictConfig, saved_path: Path, ignored_keys: set[str]) -> tuple[str, Any, Any] | None:
    """The first (dotted key, saved value, ``config``'s value) where a run's saved ``config.yaml`` differs from
    ``config`` outside ``ignored_keys``; None where they agree."""
    saved = flatten(OmegaConf.to_container(load_config(OmegaConf.get_type(config), saved_path), resolve=True))
    for key, value in flatten(OmegaConf.to_container(config, resolve=True)).items():
        if key not in ignored_keys and saved.get(key) != value:
            return key, saved.get(key), value
    return None


def load_trained_model(checkpoint: str | Path, config_path: str | Path | None = None):
    """(model in eval mode, its ModelConfig) from a run's ``model.safetensors`` and the ``model`` section of
    its ``config.yaml`` (found next to the checkpoint's experiment dir unless ``config_path`` is given)."""
    if config_path is None:
        experiment = experiment_of(checkpoint)
        if experiment is None:
            raise UserError(f"{checkpoint} is not inside an experiment dir (…/checkpoints/epoch_*/); "
                            "also give the run's config.yaml")
        config_path = experiment / CONFIG_FILE
    config = read_section(config_path, "model", ModelConfig)  # checked, as dpar.config checks every config
    model = create_model(config)
    load_model_weights(model, checkpoint)
    return model.eval(), config


def load_llamagen_gpt(checkpoint: str | Path, gpt_model: str, image_size: int, downsample_size: int = 16):
    """(model in eval mode, its ModelConfig) from a released LlamaGen class-conditional GPT checkpoint
    (e.g. ``c2i_B_256.pt`` with ``gpt_model="GPT-B"``), as LlamaGen's ``sample_c2i.py`` loads it.

    The codebook size and class count come from the weights' shapes (``tok_embeddings``,
    ``cls_embedding.embedding_table``: LlamaGen trains c2i with class dropout 0.1, so its table has the
    null class as its last row). ``UserError`` for a file that is no LlamaGen GPT of this size, or an
    ``image_size`` that is no multiple of ``downsample_size`` (named as LlamaGen's ``--image-size`` flag).
    """
    if gpt_model not in GPT_models:
        raise UserError(f"--gpt-model {gpt_model!r}: a LlamaGen checkpoint is one of {', '.join(GPT_models)}")
    state = read_state_dict(checkpoint)
    shapes = {key: state[key].shape for key in ("tok_embeddings.weight", "cls_embedding.embedding_table.weight")
              if key in state and state[key].dim() == 2}
    if len(shapes) < 2:
        raise UserError(f"{checkpoint} is not a LlamaGen GPT checkpoint (no 2-d tok_embeddings / cls_embedding "
                        "weights)")
    classes = shapes["cls_embedding.embedding_table.weight"][0] - 1
    if classes < 1:
        raise UserError(f"{checkpoint} is an unconditional GPT (one class row); a LlamaGen c2i checkpoint has "
                        "its classes and a null class")
    config = ModelConfig(gpt_model=gpt_model, model_type="c2i", image_size=image_size,
                         downsample_size=downsample_size, vocab_size=shapes["tok_embeddings.weight"][0],
                         num_classes=classes, class_dropout_prob=0.1)
    config.check(flag_key({"image_size": "--image-size", "downsample_size": "the tokenizer's downsampling factor"}))
    with torch.device("meta"):  # shapes first: a GPT-7B is not built to learn that the file is a GPT-B
        check_fits(create_model(config), state, checkpoint)
    model = create_model(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), config


def load_entropy_model(checkpoint: str | Path, config_path: str | Path | None = None, *,
                       llamagen_gpt: str | None = None, image_size: int | None, downsample_size: int,
                       vocab_size: int | None = None):
    """(model in eval mode, its ModelConfig) of an entropy model for ``image_size``-pixel images (None: a
    trained run's own size; a LlamaGen checkpoint needs it) and, when given, a ``vocab_size``-code tokenizer.

    Either a train_entropy_model.py run (an unconditional GPT; ``config_path`` as for
    :func:`load_trained_model`) or, with ``llamagen_gpt`` (e.g. ``"GPT-B"``), a released LlamaGen c2i
    checkpoint, whose null class gives the unconditional predictions (its entropies come from
    ``model(tokens, null labels)``, see ``dpar.data.preprocess.next_token_entropies``). ``UserError`` for a
    class-conditional run, or a model built for another image or token grid.
    """
    if llamagen_gpt:
        if config_path:
            raise UserError(f"entropy model {checkpoint}: a LlamaGen checkpoint (its size given as {llamagen_gpt}) "
                            f"has no run config; drop the config {config_path}")
        model, config = load_llamagen_gpt(checkpoint, llamagen_gpt, image_size, downsample_size)
    else:
        model, config = _load_trained_entropy_model(checkpoint, config_path, image_size, downsample_size)
    if vocab_size is not None and config.vocab_size != vocab_size:
        raise UserError(f"entropy model {checkpoint} predicts {config.vocab_size} codes, the tokenizer here has "
                        f"{vocab_size}; it must be trained on this tokenizer's tokens")
    return model, config


def _load_trained_entropy_model(checkpoint: str | Path, config_path: str | Path | None, image_size: int | None,
                                downsample_size: int):
    model, config = load_trained_model(checkpoint, config_path)
    if config.model_type != "uncond":
        raise UserError(f"entropy model {checkpoint} is a {config.model_type} {config.gpt_model} run; entropies come "
                        "from an unconditional GPT (train_entropy_model.py), or from a LlamaGen c2i checkpoint "
                        "named with its size (patcher.entropy_model_gpt / --entropy-model-gpt)")
    grid = (image_size or config.image_size) // downsample_size
    if model.block_size != grid * grid:
        raise UserError(f"entropy model {checkpoint} was built for {model.block_size} tokens per image "
                        f"(image_size {config.image_size}), this needs {grid * grid} ({grid * downsample_size} px)")
    return model, config
