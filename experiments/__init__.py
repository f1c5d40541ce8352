"""Hydra entry point and the scripts that turn runs into tables and figures."""
