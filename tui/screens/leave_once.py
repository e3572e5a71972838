"""A screen leaves once, however often the key that closes it arrives.

Over a slow ssh link a user's "esc esc" or "y y" can both be queued on a screen before the first
one is handled. Textual's ``Screen.dismiss`` would then run the result callback twice (a second
stop or delete) and pop the screen beneath too, or raise ScreenStackError, which ends the app,
when there is nothing beneath. Every dismissable screen of the app takes this mixin first.
"""
from __future__ import annotations


class LeaveOnce:
    """``dismiss`` acts only while this screen is the one on top; later calls do nothing."""

    def dismiss(self, result=None):
        if self.app.screen is not self:           # already left (the repeated key), or not on top
            return None
        return super().dismiss(result)
