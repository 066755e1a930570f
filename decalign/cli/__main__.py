"""`python -m decalign.cli ...`: the same as the `decalign` command."""

from . import main

if __name__ == "__main__":
    main()
