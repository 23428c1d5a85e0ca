"""openpi's wire format (``openpi_client.msgpack_numpy``), bounded like our own protocol.

openpi's `WebsocketClientPolicy` connects, reads one metadata frame, then sends each observation
as a msgpack map and reads ``{"actions": ...}`` back. Arrays are maps with *bytes* keys
{``b"__ndarray__"``: True, ``b"data"``: raw bytes, ``b"dtype"``: numpy's dtype string such as
``"<f4"``, ``b"shape"``: [...]}, numpy scalars {``b"__npgeneric__"``: True, ``b"data"``,
``b"dtype"``}. openpi decodes them with ``np.ndarray(buffer=...)`` on whatever dtype string
arrives; here only the plain numeric dtypes of `ARRAY_DTYPES` in native byte order are
accepted, the shape must match the bytes, bytes keys are accepted only inside those two maps,
and the item budget of `protocol.unpack` applies, so a hostile frame costs about what it
carries. An error goes back as a text frame of one line, which openpi's client raises as a
RuntimeError.
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import numpy as np

from picard_client.protocol import (
    ARRAY_DTYPES,
    MAX_CONTAINER_ENTRIES,
    ProtocolError,
    _decode_error,
    _Decoder,
    _ext_refused,
    decode_array,
    short_repr,
    type_name,
)

ARRAY_KEYS = frozenset({b"__ndarray__", b"data", b"dtype", b"shape"})
SCALAR_KEYS = frozenset({b"__npgeneric__", b"data", b"dtype"})
MAX_DTYPE_CHARS = 16
EPISODE_SEED_KEY = "episode_seed"
"""An observation key an openpi client may add: an int that starts a new episode with that
seed (the server's noise for it is the same as our client's `reset(seed)`); re-sending the
seed of the running episode continues it."""


def _pack_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "VOc":
            raise TypeError(f"arrays of dtype {value.dtype} cannot be sent")
        array = np.ascontiguousarray(value)
        return {b"__ndarray__": True, b"data": array.tobytes(), b"dtype": array.dtype.str,
                b"shape": list(array.shape)}
    if isinstance(value, np.generic):
        return {b"__npgeneric__": True, b"data": value.item(), b"dtype": value.dtype.str}
    raise TypeError(f"cannot encode {type(value).__name__}")


def packb(message: Any) -> bytes:
    """A message as openpi's msgpack-numpy bytes."""
    return msgpack.packb(message, default=_pack_default, use_bin_type=True)


def _dtype(value: Any) -> np.dtype:
    """A dtype string of an openpi array: plain numeric, native byte order."""
    if not isinstance(value, str | bytes) or len(value) > MAX_DTYPE_CHARS:
        raise ProtocolError(f"array dtype must be a short numpy dtype string such as '<f4'; "
                            f"got {short_repr(value)}")
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        dtype = np.dtype(text)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"array dtype {short_repr(text)} is not a numpy dtype") from e
    if dtype.name not in ARRAY_DTYPES:
        raise ProtocolError(f"array dtype {short_repr(text)} ({dtype.name}) is not one of "
                            f"{list(ARRAY_DTYPES)}")
    if dtype.byteorder not in "=|" and dtype.byteorder != {"little": "<", "big": ">"}[
            sys.byteorder]:
        raise ProtocolError(f"array dtype {short_repr(text)} is not in this machine's byte "
                            f"order")
    return dtype


class _OpenpiDecoder(_Decoder):
    """The item budget and value checks of our decoder; openpi's array and scalar maps."""

    def map(self, value: dict) -> Any:
        self._count(len(value))
        if b"__ndarray__" in value:
            return self._array(value)
        if b"__npgeneric__" in value:
            return self._scalar(value)
        return self.checked_map(value)

    def _array(self, value: dict) -> np.ndarray:
        if set(value) != ARRAY_KEYS:
            raise ProtocolError(f"an openpi array map holds exactly {sorted(ARRAY_KEYS)}; got "
                                f"{short_repr(sorted(value, key=str))}")
        dtype = _dtype(value[b"dtype"])
        return decode_array({"__ndarray__": value[b"data"], "dtype": dtype.name,
                             "shape": value[b"shape"]})

    def _scalar(self, value: dict) -> Any:
        if set(value) != SCALAR_KEYS:
            raise ProtocolError(f"an openpi scalar map holds exactly {sorted(SCALAR_KEYS)}; "
                                f"got {short_repr(sorted(value, key=str))}")
        data = value[b"data"]
        if not isinstance(data, int | float):  # bool is an int
            raise ProtocolError(f"an openpi scalar must be a number; got {type_name(data)}")
        try:
            return _dtype(value[b"dtype"]).type(data)
        except OverflowError as e:
            raise ProtocolError(f"openpi scalar {short_repr(data)} does not fit its dtype") from e


def unpackb(data: bytes | str, max_items: int | None) -> Any:
    """A received openpi frame, decoded within `max_items` msgpack items (None: msgpack's own
    limits only); ProtocolError naming what is wrong otherwise."""
    if isinstance(data, str):
        raise ProtocolError("messages must be binary msgpack frames, not text")
    decoder = _OpenpiDecoder(max_items)
    limits: dict[str, int] = {}
    if max_items is not None:
        entries = min(max_items, MAX_CONTAINER_ENTRIES)
        limits = {"max_array_len": entries, "max_map_len": entries}
    try:
        return msgpack.unpackb(data, object_hook=decoder.map, list_hook=decoder.list,
                               ext_hook=_ext_refused, raw=False, strict_map_key=True, **limits)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several types for malformed input
        raise _decode_error(e) from e


def observation(message: Any) -> tuple[dict[str, np.ndarray], int | None]:
    """An openpi request as (obs {key: array (To, ...)}, episode seed or None); string values
    (openpi's ``prompt``) are left out; ProtocolError naming what is wrong."""
    if not isinstance(message, dict) or not message:
        raise ProtocolError(f"an openpi request must be a map of observation arrays; got "
                            f"{type_name(message) if message != {} else 'an empty map'}")
    obs = dict(message)
    seed = obs.pop(EPISODE_SEED_KEY, None)
    if isinstance(seed, np.integer):
        seed = int(seed)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not 0 <= seed < 2**32):
        raise ProtocolError(f"{EPISODE_SEED_KEY} must be an int in [0, 2**32); got "
                            f"{short_repr(seed)}")
    for key, value in list(obs.items()):
        if isinstance(value, str):  # openpi's "prompt": a Diffusion Policy takes no language
            del obs[key]
        elif not isinstance(value, np.ndarray):
            raise ProtocolError(f"observation {key!r} must be an array (To, ...); got "
                                f"{type_name(value)}")
    if not obs:
        raise ProtocolError(f"an openpi request holds no observation arrays besides "
                            f"{EPISODE_SEED_KEY}")
    return obs, seed
