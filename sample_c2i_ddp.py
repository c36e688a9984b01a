"""Sample 50,000 images across processes with accelerate and pack them into an ADM-format .npz for FID.

Not implemented yet: arrives with issue 6.
"""
from dpar.errors import UserError, run_main


def main() -> None:
    raise UserError("sample_c2i_ddp.py is not implemented yet (see issue 6)")


if __name__ == "__main__":
    run_main(main)
