"""What `pjllm bench serve`'s client costs: CPU seconds per 1000 token events it reads.

    python -m benchmarks.bench_client_overhead --streams 500 --events 200

A stub completions server in a child process (raw asyncio, one core at most) streams --events
token chunks per request, pjllm-shaped, then a usage chunk and `data: [DONE]`; each stream
writes one event every --interval-ms (0: as fast as it can, yielding to the other streams
between events, so several events can reach the client in one read). The client process opens
--streams requests at once with `pjllm.bench.completions_client.stream_completion` and reports
its own CPU time (user + system) per 1000 events, the wall time, and the events per second: the
rate a server may stream before this client, not the server, limits what `pjllm bench serve`
measures. `measure` takes the client's functions, so another client can be measured the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import time
from typing import Any, AsyncContextManager, Awaitable, Callable

EVENT = ('data: {"id":"cmpl-0123456789abcdef0123456789abcdef","object":"text_completion",'
         '"created":1700000000,"model":"stub","choices":[{"index":0,"text":" token","logprobs":null,'
         '"finish_reason":null,"stop_reason":null}],"usage":null}\n\n').encode()
LAST = EVENT.replace(b'"finish_reason":null', b'"finish_reason":"length"')
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _tail(events: int) -> bytes:
    usage = {"id": "cmpl-0", "object": "text_completion", "created": 1700000000, "model": "stub",
             "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": events,
                                      "total_tokens": 8 + events}}
    return (_chunk(b"data: " + json.dumps(usage).encode() + b"\n\n") + _chunk(b"data: [DONE]\n\n")
            + b"0\r\n\r\n")


async def _serve_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            interval_s: float) -> None:
    """Answers each POST on the connection (kept alive) with a stream of its max_tokens events."""
    event, last = _chunk(EVENT), _chunk(LAST)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n")
                          if line.startswith(b"content-length:"))
            events = json.loads(await reader.readexactly(length))["max_tokens"]
            writer.write(HEAD)
            for index in range(events):
                await asyncio.sleep(interval_s)
                writer.write(last if index == events - 1 else event)
            writer.write(_tail(events))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _run_server(port_pipe, interval_s: float) -> None:
    async def main() -> None:
        server = await asyncio.start_server(
            lambda r, w: _serve_connection(r, w, interval_s), "127.0.0.1", 0, backlog=4096)
        port_pipe.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()
    asyncio.run(main())


@contextlib.contextmanager
def stub_server(interval_s: float):
    """The stub's base URL, its process running while the block does."""
    receive, send = multiprocessing.Pipe(duplex=False)
    process = multiprocessing.get_context("spawn").Process(target=_run_server, args=(send, interval_s),
                                                           daemon=True)
    process.start()
    try:
        if not receive.poll(30):
            raise RuntimeError("the stub server did not start")
        yield f"http://127.0.0.1:{receive.recv()}"
    finally:
        process.terminate()
        process.join()


async def measure(open_session: Callable[[], AsyncContextManager[Any]],
                  stream_completion: Callable[..., Awaitable[Any]], url: str, streams: int,
                  events: int) -> dict[str, float]:
    """Runs `streams` requests at once through `stream_completion(session, url, payload, headers,
    timeout_s)`, after one warm-up request; the client's CPU and wall seconds over the run."""
    payload = {"model": "stub", "prompt": [1] * 8, "max_tokens": events, "stream": True,
               "stream_options": {"include_usage": True}}
    async with open_session() as session:
        warm = await stream_completion(session, url + "/v1/completions", payload, {}, 60.0)
        if not warm.success:
            raise RuntimeError(f"the warm-up request failed: {warm.error}")
        cpu, wall = time.process_time(), time.perf_counter()
        outcomes = await asyncio.gather(*(stream_completion(session, url + "/v1/completions", payload,
                                                            {}, 600.0) for _ in range(streams)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    failed = [o.error for o in outcomes if not o.success]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0]}")
    total = sum(1 + len(o.itl_s) for o in outcomes)
    return {"events": total, "cpu_s": cpu, "wall_s": wall, "cpu_s_per_1000_events": 1000 * cpu / total,
            "events_per_s": total / wall, "client_cpu_share": cpu / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=500)
    parser.add_argument("--events", type=int, default=200, help="token events per stream")
    parser.add_argument("--interval-ms", type=float, default=0.0,
                        help="the stub's pause between a stream's events (0: as fast as it can)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the one of least CPU is reported")
    args = parser.parse_args()

    # Imported here: the stub's process, spawned, imports this module and needs no pjllm (jax).
    from pjllm.bench.completions_client import open_session, stream_completion
    with stub_server(args.interval_ms / 1e3) as url:
        runs = [asyncio.run(measure(lambda: open_session(None), stream_completion, url, args.streams,
                                    args.events)) for _ in range(args.repeats)]
    best = min(runs, key=lambda run: run["cpu_s_per_1000_events"])
    print(json.dumps({"streams": args.streams, "events_per_stream": args.events,
                      "interval_ms": args.interval_ms, **{k: round(v, 4) for k, v in best.items()}}))


if __name__ == "__main__":
    main()
