r"""Train DPAR (DGPT-*) or the LlamaGen baseline (GPT-*) on a token store.

    accelerate launch --multi-gpu train_global_model.py \
        --config configs/patching_modes/global_model_entropy_row_break.yaml --model.gpt_model DGPT-L \
        --patcher.entropy_model_checkpoint_config <dir>/config.yaml \
        --patcher.entropy_model_checkpoint <dir>/checkpoints/epoch_00000299/model.safetensors --prod

The config is parsed and validated today; the training loop arrives with issue 5.
"""
import argparse
from dataclasses import dataclass, field

from dpar.config import parse_cli
from dpar.errors import UserError, run_main
from dpar.models import ModelConfig
from dpar.patcher import PatcherConfig


@dataclass
class TrainGlobalConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    patcher: PatcherConfig = field(default_factory=PatcherConfig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prod", action="store_true", help="write to the production experiment directory")
    parse_cli(parser, TrainGlobalConfig)
    raise UserError("train_global_model.py: the config is valid, but training is not implemented yet (see issue 5)")


if __name__ == "__main__":
    run_main(main)
