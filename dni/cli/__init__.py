"""The command line: `dni-train` (the one Hydra entry point), `dni-report` (a sweep's tables
and figures), their Hydra callbacks and sweep bookkeeping. The only part of `dni` that imports
Hydra; `import dni` does not import it, so the library stays usable without Hydra."""
