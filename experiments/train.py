"""`python experiments/train.py ...` is `dni-train ...`: the runner lives in `dni.cli.train`."""

from dni.cli.train import cli

if __name__ == "__main__":
    cli()
