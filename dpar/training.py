"""The training loop behind train_entropy_model.py and train_global_model.py (arXiv 2512.21867, section 4.1).

One optimizer step trains on ``train.global_batch_size`` images: each of the P processes takes its
share and, when that share exceeds ``train.max_device_batch_size``, splits it into micro-batches
whose gradients accumulate. AdamW, constant learning rate (optional linear warm-up), grad clip,
bf16 autocast over fp32 weights, optional EMA and ``torch.compile`` (paper section 4.1).

A run resumes exactly because everything random is a function of the step:

- the images of step s are fixed by (seed, epoch) (:class:`~dpar.data.dataset.StepBatches`) and each
  image's view by (seed, epoch, image) (:class:`~dpar.data.dataset.TokenDataset`);
- the RNG behind dropout and class dropout is reseeded from (seed, step, rank) before every step;
- checkpoints hold weights, optimizer, scheduler, EMA and the step, at every epoch end and every
  ``train.ckpt_every_steps`` steps in between (``checkpoints/latest/``).

So a run continued from step s computes what an uninterrupted run computes from step s on: bit for
bit on a CPU, and up to kernel nondeterminism on GPUs, when it continues with the same split of the
global batch (processes x micro-batch) and the same ``train.compile``.

What the split changes: with every dropout 0 (``model.dropout_p``, ``token_dropout_p``,
``class_dropout_prob``, ``drop_path_rate``), nothing but float rounding. With dropout on, the random
masks: they are drawn per process and per micro-batch (torch's generator, reseeded per step and rank;
inductor draws its own when compiled), so another split or compile draws other masks, a different but
equally valid run. A resume whose split or compile differs from the one the checkpoint was written with
says so in one warning line. The figures: docs/training.md.
"""
from __future__ import annotations

import copy
import importlib.util
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .config import flatten, literal
from .data.config import DataConfig
from .data.dataset import PackedBatch, PackedCollate, StepBatches, TokenDataset
from .data.splits import holdout_problem, holdout_split
from .data.store import TokenStore, file_sha256
from .errors import UserError
from .experiment import CONFIG_FILE, RESUMABLE_TRAIN_KEYS, BaseTrainConfig, Run, experiment_of
from .launch import make_accelerator
from .flops import count
from .models import ModelConfig, architecture, create_model, is_dpar, unused_keys
from .models.attention import available_backends
from .patcher import PatcherConfig
from .runs import load_entropy_model
from .validation import Key, config_key, ranged

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> module it needs
# Keys a resumed run may change; any other difference from the run's config.yaml is refused. None of them changes
# which images a step trains on or its step size. compile, max_device_batch_size (and the process count, which no
# key holds) change how a step is split and so, with dropout on, the random masks it draws: a resume that changes
# them is warned (Trainer._load), and its results then differ from an uninterrupted run's (see the module's doc).
# train.fsdp changes where the training state lives, not what a step computes or draws, nor the checkpoint files.
RESUMABLE_KEYS = RESUMABLE_TRAIN_KEYS | {"train.max_steps", "train.val_every", "train.ckpt_every_steps",
                                        "train.trackers", "train.compile", "train.max_device_batch_size",
                                        "train.fsdp", "data.num_workers"}


