"""`optcli validate`: every mistake in a recipe found before any pass runs."""

from __future__ import annotations

from optcli.cli.guard import err, guarded, print_json
from optcli.cli.options import Debug, JsonOut, RecipeArg, Sets, Target, TrustPickle, target_set


def validate(
    recipe: RecipeArg,
    set_: Sets = [],  # noqa: B006 (never mutated: Typer reads it as the default)
    json_out: JsonOut = False,
    trust_pickle: TrustPickle = False,
    debug: Debug = False,
    target: Target = None,
):
    """Check a recipe (keys, types, files, pass order, model and data files) without running any pass."""

    def body():
        from optcli.recipe import load_recipe
        from optcli.runner import preflight

        rec = load_recipe(recipe, overrides=[*set_, *target_set(target)])
        preflight(rec, trust_pickle)
        resolved = rec.model_dump(mode="json")
        if json_out:
            print_json({"valid": True, "recipe": resolved})
        else:
            steps = " -> ".join(["original", *[f"{i + 1}-{p.type}" for i, p in enumerate(rec.passes)]])
            err(f"{recipe}: valid ({steps})")

    guarded(body, debug)
