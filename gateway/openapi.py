"""The OpenAPI 3.0.3 description of the gateway's own endpoints, served at ``/openapi.json``.

The description is the contract the schemathesis run (``tests/test_schemathesis.py``) holds
the running gateway to: every status a caller can get is documented with its body and
headers. The callresult route is the vendor's: a query that breaks a vendor rule is answered
with HTTP 200 and the vendor's code, so its 200 body is the vendor's shape whether the query
succeeded or not. The gateway's own errors are the iSales shape with a ``GW`` code.
"""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from gateway import __version__
from gateway.vendor import (
    CALLRESULT_ROUTE,
    LOCALE_HEADER,
    LOCALES,
    MAX_INT,
    MAX_PAGE_SIZE,
    MAX_SESSION_ID,
    MAX_SPAN_DAYS,
    MAX_VDN_ID,
    MIN_VDN_ID,
    PARAMETER_ERROR,
    RESULT_CODES,
    SUCCESS,
    WRONG_TYPE,
    WRONG_VALUE,
)

JSON: Final = "application/json"
_VDN_ID: Final = {"type": "integer", "minimum": MIN_VDN_ID, "maximum": MAX_VDN_ID}
_CAMPAIGN_ID: Final = {"type": "integer", "minimum": 1, "maximum": MAX_INT}
_SCHEMAS: Final = "#/components/schemas/"
_RESPONSES: Final = "#/components/responses/"


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"{kind}{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {JSON: {"schema": schema}}


def _path_parameters() -> list[dict[str, Any]]:
    return [
        {
            "name": "vdnId",
            "in": "path",
            "required": True,
            "description": f"The VDN, {MIN_VDN_ID}-{MAX_VDN_ID}. Anything else is answered 200 "
            f"with {WRONG_TYPE} (not a number) or {WRONG_VALUE} (out of range), like the vendor.",
            "schema": _VDN_ID,
        },
        {
            "name": "campaignId",
            "in": "path",
            "required": True,
            "description": f"The campaign, 1-{MAX_INT}; otherwise 200 with "
            f"{WRONG_TYPE}/{WRONG_VALUE}.",
            "schema": _CAMPAIGN_ID,
        },
    ]


def _request_id_header() -> dict[str, Any]:
    return {
        "description": "The caller's X-Request-ID if it is 1-128 of A-Za-z0-9._:-, else a new one.",
        "required": True,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
    }


def _error(description: str, *extra_headers: str) -> dict[str, Any]:
    headers: dict[str, Any] = {"X-Request-ID": _ref("#/components/headers/", "X-Request-ID")}
    for name in extra_headers:
        headers[name] = _ref("#/components/headers/", name)
    return {
        "description": description,
        "headers": headers,
        "content": _json_body(_ref(_SCHEMAS, "GatewayError")),
    }


