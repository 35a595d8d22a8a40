"""The demo's one HTML page (a Jinja template, rendered with autoescaping)."""

from __future__ import annotations

from jinja2 import Environment

PAGE = Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>statescale demo</title>
<style>
 body{font:16px/1.4 system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem}
 code,pre{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}
 form{display:inline-block;margin:.2rem .4rem .2rem 0}
 table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.2rem .6rem}
</style></head><body>
<h1>statescale demo</h1>
<p>Served by worker <b>pid {{ pid }}</b> from the <b>{{ store }}</b> store.
Session: <code>{{ session_id or "none yet" }}</code></p>
<table><tr><th>key</th><th>value</th></tr>
{% for key, value in data.items() %}<tr><td>{{ key }}</td><td>{{ value }}</td></tr>
{% else %}<tr><td colspan="2"><i>empty</i></td></tr>{% endfor %}</table>
<p>
<form method="post" action="/api/incr?key=clicks" onsubmit="return go(this)"><button>clicks += 1</button></form>
<form method="post" action="/api/login?user=ada" onsubmit="return go(this)"><button>log in as ada</button></form>
<form method="post" action="/api/logout" onsubmit="return go(this)"><button>log out</button></form>
</p>
<p>Reload a few times: with the <b>redis</b> store the counter keeps counting whichever
worker answers; with <b>memory</b> and no sticky routing it jumps between workers.</p>
<script>
function go(form){fetch(form.action,{method:"POST"}).then(()=>location.reload());return false}
</script>
</body></html>
"""
)
