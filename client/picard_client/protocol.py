"""Wire format of the policy server: msgpack maps over websocket binary frames (version 2).

Every request is a map with a ``type`` and an optional ``id`` (null, an int or a short string)
that the reply echoes: ``metadata`` (what the policy takes and returns), ``reset`` (start an
episode: ``seed``; the reply names the ``episode``), ``infer`` (``episode``, ``obs`` (To, ...)
or {key: (To, ...)}, optional ``deadline_ms`` and ``prefix`` {``actions`` (H, Da), ``weights``
(H,)}), ``resume`` (take over an ``episode`` after a reconnect), ``end`` (drop an episode).
Replies have type ``metadata``, ``episode``, ``chunk`` (``actions`` (H, Da) in raw units and
``info``), ``ended`` or ``error`` (``error``: one line; ``code``: one of ERROR_CODES).
Arrays travel as maps {``__ndarray__``: raw bytes, ``dtype``, ``shape``}; only plain numeric
dtypes are accepted, so decoding never executes anything. The server names its protocol
version in the handshake's PROTOCOL_HEADER, so a client checks it before its first request;
a token travels as ``Authorization: Bearer <token>`` (or openpi's ``Api-Key <token>``).

Decoding untrusted bytes (`unpack` with ``max_items``) is bounded: map keys are strings, ext
types and timestamps are refused, a map or array holds at most MAX_CONTAINER_ENTRIES entries and
a message at most ``max_items`` msgpack items (maps, arrays and their entries), so a message
costs about what it carries (never hundreds of MiB of Python objects); an array's declared
shape must match its bytes. Every refusal is a ProtocolError whose one line names what is
wrong.
"""

from __future__ import annotations

import math
import re
import reprlib
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 2
PROTOCOL_HEADER = "X-Picard-Protocol"  # the handshake response names the server's version
REQUEST_TYPES = ("metadata", "reset", "infer", "resume", "end")
ERROR_CODES = ("bad_request", "unknown_episode", "unavailable", "internal")
AUTH_ENV = "PICARD_AUTH_TOKEN"  # where server and client read the token when none is given
AUTH_SCHEMES = ("Bearer", "Api-Key")  # Api-Key: what openpi's client sends
ARRAY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                "uint16", "uint32", "uint64", "bool")
ARRAY_KEYS = frozenset({"__ndarray__", "dtype", "shape"})
DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20
DEFAULT_MAX_MESSAGE_ITEMS = 4096
MAX_CONTAINER_ENTRIES = 256  # entries of one map or array (an array's shape has <= 32)
MAX_ARRAY_DIMS = 32  # numpy's own limit
MAX_ID_CHARS = 128
# websocket close codes (44xx: the private range, named after the HTTP statuses)
CLOSE_IDLE = 4408  # the connection sent nothing for too long (idle_timeout_s)
CLOSE_UNAUTHORIZED = 4401  # no token, or a wrong one
CLOSE_TOO_BIG = 1009  # a message over max_message_bytes (websockets' own code)
CLOSE_SERVER_FULL = 1013  # max_clients connections already: try again later
CLOSE_GOING_AWAY = 1001  # the server is shutting down

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 6


def short_repr(value: Any) -> str:
    """`repr(value)` cut to a few dozen characters (what an error line quotes of a value)."""
    return _short.repr(value)


def type_name(value: Any) -> str:
    """How an error line names what a field holds: 'a map', 'an array', 'a str', 'null'..."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a map"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, np.ndarray):
        return f"an array {list(value.shape)} of {value.dtype}"
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the text says what is wrong)."""


def auth_header(token: str) -> dict[str, str]:
    """The handshake header that carries `token`."""
    return {"Authorization": f"Bearer {token}"}