def _components() -> dict[str, Any]:
    text = {"type": "string"}
    return {
        "securitySchemes": {
            "callerKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "A caller's API key: `Authorization: Bearer <api key>`. Required "
                "when caller authentication is on; a key may be limited to some vdnIds.",
            },
            "adminKey": {
                "type": "http",
                "scheme": "bearer",
                "description": "The admin key: `Authorization: Bearer <admin key>`.",
            },
        },
        "headers": {
            "X-Request-ID": _request_id_header(),
            "Retry-After": {
                "description": "Seconds to wait before retrying (an honest estimate).",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
            "WWW-Authenticate": {
                "description": "The bearer challenge.",
                "required": True,
                "schema": text,
            },
        },
        "schemas": {
            "CallResultQuery": {
                "type": "object",
                "description": "The vendor's request body; every field is optional and `null` "
                "means absent. The vendor's document is silent on unknown fields: they are "
                "forwarded (validation.undocumented = forward) or answered 200 with "
                f"{PARAMETER_ERROR} (reject).",
                "additionalProperties": False,
                "properties": {
                    "sessionId": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_SESSION_ID,
                        "nullable": True,
                    },
                    "customField": {"type": "string", "minLength": 1, "nullable": True},
                    "pageSize": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_PAGE_SIZE[0],
                        "nullable": True,
                        "description": f"1-{MAX_PAGE_SIZE[0]}; "
                        f"1-{MAX_PAGE_SIZE[1]} when showDetail is 1.",
                    },
                    "pageNum": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": MAX_INT,
                        "nullable": True,
                    },
                    "showDetail": {"type": "integer", "enum": [0, 1, None], "nullable": True},
                    "beginTime": {
                        "type": "string",
                        "format": "date",
                        "nullable": True,
                        "description": "YYYY-MM-DD, with endTime, earlier, at most "
                        f"{MAX_SPAN_DAYS} days apart.",
                    },
                    "endTime": {"type": "string", "format": "date", "nullable": True},
                },
            },
            "CallResult": {
                "type": "object",
                "description": "One row of the vendor's data (its Table 5).",
                "properties": {
                    "campaignId": text,
                    "sessionId": text,
                    "called": text,
                    "callTimeStr": text,
                    "callStatus": {"type": "integer"},
                    "failCode": text,
                    "resultCode": text,
                    "vdnId": {"type": "integer"},
                    "callId": text,
                    "recordPath": {"type": "string", "nullable": True},
                },
            },
            "VendorResponse": {
                "type": "object",
                "description": "The upstream's body, byte for byte, or a parameter error "
                f"answered locally the same way: resultCode {SUCCESS} is success, any other "
                f"vendor code ({', '.join(RESULT_CODES[1:])}) a failure.",
                "required": ["resultCode", "resultDesc"],
                "properties": {
                    "resultCode": {"type": "string", "pattern": "^[0-9]{7,8}$"},
                    "resultDesc": text,
                    "returnCode": {"type": "string", "pattern": "^[0-9]{7,8}$"},
                    "returnDesc": text,
                    "totalCount": {"type": "integer", "minimum": 0},
                    "data": {"type": "array", "items": _ref(_SCHEMAS, "CallResult")},
                },
            },
            "GatewayError": {
                "type": "object",
                "description": "An error the gateway raised itself: the iSales shape with a "
                "GW code (see the README), never a trace or a secret.",
                "required": ["resultCode", "resultDesc", "returnCode", "returnDesc"],
                "additionalProperties": False,
                "properties": {
                    "resultCode": {"type": "string", "pattern": "^GW[0-9]{5}$"},
                    "resultDesc": text,
                    "returnCode": {"type": "string", "pattern": "^GW[0-9]{5}$"},
                    "returnDesc": text,
                },
            },
            "ParameterError": {
                "type": "object",
                "description": "A path parameter broke a vendor rule "
                f"({WRONG_TYPE}/{WRONG_VALUE}).",
                "required": ["resultCode", "resultDesc", "returnCode", "returnDesc"],
                "additionalProperties": False,
                "properties": {
                    "resultCode": {"type": "string", "pattern": "^[0-9]{7,8}$"},
                    "resultDesc": text,
                    "returnCode": {"type": "string", "pattern": "^[0-9]{7,8}$"},
                    "returnDesc": text,
                },
            },
            "Purged": {
                "type": "object",
                "required": ["vdnId", "campaignId", "purged"],
                "additionalProperties": False,
                "properties": {
                    "vdnId": _VDN_ID,
                    "campaignId": _CAMPAIGN_ID,
                    "purged": {"type": "integer", "minimum": 0},
                },
            },
            "Readiness": {
                "type": "object",
                "required": ["status", "mode", "degraded"],
                "properties": {
                    "status": {"type": "string", "enum": ["ready", "starting"]},
                    "mode": {"type": "string", "enum": ["embedded", "redis"]},
                    "degraded": {"type": "array", "items": text},
                },
            },
        },
        "responses": {
            "NotFound": _error("GW40400: no such route (e.g. an empty path segment)."),
            "Unauthenticated": _error("GW40100: no or unknown API key.", "WWW-Authenticate"),
            "Forbidden": _error("GW40300: the key may not do this."),
        },
    }


def _callresult() -> dict[str, Any]:
    request_headers = [
        {
            "name": "X-Request-ID",
            "in": "header",
            "required": False,
            "description": "Echoed if it is 1-128 of A-Za-z0-9._:-, else replaced.",
            "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"},
        },
        {
            "name": LOCALE_HEADER,
            "in": "header",
            "required": False,
            "description": "Forwarded to the upstream and part of the cache key; other values "
            "are ignored.",
            "schema": {"type": "string", "enum": sorted(LOCALES)},
        },
        {
            "name": "Cache-Control",
            "in": "header",
            "required": False,
            "description": "`no-cache` forces a fresh upstream call (still under the limit).",
            "schema": {"type": "string", "enum": ["no-cache"]},
        },
    ]
    answered = {
        "X-Request-ID": _ref("#/components/headers/", "X-Request-ID"),
        "X-Cache": {
            "description": "HIT, MISS, COALESCED, BYPASS or STALE; absent on a parameter "
            "error answered locally.",
            "schema": {
                "type": "string",
                "enum": ["HIT", "MISS", "COALESCED", "BYPASS", "STALE"],
            },
        },
        "Age": {
            "description": "Seconds since the upstream produced this answer.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "Warning": {
            "description": 'On STALE only: 110 isales-gateway "Response is stale: <why>".',
            "schema": {"type": "string"},
        },
    }
    return {
        "post": {
            "operationId": "queryCallResults",
            "summary": "The vendor's 'query outbound call results', drop-in.",
            "description": "Same body, same response bytes, same business codes as the "
            "vendor; the gateway signs the upstream call, caches and coalesces identical "
            "queries and never exceeds the upstream's limit.",
            "security": [{}, {"callerKey": []}],
            "parameters": _path_parameters() + request_headers,
            "requestBody": {
                "required": False,
                "description": "An empty body is an empty query. Content-Type must be "
                "application/json (else 415); at most server.max_body_bytes (else 413).",
                "content": _json_body(_ref(_SCHEMAS, "CallResultQuery")),
            },
            "responses": {
                "200": {
                    "description": f"The vendor's answer ({SUCCESS} success, or a vendor code), "
                    "or a parameter error answered locally with the vendor's code.",
                    "headers": answered,
                    "content": _json_body(_ref(_SCHEMAS, "VendorResponse")),
                },
                "401": _ref(_RESPONSES, "Unauthenticated"),
                "403": _ref(_RESPONSES, "Forbidden"),
                "404": _ref(_RESPONSES, "NotFound"),
                "413": _error("GW41300: the body is larger than server.max_body_bytes."),
                "415": _error("GW41500: Content-Type is not application/json."),
                "417": _error("GW41700: an Expect header other than 100-continue."),
                "429": _error(
                    "The vendor's 429 passed on (GW42900), or the fleet pausing after one "
                    "(GW42901), where no stale copy exists. Other vendor 4xx (400, 404...) pass "
                    "through unchanged.",
                    "Retry-After",
                ),
                "502": _error(
                    "GW50200 upstream unreachable, GW50201 upstream broken, GW50202 upstream "
                    "refused the gateway's AK/SK."
                ),
                "503": _error(
                    "GW50300 queue full (or shutting down), GW50301 waited too long for an "
                    "upstream slot, GW50302 the upstream keeps failing (breaker open).",
                    "Retry-After",
                ),
                "504": _error("GW50400: the upstream did not answer in time."),
            },
        }
    }


