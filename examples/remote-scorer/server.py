"""An example remote scorer (proto/epp/remote/v1/scorer.proto) in Python, for EPP's ``remote-scorer`` plugin.

Its policy: the endpoints named by ``--prefer`` (host:port) score 1; the others score by their queue, fewer
waiting and running requests scoring higher. ``--delay-ms`` answers late (to see EPP's deadline at work).

    python examples/remote-scorer/server.py --port 9100 --prefer 10.0.0.7:8000
"""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc

from epp.remote.v1 import scorer_pb2

SERVICE = "epp.scorer.v1.Scorer"


def policy(prefer: set[str]):
    def score(req: scorer_pb2.ScoreRequest) -> scorer_pb2.ScoreResponse:
        out = scorer_pb2.ScoreResponse()
        loads = {e.name: e.metrics.waiting_requests + e.metrics.running_requests + e.inflight_requests
                 for e in req.endpoints}
        worst = max(loads.values(), default=0) or 1
        for e in req.endpoints:
            out.scores[e.name] = 1.0 if f"{e.address}:{e.port}" in prefer else 0.5 * (1 - loads[e.name] / worst)
        return out
    return score


async def serve(host: str, port: int, prefer: set[str], delay: float) -> None:
    score = policy(prefer)

    async def handle(req: scorer_pb2.ScoreRequest, context: grpc.aio.ServicerContext) -> scorer_pb2.ScoreResponse:
        if delay:
            await asyncio.sleep(delay)
        return score(req)

    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
        "Score": grpc.unary_unary_rpc_method_handler(handle, request_deserializer=scorer_pb2.ScoreRequest.FromString,
                                                     response_serializer=scorer_pb2.ScoreResponse.SerializeToString)})])
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    logging.info("remote scorer ready on %s:%d", host, port)
    await server.wait_for_termination()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--prefer", action="append", default=[], help="host:port scoring 1 (repeatable)")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    asyncio.run(serve(args.host, args.port, set(args.prefer), args.delay_ms / 1000))


if __name__ == "__main__":
    main()
