r"""Train the entropy model: an unconditional LlamaGen GPT (GPT-B by default) on a token store.

    accelerate launch --multi-gpu train_entropy_model.py --config configs/entropy_model/gpt_b_256.yaml --prod

Its next-token entropies (``preprocess_tokens.py --stage entropies``) decide DPAR's patch boundaries.
Reports validation NLL per token when the config names validation images. Same experiment-dir
layout, ``--prod`` and ``--resume`` as train_global_model.py.
"""
from dpar.errors import run_main
from dpar.experiment import RESUME_HINT, parse_trainer_cli
from dpar.training import TrainEntropyConfig, train


def main(argv: list[str] | None = None) -> None:
    args, config, name = parse_trainer_cli(TrainEntropyConfig, __doc__, argv, "entropy_model")
    train(config, patcher=None, run_name=name, prod=args.prod, resume=args.resume)


if __name__ == "__main__":
    run_main(main, interrupted=RESUME_HINT)
