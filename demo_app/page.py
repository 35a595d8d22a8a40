"""The demo's one HTML page (a Jinja template, rendered with autoescaping).

It shows the mode, the worker that served the page and its node on the ring, who owns
the session there, and the session; its buttons change the session through the JSON
routes without reloading, and a line of the last requests says who served each (it
also asks for the session every two seconds, so a page left open shows the workers
taking turns, or the one owner answering)."""

from __future__ import annotations

from jinja2 import Environment

PAGE = Environment(autoescape=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>statescale demo</title>
<style>
 body{font:16px/1.4 system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem}
 code{background:#f4f4f4;padding:.1rem .3rem;border-radius:3px}
 button{margin:.2rem .4rem .2rem 0;font-size:1rem}
 table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.2rem .6rem}
 #log li{font-family:monospace;font-size:.9rem}
</style></head><body>
<h1>statescale demo</h1>
<p>Mode <b id="mode">{{ mode }}</b>, store <b>{{ store }}</b>. This page was served by
worker <b>pid {{ pid }}</b>{% if node %}, node <b>{{ node }}</b> on the ring{% endif %}.
Session <code id="sid">{{ session_id or "none yet" }}</code>, owned on the ring by
<b id="owner">{{ owner or ("nobody: any worker serves it" if mode == "shared" else "-") }}</b>.</p>
<table><tr><th>key</th><th>value</th></tr>
<tr><td>clicks</td><td id="clicks">{{ data.get("clicks", 0) }}</td></tr>
<tr><td>user</td><td id="user">{{ data.get("user") or "nobody" }}</td></tr></table>
<p>
<button id="incr" onclick="call('POST','/api/incr?key=clicks')">clicks += 1</button>
<button id="login" onclick="call('POST','/api/login?user=ada')">log in as ada</button>
<button id="logout" onclick="call('POST','/api/logout')">log out</button>
<button id="refresh" onclick="call('GET','/api/session')">read it again</button>
</p>
<p>The last requests, newest first, and who served each:</p>
<ol id="log"></ol>
<p>With a shared store or sticky routing the counter goes on whichever worker answers;
with the memory store and no sticky routing it jumps as the workers take turns.</p>
<script>
const seen = [];
function note(line){
  seen.unshift(line);
  seen.length = Math.min(seen.length, 8);
  document.getElementById("log").innerHTML = "";
  for (const line of seen) {
    const item = document.createElement("li");
    item.textContent = line;
    document.getElementById("log").appendChild(item);
  }
}
function show(method, path, status, body){
  const data = body.data || {};
  if (path.startsWith("/api/incr")) document.getElementById("clicks").textContent = body.value;
  if (path.startsWith("/api/session")) {
    document.getElementById("clicks").textContent = data.clicks || 0;
    document.getElementById("user").textContent = data.user || "nobody";
  }
  if (path.startsWith("/api/login")) document.getElementById("user").textContent = body.user;
  if (path.startsWith("/api/logout")) {
    document.getElementById("user").textContent = "nobody";
    document.getElementById("clicks").textContent = 0;
  }
  if (body.owner) document.getElementById("owner").textContent = body.owner;
  if (body.session) document.getElementById("sid").textContent = body.session;
  if (path.startsWith("/api/logout")) document.getElementById("sid").textContent = "none yet";
  const who = "pid " + body.pid + (body.node ? " (" + body.node + ")" : "");
  note(method + " " + path + " -> " + status + ", served by " + who);
}
async function call(method, path){
  let answer;
  try {
    answer = await fetch(path, {method: method});
  } catch (error) {
    note(method + " " + path + " -> no answer: " + error.message);
    return;
  }
  const json = (answer.headers.get("Content-Type") || "").includes("json");
  if (answer.ok && json) {
    show(method, path, answer.status, await answer.json());
  } else {  // a 503 while the store is down, a router's 502: shown, counter untouched
    const text = json ? JSON.stringify(await answer.json()) : await answer.text();
    note(method + " " + path + " -> " + answer.status + ": " + text.trim().slice(0, 120));
  }
}
setInterval(() => call("GET", "/api/session"), 2000);
</script>
</body></html>
"""
)
