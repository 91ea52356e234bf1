"""`python -m wsol_bench ...` is the `wsol-bench` command."""

from wsol_bench.cli.bench import main

if __name__ == "__main__":
    main()
