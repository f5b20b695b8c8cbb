"""What the routing needs to know about this process: whether it was made by fork.

Registered when ``batchnorm`` is imported (this module imports nothing else), so that a child
forked from any process that imported the package is known as one, whether or not the parent
had loaded the torch-facing modules yet. See :mod:`batchnorm.routing` for why it matters.
"""

from __future__ import annotations

import os

__all__ = ["FORKED", "forked"]

# A one-element list, so that a reader holding it sees the child's update: the routing reads
# FORKED[0] on every call (a function call would cost more than the read).
FORKED = [False]


def _mark_forked_child() -> None:
    FORKED[0] = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_mark_forked_child)


def forked() -> bool:
    """Whether this process was made by ``fork`` from one that had imported ``batchnorm``."""
    return FORKED[0]
