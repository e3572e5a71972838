"""Drive the real app on the real in-process service (no daemon, no fakes).

``make_app`` builds ``MtevmApp`` whose client is ``connect(in_process=True, ...)`` on a private
state and runtime directory; ``wait_for`` polls a condition while the app runs (no timing
assertions: it only bounds how long a test may hang).
"""
from __future__ import annotations

import pytest

from backend.client import connect
from tests.tui.pilot_helpers import FROZEN_TIME
from tui.app import MtevmApp



@pytest.fixture
def make_app(tmp_path):
    state, runtime = str(tmp_path / "state"), str(tmp_path / "run")

    def make(**kwargs) -> MtevmApp:
        async def factory():
            return await connect(in_process=True, state_dir=state, runtime_dir=runtime)
        kwargs.setdefault("clock", lambda: FROZEN_TIME)
        kwargs.setdefault("connection_label", "in-process")
        return MtevmApp(factory, **kwargs)
    return make
