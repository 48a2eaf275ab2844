#!/usr/bin/env python3
"""A tether backend in plain Python (standard library only): prints presence changes,
answers each client message, and resumes the event stream where it stopped after a restart.

  TETHER_API=http://127.0.0.1:7301 TETHER_STATE=last-event-id python3 backend.py
  (TETHER_TOKEN: the server's --http-token-file token, when it has one)
"""
import json, os, sys, time, urllib.error, urllib.parse, urllib.request

API = os.environ.get("TETHER_API", "http://127.0.0.1:7301")
STATE = os.environ.get("TETHER_STATE", "last-event-id")
TOKEN = os.environ.get("TETHER_TOKEN")

def request(path, body=None, headers=None):
    h = dict(headers or {})
    if TOKEN:
        h["Authorization"] = "Bearer " + TOKEN
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        h["Content-Type"] = "application/json"
    return urllib.request.urlopen(urllib.request.Request(API + path, data, h), timeout=30)

def answer(client_id, text):
    try:
        request("/api/clients/%s/messages" % urllib.parse.quote(client_id, safe=""), {"text": text}).read()
    except urllib.error.HTTPError as e:  # 404 unknown, 409 offline, 429 backlog: say why
        print("cannot answer %s: %s" % (client_id, json.load(e).get("error")), flush=True)

def handle(ev):
    if ev["type"] == "presence":
        print("%s %s%s" % (ev["client_id"], ev["state"],
              " (%s, silent %s ms)" % (ev["reason"], ev["silent_for_ms"]) if ev["reason"] else ""), flush=True)
    elif ev["type"] == "message":
        text = ev.get("text") if "text" in ev else "<%d bytes>" % len(ev["base64"])
        answer(ev["client_id"], "echo: " + text)
    elif ev["type"] == "gap":
        print("missed events %s..%s (%s)" % (ev["from"], ev["to"], ev["reason"]), flush=True)

def main():
    last = open(STATE).read().strip() if os.path.exists(STATE) else None
    if last:
        print("resuming after event", last, flush=True)
    while True:
        try:
            headers = {"Accept": "application/x-ndjson"}
            if last:
                headers["Last-Event-ID"] = last
            for line in request("/api/events", headers=headers):
                if not line.strip():
                    continue  # keep-alive
                ev = json.loads(line)
                handle(ev)
                last = str(ev["id"])  # handled: remember it (a crash before this line
                with open(STATE + ".tmp", "w") as f:  # means the event comes again)
                    f.write(last)
                os.replace(STATE + ".tmp", STATE)
        except (OSError, ValueError) as e:
            print("event stream ended (%s); reconnecting" % e, file=sys.stderr, flush=True)
        time.sleep(1)

if __name__ == "__main__":
    main()
