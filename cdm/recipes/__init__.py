"""Recipes: named settings of ``cdm distill`` and ``cdm compare``, shipped as TOML
files beside this module (``cdm recipes`` lists them).

A recipe, like a user's own ``--config FILE.toml``, maps options, spelled as on
the command line without their dashes (``latent-components = 64``, a list as an
array or a comma-separated string, a flag as ``true``), to values; two more
keys describe it: ``about`` (what it is for) and ``applies-to`` (which data).
The command line overrides a file, and a ``--config`` overrides a ``--recipe``.

Without ``--recipe``, a run on a data set that has a recipe of its own name
(``text.toml`` for ``--data text``) starts from that recipe, any other from
``default`` (:func:`for_data`): data-dependent defaults are recipes, one file each.
"""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, published for Python 3.10 (a dependency there)
    import tomli as tomllib

DIRECTORY = Path(__file__).parent
#: keys of a recipe file that describe it rather than set an option
DESCRIPTION_KEYS = ("about", "applies-to")


def names() -> list[str]:
    """The shipped recipes' names, sorted."""
    return sorted(path.stem for path in DIRECTORY.glob("*.toml"))


def for_data(data) -> str:
    """The recipe a run on ``data`` starts from without ``--recipe``: the one named ``data``
    where one ships (its ``applies-to`` is that data), else ``default``."""
    return data if isinstance(data, str) and data in names() else "default"


def read_recipe(name: str) -> dict:
    """The shipped recipe ``name`` (a ``ValueError`` naming ``--recipe`` and the known names if there is none)."""
    if name not in names():
        raise ValueError(f"--recipe: no recipe named {name!r}; the shipped recipes are {', '.join(names())} "
                         "(`cdm recipes` lists them)")
    return read_file(DIRECTORY / f"{name}.toml", "--recipe")


def read_file(path, flag: str = "--config") -> dict:
    """The TOML table in ``path``; a missing file or bad TOML is a ``ValueError`` naming ``flag`` and the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag}: {path} is not a UTF-8 text file") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{flag}: {path} is not valid TOML: {error}") from None


def options_of(table: dict) -> dict:
    """The option settings of a recipe's table (its keys other than the description)."""
    return {key: value for key, value in table.items() if key not in DESCRIPTION_KEYS}


def summary(name: str) -> str:
    """One line for ``cdm recipes``: the recipe's name, what it is for and which data it applies to."""
    table = read_recipe(name)
    return f"{name:20} {table.get('about', '')} [data: {table.get('applies-to', 'any')}]"
