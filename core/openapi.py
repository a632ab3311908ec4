"""The OpenAPI 3.1 document, built from the routes as they are registered.

Every route goes through :func:`unibus.app.add_route`, which records its
operation here, so ``/openapi.json`` cannot drift from the router.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .inputs import path_param_schema

PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
}


class OpenAPI:
    def __init__(self) -> None:
        self.paths: dict[str, dict[str, Any]] = {}
        self.schemas: dict[str, Any] = {"Problem": PROBLEM_SCHEMA}

    def add_operation(
        self,
        method: str,
        path: str,
        *,
        summary: str,
        responses: dict[int, str],
        signed: bool,
        request_schema: dict[str, Any] | None = None,
        request_content_type: str = "application/json",
        tags: list[str] | None = None,
        operation_id: str | None = None,
        query: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """Record one operation. ``query`` maps each query parameter the route
        reads to its JSON Schema (``{"type": "integer", "minimum": 1, ...}``);
        path parameters get theirs from :func:`unibus.inputs.path_param_schema`."""
        op: dict[str, Any] = {"summary": summary, "responses": {}}
        if operation_id:
            op["operationId"] = operation_id
        if tags:
            op["tags"] = tags
        params = [
            {"name": name, "in": "path", "required": True, "schema": path_param_schema(name)}
            for name in _path_params(path)
        ]
        params += [{"name": name, "in": "query", "required": False, "schema": schema}
                   for name, schema in (query or {}).items()]
        if params:
            op["parameters"] = params
        if signed:
            op["security"] = [{"httpSignature": []}]
        if request_schema is not None:
            op["requestBody"] = {"required": True, "content": {request_content_type: {"schema": request_schema}}}
        for status, description in sorted(responses.items()):
            resp: dict[str, Any] = {"description": description}
            if status >= 400:
                resp["content"] = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
            op["responses"][str(status)] = resp
        self.paths.setdefault(path, {})[method.lower()] = op

    def signed(self, method: str, path: str) -> bool | None:
        """Whether the operation ``method path`` (``path`` as registered, e.g.
        ``/v1/rooms/{room_id}``) was registered signed; None if it never was."""
        op = self.paths.get(path, {}).get(method.lower())
        return None if op is None else "security" in op

    def document(self) -> dict[str, Any]:
        return {
            "openapi": "3.1.0",
            "info": {"title": "unibus membershipd", "version": __version__},
            "paths": self.paths,
            "components": {
                "schemas": self.schemas,
                "securitySchemes": {
                    "httpSignature": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "Signature",
                        "description": "RFC 9421 HTTP Message Signature (Ed25519) with Signature-Input; see docs/http-api.md",
                    }
                },
            },
        }


def _path_params(path: str) -> list[str]:
    out = []
    for part in path.split("/"):
        if part.startswith("{") and part.endswith("}"):
            out.append(part[1:-1].split(":", 1)[0])
    return out
