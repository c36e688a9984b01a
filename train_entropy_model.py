r"""Train the entropy model: an unconditional LlamaGen GPT (GPT-B by default) on a token store.

    accelerate launch --multi-gpu train_entropy_model.py --config configs/entropy_model/gpt_b_256.yaml --prod

Its next-token entropies (``preprocess_tokens.py --stage entropies``) decide DPAR's patch boundaries.
Reports validation NLL per token when the config names validation images. Same experiment-dir
layout, ``--prod`` and ``--resume`` as train_global_model.py.
"""
import argparse
from dataclasses import dataclass, field
from pathlib import Path

from dpar.config import parse_cli
from dpar.errors import ArgumentParser, UserError, run_main
from dpar.experiment import add_run_arguments
from dpar.models import ModelConfig, is_dpar
from dpar.training import DataConfig, TrainConfig, train
from dpar.validation import Key, config_key


@dataclass
class TrainEntropyConfig:
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


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args, config = parse_cli(parser, TrainEntropyConfig, argv)
    name = config.train.experiment_name or (Path(args.config).stem if args.config else "entropy_model")
    train(config, patcher=None, run_name=name, prod=args.prod, resume=args.resume)


if __name__ == "__main__":
    run_main(main)
