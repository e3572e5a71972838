"""Fixtures of the Linux guest tests: the built image (built here if scripts/test.sh has not)."""
from __future__ import annotations

import pytest

from backend.guests.linux import image


@pytest.fixture(scope="session")
def linux_image() -> image.BuiltImage:
    image.build()      # seconds when it is up to date (checks the lock, sources and checksums)
    return image.linux_image()
