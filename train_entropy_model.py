"""Train the entropy model: an unconditional LlamaGen GPT (GPT-B by default) on a token store.

    python train_entropy_model.py --config configs/entropy_model/gpt_b_256.yaml

The config is parsed and validated today; the training loop arrives with issue 5.
"""
import argparse
from dataclasses import dataclass, field

from dpar.config import parse_cli
from dpar.errors import UserError, run_main
from dpar.models import ModelConfig


@dataclass
class TrainEntropyConfig:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(gpt_model="GPT-B", model_type="uncond"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prod", action="store_true", help="write to the production experiment directory")
    parse_cli(parser, TrainEntropyConfig)
    raise UserError("train_entropy_model.py: the config is valid, but training is not implemented yet (see issue 5)")


if __name__ == "__main__":
    run_main(main)
