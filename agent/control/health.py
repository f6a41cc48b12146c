"""grpc.health.v1.Health, in-tree (Debian does not package grpcio-health-checking).

"" (the whole server) and each served service report SERVING while `is_ready()` is true,
NOT_SERVING otherwise; other names get NOT_FOUND (Check) or SERVICE_UNKNOWN (Watch), as
the protocol says. Watch sends the status, then each change (polled once a second).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Iterable

import grpc

from agent.proto.grpc.health.v1 import health_pb2 as pb
from agent.proto.grpc.health.v1 import health_pb2_grpc

WATCH_POLL_S = 1.0


class HealthService(health_pb2_grpc.HealthServicer):
    def __init__(self, is_ready: Callable[[], bool], services: Iterable[str]):
        self._is_ready = is_ready
        self._services = {"", *services}

    def _status(self, service: str) -> int:
        if service not in self._services:
            return pb.HealthCheckResponse.SERVICE_UNKNOWN
        return pb.HealthCheckResponse.SERVING if self._is_ready() else \
            pb.HealthCheckResponse.NOT_SERVING

    async def Check(self, request: pb.HealthCheckRequest, context) -> pb.HealthCheckResponse:
        status = self._status(request.service)
        if status == pb.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return pb.HealthCheckResponse(status=status)

    async def Watch(self, request: pb.HealthCheckRequest,
                    context) -> AsyncIterator[pb.HealthCheckResponse]:
        last = None
        while True:   # ends when the client cancels or the server stops
            status = self._status(request.service)
            if status != last:
                yield pb.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(WATCH_POLL_S)


def add_to_server(service: HealthService, server: grpc.aio.Server) -> None:
    health_pb2_grpc.add_HealthServicer_to_server(service, server)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Health"].full_name
