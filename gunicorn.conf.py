# The demo's gunicorn configuration, loaded when gunicorn starts from the repository root:
#   gunicorn -w 4 demo_app:app                                            (shared mode)
#   STATESCALE_MODE=sticky gunicorn -w 4 -b 127.0.0.1:8000 demo_app:app     (sticky mode)
#   STATESCALE_MODE=affinity gunicorn -w 4 -b 127.0.0.1:8000 demo_app:app   (affinity mode)
# See statescale/gunicorn.py for what each hook does.
from statescale.gunicorn import (
    on_exit,
    on_starting,
    post_fork,
    pre_fork,
    when_ready,
    worker_abort,
    worker_exit,
    worker_int,
)

# The demo asks for an embedded redis-server, started once in the master and shared by
# every worker, unless STATESCALE_REDIS_URL names a Redis of your own. Production
# configurations leave this out: without a URL, statescale refuses to start.
raw_env = ["STATESCALE_EMBEDDED_REDIS=1"]

__all__ = [
    "on_exit",
    "on_starting",
    "post_fork",
    "pre_fork",
    "raw_env",
    "when_ready",
    "worker_abort",
    "worker_exit",
    "worker_int",
]
