"""How big a fleet decision may get: the budgets the policy keeps what a decision carries
to, whatever the proposals said, so a signed envelope stays well under
agent.fleet.decision.MAX_BODY_BYTES (16 KiB): at most 5 provenance lists of
PROVENANCE_MAX_ITEMS strings of PROVENANCE_MAX_BYTES, a reason of REASON_MAX_BYTES and a
canary scope of SCOPE_MAX_BYTES come to under 8 KiB. Sizes are of the JSON the envelope
holds (ASCII, escapes included: a non-BMP character is 12 bytes)."""
from __future__ import annotations

import json
from typing import Any, Iterable

PROVENANCE_MAX_ITEMS = 10       # entries of each provenance list (nodes, rules, ...)
PROVENANCE_MAX_BYTES = 64       # JSON bytes of each provenance string
REASON_MAX_BYTES = 256
SCOPE_MAX_BYTES = 4096          # JSON bytes of a canary scope's node names


def _json_len(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=True)) - 2


def short(value: Any, max_bytes: int = PROVENANCE_MAX_BYTES) -> str:
    """`value` as text of at most `max_bytes` bytes once JSON-encoded (as the envelope is:
    ASCII with escapes), control characters dropped, a cut marked with "..."."""
    text = "".join(c for c in str(value) if c.isprintable())
    if _json_len(text) <= max_bytes:
        return text
    out, used = [], 3
    for c in text:
        used += _json_len(c)
        if used > max_bytes:
            break
        out.append(c)
    return "".join(out) + "..."


def bounded(values: Iterable[Any]) -> list[str]:
    return [short(v) for v in sorted(values)[:PROVENANCE_MAX_ITEMS]]