@dataclass
class TrainConfig(BaseTrainConfig):
    """The trainer's ``train`` keys: those of every trainer (:class:`dpar.experiment.BaseTrainConfig`: where runs go,
    epochs, batch, Adam, precision, seed, logging, checkpoints) and these."""
    # stop after this many optimizer steps (smoke tests, benchmarks); null: run all epochs.
    max_steps: int | None = ranged(None, min=1)
    # largest micro-batch a device holds; gradient accumulation makes up the rest. null: no accumulation.
    max_device_batch_size: int | None = ranged(None, min=1)
    # AdamW's weight decay (paper section 4.1).
    weight_decay: float = ranged(0.05, min=0)
    # LlamaGen decays every weight with >= 2 dims, embedding tables included; false exempts embeddings too.
    decay_embeddings: bool = True
    # linear warm-up from 0 over this many steps, then constant (the paper: 0, constant throughout).
    warmup_steps: int = ranged(0, min=0)
    # keep an exponential moving average of the weights (saved as ema.safetensors).
    ema: bool = False
    ema_decay: float = ranged(0.9999, min=0, lt=1)
    # torch.compile the model (CUDA; the first steps are slow while it compiles).
    compile: bool = False
    # shard weights, gradients, AdamW state and EMA over the processes (torch FSDP2, fully_shard: each
    # transformer block its own unit) instead of keeping a full copy on each (DDP); for sizes whose training
    # state does not fit one GPU (python -m dpar.flops --memory). Same precision (fp32 weights, bf16 autocast),
    # same checkpoint files (full, written by rank 0). One process shards over itself (the same code, no saving).
    fsdp: bool = False
    # validation NLL every N epochs (needs data.val_store or data.val_holdout).
    val_every: int = ranged(1, min=1)
    # rewrite checkpoints/latest/ every N steps, so a killed run loses at most N steps (0: off).
    ckpt_every_steps: int = ranged(5000, min=0)
    # accelerate trackers, if installed: [tensorboard], [wandb] or both.
    trackers: list[str] = field(default_factory=list)

    def check(self, key: Key = config_key("train")) -> None:
        """The rule between fields: FSDP runs eager (its sharded blocks are not compiled here). ``UserError``."""
        if self.fsdp and self.compile:
            raise UserError(f"{key('fsdp')}=true and {key('compile')}=true: the sharded model is not compiled here; "
                            f"set {key('compile')}=false (or {key('fsdp')}=false)")


@dataclass
class TrainGlobalConfig:
    """train_global_model.py's config: DPAR (DGPT-*) or the LlamaGen token-level baseline (GPT-*)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    patcher: PatcherConfig = field(default_factory=PatcherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, key: Key = config_key()) -> None:
        """The rule between sections (each section checks its own): DPAR trains on entropy, static or token
        patches; self_entropy patching exists only while sampling. ``UserError``."""
        if is_dpar(self.model.gpt_model) and self.patcher.mode == "self_entropy":
            raise UserError(f"{key('patcher.mode')} self_entropy decides boundaries from the model's own predictions "
                            "while sampling; train with entropy (or static) patching, then sample with --self-entropy")


@dataclass
class TrainEntropyConfig:
    """train_entropy_model.py's config: an unconditional token-level GPT (GPT-B by default)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(gpt_model="GPT-B", model_type="uncond",
                                                                   class_dropout_prob=0.0))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self, key: Key = config_key()) -> None:
        """The entropy model is an unconditional token-level GPT (each section checks its own rules). ``UserError``."""
        if is_dpar(self.model.gpt_model):
            raise UserError(f"{key('model.gpt_model')} {self.model.gpt_model}: the entropy model is a token-level "
                            "GPT-* model")
        if self.model.model_type != "uncond":
            raise UserError(f"{key('model.model_type')} must be uncond, got {self.model.model_type!r}: entropies are "
                            "computed without a class")


def split_global_batch(global_batch: int, processes: int, max_device_batch: int | None) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) with processes * micro * accumulation = global batch.
    ``UserError`` when the global batch does not split evenly over the processes (both sizes are >= 1 by
    their fields' rules)."""
    assert global_batch >= 1 and (max_device_batch is None or max_device_batch >= 1), (global_batch, max_device_batch)
    if global_batch % processes:
        raise UserError(f"train.global_batch_size={global_batch} is not a positive multiple of {processes} processes")
    per_process = global_batch // processes
    limit = per_process if max_device_batch is None else max_device_batch
    accumulation = next(a for a in range(1, per_process + 1) if per_process % a == 0 and per_process // a <= limit)
    return per_process // accumulation, accumulation


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with LlamaGen's grouping: weight decay on weights with >= 2 dims, none on norms and biases.

    Fused, as LlamaGen's ``configure_optimizers`` asks wherever torch has the kernel (CUDA and, since torch
    2.4, CPU): one pass over the parameters instead of torch's default on a CPU, several passes parameter by
    parameter, which is slower (benchmarks/results/cpu-2026-12-03-training.md). A run resumed from a
    checkpoint keeps the implementation saved in its optimizer state (``param_groups[i]["fused"]``), so it
    resumes with the implementation it began with.
    """
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            exempt = p.dim() < 2 or (not cfg.decay_embeddings and id(p) in embeddings)
            (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


class EMA:
    """An fp32 exponential moving average of a model's parameters (LlamaGen's ``--ema``)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        torch._foreach_lerp_(list(self.model.parameters()), [p.float() for p in model.parameters()], 1 - self.decay)


