"""Experiment directories and checkpoints: one layout for every trainer in the project.

::

    <root>/<config name>/<YYYYMMDD_HH>/            with --prod (the reference layout)
    <root>/scratch/<config name>/<YYYYMMDD_HHMMSS>/ without it: trial runs never mix with real ones
        config.yaml                                 the fully resolved config
        metrics.jsonl                               one JSON object per logged step / epoch
        checkpoints/epoch_{epoch:08d}/              the end of an epoch (0-based), kept per keep_last / keep_every
            model.safetensors                       the model weights (what sampling loads); their metadata
                                                    records epoch, step and the resolved ``model`` section
            ema.safetensors                         the EMA weights, when the run keeps an EMA
            training_state.pt                       optimizers, counters, data order (what resume loads)
        checkpoints/latest/                         the mid-epoch resume point, replaced every few steps
                                                    and removed once a newer epoch checkpoint exists

A checkpoint directory is written under a temporary name (``<name>.tmp``) and renamed into place; one that
replaces an older copy first moves that aside as ``<name>.old``, which counts as the checkpoint until the
new one is in place. So at every instant of a killed write a complete checkpoint can be found. Resuming takes whichever of the
newest epoch checkpoint and ``latest/`` is further along (the ``step`` in the weights' metadata). Weights are read with
``torch.load(weights_only=True)`` or safetensors; nothing unpickles arbitrary objects. The weights also record
the model config they were trained with (``model_config``: the run's resolved ``model`` section as JSON), and
:func:`check_model_record` refuses a config whose ``model`` section disagrees with it.

:class:`Run` is that directory as every trainer uses it (``dpar.training.Trainer``, ``tokenizer.train_vq``), and
:class:`BaseTrainConfig` the ``train`` keys they share; :func:`parse_trainer_cli` their scripts' command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import flatten, load_record, parse_cli, save_config
from .errors import ArgumentParser, UserError, first_line
from .fileio import atomic_write_text, check_output_dir, lock_folder, umask, writing
from .validation import Key, choice, config_key, ranged

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STEP_CHECKPOINT = "latest"
STATE_FILE = "training_state.pt"
MODEL_RECORD = "model_config"  # the weights' metadata key of the model config they were trained with
SCRATCH = "scratch"
_CHECKPOINT_NAME = re.compile(r"epoch_([0-9]{8})")  # fullmatch; [0-9], not \d: \d also takes "٣" and kin
_COUNT = re.compile(r"0|[1-9][0-9]*")  # a count as this project writes one: ASCII digits, no sign, no leading 0
_REPLACED = ".old"  # a checkpoint moved aside while its replacement is renamed into place


@dataclass
class BaseTrainConfig:
    """The ``train`` keys of every trainer; ``dpar.training.TrainConfig`` and ``tokenizer.train_vq.VQTrainConfig``
    add their own (and the tokenizer's schema other defaults)."""
    # runs go to <results_dir>/<experiment_name>/<YYYYMMDD_HH> (--prod) or <results_dir>/scratch/...
    results_dir: str = "results"
    # default: the config file's name, e.g. global_model_entropy_row_break.
    experiment_name: str | None = None
    # passes over the training images (the paper: 300).
    epochs: int = ranged(300, min=1)
    # images per optimizer step over all processes (the paper: 256).
    global_batch_size: int = ranged(256, min=1)
    # Adam / AdamW (paper section 4.1).
    lr: float = ranged(1e-4, gt=0)
    beta1: float = ranged(0.9, min=0, lt=1)
    beta2: float = ranged(0.95, min=0, lt=1)
    # gradient clipping by global norm.
    max_grad_norm: float = ranged(1.0, gt=0)
    # bf16: autocast to bfloat16, weights and optimizer in fp32; no: fp32 throughout.
    mixed_precision: str = choice("bf16", ("no", "bf16"))
    # seeds the initial weights, the data order, augmentation and dropout.
    global_seed: int = ranged(0, min=0, max=2**31 - 1)
    # log every N steps (metrics.jsonl, progress bar, trackers).
    log_every: int = ranged(100, min=1)
    # checkpoint every N epochs (and after the last).
    ckpt_every: int = ranged(1, min=1)
    # keep the newest K epoch checkpoints (0: all) and every epoch divisible by M.
    keep_last: int = ranged(0, min=0)
    keep_every: int = ranged(0, min=0)


# What a trainer says when Ctrl-C stops it (dpar.errors.run_main): checkpoints are written whole or not at all.
RESUME_HINT = "add --resume to the same command to continue from the run's last checkpoint, if it saved one"

# The BaseTrainConfig keys a resumed run may change (each trainer adds its own): where it writes, how long it
# trains, how often it logs and checkpoints; none changes what a step computes. Any other difference from the
# run's config.yaml is refused.
RESUMABLE_TRAIN_KEYS = frozenset({"train.results_dir", "train.epochs", "train.log_every", "train.ckpt_every",
                                  "train.keep_last", "train.keep_every"})


def parse_trainer_cli(schema: type, description: str, argv: list[str] | None,
                      default_name: str) -> tuple[argparse.Namespace, DictConfig, str]:
    """A training script's command line: ``--config``, overrides of ``schema`` (which has a ``train`` section of
    :class:`BaseTrainConfig`), ``--prod`` and ``--resume [DIR]``. Returns (flags, validated config, run name:
    ``train.experiment_name``, else the config file's stem, else ``default_name``). ``UserError`` for a bad key
    or value."""
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prod", action="store_true",
                        help="write to <results_dir>/<name>/<YYYYMMDD_HH>/ instead of <results_dir>/scratch/")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="DIR",
                        help="continue DIR, or without DIR the newest run of this config")
    args, config = parse_cli(parser, schema, argv)
    name = config.train.experiment_name or (Path(args.config).stem if args.config else default_name)
    return args, config, name