def _purge() -> dict[str, Any]:
    return {
        "delete": {
            "operationId": "purgeCampaign",
            "summary": "Admin: drop every cached answer of one campaign.",
            "security": [{"adminKey": []}],
            "parameters": _path_parameters(),
            "responses": {
                "200": {
                    "description": "Purged, with the number of entries dropped; or, for a "
                    "path parameter that breaks a vendor rule, the vendor's code.",
                    "headers": {"X-Request-ID": _ref("#/components/headers/", "X-Request-ID")},
                    "content": _json_body(
                        {"oneOf": [_ref(_SCHEMAS, "Purged"), _ref(_SCHEMAS, "ParameterError")]}
                    ),
                },
                "401": _ref(_RESPONSES, "Unauthenticated"),
                "403": _ref(_RESPONSES, "Forbidden"),
                "404": _ref(_RESPONSES, "NotFound"),
            },
        }
    }


def _admin_get(operation_id: str, summary: str) -> dict[str, Any]:
    """An admin-key GET answering a JSON object (its fields are described in the README)."""
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "security": [{"adminKey": []}],
            "responses": {
                "200": _ok("The document.", _json_body({"type": "object"})),
                "401": _ref(_RESPONSES, "Unauthenticated"),
                "403": _ref(_RESPONSES, "Forbidden"),
            },
        }
    }


def _simple_get(operation_id: str, summary: str, ok: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": ok}}


def _ok(description: str, content: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-ID": _ref("#/components/headers/", "X-Request-ID")},
        "content": content,
    }


def openapi_spec(version: str) -> dict[str, Any]:
    """The OpenAPI 3.0.3 document of the gateway's endpoints; ``version`` is the gateway's."""
    readiness = _json_body(_ref(_SCHEMAS, "Readiness"))
    alive = {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "isales-gateway",
            "version": version,
            "description": "The one door to the CC-iSales 'query outbound call results' "
            "interface: a drop-in route plus health, readiness, metrics and admin endpoints. "
            "Gateway errors carry GW codes; parameter errors the vendor's codes (HTTP 200).",
        },
        "paths": {
            CALLRESULT_ROUTE: _callresult(),
            "/admin/cache/campaigns/{vdnId}/{campaignId}": _purge(),
            "/admin/config": _admin_get(
                "adminConfig", "Admin: the effective settings, secrets redacted."
            ),
            "/admin/stats": _admin_get(
                "adminStats", "Admin: cache entries, the queue by caller, limiter and breaker."
            ),
            "/healthz": _simple_get(
                "healthz",
                "Alive: the process answers.",
                {"200": _ok("Alive.", _json_body(alive))},
            ),
            "/readyz": _simple_get(
                "readyz",
                "Ready to serve, and what is degraded.",
                {
                    "200": _ok("Ready (possibly degraded).", readiness),
                    "503": _ok("Still starting.", readiness),
                },
            ),
            "/metrics": _simple_get(
                "metrics",
                "Prometheus metrics.",
                {"200": _ok("The Prometheus text format.", {"text/plain": {"schema": {}}})},
            ),
            "/openapi.json": _simple_get(
                "openapi",
                "This document.",
                {"200": _ok("The OpenAPI document.", _json_body({"type": "object"}))},
            ),
        },
        "components": _components(),
    }


async def openapi_handler(request: web.Request) -> web.Response:
    """Serve the document; built per request because it is small and requested rarely."""
    body = json.dumps(openapi_spec(__version__), separators=(",", ":")).encode()
    return web.Response(body=body, content_type=JSON)


def add_openapi_route(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi_handler, name="openapi")
