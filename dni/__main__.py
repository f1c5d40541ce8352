"""`python -m dni ...` is `dni-train ...`: train one configuration (or a sweep with -m)."""

from dni.cli.train import cli

cli()
