"""A stand-in OpenAI completions server for the bench's fault tests: it drops connections now and
then, or dies, on purpose. Not a model: it answers every completion with the same tokens.

    python tests/flaky_server.py PORT [--drop-every K] [--die-after N]

--drop-every K: every K-th request is read and its connection closed without an answer (what a
client meets when it reuses a keep-alive connection the server has just closed). --die-after N:
the process exits (status 3) on its N-th request, before answering it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

ANSWER = {"choices": [{"index": 0, "text": " same", "token_ids": [5, 6, 7],
                       "logprobs": {"token_logprobs": [-0.25, -1.5, -0.125]}, "finish_reason": "length"}]}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--drop-every", type=int, default=0)
    ap.add_argument("--die-after", type=int, default=0)
    args = ap.parse_args()
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                count += 1
                if args.die_after and count >= args.die_after:
                    os._exit(3)
                if args.drop_every and count % args.drop_every == 0:
                    writer.close()
                    return
                body = json.dumps(ANSWER).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             + f"content-length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
