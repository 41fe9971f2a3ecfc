"""Numba integer kernels. They operate on code arrays and plain integers only."""

import os
import time

# Numba's compile time (s) in one process after which a first run is worth a word
_NOTICE_AFTER = 1.0
_announcing = False


def announce_compiling(say) -> None:
    """Once this process has spent a second compiling kernels (a first run on a machine,
    after an upgrade, or with an empty NUMBA_CACHE_DIR: a minute or two in all), call
    ``say(message)`` once, so that the silence is not taken for a hang. Registered once per
    process; FXSIM_COMPILE_NOTICE=off: never."""
    global _announcing
    if _announcing or os.environ.get("FXSIM_COMPILE_NOTICE", "on") == "off":
        return
    _announcing = True
    from numba.core import event

    class Notice(event.Listener):
        depth, started, spent, said = 0, 0.0, 0.0, False

        def on_start(self, ev):
            if self.depth == 0:  # compiling a kernel compiles the kernels it calls, nested
                self.started = time.perf_counter()
            self.depth += 1

        def on_end(self, ev):
            self.depth -= 1
            if self.depth == 0 and not self.said:
                self.spent += time.perf_counter() - self.started
                if self.spent >= _NOTICE_AFTER:
                    self.said = True
                    say("fxsim: compiling kernels for this CPU (a first run: a minute or two "
                        "in all; they are cached on disk for the next runs)")

    event.register("numba:compile", Notice())
