"""The open loop's floor: an ASGI app that reads each request whole and answers a fixed
JSON the size of a 10-item ``/recall`` answer, doing nothing else.

Served by uvicorn as ``twotower serve`` is (``python benchmarks/floor_app.py``, on a
free loopback port it prints as ``twotower serve`` does; uvloop and httptools where
installed, one process), under the load generator's own
requests, it measures what HTTP, the event loop, the load generator and the machine
cost at each rate: the latency no service can go below on that machine in that hour
(``openloop.py --bodies floor,...``).
"""

from __future__ import annotations

import argparse
import json

ANSWER = json.dumps(
    {
        "query": 123456,
        "items": list(range(100000, 100010)),
        "scores": [0.5] * 10,
        "interests": None,
        "vector": "tower",
        "state": {"features": "stored", "history": "stored"},
    }
).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    import socket

    import uvicorn

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, named below as twotower serve names its own
    sock.listen(2048)  # connections made once it is named wait for the server to accept
    print(f"Serving the floor on http://127.0.0.1:{sock.getsockname()[1]} ", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
