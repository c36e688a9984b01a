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
from dpar.config import to_dataclass
from dpar.errors import run_main
from dpar.experiment import RESUME_HINT, parse_trainer_cli
from dpar.models import is_dpar
from dpar.training import TrainGlobalConfig, train


def main(argv: list[str] | None = None) -> None:
    args, config, name = parse_trainer_cli(TrainGlobalConfig, __doc__, argv, "global_model")
    patcher = to_dataclass(config.patcher) if is_dpar(config.model.gpt_model) else None
    train(config, patcher=patcher, run_name=name, prod=args.prod, resume=args.resume)


if __name__ == "__main__":
    run_main(main, interrupted=RESUME_HINT)
