"""``python -m pdd_batch``: the same CLI as the ``pdd-batch`` command."""

from pdd_batch.cli.app import main

if __name__ == "__main__":
    main()
