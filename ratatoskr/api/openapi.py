"""The OpenAPI 3.1 document served at ``GET /v1/openapi.json``.

OpenAPI 3.1 schemas are JSON Schema 2020-12, so the message schema is embedded as it is; only its
``$defs`` references are rewritten to where it now sits in the document. Security is stated as
configured: the bearer requirement appears only when ``[http] api_tokens`` is set.
"""

from __future__ import annotations

import copy
from typing import Any

from ratatoskr import __version__

_MESSAGE = "#/components/schemas/Message"


def _relocate(node: Any, base: str) -> Any:
    """Rewrite ``#/$defs/...`` references to ``<base>/$defs/...``."""
    if isinstance(node, dict):
        return {
            k: (base + v[1:] if k == "$ref" and v.startswith("#/") else _relocate(v, base))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_relocate(v, base) for v in node]
    return node


def _json(schema_ref: str, description: str) -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": schema_ref}}}
    return {"description": description, "content": content}


def _error(description: str) -> dict[str, Any]:
    return _json("#/components/schemas/Error", description)


def _body(description: str, media_type: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {}}}


def _get(summary: str, ok: dict[str, Any], more: dict[str, Any] | None = None) -> dict[str, Any]:
    """A GET route; none of them needs a token."""
    return {"get": {"summary": summary, "security": [], "responses": {"200": ok, **(more or {})}}}


_SCHEMAS: dict[str, Any] = {
    "Accepted": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string", "description": "The queue id (logs, `ratatoskr queue show`)."}
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "details": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["field", "message"],
                    "properties": {
                        "field": {"type": "string", "description": "JSON pointer into the body."},
                        "message": {"type": "string"},
                    },
                },
            },
        },
    },
    "Admission": {
        "type": "object",
        "properties": {
            "status": {"enum": ["accepting", "not accepting"]},
            "queue_writable": {"type": "boolean"},
            "draining": {"type": "boolean"},
            "time": {"type": "number"},
        },
    },
    "Readiness": {
        "type": "object",
        "properties": {
            "status": {"enum": ["ready", "not ready"]},
            "queue_writable": {"type": "boolean"},
            "providers": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": {
                        "state": {"enum": ["closed", "open", "half_open", "rate_limited"]},
                        "up": {"type": "boolean"},
                        "last_error": {"type": "string"},
                    },
                },
            },
            "time": {"type": "number"},
        },
    },
}


def _send_operation(auth_required: bool) -> dict[str, Any]:
    responses = {
        "202": _json("#/components/schemas/Accepted", "Queued durably; delivery follows."),
        "400": _error("Invalid JSON or message; `details` names each failing field."),
        "413": _error("The body or the composed message is too large."),
        "503": _error("The queue cannot take messages now; retry later."),
    }
    operation: dict[str, Any] = {
        "operationId": "sendMessage",
        "summary": "Queue one message for delivery",
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _MESSAGE}}},
        },
        "responses": responses,
    }
    if auth_required:
        responses["401"] = _error("Missing or unknown bearer token.")
        operation["security"] = [{"bearerAuth": []}]
    return operation


def _history_operation(auth_required: bool) -> dict[str, Any]:
    responses = {
        "200": _body(
            "The message's history (never its body): id, state (queued, inflight, deferred, dead,"
            " delivered), created_at, sender, recipients, attempts, provider,"
            " provider_message_id, events",
            "application/json",
        ),
        "404": _error("No such message, or past its history's retention."),
    }
    operation: dict[str, Any] = {
        "operationId": "getMessage",
        "summary": "A message's history",
        "responses": responses,
    }
    if auth_required:
        responses["401"] = _error("Missing or unknown bearer token.")
        operation["security"] = [{"bearerAuth": []}]
    return operation


_EVENTS_OPERATION: dict[str, Any] = {
    "operationId": "postEvents",
    "summary": "A provider's delivery-event webhook (docs/events.md); its signature is the authentication",
    "security": [],
    "responses": {
        "200": _body("The events are stored.", "application/json"),
        "401": _error("Unsigned or badly signed."),
        "404": _error("No provider of that name."),
        "503": _error("The queue cannot take the events now; the provider retries."),
    },
}


def document(message_schema: dict[str, Any], *, auth_required: bool) -> dict[str, Any]:
    message = _relocate(copy.deepcopy(message_schema), _MESSAGE)
    for key in ("$schema", "$id"):
        message.pop(key, None)
    paths: dict[str, Any] = {
        "/v1/messages": {"post": _send_operation(auth_required)},
        "/v1/messages/{id}": {
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "get": _history_operation(auth_required),
        },
        "/v1/events/{provider}": {
            "parameters": [
                {"name": "provider", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "post": _EVENTS_OPERATION,
        },
        "/v1/schema": _get(
            "The message JSON Schema", _body("JSON Schema 2020-12", "application/schema+json")
        ),
        "/v1/openapi.json": _get("This document", _body("OpenAPI 3.1", "application/json")),
        "/metrics": _get("Prometheus metrics", _body("Prometheus text format", "text/plain")),
        "/healthz": _get("Liveness", _body("The process runs", "application/json")),
        "/readyz": _get(
            "Readiness",
            _json("#/components/schemas/Readiness", "Queue writable and a provider takes traffic."),
            {"503": _json("#/components/schemas/Readiness", "Not ready; see each provider's state.")},
        ),
        "/readyz/accept": _get(
            "Admission: this node can queue mail (for a load balancer), whatever the providers do",
            _json("#/components/schemas/Admission", "Queue writable and not draining."),
            {"503": _json("#/components/schemas/Admission", "Cannot queue: queue not writable or draining.")},
        ),
    }
    components: dict[str, Any] = {"schemas": {"Message": message, **_SCHEMAS}}
    if auth_required:
        components["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ratatoskr",
            "version": __version__,
            "description": "Durable SMTP/HTTP mail relay in front of Mailgun and Mandrill.",
        },
        "paths": paths,
        "components": components,
    }