def shard(model: nn.Module, mesh) -> nn.Module:
    """Shard ``model`` in place over the processes of ``mesh`` (torch FSDP2, ``fully_shard``): every block of every
    ``nn.ModuleList`` (the GPT's and DPAR's transformer blocks, DPAR's pooling and injection blocks) is a unit whose
    weights are gathered for its forward and backward and freed after; the rest (embeddings, norm, head) is the
    root's unit. Parameters stay fp32 (bf16 comes from autocast, as under DDP); gradients are reduce-scattered,
    so each process holds 1/P of the weights, gradients and AdamW state."""
    from torch.distributed.fsdp import fully_shard

    blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    for block in reversed(blocks):  # inner units before the units that contain them
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def device_mesh(device: torch.device, world: int):
    """(the mesh :func:`shard` splits over: all ``world`` processes, True when this made the process group). One
    process started without a group (plain ``python``; accelerate makes none for one process) gets a group of its
    own, so that ``train.fsdp`` runs the same sharded code on one GPU as on many."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    made = not dist.is_initialized()
    if made:
        assert world == 1, "accelerate initialises the group of several processes"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    return init_device_mesh(device.type, (world,)), made


def full_weights(model: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """The full state dict of ``model``: gathered from the shards onto the CPU of process 0 when ``sharded``
    (every process must call it; the others get ``{}``), else ``model.state_dict()``."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    """``optimizer.state_dict()``'s format (parameters by index) whether or not ``model`` is sharded, so that a
    checkpoint resumes under DDP or FSDP on any process count. Sharded: gathered on process 0 (every process
    must call it; the others get ``{}``)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, sharded: bool) -> None:
    """Load a :func:`full_optimizer_state` (every process holds it whole); sharded: each process keeps its part."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    names = _parameter_names(model, optimizer)
    assert len(names) == sum(len(group["params"]) for group in state["param_groups"]), "weights fit, so must this"
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters in its own order (the indices of its state dict)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def forward_loss(model: nn.Module, batch: PackedBatch, conditional: bool) -> Tensor:
    """Mean next-token cross-entropy (nats per token) of a DPAR (patched batch) or GPT model."""
    labels = batch.labels if conditional else None
    if batch.patch_start is None:
        _, loss = model(batch.tokens[:, :-1], labels, targets=batch.tokens)
    else:
        _, loss = model(batch.tokens, labels, batch.patch_start, targets=batch.tokens, layout=batch.layout)
    return loss


@torch.no_grad()
def token_nlls(model: nn.Module, dataset: Dataset, collate: PackedCollate, batch_size: int,
               conditional: bool) -> Tensor:
    """``[images, N]``: the NLL (nats) of every token of every image of ``dataset``, in order, under ``model``
    with the patches ``collate`` cuts (the per-token terms whose mean :func:`nll_totals` gives)."""
    model.eval()
    device = next(model.parameters()).device
    nlls = []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        batch = batch.to(device)
        labels = batch.labels if conditional else None
        if batch.patch_start is None:
            logits, _ = model(batch.tokens[:, :-1], labels)
        else:
            logits, _ = model(batch.tokens, labels, batch.patch_start, layout=batch.layout)
        nlls.append(F.cross_entropy(logits.flatten(0, 1).float(), batch.tokens.flatten(),
                                    reduction="none").view(batch.tokens.shape).cpu())
    return torch.cat(nlls)


@torch.no_grad()
def nll_totals(model: nn.Module, dataset: Dataset, collate: PackedCollate, batch_size: int, conditional: bool, *,
               autocast: Callable[[], ContextManager] = nullcontext, num_workers: int = 0,
               progress: bool = True, forward_passes: int | None = None,
               filler: PackedBatch | None = None) -> Tensor:
    """``[sum of token NLLs (nats), token count]`` of ``dataset`` under ``model``, with the patches that
    ``collate`` cuts: validation during training, and the study's threshold sweep (other boundaries).

    ``forward_passes`` (a sharded model, whose every forward is a collective that all processes must run as
    often): run that many, those past the data on ``filler``, uncounted."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(2, device=device)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    passes = 0
    for batch in tqdm(loader, desc="validation", unit="batch", leave=False, disable=not progress):
        batch = batch.to(device)
        with autocast():
            loss = forward_loss(model, batch, conditional)
        totals += torch.stack([loss.float() * batch.tokens.numel(), totals.new_tensor(batch.tokens.numel())])
        passes += 1
    for _ in range(passes, forward_passes or 0):
        with autocast():
            forward_loss(model, filler.to(device), conditional)
    return totals


