"""The Hydra configs of `dni-train`, shipped as package data. A package (this file) so that
Hydra finds them as `pkg://dni.conf` when `dni.cli.train` is imported as a module."""
