"""`python -m opdlab ...` and `torchrun -m opdlab ...` enter here."""

from opdlab.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
