"""`python -m sftune ...` is the same as the `sftune` console script."""

from sftune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
