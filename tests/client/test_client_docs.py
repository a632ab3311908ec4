"""docs/client.md's SDK section against the SDK itself: every method it lists exists with the
parameters it names, in that order, of that kind (positional, or keyword-only after ``*``) and
with those defaults. A walk-through of the docs by a developer found ``request`` documented
with positional ``json_body`` and ``query``, which the SDK takes only as keywords."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
from unibus.client import UnibusClient

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"
SECTION = DOC.read_text().split("## 6. The SDK", 1)[1]

#: ``| `name(args)` |`` rows, ``- **`await name(args)`` items and ``### `UnibusClient(args)` ``
#: (the errors' table names classes and their bases: not methods).
DOCUMENTED = re.compile(r"^(?:\| `|- \*\*`(?:await )?|### (?:The bus: )?`(?:client\.)?)"
                        r"(?P<name>UnibusClient|[a-z_]+)\((?P<args>[^)]*)\)", re.MULTILINE)


def documented() -> list[tuple[str, str]]:
    return [(m["name"], m["args"]) for m in DOCUMENTED.finditer(SECTION)]


def test_the_section_lists_what_it_should():
    names = [name for name, _ in documented()]
    assert {"UnibusClient", "request", "my_key", "room_key", "current_key", "rekey", "bus"} <= set(names), names
    assert len(names) == len(set(names)), names


@pytest.mark.parametrize(("name", "args"), documented())
def test_a_documented_method_takes_what_the_docs_say(name, args):
    target = UnibusClient.__init__ if name == "UnibusClient" else getattr(UnibusClient, name)
    actual = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    keyword_only = False
    at = 0
    for part in (a.strip() for a in args.split(",") if a.strip()):
        if part == "*":
            keyword_only = True
            continue
        pname, _, default = part.partition("=")
        assert at < len(actual), f"{name}: the docs name {pname}, which it does not take"
        param = actual[at]
        at += 1
        assert param.name == pname, f"{name}: the docs name {pname} where it takes {param.name}"
        kind = inspect.Parameter.KEYWORD_ONLY if keyword_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert param.kind == kind, f"{name}: {pname} is {param.kind.description}, the docs say {kind.description}"
        if default:
            assert param.default == ast.literal_eval(default), f"{name}: {pname}'s default"
        else:
            assert param.default is inspect.Parameter.empty, f"{name}: {pname} has a default the docs omit"
    for param in actual[at:]:  # what the docs leave out must be optional
        assert param.default is not inspect.Parameter.empty, f"{name}: {param.name} is required, the docs omit it"
