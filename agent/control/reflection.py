"""gRPC server reflection (v1 and v1alpha), in-tree (Debian does not package
grpcio-reflection), so `grpcurl` can list and call the agent's services.

Descriptors come from protobuf's default pool, where the generated modules registered
themselves on import. A file is answered with its transitive dependencies, as the
reference implementation does. Extension queries are answered "not found": the agent's
protos declare no extensions.
"""
from __future__ import annotations

from typing import AsyncIterator, Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from agent.proto.grpc.reflection.v1 import reflection_pb2 as v1
from agent.proto.grpc.reflection.v1 import reflection_pb2_grpc as v1_grpc
from agent.proto.grpc.reflection.v1alpha import reflection_pb2 as v1alpha
from agent.proto.grpc.reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

SERVICE_NAMES = tuple(m.DESCRIPTOR.services_by_name["ServerReflection"].full_name
                      for m in (v1, v1alpha))


def _with_dependencies(fd) -> list[bytes]:
    seen: dict[str, bytes] = {}

    def visit(f) -> None:
        if f.name in seen:
            return
        proto = descriptor_pb2.FileDescriptorProto()
        f.CopyToProto(proto)
        seen[f.name] = proto.SerializeToString()
        for dep in f.dependencies:
            visit(dep)

    visit(fd)
    return list(seen.values())


def _answer(pb, request, services: list[str]):
    """One response of module `pb`'s types (v1 and v1alpha messages are identical)."""
    pool = descriptor_pool.Default()
    resp = pb.ServerReflectionResponse(valid_host=request.host, original_request=request)
    which = request.WhichOneof("message_request")
    try:
        if which == "list_services":
            resp.list_services_response.service.extend(
                pb.ServiceResponse(name=n) for n in services)
        elif which == "file_by_filename":
            fd = pool.FindFileByName(request.file_by_filename)
            resp.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(fd))
        elif which == "file_containing_symbol":
            fd = pool.FindFileContainingSymbol(request.file_containing_symbol)
            resp.file_descriptor_response.file_descriptor_proto.extend(_with_dependencies(fd))
        elif which == "all_extension_numbers_of_type":
            pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
            resp.all_extension_numbers_response.base_type_name = \
                request.all_extension_numbers_of_type
        else:
            raise KeyError(which or "empty request")
    except KeyError as e:
        resp.error_response.error_code = grpc.StatusCode.NOT_FOUND.value[0]
        resp.error_response.error_message = f"not found: {e.args[0] if e.args else which}"
    return resp


def _servicer(pb, base: type, services: list[str]):
    class Reflection(base):
        async def ServerReflectionInfo(self, request_iterator, context) -> AsyncIterator:
            async for request in request_iterator:
                yield _answer(pb, request, services)

    return Reflection()


def add_to_server(server: grpc.aio.Server, services: Iterable[str]) -> None:
    """Serve reflection v1 and v1alpha, listing `services` (and reflection itself)."""
    names = sorted({*services, *SERVICE_NAMES})
    v1_grpc.add_ServerReflectionServicer_to_server(
        _servicer(v1, v1_grpc.ServerReflectionServicer, names), server)
    v1alpha_grpc.add_ServerReflectionServicer_to_server(
        _servicer(v1alpha, v1alpha_grpc.ServerReflectionServicer, names), server)
