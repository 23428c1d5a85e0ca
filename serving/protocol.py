"""Wire format of the policy server: msgpack maps over websocket binary frames.

Every request is a map with a ``type`` and an optional ``id`` that the reply echoes:
``metadata`` (what the policy takes and returns), ``reset`` (start an episode: ``seed``; the
reply names the ``episode``), ``infer`` (``episode``, ``obs`` (To, ...) or {key: (To, ...)},
optional ``deadline_ms`` and ``prefix`` {``actions`` (H, Da), ``weights`` (H,)}), ``end`` (drop
an episode). Replies have type ``metadata``, ``episode``, ``chunk`` (``actions`` (H, Da) in raw
units and ``info``), ``ended`` or ``error`` (``error``: one line). Arrays travel as maps
{``__ndarray__``: raw bytes, ``dtype``, ``shape``}; only plain numeric dtypes are accepted, so
decoding never executes anything and never allocates more than the message holds.
"""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
REQUEST_TYPES = ("metadata", "reset", "infer", "end")
ARRAY_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
                "uint16", "uint32", "uint64", "bool")
DEFAULT_MAX_MESSAGE_BYTES = 4 * 2**20


class ProtocolError(ValueError):
    """A message that does not follow the protocol (the text says what is wrong)."""


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


def _decode_hook(value: dict) -> Any:
    if "__ndarray__" not in value:
        return value
    data, dtype, shape = value["__ndarray__"], value.get("dtype"), value.get("shape")
    if dtype not in ARRAY_DTYPES:
        raise ProtocolError(f"array dtype {dtype!r} is not one of {list(ARRAY_DTYPES)}")
    if (not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(data, bytes)):
        raise ProtocolError("an array needs raw bytes, a dtype and a shape (list of ints >= 0)")
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    if expected != len(data):
        raise ProtocolError(f"array of shape {shape} and dtype {dtype} needs {expected} bytes; "
                            f"got {len(data)}")
    return np.frombuffer(data, dtype=dtype).reshape(shape).copy()  # writable, owns its data


def pack(message: dict[str, Any]) -> bytes:
    """A message as msgpack bytes (numpy arrays included)."""
    return msgpack.packb(message, default=_encode_default, use_bin_type=True)


def unpack(data: bytes | str) -> dict[str, Any]:
    """A received message; a ProtocolError (one line) for anything that is not a msgpack map of
    the protocol."""
    if isinstance(data, str):
        raise ProtocolError("messages must be binary msgpack frames, not text")
    try:
        message = msgpack.unpackb(data, object_hook=_decode_hook, raw=False,
                                  strict_map_key=True)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several types for malformed input
        raise ProtocolError(f"not a msgpack message ({type(e).__name__})") from e
    if not isinstance(message, dict) or "type" not in message:
        raise ProtocolError("a message must be a map with a 'type'")
    return message