class Run:
    """One training run's experiment directory (the layout above): its name, lock, config, metrics and checkpoints.

    ``Run(...)`` checks the results root and the name and writes nothing; :meth:`find` resolves the directory and
    the checkpoint a resumed run continues from (:func:`resolve_run`); :meth:`start` locks the directory and writes
    the resolved config (a resumed run's must match outside the resumable keys); :meth:`load` reads the
    checkpoint, :meth:`truncate_metrics` cuts ``metrics.jsonl`` back to it, :meth:`log` appends a record and
    :meth:`save` writes a checkpoint and prunes old ones.

    Every process of a multi-process run holds one: the main process (rank 0) resolves the directory and
    broadcasts it, and only it writes (config, metrics, checkpoints: :meth:`start`, :meth:`log`,
    :meth:`truncate_metrics` and :meth:`save` do nothing on the other ranks); every process reads the checkpoint
    it resumes from. ``accelerator`` is an ``accelerate.Accelerator`` (its rank, its barrier).
    """

    def __init__(self, accelerator, train: BaseTrainConfig | DictConfig, name: str, *, prod: bool,
                 resume: str | None, what: str = "a training run"):
        self.root = check_output_dir(train.results_dir, "train.results_dir")
        _check_run_name(name)
        self.accelerator, self.name, self.prod, self.resume, self.what = accelerator, name, prod, resume, what
        self.keep_last, self.keep_every = train.keep_last, train.keep_every
        self.main = accelerator.is_main_process
        self.dir: Path | None = None  # set by find()
        self.resume_from: Path | None = None
        self.model_config: dict[str, Any] | None = None  # the resolved model section, set by start()
        self.resumable_model_keys: frozenset[str] = frozenset()  # its keys a resume may change, set by start()
        self._state: dict[str, Any] | None = None  # the resume point's training state, read by start() (main process)

    def find(self) -> Run:
        """Resolve the directory and the resume point on the main process; every process gets them."""
        from accelerate.utils import broadcast_object_list  # imported when used, as dpar.launch imports accelerate

        found = [resolve_run(self.root, self.name, self.prod, self.resume)] if self.main else [None]
        self.dir, self.resume_from = broadcast_object_list(found)[0]
        return self

    @property
    def resume_step(self) -> int:
        """The optimizer step of the resume point; -1 for a new run (or a checkpoint that does not say)."""
        return -1 if self.resume_from is None else checkpoint_step(self.resume_from)

    def start(self, config: DictConfig, resumable_keys: set[str] | frozenset[str], total_steps: int,
              state_keys: tuple[str, ...] = ()) -> Run:
        """Create and lock the directory and write ``config.yaml`` (main process), then wait for every process.
        ``UserError`` when a resumed run's saved config differs outside ``resumable_keys`` (dotted keys) or its
        training state lacks one of ``state_keys`` (what the trainer reads back), when it is already at
        ``total_steps`` (the step its config ends at), or when another process holds the lock. Its ``model``
        section is recorded with every checkpoint's weights."""
        if "model" in config:
            self.model_config = OmegaConf.to_container(config.model, resolve=True)
            self.resumable_model_keys = frozenset(key.removeprefix("model.") for key in resumable_keys
                                                  if key.startswith("model."))
        path = self.dir / CONFIG_FILE
        if self.main and self.resume_from is not None:  # what the run is, before how far it got
            self._check_resume_point(path, bool(OmegaConf.select(config, "train.ema", default=False)), state_keys)
            differs = config_difference(config, path, set(resumable_keys))
            if differs:
                key, saved, value = differs
                raise UserError(f"{path} was started with {key}={saved!r}, this run has {value!r}; resume with "
                                "the same settings or start a new run (e.g. another --train.experiment_name)")
        if self.main and self.resume_step >= total_steps:
            train = config.train
            raise UserError(f"{self.dir} is already at step {self.resume_step}; train.epochs {train.epochs} / "
                            f"train.max_steps {train.get('max_steps')} end at step {total_steps}: raise them to "
                            "train on")
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            lock_folder(self.dir, self.what)
            save_config(config, path)
        self.accelerator.wait_for_everyone()
        return self

    def _check_resume_point(self, config_path: Path, ema: bool, state_keys: tuple[str, ...]) -> None:
        """Before anything is written: a resumed run has its ``config.yaml`` (to compare settings with) and a
        complete resume point (weights, a readable training state holding ``state_keys``, EMA weights when
        ``train.ema`` is on)."""
        if not config_path.is_file():
            raise UserError(f"--resume {self.dir}: it has no {CONFIG_FILE} to compare this run's settings with; "
                            "start a new run")
        for name in (MODEL_FILE, STATE_FILE) + ((EMA_FILE,) if ema else ()):
            if not (self.resume_from / name).is_file():
                raise UserError(f"--resume {self.dir}: its checkpoint {self.resume_from} has no {name}"
                                f"{' (train.ema is on)' if name == EMA_FILE else ''}")
        self._state = _load_torch_file(self.resume_from / STATE_FILE)  # read once: load() returns it
        if not isinstance(self._state, dict):
            raise UserError(f"{self.resume_from / STATE_FILE} is not a training state (a dict); it cannot be resumed")
        missing = [key for key in state_keys if key not in self._state]
        if missing:
            raise UserError(f"{self.resume_from / STATE_FILE} lacks {', '.join(missing)} (not a training state of "
                            f"this trainer); it cannot be resumed")

    def load(self, model: torch.nn.Module, ema: torch.nn.Module | None = None) -> dict[str, Any]:
        """Load the resume point's weights into ``model`` (and its EMA weights into ``ema``); returns the training
        state saved with them. Every process reads. ``UserError`` for weights that do not fit or that record
        another model config than this run's (outside the ``model`` keys a resume may change), or no EMA file."""
        if self.model_config is not None:  # the config.yaml (edited?) and the command agree; and the weights?
            check_model_record(self.resume_from / MODEL_FILE, self.model_config, self.dir / CONFIG_FILE,
                               ignore=self.resumable_model_keys)
        state = self._state if self._state is not None else _load_torch_file(self.resume_from / STATE_FILE)
        self._state = None
        load_model_weights(model, self.resume_from / MODEL_FILE)
        if ema is not None:
            if not (self.resume_from / EMA_FILE).is_file():
                raise UserError(f"train.ema is on but {self.resume_from} has no {EMA_FILE}")
            load_model_weights(ema, self.resume_from / EMA_FILE)
        return state

    def truncate_metrics(self, step: int) -> None:
        """:func:`truncate_metrics` of this run (main process): called once the run knows its first step."""
        if self.main:
            truncate_metrics(self.dir, step)

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON record to ``metrics.jsonl`` (main process)."""
        if self.main:
            with writing(self.dir / METRICS_FILE), open(self.dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(self, epoch: int, model_state: dict[str, torch.Tensor], training_state: dict[str, Any], *,
             ema_state: dict[str, torch.Tensor] | None = None, step: int | None = None,
             end_of_epoch: bool = True) -> None:
        """Write the checkpoint of the end of ``epoch`` and prune per ``train.keep_last`` / ``keep_every``
        (:func:`save_checkpoint`), or with ``end_of_epoch=False`` the mid-epoch ``checkpoints/latest/`` at ``step``
        (:func:`save_step_checkpoint`). Main process only (the others return at once)."""
        if not self.main:
            return
        if end_of_epoch:
            save_checkpoint(self.dir, epoch, model_state, training_state, self.keep_last, self.keep_every,
                            ema_state=ema_state, step=step, model_config=self.model_config)
        else:
            save_step_checkpoint(self.dir, epoch, step, model_state, training_state, ema_state=ema_state,
                                 model_config=self.model_config)


def new_experiment_dir(root: str | Path, config_name: str, prod: bool, now: datetime | None = None) -> Path:
    """The directory a new run writes to (not created here)."""
    now = now or datetime.now()
    if prod:
        return Path(root) / config_name / now.strftime("%Y%m%d_%H")
    return Path(root) / SCRATCH / config_name / now.strftime("%Y%m%d_%H%M%S")


def _latest_experiment_dir(root: str | Path, config_name: str, prod: bool) -> Path | None:
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
    _check_run_name(config_name)
    if resume is None:
        experiment = new_experiment_dir(root, config_name, prod)
    elif resume == "latest":
        experiment = _latest_experiment_dir(root, config_name, prod)
        if experiment is None:
            kind = "--prod" if prod else "scratch"
            raise UserError(f"--resume: no {kind} run of {config_name!r} with a checkpoint under {root}")
    else:
        experiment = Path(resume)
        if resume_checkpoint(experiment) is None:
            raise UserError(f"--resume {experiment}: no {CHECKPOINTS}/epoch_*/{MODEL_FILE} there")
    return experiment, resume_checkpoint(experiment)


def _check_run_name(name: str) -> None:
    if not name or Path(name).name != name or name in (".", ".."):
        raise UserError(f"train.experiment_name {name!r} must be a plain folder name (no '/', not '.' or "
                        "'..'): runs stay inside train.results_dir")


def checkpoint_dir(experiment_dir: str | Path, epoch: int) -> Path:
    return Path(experiment_dir) / CHECKPOINTS / f"epoch_{epoch:08d}"


def list_checkpoints(experiment_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints as (epoch, dir), oldest first."""
    found = {}
    for path in (Path(experiment_dir) / CHECKPOINTS).glob("epoch_*"):  # epoch_X, or epoch_X.old mid-swap
        match = _CHECKPOINT_NAME.fullmatch(path.name.removesuffix(_REPLACED))
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
    if (len(path.parents) > 2 and path.parents[1].name == CHECKPOINTS
            and _CHECKPOINT_NAME.fullmatch(path.parent.name)):
        return path.parents[2]
    return None


