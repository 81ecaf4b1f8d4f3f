"""Page sizes and page tokens of the list-like calls, as AIP-158 has them.

A size of 0 takes the call's default, one over the maximum is capped to it (a
caller asking for "everything" gets the most one page holds, not an error), and
a negative one is INVALID_ARGUMENT naming the field. A page token is the stream
sequence of the last dead letter of the previous page.
"""

from __future__ import annotations

from laneway.broker.core.wire.jobs import clip
from laneway.errors import InvalidArgument

__all__ = ["DEFAULT_PAGE_SIZE", "MAX_PAGE_SIZE", "page_size", "page_token_seq"]

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A page token is a stream sequence; JetStream's are below 2**63 (a larger one makes
# the server time a read out, which would look like an outage to the caller).
_MAX_PAGE_TOKEN = 2**63 - 1


def page_size(requested: int, field: str, *, default: int = DEFAULT_PAGE_SIZE) -> int:
    """How many items a call with ``requested`` (its ``field``) returns at most."""
    if requested < 0:
        raise InvalidArgument(
            f"{field}: {requested} is negative (0 for the default of {default}, at most {MAX_PAGE_SIZE})",
            field=field,
            reason="INVALID_FIELD",
        )
    return min(requested or default, MAX_PAGE_SIZE)


def page_token_seq(token: str, field: str = "page_token") -> int:
    """The stream sequence a page token continues after (0 for the first page)."""
    if not token:
        return 0
    # isascii: str.isdigit also takes other scripts' digits, which int() would read.
    valid = token.isascii() and token.isdigit() and len(token) <= 19
    if not (valid and int(token) <= _MAX_PAGE_TOKEN):
        raise InvalidArgument(
            f"{field}: {clip(token)!r} is not a next_page_token from ListDeadLetters",
            field=field,
            reason="INVALID_FIELD",
        )
    return int(token)
