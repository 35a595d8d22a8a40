# Loaded by gunicorn when it is started from the repository root, e.g.
#   gunicorn -w 4 demo_app:app
# The hooks share one embedded Redis among the workers when STATESCALE_REDIS_URL is unset
# and warn when the memory store runs under several workers without sticky routing.
from statescale.gunicorn import on_exit, on_starting, when_ready

__all__ = ["on_exit", "on_starting", "when_ready"]
