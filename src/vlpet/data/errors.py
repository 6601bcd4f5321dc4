"""The one exception type of the data subpackage.

Every problem with input data (a missing root, a file that is not JSON, a record without a field,
a feature array of the wrong shape, ...) raises :class:`DataError`. Its message always names the
file, then the record (index and id) and the field where they apply, then what was expected and
what was found, e.g.::

    /data/vqa/karpathy_train.json: record 3 (question_id=458752000): field 'label':
    expected a dict mapping answer strings to soft scores >= 0, got list
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import VLPetError

__all__ = ["DataError"]


def _rebuild(cls: type, message: str, state: dict) -> "DataError":
    err = ValueError.__new__(cls)
    ValueError.__init__(err, message)
    err.__dict__.update(state)
    return err


class DataError(VLPetError, ValueError):
    """Invalid or missing input data.

    Attributes mirror the message parts: ``path`` (always set), ``record`` (index in the file),
    ``record_id`` (e.g. ``"question_id=5"``), ``field``, ``expected``, ``got``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        expected: str,
        *,
        got: Any = None,
        record: int | None = None,
        record_id: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.expected = expected
        self.got = got
        self.record = record
        self.record_id = record_id
        self.field = field
        parts = [self.path]
        if record is not None or record_id is not None:
            where = "record" if record is None else f"record {record}"
            if record_id is not None:
                where += f" ({record_id})"
            parts.append(where)
        if field is not None:
            parts.append(f"field {field!r}")
        msg = ": ".join(parts) + f": expected {expected}"
        if got is not None:
            msg += f", got {got}"
        super().__init__(msg)

    # The custom __init__ signature would break the default exception pickling that
    # DataLoader worker processes rely on.
    def __reduce__(self):
        return (_rebuild, (type(self), str(self), dict(self.__dict__)))
