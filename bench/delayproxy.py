"""A userspace TCP delay proxy on loopback (this kernel has no netem).

``python bench/delayproxy.py --delay 0.025 --target-port 2222 --port 3333 127.0.0.1 127.0.0.2``
listens on each given loopback address at ``--port`` and forwards every connection to the
same address at ``--target-port``, holding each chunk ``--delay`` seconds in each direction
(0.025 s each way = 50 ms of round trip).  Order is kept (every chunk waits the same time).
It prints ``ready`` once listening and runs until SIGTERM.  Loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import signal
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            loop.call_later(delay, writer.write, data)
    except (ConnectionError, OSError):
        pass
    await asyncio.sleep(delay)  # what is still in flight arrives before the close
    try:
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


_HANDLERS: set[asyncio.Task[None]] = set()


async def _handle(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    target_port: int,
    delay: float,
) -> None:
    # A strong reference: a task whose streams were closed under it is otherwise garbage
    # collected while pending ("Task was destroyed but it is pending!"); shutdown cancels it.
    task = asyncio.current_task()
    assert task is not None
    _HANDLERS.add(task)
    task.add_done_callback(_HANDLERS.discard)
    host = writer.get_extra_info("sockname")[0]
    try:
        up_r, up_w = await asyncio.open_connection(host, target_port)
    except OSError:
        writer.close()
        return
    try:
        await asyncio.gather(_pipe(reader, up_w, delay), _pipe(up_r, writer, delay))
    except asyncio.CancelledError:
        pass  # shutting down
    finally:
        for w in (writer, up_w):
            w.close()


async def _main(addresses: list[str], port: int, target_port: int, delay: float) -> None:
    servers = []
    for addr in addresses:
        if not ipaddress.ip_address(addr).is_loopback:
            raise SystemExit(f"delayproxy: {addr} is not a loopback address")
        servers.append(
            await asyncio.start_server(
                lambda r, w: _handle(r, w, target_port, delay), addr, port, backlog=1024
            )
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for s in servers:
        s.close()
    current = asyncio.current_task()
    rest = [t for t in asyncio.all_tasks() if t is not current]
    for t in rest:
        t.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


def main() -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("addresses", nargs="+")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--target-port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.025, help="seconds each way")
    args = ap.parse_args()
    asyncio.run(_main(args.addresses, args.port, args.target_port, args.delay))
    return 0


if __name__ == "__main__":
    sys.exit(main())
