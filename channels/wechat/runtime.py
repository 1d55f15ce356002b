"""What the WeChat-family channels share at run time: the host, one HTTP client, background
tasks that stop with the channel, and request-signature helpers."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import httpx
from aiohttp import web
from wechatpy.enterprise.crypto import WeChatCrypto as EnterpriseCrypto
from wechatpy.enterprise.exceptions import InvalidCorpIdException
from wechatpy.exceptions import InvalidSignatureException
from wechatpy.utils import WeChatSigner

from channels.base import Channel, ChannelHost
from channels.http import ApiError
from channels.wechat.xmlsafe import read_limited, safe_xml

A = TypeVar("A")


class WechatChannelBase(Channel):
    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self._host: ChannelHost | None = None
        self._http: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def host(self) -> ChannelHost:
        if self._host is None:
            raise RuntimeError(f"the {self.name} channel is not registered")
        return self._host

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError(f"the {self.name} channel is not started")
        return self._http

    async def start(self) -> None:
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=5.0))

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task that the channel cancels when it closes."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def bind(
    handler: Callable[[A, web.Request], Awaitable[web.StreamResponse]], account: A
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler for one account."""

    async def route(request: web.Request) -> web.StreamResponse:
        return await handler(account, request)

    return route


def signed_params(
    query: Mapping[str, str], signature: str = "msg_signature"
) -> tuple[str, str, str]:
    """(signature, timestamp, nonce) of a callback, or a 403 ApiError if one is missing."""
    sig, ts, nonce = query.get(signature), query.get("timestamp"), query.get("nonce")
    if not (sig and ts and nonce):
        raise ApiError(
            403,
            "invalid_signature",
            f"{signature}, timestamp and nonce are required (the platform sends them on "
            "every callback)",
        )
    return sig, ts, nonce


def require_signature(given: str, token: str, *signed: str) -> None:
    """Check a callback's SHA-1 signature (over the token and `signed`) in constant time;
    wechatpy compares with `!=`, which tells a forger how much of a guess was right. Raises
    InvalidSignatureException like wechatpy, whose own check then only sees a match."""
    signer = WeChatSigner()
    signer.add_data(token, *signed)
    expected: str = signer.signature
    if not hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace")):
        raise InvalidSignatureException()


def verify_echo(crypto: EnterpriseCrypto, query: Mapping[str, str]) -> web.Response:
    """WeCom's URL check (app and bot alike): decrypt `echostr` and send it back."""
    sig, ts, nonce = signed_params(query)
    echo = query.get("echostr")
    if not echo:
        raise ApiError(400, "missing_parameter", "echostr is required for URL verification")
    with wecom_decrypt_errors(
        other_corp="echostr was made for another corp id",
        unreadable="cannot decrypt echostr; check the key",
    ):
        require_signature(sig, crypto.token, ts, nonce, echo)
        plain = crypto.check_signature(sig, ts, nonce, echo)
    return web.Response(text=str(plain))


@contextlib.contextmanager
def wecom_decrypt_errors(*, other_corp: str, unreadable: str) -> Iterator[None]:
    """A failed WeCom decryption as the 403/400 that names its cause (the details given)."""
    try:
        yield
    except InvalidSignatureException as e:
        raise ApiError(403, "invalid_signature", "msg_signature does not match") from e
    except InvalidCorpIdException as e:
        raise ApiError(403, "wrong_corp_id", other_corp) from e
    except Exception as e:
        raise ApiError(400, "cannot_decrypt", unreadable) from e


async def open_wecom_callback(
    request: web.Request, crypto: EnterpriseCrypto, max_body_bytes: int
) -> str:
    """The decrypted XML of a WeCom callback (app or customer service): size and XXE rules,
    the signature over the envelope checked in constant time, the corp id checked."""
    sig, ts, nonce = signed_params(request.query)
    body = await read_limited(request, max_body_bytes)
    _, envelope = safe_xml(body)
    if not isinstance(envelope.get("Encrypt"), str):
        raise ApiError(400, "invalid_message", "a WeCom callback needs an <Encrypt> element")
    with wecom_decrypt_errors(
        other_corp="the message is for another corp id",
        unreadable="cannot decrypt; check the key",
    ):
        require_signature(sig, crypto.token, ts, nonce, envelope["Encrypt"])
        return str(crypto.decrypt_message(envelope, sig, ts, nonce))
