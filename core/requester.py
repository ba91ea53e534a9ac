"""Who asks: the platform-free identity of a requester (defined in `core.types`)."""

from __future__ import annotations

from core.types import Requester as Requester  # the store and the front ends read it here
