"""Sample a grid of images and a patch-boundary map from an experiment directory.

Not implemented yet: arrives with issue 6.
"""
from dpar.errors import UserError, run_main


def main() -> None:
    raise UserError("sample_c2i.py is not implemented yet (see issue 6)")


if __name__ == "__main__":
    run_main(main)
