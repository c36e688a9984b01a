r"""Train DPAR (DGPT-*) or the LlamaGen token-level baseline (GPT-*) on a token store.

    accelerate launch --multi-gpu train_global_model.py \
        --config configs/patching_modes/global_model_entropy_row_break.yaml --model.gpt_model DGPT-L \
        --patcher.entropy_model_checkpoint_config <dir>/config.yaml \
        --patcher.entropy_model_checkpoint <dir>/checkpoints/epoch_00000299/model.safetensors --prod

    python train_global_model.py --config configs/baselines/gpt_l_256.yaml    # the baseline, same store

DPAR cuts patches on the fly from the store's entropies with the config's ``patcher`` section; a
GPT-* model ignores that section. Without ``--prod`` the run goes to a scratch dir; ``--resume``
continues a run (a ``--prod`` run started in the same hour continues by itself).
"""
import argparse
from dataclasses import dataclass, field
from pathlib import Path

from dpar.config import parse_cli, to_dataclass
from dpar.errors import ArgumentParser, UserError, run_main
from dpar.experiment import add_run_arguments
from dpar.models import ModelConfig, is_dpar
from dpar.patcher import PatcherConfig
from dpar.training import DataConfig, TrainConfig, train
from dpar.validation import Key, config_key


@dataclass
class TrainGlobalConfig:
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


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args, config = parse_cli(parser, TrainGlobalConfig, argv)
    patcher = to_dataclass(config.patcher) if is_dpar(config.model.gpt_model) else None
    name = config.train.experiment_name or (Path(args.config).stem if args.config else "global_model")
    train(config, patcher=patcher, run_name=name, prod=args.prod, resume=args.resume)


if __name__ == "__main__":
    run_main(main)
