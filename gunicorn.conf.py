# Loaded by gunicorn when it is started from the repository root, e.g.
#   gunicorn -w 4 demo_app:app                                  (shared mode)
#   STATESCALE_MODE=sticky gunicorn -w 4 -b 127.0.0.1:8000 demo_app:app   (sticky mode)
# See statescale/gunicorn.py for what each hook does.
from statescale.gunicorn import on_exit, on_starting, post_fork, pre_fork, when_ready

__all__ = ["on_exit", "on_starting", "post_fork", "pre_fork", "when_ready"]
