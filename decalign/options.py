"""The one parser of `key=value` options, as specs write them: `bon:n=8`, `hf:MODEL:label=1`, `-p n=8`.

Every spec parses the same way and a bad item gets the same one-line error, naming it.
"""

from __future__ import annotations

from typing import Collection, Iterable

from .errors import DecalignError


def split_spec(text: str, sep: str = ":") -> tuple[str, list[str]]:
    """'bon:n=8:temperature=0.7' -> ('bon', ['n=8', 'temperature=0.7']).

    The head runs up to the first item holding '=', so it may itself hold `sep` (a path such as
    'C:\\models\\rm' in 'hf:C:\\models\\rm:label=1'); every item after it is returned, '=' or not.
    """
    parts = text.split(sep)
    cut = next((i for i, part in enumerate(parts) if "=" in part), len(parts))
    return sep.join(parts[:cut]), parts[cut:]


def parse_options(items: Iterable[str], *, what: str, example: str, allowed: Collection[str] | None = None,
                  strip: bool = False) -> dict[str, str]:
    """['n=8', 'temperature=0.7'] -> {'n': '8', 'temperature': '0.7'}; a later key overrides an earlier one.

    what: who the options are for, the start of every error ('length reward', '--param').
    example: a well-formed spec, shown when an item is not key=value.
    allowed: the known keys; another key is an error listing them (None: any key, checked by the caller).
    strip: strip blanks around keys and values (for command-line text, where `n = 8` means n=8).
    """
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if strip:
            key, value = key.strip(), value.strip()
        if not sep or not key:
            raise DecalignError(f"{what}: bad option {item!r}: write key=value, e.g. {example}")
        if allowed is not None and key not in allowed:
            raise DecalignError(f"{what}: bad option {item!r}: no option {key!r}; options: "
                                f"{', '.join(sorted(allowed))}")
        options[key] = value
    return options
