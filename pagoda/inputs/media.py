"""Image URLs -> PIL images, safely: `data:` base64 URLs, http(s) URLs and local files.

- http(s): fetched with a deadline (--media-fetch-timeout) and a byte limit (--max-image-bytes);
  only hosts in --allowed-media-domains when it is set. The host is resolved here and the
  address checked before connecting (private, loopback, link-local, multicast and reserved
  addresses are refused unless the host is listed in --allowed-media-domains), and the
  connection goes to that very address (TLS still verifies the host name), so a DNS answer
  cannot change between the check and the connection. Redirects are followed by hand, each
  hop checked the same way; a redirect to another scheme is refused.
- file:// URLs only below --allowed-local-media-path (symlinks resolved first).
- decoding: the header's size is checked against --max-image-pixels before any pixel is
  decoded; bytes that are not an image, or a truncated one, are refused.

Every refusal is a `MediaError` (a ValueError with an HTTP status: 413 for too many bytes,
400 otherwise) whose message names the URL (data URLs shortened).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import socket
from typing import Optional
from urllib.parse import unquote, urljoin, urlsplit

MAX_REDIRECTS = 3
_CHUNK = 64 << 10


class MediaError(ValueError):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def short(url: str) -> str:
    return url if len(url) <= 80 else url[:60] + "..." + url[-12:]


def _blocked(ip: ipaddress._BaseAddress) -> Optional[str]:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "private", "multicast", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None


class MediaConnector:
    def __init__(self, allowed_local_media_path: Optional[str] = None,
                 allowed_media_domains: Optional[list[str]] = None, timeout: float = 5.0,
                 max_bytes: int = 20 << 20, max_pixels: Optional[int] = None):
        self.local_root = os.path.realpath(allowed_local_media_path) if allowed_local_media_path else None
        self.domains = {d.lower().rstrip(".") for d in allowed_media_domains} if allowed_media_domains else None
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    @classmethod
    def from_args(cls, args) -> "MediaConnector":
        return cls(args.allowed_local_media_path, args.allowed_media_domains, args.media_fetch_timeout,
                   args.max_image_bytes, args.max_image_pixels)

    # -- sources --------------------------------------------------------------------------
    def _too_big(self, url: str, n: int) -> MediaError:
        return MediaError(f"{short(url)}: the image is {n} bytes or more, over --max-image-bytes "
                          f"{self.max_bytes}", 413)

    def data_url(self, url: str) -> bytes:
        head, sep, payload = url.partition(",")
        if not sep:
            raise MediaError(f"{short(url)}: a data URL needs a comma before its data")
        if not head.lower().endswith(";base64"):
            raise MediaError(f"{short(url)}: only base64 data URLs (data:image/png;base64,...) are "
                             "supported")
        if len(payload) * 3 // 4 > self.max_bytes + 3:
            raise self._too_big(url, len(payload) * 3 // 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{short(url)}: the data is not valid base64") from None
        if len(data) > self.max_bytes:
            raise self._too_big(url, len(data))
        return data

    def local_file(self, url: str) -> bytes:
        if self.local_root is None:
            raise MediaError(f"{short(url)}: local files are not allowed (the server was started "
                             "without --allowed-local-media-path)")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise MediaError(f"{short(url)}: file URLs name local files only (file:///path)")
        path = os.path.realpath(unquote(parts.path))
        if os.path.commonpath([path, self.local_root]) != self.local_root:
            raise MediaError(f"{short(url)}: the file is outside --allowed-local-media-path")
        try:
            size = os.path.getsize(path)
            if size > self.max_bytes:
                raise self._too_big(url, size)
            with open(path, "rb") as f:
                return f.read(self.max_bytes + 1)
        except OSError as e:
            raise MediaError(f"{short(url)}: cannot read the file ({e.strerror or e})") from None

    def _check_host(self, url: str, host: Optional[str]) -> None:
        if not host:
            raise MediaError(f"{short(url)}: the URL has no host")
        if self.domains is not None and host.lower().rstrip(".") not in self.domains:
            raise MediaError(f"{short(url)}: host {host!r} is not in --allowed-media-domains")

    def _pick_address(self, url: str, host: str, infos) -> str:
        """The address to connect to: the resolver's first, if it may be reached."""
        if not infos:
            raise MediaError(f"{short(url)}: host {host!r} does not resolve")
        addr = infos[0][4][0]
        bad = _blocked(ipaddress.ip_address(addr.split("%")[0]))
        listed = self.domains is not None and host.lower().rstrip(".") in self.domains
        if bad and not listed:
            raise MediaError(f"{short(url)}: host {host!r} resolves to a {bad} address ({addr}); "
                             "such hosts must be listed in --allowed-media-domains")
        return addr

    async def _resolve(self, url: str, host: str, port: int) -> str:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise MediaError(f"{short(url)}: host {host!r} does not resolve ({e.strerror})") from None
        return self._pick_address(url, host, infos)

    async def http(self, url: str) -> bytes:
        import httpx
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, trust_env=False) as client:
            for _ in range(MAX_REDIRECTS + 1):
                parts = urlsplit(url)
                if parts.scheme not in ("http", "https"):
                    raise MediaError(f"{short(url)}: redirected to an unsupported scheme "
                                     f"{parts.scheme!r}")
                self._check_host(url, parts.hostname)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                addr = await self._resolve(url, parts.hostname, port)
                netloc = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
                target = parts._replace(netloc=netloc).geturl()
                headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
                try:
                    async with client.stream("GET", target, headers=headers,
                                             extensions={"sni_hostname": parts.hostname}) as r:
                        if r.is_redirect:
                            url = urljoin(url, r.headers.get("location", ""))
                            continue
                        if r.status_code != 200:
                            raise MediaError(f"{short(url)}: the server answered HTTP {r.status_code}")
                        n = int(r.headers.get("content-length") or 0)
                        if n > self.max_bytes:
                            raise self._too_big(url, n)
                        chunks, size = [], 0
                        async for chunk in r.aiter_bytes(_CHUNK):
                            size += len(chunk)
                            if size > self.max_bytes:
                                raise self._too_big(url, size)
                            chunks.append(chunk)
                        return b"".join(chunks)
                except httpx.TimeoutException:
                    raise MediaError(f"{short(url)}: fetching the image timed out after "
                                     f"{self.timeout:g} s") from None
                except httpx.HTTPError as e:
                    raise MediaError(f"{short(url)}: cannot fetch the image ({type(e).__name__}: "
                                     f"{e})") from None
        raise MediaError(f"{short(url)}: more than {MAX_REDIRECTS} redirects")

    async def fetch(self, url: str) -> bytes:
        """The encoded bytes an image URL names."""
        scheme = urlsplit(url).scheme.lower() if ":" in url else ""
        if scheme == "data":
            return self.data_url(url)
        if scheme in ("http", "https"):
            try:
                return await asyncio.wait_for(self.http(url), self.timeout + 1)
            except asyncio.TimeoutError:
                raise MediaError(f"{short(url)}: fetching the image timed out after "
                                 f"{self.timeout:g} s") from None
        if scheme == "file":
            return self.local_file(url)
        raise MediaError(f"{short(url)}: unsupported URL scheme {scheme or '(none)'!r}; use data:, "
                         "http(s): or file:")

    def fetch_sync(self, url: str) -> bytes:
        """fetch() for synchronous callers (the offline LLM.chat), in a thread of its own
        when the caller already runs an event loop (a notebook)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.fetch(url))
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.fetch(url)).result()

    # -- decoding -------------------------------------------------------------------------
    def decode(self, data: bytes, url: str = "image"):
        """A PIL image (RGB) from encoded bytes."""
        from PIL import Image, UnidentifiedImageError
        try:
            im = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError):
            raise MediaError(f"{short(url)}: the data is not an image PIL can read") from None
        w, h = im.size
        if self.max_pixels is not None and w * h > self.max_pixels:
            raise MediaError(f"{short(url)}: the image is {w}x{h} = {w * h} pixels, over "
                             f"--max-image-pixels {self.max_pixels}")
        try:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise MediaError(f"{short(url)}: the image cannot be decoded ({e})") from None
