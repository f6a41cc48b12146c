"""The control API's refusal: a gRPC status and the one sentence the caller sees."""
from __future__ import annotations

import grpc


class CallError(Exception):
    """A refused call: its gRPC status and the sentence the caller sees."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message
