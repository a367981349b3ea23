"""Recipes: pipelines written as YAML or JSON files (docs/recipes.md, docs/recipe.schema.json).

A recipe is a list of steps, bare or under `steps:` (or `passes:`) next to `version: 1` and an
optional `description`. `load_recipe` reads one and checks the same rules as `RECIPE_SCHEMA`;
`read_document` is the YAML/JSON file reader that recipes and sweep grids share.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slimgraph.errors import BadOptionError, first_line
from slimgraph.passes.registry import COMMAND_STEPS, PASSES, PRESETS, ensure_registered

__all__ = ["RECIPE_VERSION", "RECIPE_SCHEMA", "read_document", "load_recipe", "known_names"]

# The recipe format this version reads (`version:` at the top of a recipe file).
RECIPE_VERSION = 1


# A recipe file, as JSON Schema (draft 2020-12); `load_recipe` checks the same rules and names the
# offending step in command-line terms. docs/recipes.md describes it.
RECIPE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "slimgraph recipe",
    "oneOf": [
        {"$ref": "#/$defs/steps"},
        {
            "type": "object",
            "properties": {
                "version": {"const": RECIPE_VERSION},
                "description": {"type": "string"},
                "steps": {"$ref": "#/$defs/steps"},
                "passes": {"$ref": "#/$defs/steps"},
            },
            "oneOf": [{"required": ["steps"]}, {"required": ["passes"]}],
            "additionalProperties": False,
        },
    ],
    "$defs": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "oneOf": [
                    {"type": "string", "description": "a pass, preset or command name"},
                    {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "min_cosine": {"type": "number"},
                            "max_drop": {"type": "number"},
                        },
                        "additionalProperties": {
                            "description": "options of the pass (dashes or underscores)"
                        },
                    },
                ]
            },
        }
    },
}


def known_names() -> str:
    """Every name a step may use: passes, presets and commands (for messages)."""
    ensure_registered()
    return (
        f"passes: {', '.join(sorted(PASSES))}; presets: {', '.join(sorted(PRESETS)) or 'none'}; "
        f"commands: {', '.join(COMMAND_STEPS)}"
    )


def read_document(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a YAML or JSON file (JSON by a `.json` suffix, YAML otherwise).

    Args:
        path: the file.
        what: what the file is, for messages ("recipe", "grid").

    Returns:
        The parsed document (any YAML/JSON value; the caller checks its shape).

    Raises:
        BadOptionError: the file is missing, unreadable, or not valid YAML/JSON; the message
            starts with `{what} {path}:`.
    """
    import yaml

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadOptionError(f"{what} {file}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise BadOptionError(f"{what} {file}: cannot read ({error})") from None
    try:
        return json.loads(text) if file.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as error:
        raise BadOptionError(f"{what} {file}: not valid YAML/JSON ({first_line(error)})") from None


def load_recipe(path: str | os.PathLike[str]) -> list[str | dict[str, Any]]:
    """Read a recipe file (YAML or JSON): a list of steps, or a mapping with a `passes` list.

    Raises:
        BadOptionError: the file is missing, not YAML/JSON, or not a list of steps.
    """
    file = Path(path)
    data = read_document(file, "recipe")
    if isinstance(data, Mapping):
        allowed = ("version", "description", "steps", "passes")
        unknown = [str(k) for k in data if k not in allowed]
        if unknown:
            raise BadOptionError(
                f"recipe {file}: unknown key '{unknown[0]}' (a recipe has {', '.join(allowed)})"
            )
        version = data.get("version", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise BadOptionError(
                f"recipe {file}: version {version!r} is not supported (this slimgraph reads "
                f"version {RECIPE_VERSION})"
            )
        data = data.get("passes", data.get("steps"))
    if not isinstance(data, list) or not data:
        raise BadOptionError(
            f"recipe {file}: expected a non-empty list of steps (or 'passes: [...]'); "
            f"known {known_names()}"
        )
    for step in data:
        if not isinstance(step, (str, dict)):
            raise BadOptionError(f"recipe {file}: step {step!r} is neither a name nor a mapping")
    return data
