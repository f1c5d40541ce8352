"""`python experiments/report.py ...` is `dni-report ...`: the script lives in `dni.cli.report`."""

from dni.cli.report import cli

if __name__ == "__main__":
    cli()