def open_store(path: str, model: ModelConfig, key: str) -> TokenStore:
    """The token store at ``path``, checked against the model it will train."""
    store = TokenStore(path)
    grid = model.image_size // model.downsample_size
    if store.grid != grid:
        raise UserError(f"{key} {path} holds {store.grid}x{store.grid} tokens per image, the model expects "
                        f"{grid}x{grid} (model.image_size {model.image_size} / downsample_size {model.downsample_size})")
    if store.codebook_size != model.vocab_size:
        raise UserError(f"{key} {path} has a codebook of {store.codebook_size} codes, model.vocab_size is "
                        f"{model.vocab_size}")
    if model.model_type == "c2i" and store.num_classes > model.num_classes:
        raise UserError(f"{key} {path} has {store.num_classes} classes, model.num_classes is {model.num_classes}")
    return store


def check_entropy_source(config: DictConfig, store: TokenStore, key: str = "data.store") -> None:
    """The store's entropies must come from the entropy model ``patcher`` names; fills in its config path. For
    ``data.store`` (once per run) the entropy model is also loaded as sampling will load it, so that a run
    whose entropy model cannot be read is refused before it starts."""
    patcher = config.patcher
    if not patcher.entropy_model_checkpoint:
        raise UserError("patcher.mode 'entropy' needs patcher.entropy_model_checkpoint (the entropy model whose "
                        "entropies the token store holds)")
    checkpoint = Path(patcher.entropy_model_checkpoint)
    if not checkpoint.is_file():
        raise UserError(f"patcher.entropy_model_checkpoint not found: {checkpoint}")
    if patcher.entropy_model_gpt:  # a LlamaGen c2i checkpoint: no run config
        patcher.entropy_model_checkpoint_config = None
    elif not patcher.entropy_model_checkpoint_config:
        experiment = experiment_of(checkpoint)
        if experiment is None:
            raise UserError(f"patcher.entropy_model_checkpoint {checkpoint} is not inside an experiment dir; "
                            "also set patcher.entropy_model_checkpoint_config (or, for a LlamaGen c2i .pt, "
                            "patcher.entropy_model_gpt to its size)")
        patcher.entropy_model_checkpoint_config = literal(str(experiment / CONFIG_FILE))
    if patcher.entropy_model_checkpoint_config and not Path(patcher.entropy_model_checkpoint_config).is_file():
        raise UserError(f"patcher.entropy_model_checkpoint_config not found: {patcher.entropy_model_checkpoint_config}")
    if key == "data.store":  # once per run: it loads as the config describes it, as sampling will load it
        load_entropy_model(checkpoint, patcher.entropy_model_checkpoint_config,
                           llamagen_gpt=patcher.entropy_model_gpt, image_size=config.model.image_size,
                           downsample_size=config.model.downsample_size, vocab_size=config.model.vocab_size)
    store.require_entropies()
    recorded = store.meta["entropies"]["model"]
    if file_sha256(checkpoint) != recorded["sha256"]:
        raise UserError(f"{key} {store.path} holds the entropies of {recorded['checkpoint']}, not of "
                        f"patcher.entropy_model_checkpoint {checkpoint}; point the config at that model or rerun "
                        "preprocess_tokens.py --stage entropies --overwrite with this one")


