"""Free text made safe for a terminal.

Reasons, comments, identities, summaries, timeline texts, probe reasons, error details:
whatever an operator, a certificate or an attacker's traffic put there reaches the CLI's
human output only through `clean`, which writes every character that is not printable
(C0/C1 controls such as ESC, newlines and tabs, DEL, bidi overrides and other format
characters, line separators) as a visible escape ("\\x1b", "\\n", "\\u202e"), so nothing a
field carries can move the cursor, recolour, rewrite or hide what the table says. --json
output needs no cleaning: json.dumps escapes the same characters.
"""
from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def clean(text: str) -> str:
    """`text` with every non-printable character (space excepted) escaped visibly."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def cleaned(msg: Any) -> Any:
    """A copy of a protobuf message with every string field (nested, repeated and map
    values included) cleaned; anything else is returned as it is."""
    if not isinstance(msg, Message):
        return msg
    out = type(msg)()
    out.CopyFrom(msg)
    _clean_in_place(out)
    return out


def _clean_in_place(msg: Message) -> None:
    for field, value in msg.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            vfield = field.message_type.fields_by_name["value"]
            for key in list(value):
                if vfield.type == FieldDescriptor.TYPE_STRING:
                    value[key] = clean(value[key])
                elif vfield.message_type is not None:
                    _clean_in_place(value[key])
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            items = value if field.label == FieldDescriptor.LABEL_REPEATED else [value]
            for item in items:
                _clean_in_place(item)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.label == FieldDescriptor.LABEL_REPEATED:
                value[:] = [clean(v) for v in value]
            else:
                setattr(msg, field.name, clean(value))
