"""The chat page at / and /chat: a few static files shipped inside the package.

No build step and no CDN, so it works offline. The page holds no data, so it is served without the
API key (like /health); every API call it makes sends the key the user typed. Its URLs are all
relative, so it works behind --root-path whether the proxy strips the prefix or forwards it.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).parent / "static"
PAGE_PATHS = ("/", "/chat")
ASSETS = {"/static/chat.css": ("chat.css", "text/css; charset=utf-8"),
          "/static/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
          "/static/chat.js": ("chat.js", "text/javascript; charset=utf-8")}
# Paths the API-key middleware lets through: exactly the files above, nothing under them.
FRONTEND_PATHS = frozenset(PAGE_PATHS) | frozenset(ASSETS)

# Defence in depth under the renderer's escaping: no inline script, no foreign origins, no framing.
_HEADERS = {
    "Cache-Control": "no-cache",  # revalidate: a new pagoda version must not run an old page
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
}


def _file(name: str, media_type: str):
    path = STATIC_DIR / name

    async def serve() -> FileResponse:
        return FileResponse(path, media_type=media_type, headers=_HEADERS)
    return serve


class PrefixSlashRedirect:
    """GET/HEAD of the --root-path itself ("/llm", no slash) -> 307 to "/llm/", so the page's
    relative URLs keep the prefix. Slash redirects are otherwise off (no Location built from the
    Host header); this one's Location is the configured prefix, a relative URL."""

    def __init__(self, app, root_path: str):
        self.app, self.root_path = app, root_path.rstrip("/")

    async def __call__(self, scope, receive, send):
        if (scope["type"] == "http" and self.root_path and scope["path"] == self.root_path
                and scope["method"] in ("GET", "HEAD")):
            from starlette.responses import RedirectResponse
            await RedirectResponse(self.root_path + "/", status_code=307)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def add_frontend_routes(app: FastAPI) -> None:
    """GET (and HEAD) routes for the page and its assets, kept out of the OpenAPI schema."""
    page = _file("chat.html", "text/html; charset=utf-8")
    for path in PAGE_PATHS:
        app.add_api_route(path, page, methods=["GET", "HEAD"], include_in_schema=False)
    for path, (name, media_type) in ASSETS.items():
        app.add_api_route(path, _file(name, media_type), methods=["GET", "HEAD"],
                          include_in_schema=False)
