"""A minimal Mailgun stand-in for the benchmark: answers messages.mime like the real API.

The test suite's fake (tests/fakes/mailgun.py) validates and decodes every message so tests
can assert on content; on a 2-core machine that parsing would compete with the daemon for CPU
and skew the figures. This one reads the request, checks the same shape (Basic auth, a ``to``
field, a ``message`` file part), counts, and answers. ``GET /_stats`` returns the count.
"""

from __future__ import annotations

import argparse
import base64

from aiohttp import web

API_KEY = "bench-key"
COUNTER = web.AppKey("counter", list)


async def send_mime(request: web.Request) -> web.Response:
    expected = "Basic " + base64.b64encode(f"api:{API_KEY}".encode()).decode()
    if request.headers.get("Authorization") != expected:
        return web.Response(status=401, text="Forbidden")
    reader = await request.multipart()
    recipients = 0
    message_bytes = 0
    async for part in reader:
        if part.name == "to":
            recipients += 1
            await part.read()
        elif part.name == "message" and part.filename:
            while chunk := await part.read_chunk(1 << 16):
                message_bytes += len(chunk)
        else:
            await part.read()
    if not recipients or not message_bytes:
        return web.json_response({"message": "to parameter is missing"}, status=400)
    counter = request.app[COUNTER]
    counter[0] += 1
    return web.json_response({"id": f"<bench.{counter[0]}@mg.example.com>", "message": "Queued. Thank you."})


async def stats(request: web.Request) -> web.Response:
    return web.json_response({"messages": request.app[COUNTER][0]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[COUNTER] = [0]
    app.router.add_post("/v3/{domain}/messages.mime", send_mime)
    app.router.add_get("/_stats", stats)
    web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, print=None, access_log=None)


if __name__ == "__main__":
    main()
