"""optcli: a command-line model optimizer (int8, pruning, distillation, export) with honest reports."""

__version__ = "0.1.0"
