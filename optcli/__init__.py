"""optcli: a command-line model optimizer (int8, pruning, distillation, export) with honest reports.

The Python API (optcli.api) is exposed here lazily, so `import optcli` stays as light as `optcli --help`:

    from optcli import run, sweep, validate
"""

__version__ = "0.1.0"

__all__ = ["run", "sweep", "validate", "__version__"]


def __getattr__(name: str):
    # PEP 562: the API (and torch behind it) is imported on first use, not on `import optcli`.
    if name in ("run", "sweep", "validate", "Report", "SweepReport"):
        from optcli import api

        return getattr(api, name)
    raise AttributeError(f"module 'optcli' has no attribute {name!r}")
