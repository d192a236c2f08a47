"""Errors in OpenAI's JSON shape (`{"error": {message, type, param, code}}`) with the right status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EngineError, IncompatibleError, LorastackError, NotFoundError


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_lorastack(e: LorastackError, param: str | None = None) -> ApiError:
    """Map a user error from the core to an HTTP status."""
    if isinstance(e, NotFoundError):
        return ApiError(404, str(e), param=param, code="model_not_found" if param == "model" else "not_found")
    if isinstance(e, IncompatibleError):
        return ApiError(400, str(e), param=param, code="incompatible_adapter")
    return ApiError(400, str(e), param=param)


def request_error(e: BaseException) -> ApiError:
    """The HTTP error for a generation that failed in the engine: the engine's own faults
    are 500s that say what failed (the server keeps serving), user errors keep their 4xx."""
    if isinstance(e, EngineError):
        return ApiError(500, str(e), type="server_error", code="engine_error")
    if isinstance(e, LorastackError):
        return from_lorastack(e)
    return ApiError(500, f"internal error: {type(e).__name__}", type="server_error")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error") or "malformed"
            where = f" ({why} at character {loc[0]})" if loc else f" ({why})"
            return JSONResponse(body(f"request body is not valid JSON{where}", "invalid_request_error"), status_code=400)
        if param is None and first.get("type") == "missing":  # no body at all
            return JSONResponse(body("a JSON request body is required", "invalid_request_error", "body", "missing"), status_code=400)
        msg = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if len(errors) > 1:
            msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return JSONResponse(body(msg, "invalid_request_error", param, "invalid_value"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "authentication_error" if e.status_code == 401 else "invalid_request_error"
        return JSONResponse(body(str(e.detail), kind), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(LorastackError)
    async def _core(_: Request, e: LorastackError) -> JSONResponse:
        api = from_lorastack(e)
        return JSONResponse(body(api.message, api.type, api.param, api.code), status_code=api.status)
