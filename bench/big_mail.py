#!/usr/bin/env python3
"""big_mail.py - big-message load and a discarding primary, for bench/memory.sh.

  big_mail.py send --port P --sessions N --size BYTES --messages M
      N concurrent SMTP sessions on loopback send M messages in all, each
      BYTES long, streamed in 1 MiB writes. Prints one line: counts of the
      final replies by code, e.g. `replies 250=38 452=2 total=40 seconds=12.3`.
  big_mail.py sink --port P
      A primary that answers 250 to everything and throws the data away
      (it scans only for the end-of-data marker), until killed.

Loopback only: the address is always 127.0.0.1.
"""
import argparse
import asyncio
import collections
import time

HOST = "127.0.0.1"


async def reply(reader):
    """One (possibly multi-line) SMTP reply; returns its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def send_one(port, size, body_chunk, counts):
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        await reply(reader)
        writer.write(b"EHLO bench.test\r\n")
        await reply(reader)
        writer.write(b"MAIL FROM:<load@bench.test>\r\n")
        code = await reply(reader)
        if code != 250:
            counts[code] += 1
            return
        writer.write(b"RCPT TO:<user@example.test>\r\n")
        code = await reply(reader)
        if code != 250:
            counts[code] += 1
            return
        writer.write(b"DATA\r\n")
        code = await reply(reader)
        if code != 354:
            counts[code] += 1
            return
        writer.write(b"Subject: big\r\n\r\n")
        sent = 0
        while sent < size:
            n = min(len(body_chunk), size - sent)
            writer.write(body_chunk[:n])
            await writer.drain()
            sent += n
        # CRLF first: the last piece may end mid-line.
        writer.write(b"\r\n.\r\n")
        counts[await reply(reader)] += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
    except (ConnectionError, OSError):
        counts["dropped"] += 1
    finally:
        writer.close()


async def send(args):
    line = b"x" * 76 + b"\r\n"
    body_chunk = line * ((1 << 20) // len(line))
    counts = collections.Counter()
    queue = asyncio.Queue()
    for _ in range(args.messages):
        queue.put_nowait(None)

    async def session():
        while not queue.empty():
            queue.get_nowait()
            await send_one(args.port, args.size, body_chunk, counts)

    started = time.monotonic()
    await asyncio.gather(*(session() for _ in range(args.sessions)))
    parts = " ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=str))
    print(f"replies {parts} total={sum(counts.values())} seconds={time.monotonic() - started:.1f}")


async def sink_session(reader, writer):
    try:
        writer.write(b"220 sink.bench.test ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                tail = b""
                while True:
                    chunk = await reader.read(1 << 20)
                    if not chunk:
                        return
                    window = tail + chunk
                    if b"\r\n.\r\n" in window:
                        break
                    tail = window[-4:]
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 Ok\r\n")
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def sink(args):
    server = await asyncio.start_server(sink_session, HOST, args.port)
    async with server:
        await server.serve_forever()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["send", "sink"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=40)
    p.add_argument("--size", type=int, default=30 << 20)
    p.add_argument("--messages", type=int, default=40)
    args = p.parse_args()
    asyncio.run(send(args) if args.mode == "send" else sink(args))


if __name__ == "__main__":
    main()
