"""docs/plugins.md cannot drift from the code it documents.

Every hookspec's signature and docstring must appear in the guide verbatim
(whitespace normalised), and the worked example must be the files of
examples/unibus-hello-plugin, byte for byte. The example of "Documenting
responses" runs as a plugin of a real daemon.
"""

from __future__ import annotations

import inspect
import re
import types
from collections.abc import Callable
from pathlib import Path

import pytest
from unibus import hookspecs
from unibus.testing import http_json

REPO = Path(__file__).resolve().parents[2]
GUIDE = REPO / "docs" / "plugins.md"
EXAMPLE = REPO / "examples" / "unibus-hello-plugin"


def _specs() -> list[tuple[str, Callable[..., object]]]:
    return [(name, fn) for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "unibus_spec")]


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _signature(name: str, fn: Callable[..., object]) -> str:
    # hookspecs uses `from __future__ import annotations`: annotations are the source text.
    sig = inspect.signature(fn)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"def {name}({params}) -> {sig.return_annotation}"


def test_the_hooks_of_the_spec_are_declared() -> None:
    assert {name for name, _ in _specs()} == {
        "cli_options", "configure_nats", "posture", "healthz_fields", "startup", "shutdown",
        "store_changed", "reloaded", "validate_settings", "client_commands",
    }


@pytest.mark.parametrize(("name", "fn"), _specs(), ids=[name for name, _ in _specs()])
def test_hookspec_docstring_and_signature_are_in_the_guide(name: str, fn: Callable[..., object]) -> None:
    guide = GUIDE.read_text()
    doc = inspect.getdoc(fn)
    assert doc, f"hookspec {name} has no docstring"
    assert re.search(rf"^### `{name}`$", guide, re.MULTILINE), f"docs/plugins.md has no '### `{name}`' section"
    assert _normalize(doc) in _normalize(guide), f"the docstring of {name} is not reproduced verbatim in docs/plugins.md"
    assert _signature(name, fn) in guide, f"docs/plugins.md does not show the signature {_signature(name, fn)}"


@pytest.mark.parametrize("path", ["pyproject.toml", "unibus_hello_plugin/__init__.py", "tests/test_hello.py"])
def test_worked_example_matches_the_example_plugin(path: str) -> None:
    source = (EXAMPLE / path).read_text().rstrip("\n")
    assert f"\n{source}\n```" in GUIDE.read_text(), f"docs/plugins.md does not show examples/unibus-hello-plugin/{path} verbatim"


AUDIT = REPO / "examples" / "unibus-audit-plugin"


def _tutorial_blocks() -> list[str]:
    guide = GUIDE.read_text()
    tutorial = guide[guide.index("# Tutorial: the audit plugin"):guide.index("\n# Reference\n")]
    return re.findall(r"```(?:python|toml)\n(.*?)```", tutorial, re.DOTALL)


def test_the_tutorial_has_code():
    assert len(_tutorial_blocks()) >= 10


@pytest.mark.parametrize("block", _tutorial_blocks(), ids=lambda b: b.strip().splitlines()[0][:40])
def test_every_tutorial_block_is_in_the_audit_example(block: str) -> None:
    sources = "\n".join(p.read_text() for p in (AUDIT / "unibus_audit_plugin" / "__init__.py",
                                                  AUDIT / "tests" / "test_audit.py", AUDIT / "pyproject.toml"))
    assert block.rstrip("\n") in sources, "docs/plugins.md shows code that examples/unibus-audit-plugin does not have"


def test_the_tutorial_shows_every_line_of_the_audit_module() -> None:
    """A reader of the tutorial alone can write the whole plugin (docs/plugins.md, "Tutorial")."""
    shown = {line.rstrip() for block in _tutorial_blocks() for line in block.splitlines()}
    module = (AUDIT / "unibus_audit_plugin" / "__init__.py").read_text()
    code = module.split('"""', 2)[2]  # after the module docstring
    missing = [line for line in code.splitlines()
               if line.strip() and not line.lstrip().startswith("# ---") and line.rstrip() not in shown]
    assert not missing, f"docs/plugins.md's tutorial does not show these lines of the example: {missing}"


def _first_python_block(section: str) -> str:
    guide = GUIDE.read_text()
    found = re.search(r"```python\n(.*?)```", guide[guide.index(f"\n### {section}\n"):], re.DOTALL)
    assert found, f"docs/plugins.md has no python block under '### {section}'"
    return found.group(1)


def test_the_documenting_responses_example_serves_its_route_under_the_plugin_s_prefix(unibus_app) -> None:
    """It registered "/v1/hello/{handle}", which add_route served at /v1/plugins/hello/v1/hello/{handle}
    (a plugin author's walkthrough). The block runs as written; only its handler is the test's."""
    from aiohttp import web

    async def hello(request):
        return web.json_response({"greeting": f"hello {request.match_info['handle']}"})

    plugin = types.ModuleType("docs_documenting_responses")
    plugin.hello = hello
    exec(compile(_first_python_block("Documenting responses"), "docs/plugins.md", "exec"), vars(plugin))
    served = unibus_app(plugins=[plugin])
    status, doc = http_json("GET", served.base_url + "/openapi.json")
    assert status == 200
    assert [path for path in doc["paths"] if "hello" in path] == ["/v1/plugins/hello/greetings/{handle}"]
    assert doc["components"]["schemas"]["HelloGreeting"]["required"] == ["greeting"]
    assert served.admin.get("/v1/plugins/hello/greetings/admin") == (200, {"greeting": "hello admin"})
