"""`optcli schema`: the recipe's JSON Schema, for editors."""

from __future__ import annotations

from optcli.cli.guard import print_json


def schema():
    """JSON Schema of recipes, for editor completion (yaml-language-server)."""
    from optcli.recipe import recipe_model

    print_json(recipe_model().model_json_schema())
