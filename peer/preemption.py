"""Spot-interruption notices: poll the cloud's metadata endpoint and start a drain in time.

- AWS (`aws:URL`, normally http://169.254.169.254/latest/meta-data/spot/instance-action): 404
  until an interruption is scheduled, then 200 with JSON {"action": ..., "time": ...}; about two
  minutes remain. Polled every 5 s.
- GCP (`gcp:URL`, normally http://metadata.google.internal/computeMetadata/v1/instance/preempted
  with header `Metadata-Flavor: Google`): the body is "TRUE" once preempted; about 30 s remain.
  Polled every 2 s (a hanging `?wait_for_change=true` would tie up the loop's HTTP client for
  little gain at this rate).

Endpoints are configurable (`--spot-url aws:http://...`) so tests point them at a fake server.
An unreachable endpoint is not a notice: it is logged once and polling goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp

log = logging.getLogger("shoal.spot")

AWS_DEFAULT = "http://169.254.169.254/latest/meta-data/spot/instance-action"
GCP_DEFAULT = "http://metadata.google.internal/computeMetadata/v1/instance/preempted"


def parse_endpoint(text: str) -> tuple[str, str]:
    kind, _, url = text.partition(":")
    if kind not in ("aws", "gcp") or not url.startswith(("http://", "https://")):
        raise ValueError(f"--spot-url {text!r}: write aws:URL or gcp:URL (e.g. aws:{AWS_DEFAULT})")
    return kind, url


async def _imds_token(session: aiohttp.ClientSession, url: str) -> str | None:
    """An IMDSv2 session token (instances that require IMDSv2 refuse plain GETs); None where
    the endpoint does not issue tokens (IMDSv1, or a test's fake)."""
    base = url.split("/latest/", 1)[0]
    try:
        async with session.put(f"{base}/latest/api/token",
                               headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"},
                               timeout=aiohttp.ClientTimeout(total=2)) as r:
            return (await r.text()).strip() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


async def check_once(session: aiohttp.ClientSession, kind: str, url: str) -> str | None:
    """The notice's text if the endpoint reports an interruption, else None."""
    headers = {"Metadata-Flavor": "Google"} if kind == "gcp" else {}
    if kind == "aws" and (token := await _imds_token(session, url)):
        headers["X-aws-ec2-metadata-token"] = token
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=3)) as r:
        body = (await r.text()).strip()
        if kind == "aws":
            if r.status != 200:
                return None
            with contextlib.suppress(ValueError):
                action = json.loads(body).get("action", "")
                return f"AWS spot {action or 'interruption'} notice"
            return "AWS spot interruption notice"
        return "GCP preemption notice" if r.status == 200 and body.upper() == "TRUE" else None


class SpotWatcher:
    def __init__(self, endpoints: list[str], on_notice: Callable[[str], Awaitable[None]]):
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.on_notice = on_notice

    async def run(self, stopped: asyncio.Event) -> None:
        if not self.endpoints:
            return
        warned: set[str] = set()
        async with aiohttp.ClientSession() as session:
            while not stopped.is_set():
                for kind, url in self.endpoints:
                    try:
                        notice = await check_once(session, kind, url)
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        if url not in warned:
                            log.warning("spot endpoint %s unreachable (%s); still polling", url,
                                        exc)
                            warned.add(url)
                        continue
                    if notice:
                        log.warning("%s from %s: draining", notice, url)
                        await self.on_notice(notice)
                        return
                interval = 2.0 if any(k == "gcp" for k, _ in self.endpoints) else 5.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopped.wait(), interval)