def token_of(header: str | None) -> str | None:
    """The token of an ``Authorization`` header (``Bearer <t>`` or ``Api-Key <t>``); None
    when there is none or the scheme is another."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() not in {s.lower() for s in AUTH_SCHEMES} or not token.strip():
        return None
    return token.strip()


def _encode_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        if array.dtype.name not in ARRAY_DTYPES:
            raise TypeError(f"arrays of dtype {array.dtype} cannot be sent")
        return {"__ndarray__": array.tobytes(), "dtype": array.dtype.name,
                "shape": list(array.shape)}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _ext_refused(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not part of the protocol")


def _check_value(value: Any) -> None:
    # ext types other than timestamps never get here (_ext_refused); msgpack decodes
    # timestamps itself, so they are caught in the map or array that holds them
    if isinstance(value, msgpack.Timestamp | msgpack.ExtType):
        raise ProtocolError("msgpack timestamps and ext types are not part of the protocol")


def decode_array(value: dict) -> np.ndarray:
    """An {__ndarray__, dtype, shape} map as a writable array; ProtocolError naming what is
    wrong (unknown keys, a dtype outside ARRAY_DTYPES, a shape that is not a list of ints >= 0
    or does not match the bytes, an impossible size)."""
    extra = sorted(set(value) - ARRAY_KEYS)
    if extra:
        raise ProtocolError(f"an array map has unknown keys {extra}; it holds exactly "
                            f"{sorted(ARRAY_KEYS)}")
    data, dtype, shape = value["__ndarray__"], value.get("dtype"), value.get("shape")
    if not isinstance(data, bytes):
        raise ProtocolError(f"array __ndarray__ must be raw bytes (msgpack bin); got "
                            f"{type_name(data)}")
    if not isinstance(dtype, str) or dtype not in ARRAY_DTYPES:
        raise ProtocolError(f"array dtype {short_repr(dtype)} is not one of {list(ARRAY_DTYPES)}")
    if (not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                       for n in shape)):
        raise ProtocolError(f"array shape must be a list of ints >= 0; got {short_repr(shape)}")
    if len(shape) > MAX_ARRAY_DIMS:
        raise ProtocolError(f"array shape has {len(shape)} dimensions; at most {MAX_ARRAY_DIMS}")
    itemsize = np.dtype(dtype).itemsize
    expected = math.prod(shape) * itemsize  # exact: Python ints do not overflow
    if expected > len(data):
        raise ProtocolError(f"array shape {shape} too large for its data: {dtype} of that shape "
                            f"needs {expected} bytes; got {len(data)}")
    if expected < len(data):
        raise ProtocolError(f"array of shape {shape} and dtype {dtype} needs {expected} bytes; "
                            f"got {len(data)}")
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, owns its data
    except (ValueError, OverflowError) as e:  # an empty array with a dimension over intp
        raise ProtocolError(f"array shape {shape} too large for numpy ({e})") from e


class _Decoder:
    """msgpack hooks that count items against a budget and check keys and values."""

    def __init__(self, max_items: int | None):
        self.max_items = max_items
        self.left = max_items

    def _count(self, entries: int) -> None:
        if self.left is None:
            return
        self.left -= entries + 1
        if self.left < 0:
            raise ProtocolError(f"message holds more than {self.max_items} msgpack items (maps, "
                                f"arrays and their entries; max_message_items)")

    def map(self, value: dict) -> Any:
        self._count(len(value))
        return self.checked_map(value)

    def checked_map(self, value: dict) -> Any:
        """A counted map: string keys, no ext values; an array map becomes its array."""
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(f"map keys must be strings; got {type_name(key)} key "
                                    f"{short_repr(key)}")
            _check_value(item)
        return decode_array(value) if "__ndarray__" in value else value

    def list(self, value: list) -> list:
        self._count(len(value))
        for item in value:
            _check_value(item)
        return value


_LIMIT = re.compile(r"(\d+) exceeds max_(array|map)_len")


def _decode_error(error: Exception) -> ProtocolError:
    """msgpack's exception as one line naming what is wrong with the bytes."""
    if isinstance(error, msgpack.ExtraData):
        extra = len(error.extra)
        return ProtocolError(f"a frame must hold exactly one msgpack message; {extra} extra "
                             f"byte{'s' if extra != 1 else ''} follow it")
    if isinstance(error, msgpack.StackError):
        return ProtocolError("msgpack message nested too deep (more than msgpack's 1024 levels)")
    if isinstance(error, msgpack.FormatError):
        return ProtocolError("not a msgpack message: it holds a byte that starts no msgpack "
                             "value (FormatError)")
    if isinstance(error, UnicodeDecodeError):
        return ProtocolError(f"a msgpack string is not valid UTF-8 ({error.reason} at byte "
                             f"{error.start})")
    text = str(error)
    if "incomplete input" in text:
        return ProtocolError("truncated msgpack message: it ends inside a value")
    if "is not allowed for map key" in text:
        return ProtocolError(f"map keys must be strings; got {text.split(' is not')[0]} keys")
    limit = _LIMIT.search(text)
    if limit is not None:
        kind = "array" if limit.group(2) == "array" else "map"
        return ProtocolError(f"message has a msgpack {kind} of {limit.group(1)} entries; at most "
                             f"{MAX_CONTAINER_ENTRIES} per map or array")
    return ProtocolError(f"not a msgpack message ({type(error).__name__}: "
                         f"{' '.join(text.split())[:200]})")


def pack(message: dict[str, Any]) -> bytes:
    """A message as msgpack bytes (numpy arrays included)."""
    return msgpack.packb(message, default=_encode_default, use_bin_type=True)


def unpack(data: bytes | str, max_items: int | None = DEFAULT_MAX_MESSAGE_ITEMS
           ) -> dict[str, Any]:
    """A received message; a ProtocolError (one line naming what is wrong) for anything that is
    not a msgpack map of the protocol. `max_items` bounds the msgpack items (and each map or
    array to MAX_CONTAINER_ENTRIES): a server decoding untrusted bytes keeps it; a client
    reading its server's replies may pass None (msgpack's own limits only)."""
    if isinstance(data, str):
        raise ProtocolError("messages must be binary msgpack frames, not text")
    decoder = _Decoder(max_items)
    limits: dict[str, int] = {}
    if max_items is not None:
        entries = min(max_items, MAX_CONTAINER_ENTRIES)
        limits = {"max_array_len": entries, "max_map_len": entries}
    try:
        message = msgpack.unpackb(data, object_hook=decoder.map, list_hook=decoder.list,
                                  ext_hook=_ext_refused, raw=False, strict_map_key=True,
                                  **limits)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several types for malformed input
        raise _decode_error(e) from e
    if not isinstance(message, dict):
        raise ProtocolError(f"a message must be a map with a 'type'; got {type_name(message)}")
    if "type" not in message:
        raise ProtocolError(f"a message must be a map with a 'type'; got keys "
                            f"{short_repr(sorted(message))}")
    return message
