"""The yardstick: a bare aiosmtpd server that accepts every message and stores nothing."""

from __future__ import annotations

import argparse
import asyncio

from aiosmtpd.smtp import SMTP


class Sink:
    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        return "250 2.0.0 Ok: discarded"


async def main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(Sink(), hostname="sink.test", data_size_limit=None, loop=loop),
        host="127.0.0.1",
        port=port,
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
