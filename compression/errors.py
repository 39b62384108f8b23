"""The one exception that decoding a payload raises."""


class DecodeError(ValueError):
    """A payload that is malformed, corrupted or does not match the expected model.

    Every check in `decode_update` raises this type and no other, so a server can
    reject one client's reply with a single ``except DecodeError`` and keep the
    round going. The message names the tensor, the field, the value found and the
    value expected.
    """