class Trainer:
    """Sets up a run (data, model, optimizer; its experiment dir and resume point: :class:`dpar.experiment.Run`)
    and trains it with :meth:`fit`."""

    # what _save writes to the training state and _load reads back ("split" is optional: older checkpoints)
    STATE_KEYS = ("step", "steps_per_epoch", "images_seen", "positions_seen", "epoch_loss", "optimizer", "scheduler")

    def __init__(self, config: DictConfig, *, patcher: PatcherConfig | None, run_name: str, prod: bool,
                 resume: str | None):
        model_config: ModelConfig = OmegaConf.to_object(config.model)
        data: DataConfig = OmegaConf.to_object(config.data)
        cfg: TrainConfig = OmegaConf.to_object(config.train)
        self.cfg, self.model_config = cfg, model_config
        self.conditional = model_config.model_type == "c2i"
        _check_trackers(cfg.trackers)
        # trackers log under <experiment>/logs, set once the experiment dir is known
        self.accelerator = acc = make_accelerator(mixed_precision=cfg.mixed_precision, log_with=cfg.trackers or None,
                                                  project_dir=cfg.results_dir)
        self.world, self.rank, self.device = acc.num_processes, acc.process_index, acc.device
        self.micro_batch, self.accumulation = split_global_batch(cfg.global_batch_size, self.world,
                                                                 cfg.max_device_batch_size)
        self.run = Run(acc, cfg, run_name, prod=prod, resume=resume)

        store = open_store(data.store, model_config, "data.store")
        if config.data.tokenizer_checkpoint is None:
            config.data.tokenizer_checkpoint = literal(store.meta["tokenizer"]["checkpoint"])
        entropies = patcher is not None and patcher.mode == "entropy"
        if entropies:
            check_entropy_source(config, store)
        self.collate = PackedCollate(patcher, store.grid)
        self.train_set, self.val_set = _datasets(store, data, model_config, entropies, cfg.global_seed)
        self.split_seed = data.split_seed
        if entropies and self.val_set is not None and self.val_set.store is not store:
            check_entropy_source(config, self.val_set.store, "data.val_store")
        self.steps_per_epoch = len(self.train_set) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"data.store {data.store} has {len(self.train_set)} training images, fewer than "
                            f"train.global_batch_size={cfg.global_batch_size}")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.num_workers = data.num_workers

        torch.manual_seed(cfg.global_seed)
        model = create_model(model_config)
        _check_backend(model_config.attn_backend, self.device, cfg.mixed_precision)
        resumable = RESUMABLE_KEYS | {f"model.{name}" for name in unused_keys(model_config)}  # vs its weights' record
        self.run.find().start(config, resumable, self.total_steps, state_keys=self.STATE_KEYS)
        if not cfg.fsdp:  # sharded, each process moves only its shards to the device (shard below)
            model = model.to(self.device)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema else None
        # full weights are loaded before sharding (each process keeps its part), the optimizer state after
        state = self.run.load(model, None if self.ema is None else self.ema.model) if self.run.resume_from else None
        self.sharded, self.own_group = cfg.fsdp, False
        if self.sharded:
            mesh, self.own_group = device_mesh(self.device, self.world)
            shard(model, mesh)
            if self.ema is not None:
                shard(self.ema.model, mesh)  # the same split as the model's, so the update is local
        optimizer = build_optimizer(model, cfg)
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0)
        self.step, self.images_seen, self.positions_seen, self.epoch_loss = 0, 0, 0, [0.0, 0]
        if state is not None:
            self._load(state, model, optimizer)
        self.run.truncate_metrics(self.step)  # a killed run may have logged past its checkpoint (or before one)
        self.raw_model, self.raw_optimizer = model, optimizer
        if cfg.compile:
            model = torch.compile(model, dynamic=is_dpar(model_config.gpt_model))
        if self.sharded:  # already distributed: accelerate's DDP wrapper would replicate it again
            self.model, self.optimizer = model, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(model, optimizer)
        if cfg.trackers:
            acc.project_configuration.logging_dir = str(self.run.dir / "logs")
            flat = flatten(OmegaConf.to_container(config, resolve=True))
            acc.init_trackers(run_name, config={k: v if isinstance(v, (bool, int, float, str)) else str(v)
                                                for k, v in flat.items()})
        self._reset_interval()

    # -- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> Path:
        """Train until ``train.epochs`` (or ``train.max_steps``); returns the experiment dir."""
        cfg, acc = self.cfg, self.accelerator
        params = sum(p.numel() for p in self.raw_model.parameters())
        held_out = (f"{len(self.val_set):,} held out for validation (stratified, split seed {self.split_seed}), "
                    if self.val_set is not None and self.val_set.store is self.train_set.store else "")
        acc.print(f"{self.model_config.gpt_model}: {params:,} parameters; {len(self.train_set):,} training images, {held_out}"
                  f"{self.steps_per_epoch} steps per epoch; global batch {cfg.global_batch_size} = {self.world} "
                  f"process(es) x micro-batch {self.micro_batch} x {self.accumulation} accumulation step(s)"
                  f"{', sharded (FSDP)' if self.sharded else ''}; "
                  f"writing to {self.run.dir}")
        while self.step < self.total_steps:
            epoch, first_step = divmod(self.step, self.steps_per_epoch)
            self._train_epoch(epoch, first_step)
            if self.step % self.steps_per_epoch:  # stopped by train.max_steps inside an epoch
                self._save(epoch, end_of_epoch=False)
                break
            self._end_epoch(epoch)
        acc.end_training()
        if self.own_group and torch.distributed.is_initialized():  # (end_training may have ended it)
            torch.distributed.destroy_process_group()
        acc.print(f"done: {self.run.dir}")
        return self.run.dir

    def _train_epoch(self, epoch: int, first_step: int) -> None:
        cfg = self.cfg
        self.train_set.set_epoch(epoch)
        sampler = StepBatches(len(self.train_set), global_batch=cfg.global_batch_size, micro_batch=self.micro_batch,
                              accumulation=self.accumulation, rank=self.rank, seed=cfg.global_seed, epoch=epoch,
                              first_step=first_step)
        micro_batches = iter(DataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collate,
                                        num_workers=self.num_workers))
        last_step = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
        if first_step == 0:
            self.epoch_loss = [0.0, 0]
        self._reset_interval()  # throughput counts training steps, not the validation and saving before them
        with tqdm(total=last_step, initial=first_step, desc=f"epoch {epoch}", unit="step",
                  disable=not self.accelerator.is_local_main_process) as bar:
            for step_in_epoch in range(first_step, last_step):
                self._train_step([next(micro_batches) for _ in range(self.accumulation)])
                bar.update()
                if self.step % cfg.log_every == 0:
                    self._log(epoch, bar)
                if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0 and step_in_epoch + 1 < last_step:
                    self._save(epoch, end_of_epoch=False)

    def _train_step(self, micro_batches: list[PackedBatch]) -> None:
        acc = self.accelerator
        torch.manual_seed(self.cfg.global_seed * 1_000_003 + self.step * 1009 + self.rank)
        self.model.train()
        for k, batch in enumerate(micro_batches):
            self.interval_positions += batch.positions
            batch = batch.to(self.device)
            # DDP all-reduces the last micro-batch's gradients only; FSDP reduce-scatters each micro-batch's into
            # the shards (no full-size gradient is ever held)
            with nullcontext() if k == len(micro_batches) - 1 or self.sharded else acc.no_sync(self.model):
                with acc.autocast():
                    loss = forward_loss(self.model, batch, self.conditional)
                acc.backward(loss / len(micro_batches))
            self.interval_loss += loss.detach().float()
        self.interval_grad_norm += acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm).float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.raw_model)
        self.step += 1
        self.interval_steps += 1

    def _end_epoch(self, epoch: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        self._log(epoch, None)
        last = self.step >= self.total_steps
        summary = {"epoch_summary": True, "epoch": epoch, "step": self.step,
                   "train_loss": self.epoch_loss[0] / max(self.epoch_loss[1], 1),
                   "tokens_per_patch": self._tokens_per_patch(), "images_seen": self.images_seen}
        if self.val_set is not None and ((epoch + 1) % cfg.val_every == 0 or last):
            summary["val_nll"] = self.validation_nll()
        if acc.is_main_process:
            summary["forward_linear_gmacs_per_sample"] = self._forward_gmacs()
            self.run.log(summary)
            acc.log({k: v for k, v in summary.items() if k != "epoch_summary"}, step=self.step)
            val = f", val NLL {summary['val_nll']:.4f}" if "val_nll" in summary else ""
            acc.print(f"epoch {epoch}: train loss {summary['train_loss']:.4f}{val}, "
                      f"{summary['tokens_per_patch']:.2f} tokens/patch, "
                      f"{summary['forward_linear_gmacs_per_sample']:.3f} forward linear GMACs/sample")
        if (epoch + 1) % cfg.ckpt_every == 0 or last:
            self._save(epoch, end_of_epoch=True)

    # -- metrics ----------------------------------------------------------------------------------------------

    def _reset_interval(self) -> None:
        self.interval_loss = torch.zeros((), device=self.device)
        self.interval_grad_norm = torch.zeros((), device=self.device)
        self.interval_positions, self.interval_steps, self.interval_start = 0, 0, time.perf_counter()

    def _log(self, epoch: int, bar: tqdm | None) -> None:
        """Reduce the steps since the last log over processes; stop on a non-finite loss."""
        if self.interval_steps == 0:
            return
        acc, steps = self.accelerator, self.interval_steps
        totals = acc.reduce(torch.stack([self.interval_loss, self.interval_grad_norm,
                                         torch.tensor(float(self.interval_positions), device=self.device)]), "sum")
        loss = float(totals[0]) / (steps * self.accumulation * self.world)
        grad_norm = float(totals[1]) / (steps * self.world)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # NaN gradients poison the weights a step later
            raise UserError(f"training loss is {loss} (gradient norm {grad_norm}) at step {self.step}; stopped, the "
                            f"last good checkpoint in {self.run.dir / 'checkpoints'} is intact")
        seconds = time.perf_counter() - self.interval_start
        images = steps * self.cfg.global_batch_size
        tokens, positions = images * self.train_set.store.num_tokens, int(totals[2])
        self.images_seen += images
        self.positions_seen += positions
        self.epoch_loss = [self.epoch_loss[0] + loss * steps, self.epoch_loss[1] + steps]
        record = {"step": self.step, "epoch": epoch, "loss": loss, "grad_norm": grad_norm,
                  "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tokens / seconds,
                  "patches_per_s": positions / seconds, "tokens_per_patch": tokens / positions,
                  "images_per_s": images / seconds}
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            patch_s=f"{record['patches_per_s']:,.0f}", tok_patch=f"{record['tokens_per_patch']:.2f}")
        if acc.is_main_process:
            self.run.log(record)
            acc.log(record, step=self.step)
        self._reset_interval()

    def _tokens_per_patch(self) -> float:
        return self.images_seen * self.train_set.store.num_tokens / max(self.positions_seen, 1)

    def _forward_gmacs(self) -> float:
        """Mean forward linear GMACs per sample over the run so far (paper section 4.3), from dpar.flops."""
        m = self.model_config
        return count(m.gpt_model, m.image_size, self._tokens_per_patch(), m.downsample_size, m.vocab_size,
                     m.num_classes, **architecture(m))["linear_gmacs"]

    def validation_nll(self) -> float:
        """Mean NLL per token (nats) of the validation images, over all processes."""
        shard = torch.utils.data.Subset(self.val_set, range(self.rank, len(self.val_set), self.world))
        passes, filler = None, None
        if self.sharded:  # every process runs as many forwards: the longest share's batches
            passes = math.ceil(math.ceil(len(self.val_set) / self.world) / self.micro_batch)
            filler = self.collate([self.val_set[0]])
        totals = nll_totals(self.raw_model, shard, self.collate, self.micro_batch, self.conditional,
                            autocast=self.accelerator.autocast, num_workers=self.num_workers,
                            progress=self.accelerator.is_local_main_process, forward_passes=passes, filler=filler)
        totals = self.accelerator.reduce(totals, "sum")
        return float(totals[0] / totals[1])

    # -- checkpoints ------------------------------------------------------------------------------------------

    def _save(self, epoch: int, end_of_epoch: bool) -> None:
        acc = self.accelerator
        self._log(epoch, None)  # also the non-finite check: never save a diverged model
        acc.wait_for_everyone()
        # full files whether sharded or not (sharded: every process takes part in gathering them onto process 0)
        weights = full_weights(self.raw_model, self.sharded)
        ema = None if self.ema is None else full_weights(self.ema.model, self.sharded)
        optimizer = full_optimizer_state(self.raw_model, self.raw_optimizer, self.sharded)
        if acc.is_main_process:
            state = {"step": self.step, "steps_per_epoch": self.steps_per_epoch, "images_seen": self.images_seen,
                     "positions_seen": self.positions_seen, "epoch_loss": self.epoch_loss, "optimizer": optimizer,
                     "scheduler": self.scheduler.state_dict(), "split": self._split()}
            self.run.save(epoch, weights, state, ema_state=ema, step=self.step, end_of_epoch=end_of_epoch)
        acc.wait_for_everyone()

    def _load(self, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Continue from the training ``state`` that :meth:`Run.load` returned with the weights."""
        checkpoint = self.run.resume_from
        if state["steps_per_epoch"] != self.steps_per_epoch:
            raise UserError(f"{checkpoint} was trained with {state['steps_per_epoch']} steps per epoch, this run has "
                            f"{self.steps_per_epoch}: the training images or train.global_batch_size changed")
        load_optimizer_state(model, optimizer, state["optimizer"], self.sharded)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.images_seen, self.positions_seen = state["step"], state["images_seen"], state["positions_seen"]
        self.epoch_loss = state["epoch_loss"]
        self.accelerator.print(f"resuming {self.run.dir} from {checkpoint.name} at step {self.step}")
        self._warn_if_masks_change(state.get("split"))  # checkpoints written before the split was saved: silent

    def _split(self) -> dict[str, int | bool]:
        """How a step is computed beyond its images: processes, micro-batch, compiled or not."""
        return {"processes": self.world, "micro_batch": self.micro_batch, "compile": self.cfg.compile}

    def _warn_if_masks_change(self, saved: dict | None) -> None:
        """One warning line when this resume splits steps or compiles otherwise than the checkpoint's run, while
        dropout is on: the random masks, so the results, then differ from an uninterrupted run's."""
        dropouts = random_draws(self.model_config)
        if saved is None or saved == self._split() or not dropouts or not self.accelerator.is_main_process:
            return

        def described(split: dict) -> str:
            return (f"{split['processes']} process(es) x micro-batch {split['micro_batch']}"
                    f"{', compiled' if split['compile'] else ''}")

        print(f"warning: {self.run.dir} trained as {described(saved)} and resumes as {described(self._split())}; "
              f"with {', '.join(f'{key} {value}' for key, value in dropouts.items())} the random masks differ "
              "from here on, so the run will not equal an uninterrupted one (with every dropout 0 it would)",
              file=sys.stderr)


def random_draws(model: ModelConfig) -> dict[str, float]:
    """The dropouts of ``model`` that draw random masks in training (``model.<key>``: rate); empty when none
    does, and only then does the batch split leave results unchanged (see the module's doc)."""
    keys = ["dropout_p", "token_dropout_p", "drop_path_rate"] + (["class_dropout_prob"] if model.model_type == "c2i"
                                                                 else [])  # uncond: no class to drop
    return {f"model.{key}": getattr(model, key) for key in keys if getattr(model, key) > 0}


def train(config: DictConfig, *, patcher: PatcherConfig | None, run_name: str, prod: bool,
          resume: str | None) -> Path:
    """Build a :class:`Trainer` for ``config`` and run it; returns the experiment dir."""
    return Trainer(config, patcher=patcher, run_name=run_name, prod=prod, resume=resume).fit()


def _datasets(store: TokenStore, data: DataConfig, model: ModelConfig, entropies: bool,
              seed: int) -> tuple[TokenDataset, TokenDataset | None]:
    if data.val_store is not None:  # then data.val_holdout is 0 (DataConfig.check)
        val_store = open_store(data.val_store, model, "data.val_store")
        if entropies and not val_store.has_entropies:
            raise UserError(f"data.val_store {data.val_store} has no entropies for DPAR's validation; run "
                            "preprocess_tokens.py --stage entropies on it with the training store's entropy model")
        return TokenDataset(store, entropies, seed), TokenDataset(val_store, entropies, view=0)
    problem = holdout_problem(store.labels, data.val_holdout)
    if problem is not None:
        raise UserError(f"data.val_holdout={data.val_holdout} for data.store {store.path}: {problem}")
    train_images, held_out = holdout_split(store.labels, data.val_holdout, data.split_seed)
    val = TokenDataset(store, entropies, images=held_out, view=0) if data.val_holdout else None
    return TokenDataset(store, entropies, seed, images=train_images), val


def _check_backend(backend: str, device: torch.device, mixed_precision: str) -> None:
    """A packed attention backend named in the config must run training on this device (else it would fail at
    the first step, after the run folder is written)."""
    if backend == "auto":
        return
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    usable = available_backends(device, dtype, grad=True)
    if backend not in usable:
        raise UserError(f"model.attn_backend {backend!r} cannot train on {device.type} with {dtype} (no backward "
                        f"there); available: auto, {', '.join(usable)}")


def _check_trackers(trackers: list[str]) -> None:
    for name in trackers:
        if name not in TRACKERS:
            raise UserError(f"train.trackers: unknown tracker {name!r}; valid: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UserError(f"train.trackers asks for {name}, which is not installed (pip install {name})")
