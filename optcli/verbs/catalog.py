"""`optcli passes`: each pass with its options, types and defaults, read from the typed configs."""

from __future__ import annotations


def _type_of(prop: dict, defs: dict) -> str:
    if "$ref" in prop:
        return prop["$ref"].rsplit("/", 1)[-1]
    if "enum" in prop:
        return " | ".join(map(str, prop["enum"]))
    if "const" in prop:
        return str(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_type_of(p, defs) for p in prop["anyOf"])
    if prop.get("type") == "array":
        return f"list[{_type_of(prop.get('items', {}), defs)}]"
    return prop.get("type", "any")


def _options(schema: dict, defs: dict, prefix: str = "") -> list[dict]:
    out = []
    for name, prop in schema.get("properties", {}).items():
        if name == "type" and not prefix:
            continue
        ref = prop.get("$ref")
        if ref and ref.rsplit("/", 1)[-1] in defs:
            out.extend(_options(defs[ref.rsplit("/", 1)[-1]], defs, prefix=f"{prefix}{name}."))
            continue
        out.append(
            {
                "name": prefix + name,
                "type": _type_of(prop, defs),
                "default": prop.get("default"),
                "help": prop.get("description", ""),
            }
        )
    return out


def pass_catalog() -> list[dict]:
    from optcli.passes import all_passes

    catalog = []
    for spec in all_passes():
        schema = spec.config.model_json_schema()
        catalog.append(
            {
                "type": spec.type,
                "summary": spec.summary,
                "consumes": sorted(spec.consumes),
                "produces": spec.produces or "same as input",
                "options": _options(schema, schema.get("$defs", {})),
            }
        )
    return catalog
