"""FID, sFID, Inception Score, precision and recall on ADM-format .npz batches, in PyTorch.

    python -m evaluations.c2i.evaluator REF.npz SAMPLE.npz

Not implemented yet: arrives with issue 7.
"""
from dpar.errors import UserError, run_main


def main() -> None:
    raise UserError("evaluations.c2i.evaluator is not implemented yet (see issue 7)")


if __name__ == "__main__":
    run_main(main)
