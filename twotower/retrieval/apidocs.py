"""``GET /docs``: the API reference as one self-contained HTML page, rendered from the app's OpenAPI schema.

FastAPI's default ``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript and CSS from a CDN, so on a
machine without internet access (or behind a strict proxy) they show a blank page, and every page view tells a
third party that the service exists. This page needs nothing but the server: plain HTML with inline CSS, every
endpoint with its description, request body and responses, the JSON schemas, and a curl example. The machine-
readable schema stays at ``/openapi.json`` for any OpenAPI tool.
"""
from __future__ import annotations

import html
import json
from typing import Any

_CSS = """body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
h2{margin-top:2.5rem;border-bottom:1px solid #ccc}code,pre{font:13px ui-monospace,monospace;background:#f4f4f4}
pre{padding:.6rem;overflow-x:auto}.m{font-weight:bold;padding:.1rem .4rem;border-radius:3px;color:#fff}
.get{background:#2b7a3d}.post{background:#1f5fa8}td,th{text-align:left;padding:.2rem .8rem .2rem 0}"""


def _resolve(schema: Any, components: dict[str, Any]) -> Any:
    """``schema`` with every ``$ref`` to ``#/components/schemas/X`` replaced by X (recursively)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
            return _resolve(components.get(ref.rsplit("/", 1)[1], {}), components)
        return {k: _resolve(v, components) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_resolve(v, components) for v in schema]
    return schema


def _pre(obj: Any) -> str:
    return f"<pre>{html.escape(json.dumps(obj, indent=2, ensure_ascii=False))}</pre>"


def render_docs(openapi: dict[str, Any], base_url: str = "http://127.0.0.1:8000") -> str:
    """The HTML reference page for ``openapi`` (the dict ``FastAPI.openapi()`` returns)."""
    components = openapi.get("components", {}).get("schemas", {})
    info = openapi.get("info", {})
    title = html.escape(info.get("title", "API"))
    version = html.escape(str(openapi.get("openapi", "")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{title} API</title>",
             f"<style>{_CSS}</style></head><body><h1>{title} API</h1>",
             f"<p>{html.escape(info.get('summary') or info.get('description') or '')}</p>",
             "<p>Machine-readable schema: <a href='/openapi.json'><code>/openapi.json</code></a> "
             f"(OpenAPI {version}).</p>"]
    for path, methods in openapi.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><span class='m {method}'>{method.upper()}</span> <code>{html.escape(path)}</code></h2>")
            for text in (op.get("summary"), op.get("description")):
                if text:
                    parts.append(f"<p>{html.escape(text)}</p>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                schema = _resolve(body, components)
                parts.append("<h3>Request body (JSON)</h3>" + _pre(schema))
                example = {name: (prop.get("examples") or [prop.get("default")])[0]
                           for name, prop in schema.get("properties", {}).items()
                           if prop.get("examples") or "default" in prop}
                parts.append("<p>Example:</p><pre>" + html.escape(
                    f"curl -s -X POST {base_url}{path} -H 'content-type: application/json' \\\n"
                    f"     -d '{json.dumps(example, ensure_ascii=False)}'") + "</pre>")
            rows = "".join(f"<tr><td><code>{html.escape(code)}</code></td><td>{html.escape(r.get('description', ''))}"
                           f"</td></tr>" for code, r in op.get("responses", {}).items())
            parts.append(f"<h3>Responses</h3><table>{rows}</table>")
            ok = op.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {}).get("schema")
            if ok:
                parts.append("<details><summary>200 response schema</summary>" + _pre(_resolve(ok, components))
                             + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
