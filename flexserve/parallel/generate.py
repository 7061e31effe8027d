"""`torchrun --nproc-per-node N -m flexserve.parallel.generate ...`: the torchrun command of parallel generation,
kept at this name for the launch lines in docs/PARALLEL.md. The command itself (its flags and what it prints) is
`flexserve.cli.parallel`; the import sits under the `__main__` guard, so importing this module loads nothing.
"""
if __name__ == "__main__":
    import sys

    from flexserve.cli.parallel import main

    sys.exit(main())
