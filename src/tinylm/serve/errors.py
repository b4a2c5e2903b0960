"""OpenAI's error body, {"error": {"message", "type", "param", "code"}}, for every failed request."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """A request the server refuses, with OpenAI's status, type, param and code."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str | None:
    """OpenAI's spelling of a field's location, "messages.[0].role", without pydantic's union tags."""
    parts = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p.isidentifier() and p not in _TYPE_TAGS:
            parts.append(p)
        else:
            break
    return ".".join(parts) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) for the first problem pydantic found."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None, "invalid_json"
    param = _param(first.get("loc", ()))
    if first.get("type") == "missing":
        return f"Missing required parameter: {param!r}.", param, "missing_required_parameter"
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict | list) else type(got).__name__
    return (
        f"Invalid value for {param!r}: {first.get('msg', 'invalid')} (got {shown}).",
        param,
        "invalid_value",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error body: bad requests 4xx, unexpected failures 500."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"Internal error: {exc}", "server_error"), status_code=500)