def latest_checkpoint(experiment_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(experiment_dir)
    return checkpoints[-1][1] if checkpoints else None


def save_checkpoint(experiment_dir: str | Path, epoch: int, model_state: dict[str, torch.Tensor],
                    training_state: dict[str, Any] | None = None, keep_last: int = 0, keep_every: int = 0, *,
                    ema_state: dict[str, torch.Tensor] | None = None, step: int | None = None,
                    model_config: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint of the end of ``epoch`` atomically, then prune (see :func:`_prune_checkpoints`).
    ``model_config`` (the run's resolved ``model`` section) is recorded in the weights' metadata."""
    final = _write_checkpoint(checkpoint_dir(experiment_dir, epoch), model_state, training_state, ema_state,
                              {"epoch": epoch, "step": step, MODEL_RECORD: _record(model_config)})
    shutil.rmtree(step_checkpoint_dir(experiment_dir), ignore_errors=True)
    _prune_checkpoints(experiment_dir, keep_last, keep_every)
    return final


def save_step_checkpoint(experiment_dir: str | Path, epoch: int, step: int, model_state: dict[str, torch.Tensor],
                         training_state: dict[str, Any], *, ema_state: dict[str, torch.Tensor] | None = None,
                         model_config: dict[str, Any] | None = None) -> Path:
    """Replace the mid-epoch resume point ``checkpoints/latest/`` atomically (``model_config`` as for
    :func:`save_checkpoint`)."""
    return _write_checkpoint(step_checkpoint_dir(experiment_dir), model_state, training_state, ema_state,
                             {"epoch": epoch, "step": step, MODEL_RECORD: _record(model_config)})


def _record(model_config: dict[str, Any] | None) -> str | None:
    return None if model_config is None else json.dumps(model_config, sort_keys=True)


def recorded_model_config(weights: str | Path) -> dict[str, Any] | None:
    """The model config a ``.safetensors`` weights file records (written by :func:`save_checkpoint` since it
    records one); None for weights that record none (older checkpoints, LlamaGen's ``.pt``). ``UserError`` for
    a file that cannot be read or a record that is not a JSON mapping."""
    path = Path(weights)
    if path.suffix != ".safetensors":
        return None
    try:
        with safe_open(path, framework="pt") as f:
            text = (f.metadata() or {}).get(MODEL_RECORD)
        record = None if text is None else json.loads(text)
    except (SafetensorError, OSError, ValueError, RecursionError) as error:
        raise UserError(f"cannot read the model config recorded in {path}: {first_line(error)}") from None
    if record is not None and not isinstance(record, dict):
        raise UserError(f"{path} records a model config that is not a mapping of keys ({str(text)[:60]})")
    return record


def check_model_record(weights: str | Path, model_config: dict[str, Any], config_path: str | Path,
                       ignore: frozenset[str] | set[str] = frozenset()) -> None:
    """``UserError`` (one line naming the key and both values) when the ``model`` section of ``config_path``
    (``model_config``, resolved) gives a key another value than the model config ``weights`` record. Keys only
    one side has (a key added to the schema since) and ``ignore`` are not compared; weights that record no
    config pass."""
    recorded = recorded_model_config(weights)
    for key, value in (recorded or {}).items():
        if key in model_config and key not in ignore and json.loads(json.dumps(model_config[key])) != value:
            raise UserError(f"{config_path} has model.{key}={model_config[key]!r}, but the weights {weights} were "
                            f"trained with model.{key}={value!r} (the config they record); put {value!r} back: a "
                            "run's config.yaml must describe its weights")


def step_checkpoint_dir(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / CHECKPOINTS / STEP_CHECKPOINT


def resume_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The checkpoint a resumed run continues from: the newest epoch one or ``latest/``, whichever is later."""
    candidates = [path for path in (latest_checkpoint(experiment_dir), _complete(step_checkpoint_dir(experiment_dir)))
                  if path is not None]
    return max(candidates, key=checkpoint_step, default=None)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The optimizer step a checkpoint was written at (-1 when its metadata does not say)."""
    return checkpoint_metadata(checkpoint).get("step", -1)


def checkpoint_metadata(checkpoint: str | Path) -> dict[str, int]:
    """The ``epoch`` and ``step`` a checkpoint dir's weights record (absent when not recorded), each read with
    :func:`parse_count`. ``UserError`` naming the file for weights that cannot be read or a value that is not a
    count as this project writes one."""
    path = Path(checkpoint) / MODEL_FILE
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise UserError(f"checkpoint {path} is damaged ({error}); delete its folder to use an earlier one") from None
    return {key: parse_count(metadata[key], f"checkpoint {path}: its metadata {key!r}")
            for key in ("epoch", "step") if key in metadata}


def parse_count(text: str, what: str) -> int:
    """``text`` as a count this project wrote (an epoch, a step): ASCII digits in canonical form (``"0"``,
    ``"590"``). Anything else (``"5\\n"``, ``" 5"``, ``"05"``, ``"+5"``, ``"-1"``, ``"5_0"``, ``"٣"``: ``int()``
    takes them all, and most would be written back otherwise) is a damaged or crafted file: ``UserError`` naming
    ``what``, before the value reaches a file name or a resume point."""
    if not isinstance(text, str) or len(text) > 18 or not _COUNT.fullmatch(text):  # 18 digits: any real count
        raise UserError(f"{what} is {text!r}, not a count in ASCII digits (a damaged or crafted file); delete "
                        "the checkpoint's folder to use an earlier one")
    return int(text)


def _write_checkpoint(final: Path, model_state: dict[str, torch.Tensor], training_state: dict[str, Any] | None,
                      ema_state: dict[str, torch.Tensor] | None, metadata: dict[str, int | str | None]) -> Path:
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    metadata = {key: str(value) for key, value in metadata.items() if value is not None}
    try:
        for name, state in ((MODEL_FILE, model_state), (EMA_FILE, ema_state)):
            if state is not None:
                tensors = {key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}
                with writing(staging / name, shown=final / name):
                    save_file(tensors, staging / name, metadata=metadata)
                os.chmod(staging / name, 0o666 & ~umask())  # safetensors creates its files 0600
        if training_state is not None:
            with writing(staging / STATE_FILE, shown=final / STATE_FILE):
                torch.save(training_state, staging / STATE_FILE)
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint is left
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replaced = final.with_name(final.name + _REPLACED)
    if final.exists():
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(staging, final)
    shutil.rmtree(replaced, ignore_errors=True)
    return final


def _prune_checkpoints(experiment_dir: str | Path, keep_last: int, keep_every: int) -> None:
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
    ``"state_dict"``), else the checkpoint itself. ``UserError`` for a missing or unreadable file, and for
    weights no model can use (:func:`check_weights`)."""
    path = _weights_file(path)
    if path.suffix == ".safetensors":
        try:
            return check_weights(load_file(path), path)
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
    return check_weights(_state_dict_in(_load_torch_file(path), path), path)


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of every weight in a file :func:`read_state_dict` reads, without reading the weights: a
    ``.safetensors`` header, or a torch checkpoint memory-mapped (read whole only in torch's legacy format, which
    cannot be mapped). ``UserError`` as :func:`read_state_dict`."""
    path = _weights_file(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except (SafetensorError, OSError) as error:
            raise UserError(f"cannot read {path}: {error}") from None
    try:
        checkpoint = _load_torch_file(path, mmap=True)
    except UserError:  # a legacy (non-zip) torch file cannot be mapped; a damaged one fails again here
        checkpoint = _load_torch_file(path)
    return {key: tuple(tensor.shape) for key, tensor in _state_dict_in(checkpoint, path).items()}


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def _state_dict_in(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict a loaded torch checkpoint holds (see :func:`read_state_dict`); ``UserError`` for none."""
    if isinstance(checkpoint, dict):
        key = next((key for key in STATE_DICT_KEYS if isinstance(checkpoint.get(key), dict)), None)
        checkpoint = checkpoint if key is None else checkpoint[key]
    if (not isinstance(checkpoint, dict) or not checkpoint
            or not all(isinstance(v, torch.Tensor) for v in checkpoint.values())):
        raise UserError(f"{path} holds no state dict (expected tensors, or a dict with one under "
                        f"{' / '.join(map(repr, STATE_DICT_KEYS))})")
    return checkpoint


def check_weights(state: dict[str, torch.Tensor], path: str | Path) -> dict[str, torch.Tensor]:
    """``state`` when every tensor is floating point and finite; else ``UserError`` naming ``path`` and the
    first bad tensor. Every weight file goes through it (trained runs, LlamaGen checkpoints, tokenizers, LPIPS):
    a NaN or inf weight samples "successfully" (every token the last code), and integer weights would be cast
    silently. None of these models holds an integer buffer (LlamaGen's VQ ``codebook_used`` is float)."""
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise UserError(f"{path}: weight {key!r} is {str(tensor.dtype).removeprefix('torch.')}; model weights "
                            "are floating point (a damaged or foreign file)")
        # min and max: one read and no mask allocated, far faster than isfinite().all(); NaN propagates into both
        if tensor.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all()):
            finite = torch.isfinite(tensor)
            kind = "NaN" if bool(tensor.isnan().any()) else "inf"
            raise UserError(f"{path}: weight {key!r} holds {kind} ({int((~finite).sum())} of {tensor.numel()} "
                            "values not finite); the weights are unusable (a run that diverged, or a damaged file)")
    return state


def _load_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``; also admits the argparse.Namespace LlamaGen stores as ``args``.
    ``mmap``: the tensors mapped from the file, not read (torch's zip format only)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
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
    count, details = _misfit(_shapes(model), {key: tuple(tensor.shape) for key, tensor in state.items()})
    if count:
        raise UserError(f"{path} does not fit the model: {details}")


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _misfit(own: dict[str, tuple[int, ...]], file: dict[str, tuple[int, ...]]) -> tuple[int, str]:
    """(how many keys of a model's state dict and of a file disagree, given their shapes ``own`` and ``file``;
    the first of each kind in words)."""
    missing = [k for k in own if k not in file]
    unexpected = [k for k in file if k not in own]
    misshapen = [k for k in own if k in file and own[k] != file[k]]
    details = []
    if missing:
        details.append(f"{len(missing)} missing (first {missing[0]!r})")
    if unexpected:
        details.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
    if misshapen:
        k = misshapen[0]
        details.append(f"{len(misshapen)} with other shapes (first {k!r}: {list(file[k])} in file, {list(own[k])} "
                       "in model)")
    return len(missing) + len(unexpected) + len(misshapen), "; ".join(details)


def build_for_weights(build: Callable[[Any], torch.nn.Module], config: Any, weights: str | Path,
                      config_path: str | Path | None = None, key: Key = config_key("model")) -> torch.nn.Module:
    """``build(config)`` with ``weights`` loaded (:func:`load_model_weights`), the shapes compared first: the
    model is built on the meta device (nothing allocated) and its every key and shape compared with the file's
    (:func:`weight_shapes`: no weight read). So a config that does not describe the weights -- a run's
    ``config.yaml`` edited to GPT-7B or a vocabulary of 10^9 -- is refused before anything is allocated.

    ``config`` is a config dataclass read from ``config_path`` (its fields named by ``key``): a mismatch is
    one line naming the field whose other value the weights fit (:func:`_fitting_values`), and that value;
    without ``config_path``, or when no single field explains the shapes, one line naming the first weight
    that differs.
    """
    shapes = weight_shapes(weights)
    with torch.device("meta"):
        count, details = _misfit(_shapes(build(config)), shapes)
    if count:
        fitting = _fitting_values(build, config, shapes) if config_path is not None else []
        if not fitting:
            where = f" {config_path} describes" if config_path is not None else ""
            raise UserError(f"{weights} does not fit the model{where}: {details}")
        has = " and ".join(f"{key(name)}={_yaml(getattr(config, name))}" for name, _ in fitting)
        fits = " or ".join(f"{key(name)}={_yaml(value)}" for name, value in fitting)
        raise UserError(f"{config_path} has {has}, but the weights {weights} have the shapes of {fits}: a run's "
                        "config.yaml must describe its weights")
    model = build(config)
    load_model_weights(model, weights)
    return model


def _fitting_values(build: Callable[[Any], torch.nn.Module], config: Any,
                    shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, Any]]:
    """[(field, value)]: each field of the config dataclass ``config`` whose other value makes ``build`` a model
    of exactly the file's ``shapes`` (the field an edit changed; two when either explains the shapes, e.g. a
    class table one row longer: ``num_classes`` or ``class_dropout_prob``), with the first such value.

    Candidates, each built on the meta device: the field's default first, then every choice of a choice field,
    the other boolean, 0 for a float; for an integer that adds or removes weights (a count of layers or blocks)
    the counts of the file's numbered modules, and for one that changes shapes the sizes in the file's shapes
    of the weights it changes (and each less one: a table with a null row), if it changes every weight that
    differs; all within the field's range. A field that changes nothing is left after one try."""
    counts: dict[str, int] = {}  # "layers" -> 12 for layers.0 .. layers.11
    for name in shapes:
        parts = name.split(".")
        for i, part in enumerate(parts):
            if part.isdigit():
                prefix = ".".join(parts[:i])
                counts[prefix] = max(counts.get(prefix, 0), int(part) + 1)
    found = []
    with torch.device("meta"):
        own = _shapes(build(config))
        differ = {key for key in own.keys() | shapes.keys() if own.get(key) != shapes.get(key)}

        def shapes_with(name: str, value: Any) -> dict[str, tuple[int, ...]] | None:
            try:
                return _shapes(build(dataclasses.replace(config, **{name: value})))
            except Exception:  # a candidate its schema or its model refuses: not the value the weights have
                return None

        for field in dataclasses.fields(config):
            current, default, rule = getattr(config, field.name), field.default, field.metadata.get("range")
            if "choices" in field.metadata:
                candidates = [default, *field.metadata["choices"]]
            elif isinstance(current, bool):
                candidates = [not current]
            elif isinstance(default, float):
                candidates = [default, 0.0]
            elif isinstance(current, int) or (current is None and rule is not None):
                base = current or default or 1
                probe = next((probed for value in (default, base + 1, 2 * base) if value != current
                              for probed in [shapes_with(field.name, value)] if probed is not None), None)
                if probe is None or probe == own:
                    continue
                if probe.keys() != own.keys():  # a count of modules
                    candidates = [default, *sorted(set(counts.values()))]
                else:  # a size: it must change every weight that differs, and the file has the same weights
                    changes = {key for key in own if own[key] != probe[key]}
                    if own.keys() != shapes.keys() or not differ <= changes:
                        continue
                    sizes = {size for key in differ for size in shapes[key]}
                    candidates = [default, *sorted(sizes | {size - 1 for size in sizes})]
            else:
                continue  # lists and free text: no candidates
            for value in dict.fromkeys(candidates):
                if value == current or not (value is None or rule is None or rule.allows(value)):
                    continue
                changed = shapes_with(field.name, value)
                if changed == own and "choices" not in field.metadata:
                    break  # this field changes no shape (a choice may change some: try them all)
                if changed is not None and not _misfit(changed, shapes)[0]:
                    found.append((field.name, value))
                    break
    return found


def _yaml(value: Any) -> str:
    """A config value as YAML writes it (``null``, ``true``, ``DGPT-B``, ``0.1``)."""
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


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


def config_difference(config: DictConfig, saved_path: Path, ignored_keys: set[str]) -> tuple[str, Any, Any] | None:
    """The first (dotted key, saved value, ``config``'s value) where a run's saved ``config.yaml`` differs from
    ``config`` outside ``ignored_keys``; None where they agree."""
    saved = flatten(OmegaConf.to_container(load_record(OmegaConf.get_type(config), saved_path), resolve=True))
    for key, value in flatten(OmegaConf.to_container(config, resolve=True)).items():
        if key not in ignored_keys and saved.get(key) != value:
            return key, saved.get(key), value
    return None
