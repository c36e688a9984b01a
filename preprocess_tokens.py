"""Turn an ImageNet-layout image folder into VQ token shards (--stage tokens), then add per-token entropies (--stage entropies).

Not implemented yet: arrives with issue 4.
"""
from dpar.errors import UserError, run_main


def main() -> None:
    raise UserError("preprocess_tokens.py is not implemented yet (see issue 4)")


if __name__ == "__main__":
    run_main(main)
