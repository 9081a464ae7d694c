"""`optcli passes`: every pass with its options (core: optcli.verbs.catalog)."""

from __future__ import annotations

from optcli.cli.guard import print_json
from optcli.cli.options import JsonOut


def passes(json_out: JsonOut = False):
    """Every pass with its options, types and defaults."""
    from optcli.report.terminal import render_pass_catalog, show
    from optcli.verbs.catalog import pass_catalog

    catalog = pass_catalog()
    print_json(catalog) if json_out else show(render_pass_catalog(catalog))
