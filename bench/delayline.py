"""A TCP delay line on loopback: a round trip's latency for a host without `netem`.

    python3 -m bench.delayline LISTEN_PORT TARGET_PORT ONE_WAY_SECONDS

Listens on 127.0.0.1:LISTEN_PORT and forwards each connection to 127.0.0.1:TARGET_PORT,
handing every chunk on ONE_WAY_SECONDS after it arrived, in order, both ways: a round trip
costs twice that. No rate limit and no loss (bench/link.py shapes those in the guest, whose
kernel has netem). Prints "ready" once it listens.
"""

from __future__ import annotations

import asyncio
import sys


async def carry(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                writer.close()
                return
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    while True:
        data = await reader.read(65536)
        queue.put_nowait((loop.time() + delay, data))
        if not data:
            break
    await delivering


async def main(listen: int, target: int, delay: float) -> None:
    async def connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        to_reader, to_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(carry(reader, to_writer, delay), carry(to_reader, writer, delay), return_exceptions=True)

    server = await asyncio.start_server(connect, "127.0.0.1", listen)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
