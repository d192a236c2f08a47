"""`/docs` that renders offline: Swagger UI from assets installed with the package.

FastAPI's default `/docs` page loads Swagger UI's JavaScript and CSS from a CDN, so on a
machine without internet access it stays blank. Here the same page points at the copy of
Swagger UI (5.x, which reads FastAPI's OpenAPI 3.1) shipped by the `swagger-ui-py` package,
served by this app. ReDoc has no such package and is not served.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response

ASSETS = "/docs/assets"
_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}


def assets_dir() -> Path:
    import swagger_ui  # swagger-ui-py: a dependency of lorastack

    return Path(swagger_ui.__file__).parent / "static"


def install_docs(app: FastAPI, dependencies: list[Any]) -> None:
    """/openapi.json and /docs behind `dependencies` (the API key, when one is set); the
    static Swagger UI files stay open, as on any CDN."""
    root = assets_dir()

    @app.get("/openapi.json", dependencies=dependencies, include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=dependencies, include_in_schema=False)
    async def docs_page() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} API",
                                   swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
                                   # no badge that sends the schema to swagger.io's online validator
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get(ASSETS + "/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in _FILES:  # a fixed list: no path from the client reaches the file system
            return JSONResponse({"error": {"message": f"no docs asset {name!r}", "type": "invalid_request_error",
                                           "param": None, "code": "not_found"}}, status_code=404)
        return FileResponse(root / name, media_type=_FILES[name], headers={"Cache-Control": "public, max-age=86400"})
