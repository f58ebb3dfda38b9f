"""OpenAI-shaped errors: one exception type the handlers raise, one function that renders it.

Every error the server returns, from a route, a middleware or an exception handler, goes through
``error_response`` so clients always see ``{"error": {"message", "type", "param", "code"}}``.
Messages often quote the client (a model name, a method, a path): ``error_body`` makes them safe
to encode (a lone surrogate once crashed the rendering of its own 404) and short.
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Optional

from fastapi.responses import JSONResponse

# OpenAI's error "type" per status; anything else falls back to the HTTP phrase.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """Raised anywhere in request handling; the app turns it into an OpenAI error response."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.headers = headers


MAX_ECHO_CHARS = 200  # of one piece of client text quoted in a message


def quote(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """Client text as it may appear in a message: lone surrogates (valid in a JSON string, not in
    UTF-8) escaped as ``\\udXXX``, and cut to ``limit`` characters."""
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, status: int, param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    err_type = _TYPES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if param is not None:
        param = quote(param)
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(message: str, status: int = 400, param: Optional[str] = None,
                   code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> JSONResponse:
    return JSONResponse(error_body(message, status, param, code), status_code=status, headers=headers)


def from_exception(exc: OpenAIError) -> JSONResponse:
    return error_response(exc.message, exc.status, exc.param, exc.code, exc.headers)


def model_not_found(name: str) -> OpenAIError:
    return OpenAIError(f"The model `{quote(name)}` does not exist.", 404, param="model",
                       code="model_not_found")
