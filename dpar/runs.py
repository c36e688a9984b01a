"""Loading what sampling needs: a training run's model, patcher, entropy model and tokenizer, or a released
LlamaGen checkpoint.

A run is an experiment directory of ``train_global_model.py`` (``dpar.experiment``'s layout): its
``config.yaml`` names the model (``model``), the patching it was trained with (``patcher``, with the entropy
model's checkpoint) and the token store (``data.store``), whose ``meta.json`` records the tokenizer and the class
names. :class:`Sampler` bundles them on one device; :func:`dpar.sampling.generate` does the sampling.
``UserError`` (one line) for anything the user named that is missing or does not fit.

A run's ``config.yaml`` is read as a training config is (``dpar.config.read_section``: resolved, each section
validated against the schema that wrote it), and its ``model`` section must agree with the model config its
weights record (:func:`dpar.experiment.check_model_record`), so an edited config cannot silently change the
architecture the weights are run with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from tokenizer.vq_model import load_vq

from .config import read_config_file, read_section, recorded_path
from .data.config import DataConfig
from .data.store import file_sha256, read_meta
from .errors import UserError
from .experiment import (CHECKPOINTS, CONFIG_FILE, EMA_FILE, MODEL_FILE, STEP_CHECKPOINT, build_for_weights,
                         check_fits, check_model_record, checkpoint_metadata, experiment_of, list_checkpoints,
                         read_state_dict, step_checkpoint_dir)
from .models import GPT_models, ModelConfig, create_model, is_dpar, unused_keys
from .patcher import PatcherConfig
from .sampling import Generation, SamplingConfig, cached_steps, generate
from .validation import flag_key


@dataclass
class Sampler:
    """A model ready to sample -- a training run's or a released LlamaGen GPT's -- with its patcher, entropy
    model and tokenizer, on one device."""

    model: nn.Module
    model_config: ModelConfig
    patcher: PatcherConfig | None
    entropy_model: nn.Module | None
    vq: nn.Module | None
    epoch: int | str | None  # the run's checkpoint epoch, "latest" (its mid-epoch checkpoint), None for LlamaGen's
    name: str            # what sample files are named after: epoch-299, epoch-3-step-1200, GPT-B-c2i_B_256-size-256
    weights: Path        # the model.safetensors (or ema.safetensors, or LlamaGen .pt) sampled from
    vq_checkpoint: Path | None  # the tokenizer that decodes
    class_names: list[str] | None = None  # from the run's token store, where it is here
    config_path: Path | None = None       # the run's config.yaml (None for a LlamaGen checkpoint)

    @classmethod
    def from_experiment(cls, experiment_dir: str | Path, epoch: int | str | None = None, *, ema: bool = False,
                        vq_checkpoint: str | None = None, device: str | torch.device = "cpu",
                        threshold: float | None = None, max_patch_length: int | None = None,
                        self_entropy: bool = False, tokenizer: bool = True) -> Sampler:
        """Load ``experiment_dir``'s checkpoint of ``epoch`` (default: the newest epoch; ``"latest"``: the
        mid-epoch ``checkpoints/latest``) and what it needs (``tokenizer=False``: all but the tokenizer, for
        work on tokens such as the linear probe; ``vq`` is then None).

        ``threshold`` / ``max_patch_length`` / ``self_entropy`` change the trained patcher at inference (paper
        Table 6; see :func:`run_patching`); ``max_patch_length=0`` removes the cap.
        """
        experiment = Path(experiment_dir)
        config_path = run_config(experiment)
        checkpoint, epoch, name = _checkpoint_of(experiment, epoch)
        weights = checkpoint / (EMA_FILE if ema else MODEL_FILE)
        if not weights.is_file():
            raise UserError(f"--ema: {weights} does not exist (the run kept no EMA: train.ema false)")
        model, model_config = load_trained_model(weights, config_path)
        model = model.to(device)
        patcher, entropy_model = run_patching(config_path, model_config, device, threshold, max_patch_length,
                                              self_entropy)
        sampler = cls(model, model_config, patcher, entropy_model, None, epoch, name, weights, None,
                      run_class_names(config_path), config_path)
        return sampler.load_tokenizer(vq_checkpoint) if tokenizer else sampler

    def load_tokenizer(self, vq_checkpoint: str | Path | None = None) -> Sampler:
        """Load ``vq_checkpoint`` (default: the run's tokenizer) as :attr:`vq`, on the model's device; returns
        self. ``UserError`` when none is found or it does not fit the model."""
        self.vq, self.vq_checkpoint = run_tokenizer(self.config_path, self.model_config, vq_checkpoint)
        self.vq = self.vq.to(next(self.model.parameters()).device)
        return self

    @classmethod
    def from_llamagen(cls, gpt_model: str, gpt_checkpoint: str | Path, vq_checkpoint: str | Path, image_size: int,
                      device: str | torch.device = "cpu") -> Sampler:
        """A released LlamaGen c2i GPT (``--gpt-model GPT-L --gpt-ckpt c2i_L_256.pt --vq-ckpt vq_ds16_c2i.pt
        --image-size 256``, LlamaGen's flags), so that the baseline is sampled and evaluated like DPAR."""
        vq_checkpoint = Path(vq_checkpoint)
        vq = load_vq(vq_checkpoint)
        model, model_config = load_llamagen_gpt(gpt_checkpoint, gpt_model, image_size, vq.downsample)
        run_tokenizer(None, model_config, vq_checkpoint, vq)  # refused unless it fits the model
        name = f"{gpt_model}-{Path(gpt_checkpoint).stem}-size-{image_size}"
        return cls(model.to(device), model_config, None, None, vq.to(device), None, name, Path(gpt_checkpoint),
                   vq_checkpoint)

    @property
    def grid(self) -> int:
        return self.model_config.image_size // self.model_config.downsample_size

    def check(self, sampling: SamplingConfig) -> None:
        """Refuse, before any output, sampling this model cannot do: guidance without a null class."""
        if sampling.cfg_scale != 1.0 and not self.model.cls_embedding.has_null:
            raise UserError(f"--cfg-scale {sampling.cfg_scale}: the model was trained with model.class_dropout_prob "
                            "0, so it has no null class for guidance; use --cfg-scale 1.0")

    def sample(self, labels: Tensor | None, seeds: Tensor, sampling: SamplingConfig, progress: bool = False,
               image_size: int | None = None, prefix: Tensor | None = None,
               static_shapes: bool = False) -> tuple[Tensor, Generation]:
        """uint8 images ``[B, H, W, 3]`` and the generation record for ``labels`` and per-image ``seeds``;
        ``image_size`` resizes the decoded images before quantisation (LlamaGen's ``--image-size-eval``);
        ``prefix [B, L]`` keeps the first L tokens (image completion, see :func:`generate`)."""
        steps = cached_steps(self.model, self.patcher, self.entropy_model, static_shapes)
        out = generate(steps, labels, seeds, sampling, prefix=prefix, progress=progress)
        return self.vq.codes_to_images(out.tokens, self.grid, size=image_size), out

    def identity(self) -> dict:
        """What, besides the sampling flags, decides the images: the weights, the tokenizer and the patcher."""
        return {"weights": str(self.weights.resolve()), "weights_sha256": file_sha256(self.weights),
                "tokenizer": str(self.vq_checkpoint.resolve()), "tokenizer_sha256": file_sha256(self.vq_checkpoint),
                "patcher": None if self.patcher is None else asdict(self.patcher)}


def run_config(experiment: Path) -> Path:
    """The ``config.yaml`` of a class-conditional training run of ``train_global_model.py``; ``UserError`` for
    any other folder (missing, a tokenizer or an entropy model run)."""
    config_path = experiment / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{experiment} is not an experiment dir (no {CONFIG_FILE})")
    model = read_config_file(config_path).get("model")
    if isinstance(model, DictConfig) and "gpt_model" not in model:
        raise UserError(f"{experiment} is not a training run of train_global_model.py (its config has no "
                        "model.gpt_model; a tokenizer run?)")
    model = read_section(config_path, "model", ModelConfig)
    if model.model_type != "c2i":
        raise UserError(f"{experiment} is an unconditional model ({model.gpt_model}, e.g. an entropy model); "
                        "class-conditional sampling needs a c2i run")
    return config_path


def run_patching(config_path: Path, model_config: ModelConfig, device: str | torch.device,
                 threshold: float | None = None, max_patch_length: int | None = None, self_entropy: bool = False
                 ) -> tuple[PatcherConfig | None, nn.Module | None]:
    """(patcher, entropy model on ``device``) of the run ``config_path`` describes: (None, None) for a GPT,
    no entropy model unless it patches by entropy. ``threshold`` / ``max_patch_length`` (0: no cap) override
    the trained patcher (paper Table 6); ``self_entropy`` switches it to ``self_entropy`` mode at
    ``threshold`` (required: θ on the model's own entropies is not the entropy model's). Needs the run's config
    only, not its weights (``dpar.patchmap``)."""
    if not is_dpar(model_config.gpt_model):
        if threshold is not None or max_patch_length is not None or self_entropy:
            raise UserError(f"--threshold, --max-patch-length and --self-entropy change DPAR's patching; "
                            f"{config_path.parent} is a {model_config.gpt_model} run, which has none")
        return None, None
    patcher = read_section(config_path, "patcher", PatcherConfig)
    if self_entropy:
        if patcher.mode != "entropy":
            raise UserError(f"--self-entropy replaces entropy-model patching; {config_path.parent} patches in "
                            f"{patcher.mode} mode")
        if threshold is None:
            raise UserError("--self-entropy needs --threshold: θ for the model's own entropies (calibrate it with "
                            "benchmarks/self_entropy.py), which differs from the entropy model's")
        patcher = replace(patcher, mode="self_entropy")
    if threshold is not None and patcher.mode not in ("entropy", "self_entropy"):
        raise UserError(f"--threshold changes entropy patching; {config_path.parent} patches in {patcher.mode} mode")
    if threshold is not None:
        patcher = replace(patcher, threshold=threshold)
    if max_patch_length is not None:
        patcher = replace(patcher, max_patch_length=max_patch_length or None)
    if patcher.mode != "entropy":
        return patcher, None
    keys = ("entropy_model_checkpoint",) + (  # the config: named, else the run's next to the weights
        ("entropy_model_checkpoint_config",) if patcher.entropy_model_checkpoint_config else ())
    for key in keys:
        if not getattr(patcher, key) or not recorded_path(getattr(patcher, key)).is_file():
            raise UserError(f"{config_path}: patcher.{key} {getattr(patcher, key)!r} is not a file here")
        setattr(patcher, key, str(recorded_path(getattr(patcher, key))))
    entropy_model, _ = load_entropy_model(patcher.entropy_model_checkpoint, patcher.entropy_model_checkpoint_config,
                                          llamagen_gpt=patcher.entropy_model_gpt, image_size=model_config.image_size,
                                          downsample_size=model_config.downsample_size,
                                          vocab_size=model_config.vocab_size)
    return patcher, entropy_model.to(device)


def _checkpoint_of(experiment: Path, epoch: int | str | None) -> tuple[Path, int | str, str]:
    """(checkpoint dir, epoch, sample-file name) of a run's ``epoch``: an int, None (the newest) or "latest"."""
    checkpoints = dict(list_checkpoints(experiment))
    if epoch == "latest":
        latest = step_checkpoint_dir(experiment)
        if not (latest / MODEL_FILE).is_file():
            newest = f"; its newest epoch checkpoint is {max(checkpoints)}" if checkpoints else ""
            raise UserError(f"--epoch latest: {experiment} has no {CHECKPOINTS}/{STEP_CHECKPOINT}/{MODEL_FILE} (it is "
                            f"removed once an epoch checkpoint supersedes it){newest}")
        metadata = checkpoint_metadata(latest)
        return latest, epoch, f"epoch-{metadata.get('epoch', 'unknown')}-step-{metadata.get('step', 'unknown')}"
    if not checkpoints:
        hint = (" yet; a run shorter than one epoch has its mid-epoch checkpoint: --epoch latest"
                if (step_checkpoint_dir(experiment) / MODEL_FILE).is_file() else "")
        raise UserError(f"{experiment} has no {CHECKPOINTS}/epoch_*/{MODEL_FILE}{hint}")
    epoch = max(checkpoints) if epoch is None else epoch
    if epoch not in checkpoints:
        raise UserError(f"{experiment} has no checkpoint of epoch {epoch}; it has epochs "
                        f"{', '.join(map(str, sorted(checkpoints)))}")
    return checkpoints[epoch], epoch, f"epoch-{epoch}"


def run_tokenizer(config_path: Path | None, model_config: ModelConfig, vq_checkpoint: str | Path | None = None,
                  vq: nn.Module | None = None) -> tuple[nn.Module, Path]:
    """(tokenizer in eval mode, its checkpoint): ``vq_checkpoint``, else the one the run's config names
    (``data.tokenizer_checkpoint``), else the one its token store records. ``UserError`` when none is found or
    its codebook and downsampling do not fit the model. ``vq``: the tokenizer already loaded from
    ``vq_checkpoint``."""
    if vq_checkpoint is None:
        data = read_section(config_path, "data", DataConfig, required=False)
        vq_checkpoint = (data and data.tokenizer_checkpoint) or \
            ((_meta_of(data and data.store) or {}).get("tokenizer", {}).get("checkpoint"))
        if not vq_checkpoint or not recorded_path(vq_checkpoint).is_file():
            raise UserError(f"cannot find the tokenizer of {config_path} (data.tokenizer_checkpoint / its token "
                            f"store {data and data.store!r} name {vq_checkpoint!r}); give --vq-ckpt")
        vq_checkpoint = recorded_path(vq_checkpoint)
    vq = vq or load_vq(vq_checkpoint)
    if vq.config.codebook_size != model_config.vocab_size or vq.downsample != model_config.downsample_size:
        raise UserError(f"the tokenizer {vq_checkpoint} has {vq.config.codebook_size} codes and downsamples "
                        f"{vq.downsample}x, the model expects {model_config.vocab_size} and "
                        f"{model_config.downsample_size}x")
    return vq, Path(vq_checkpoint)


def _meta_of(store: str | None) -> dict | None:
    """The ``meta.json`` of a run's token store (its ``data.store``), if that store is here."""
    return read_meta(recorded_path(store)) if store and recorded_path(store).is_dir() else None


def run_class_names(config_path: Path) -> list[str] | None:
    """The class names the run's token store records, if that store is here (a damaged store: None, and the
    grid is labelled with class ids; a config that does not read: ``UserError``)."""
    data = read_section(config_path, "data", DataConfig, required=False)
    try:
        meta = _meta_of(data and data.store)
    except UserError:
        return None
    return list(meta["class_names"]) if meta and meta.get("class_names") else None


# The model keys a run's config.yaml may change after training: how attention is computed, not what (every
# backend computes the same function; the one the weights were trained with may not exist where they are used).
RUN_TIME_MODEL_KEYS = frozenset({"attn_backend"})


def load_trained_model(checkpoint: str | Path, config_path: str | Path | None = None):
    """(model in eval mode, its ModelConfig) from a run's ``model.safetensors`` and the ``model`` section of
    its ``config.yaml`` (found next to the checkpoint's experiment dir unless ``config_path`` is given).
    ``UserError`` when that section differs from the model config the weights record (outside
    :data:`RUN_TIME_MODEL_KEYS`), or describes a model of other shapes than the weights' (compared on the meta
    device before anything is allocated, :func:`dpar.experiment.build_for_weights`: weights written before the
    record existed too)."""
    if config_path is None:
        experiment = experiment_of(checkpoint)
        if experiment is None:
            raise UserError(f"{checkpoint} is not inside an experiment dir (…/checkpoints/epoch_*/); "
                            "also give the run's config.yaml")
        config_path = experiment / CONFIG_FILE
    config = read_section(config_path, "model", ModelConfig)  # checked, as dpar.config checks every config
    check_model_record(checkpoint, asdict(config), config_path, ignore=RUN_TIME_MODEL_KEYS | unused_keys(config))
    model = build_for_weights(create_model, config, checkpoint, config_path)  # shapes first, on the meta device
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
