"""Runs the shared conformance vectors (../../conformance, format in its README) against this
client: every frame through the codec, every client exchange through ``Conn`` on a virtual
clock. Vectors for the server role are skipped visibly (this is a client library)."""

import json
import os
import unittest

from tether import codec
from tether.conn import (
    AuthDue, AuthOk, Closed, Conn, ConnConfig, Established, Message, Resumed, SendError,
    SessionLost, PEER_RESET,
)
from tether.session import SessionConfig

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.normpath(os.path.join(HERE, "..", "..", "..", "conformance"))
SUPPORTED = {"auth", "token-rotation", "coalesce", "policy-violation", "ack-on-close"}


def load(name):
    with open(os.path.join(VECTORS, name), encoding="utf-8") as f:
        return json.load(f)


def skip_reason(v, client_only=False):
    missing = [r for r in v.get("requires", []) if r not in SUPPORTED]
    if missing:
        return "requires " + ", ".join(missing)
    if client_only and v.get("role") != "client":
        return "server role (this is a client library)"
    return None


def session_json(s, with_grant=True):
    out = {"session_id": str(s.session_id), "token": s.token.hex(), "last_received": str(s.last_received)}
    if with_grant:
        out["linger_ms"] = s.linger_ms
        out["resumed"] = s.resumed
    return out


def frame_json(f):
    t = type(f)
    if t is codec.Heartbeat:
        return {"type": "HEARTBEAT"}
    if t is codec.Data:
        return {"type": "DATA", "payload": f.payload.hex()}
    if t is codec.SeqData:
        return {"type": "SEQ_DATA", "seq": str(f.seq), "payload": f.payload.hex()}
    if t in (codec.Ping, codec.Pong):
        return {"type": "PING" if t is codec.Ping else "PONG", "nonce": str(f.nonce)}
    if t is codec.Ack:
        return {"type": "ACK", "seq": str(f.seq)}
    if t in (codec.Close, codec.Refuse):
        return {"type": "CLOSE" if t is codec.Close else "REFUSE", "code": f.code, "text": f.text}
    if t is codec.Hello:
        o = {"type": "HELLO", "flags": f.flags, "want_session": f.want_session,
             "heartbeat_ms": f.heartbeat_ms, "client_id": f.client_id}
        if f.resume is not None:
            o["resume"] = {"session_id": str(f.resume.session_id), "token": f.resume.token.hex(),
                           "last_received": str(f.resume.last_received)}
        if f.credential is not None:
            o["credential"] = f.credential.hex()
        return o
    if t is codec.Welcome:
        o = {"type": "WELCOME", "flags": f.flags, "heartbeat_ms": f.heartbeat_ms,
             "dead_after_ms": f.dead_after_ms}
        if f.session is not None:
            o["session"] = session_json(f.session)
        if f.credential_ttl_ms is not None:
            o["credential_ttl_ms"] = f.credential_ttl_ms
        return o
    if t is codec.Probe:
        return {"type": "PROBE", "body": f.body.hex()}
    if t is codec.Extension:
        return {"type": "EXTENSION", "ext_type": f.ext_type}
    if t is codec.Auth:
        return {"type": "AUTH", "credential": f.credential.hex()}
    if t is codec.AuthOk:
        return {"type": "AUTH_OK", "credential_ttl_ms": f.credential_ttl_ms}
    raise AssertionError(repr(f))


def subset(want, got):
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and subset(v, got[k]) for k, v in want.items())
    return want == got


def decode_all(data, max_len, chunk):
    d = codec.Decoder(max_len)
    out = []
    for i in range(0, len(data), chunk):
        out.extend(d.feed(data[i:i + chunk]))
    if d.buffered:
        raise AssertionError("%d bytes left over" % d.buffered)
    return out


def event_json(ev):
    t = type(ev)
    if t is Established:
        w = ev.welcome
        o = {"type": "established", "heartbeat_ms": w.heartbeat_ms, "dead_after_ms": w.dead_after_ms,
             "session": session_json(w.session) if w.session is not None else None}
        if w.credential_ttl_ms is not None:
            o["credential_ttl_ms"] = w.credential_ttl_ms
        return o
    if t is Message:
        return {"type": "message", "payload": ev.payload.hex()}
    if t is Resumed:
        return {"type": "resumed", "replayed": ev.replayed}
    if t is SessionLost:
        u = ev.unacked
        return {"type": "session-lost", "unacked": None if u is None else [str(u[0]), str(u[1])]}
    if t is AuthDue:
        return {"type": "auth-due"}
    if t is AuthOk:
        return {"type": "auth-ok", "credential_ttl_ms": ev.credential_ttl_ms}
    if t is Closed:
        d = ev.disconnect
        o = {"type": "closed", "reason": d.reason, "silent_for_ms": d.silent_for_ms, "retry": d.retry}
        if d.code is not None:
            o["code"] = d.code
            o["text"] = d.text
        return o
    return None


class Runner:
    """Drives one client exchange (conformance/README.md, "Driving an exchange")."""

    def __init__(self, x):
        c = x["config"]
        self.cfg = ConnConfig(
            max_frame_len=c["max_frame_len"],
            handshake_timeout_ms=c["handshake_timeout_ms"],
            session=SessionConfig(c["max_replay_bytes"], c["max_replay_messages"], c["ack_every"],
                                  c["ack_delay_ms"]))
        cred = bytes.fromhex(c["credential"]) if "credential" in c else None
        self.hello = codec.Hello(c["client_id"], c["heartbeat_ms"], bool(c.get("session")), None, cred)
        self.now = 0
        self.conn = Conn(0, self.cfg, self.hello)
        self.out = []
        self.events = []
        self.collect()

    def collect(self):
        b = self.conn.take_transmit()
        if b:
            self.out.append((self.now, b))
        while True:
            ev = self.conn.poll_event()
            if ev is None:
                break
            j = event_json(ev)
            if j is not None:
                self.events.append((self.now, j))

    def advance(self, t):
        assert t >= self.now, "steps go back in time"
        for _ in range(100000):
            d = self.conn.poll_timeout()
            if d is None or d > t:
                self.now = t
                return
            self.now = max(self.now, d)
            self.conn.handle_timeout(self.now)
            self.collect()
        raise AssertionError("timers do not settle")

    def take_out(self):
        last = self.out[-1][0] if self.out else None
        data = b"".join(b for _, b in self.out)
        self.out = []
        return last, data

    def run(self, x):
        for i, step in enumerate(x["steps"]):
            t = step["at_ms"]
            self.advance(t)
            try:
                self.step(step, t)
            except AssertionError as e:
                raise AssertionError("step %d at %d ms: %s" % (i, t, e)) from None
            self.collect()
        if self.out:
            raise AssertionError("unexpected bytes after the last step: %s" % self.out[0][1].hex())
        if self.events:
            raise AssertionError("unexpected event after the last step: %s" % (self.events[0][1],))

    def step(self, step, t):
        if "recv" in step:
            self.conn.handle_input(self.now, bytes.fromhex(step["recv"]))
        elif "recv_eof" in step:
            self.conn.handle_eof(self.now)
        elif "recv_reset" in step:
            self.conn.handle_transport_error(self.now, PEER_RESET)
        elif "send" in step:
            last, got = self.take_out()
            want = bytes.fromhex(step["send"])
            assert got == want, "sent %s, want %s" % (got.hex(), want.hex())
            assert not got or last == t, "sent at %s ms" % last
        elif "send_frames" in step:
            last, got = self.take_out()
            assert last == t, "sent at %s ms" % last
            frames = []
            if got[:4] == codec.MAGIC:
                frames.append({"type": "PREAMBLE", "version": got[4]})
                got = got[5:]
            frames += [frame_json(f) for f in decode_all(got, 1 << 32, max(1, len(got)))]
            want = step["send_frames"]
            assert len(frames) == len(want) and all(subset(w, g) for w, g in zip(want, frames)), \
                "sent %s, want %s" % (frames, want)
        elif "event" in step:
            assert self.events, "no event, want %s" % step["event"]
            at, got = self.events.pop(0)
            assert subset(step["event"], got), "event %s, want %s" % (got, step["event"])
            assert at == t, "event %s at %d ms" % (got, at)
        elif "app" in step:
            self.app(step["app"])
        else:
            raise AssertionError("unknown step %s" % step)

    def app(self, a):
        op = a["op"]
        if op == "send":
            try:
                self.conn.send(self.now, bytes.fromhex(a["payload"]))
                got = "ok"
            except SendError as e:
                got = e.kind
            assert got == a.get("result", "ok"), "send result %s, want %s" % (got, a.get("result"))
        elif op == "close":
            self.conn.close(self.now, a["code"], a["text"])
        elif op == "reconnect":
            self.conn = Conn(self.now, self.cfg, self.hello, self.conn.take_session())
        elif op == "auth":
            self.conn.auth(self.now, bytes.fromhex(a["credential"]))
        else:
            raise AssertionError("unknown app op %s" % op)


class Conformance(unittest.TestCase):
    def test_frames(self):
        doc = load("frames.json")
        passed = skipped = 0
        failures = []
        for v in doc["frames"]:
            why = skip_reason(v)
            if why:
                print("SKIP frame %s: %s" % (v["name"], why))
                skipped += 1
                continue
            try:
                self.check_frame(v)
                passed += 1
            except AssertionError as e:
                failures.append("frame %s: %s" % (v["name"], e))
        print("conformance frames (python): %d passed, %d skipped, %d failed" % (passed, skipped, len(failures)))
        self.assertEqual(failures, [])

    def check_frame(self, v):
        data = bytes.fromhex(v["hex"])
        max_len = v.get("max_frame_len", 1 << 20)
        if "error" in v:
            if v["error"] == "oversize":
                data = data[:4]
            for chunk in (len(data), 1):
                try:
                    got = decode_all(data, max_len, chunk)
                except codec.ProtocolError as e:
                    assert e.kind == v["error"], "error %s (%s), want %s" % (e.kind, e, v["error"])
                    continue
                raise AssertionError("decoded %r, want error %s" % (got, v["error"]))
            return
        for chunk in (len(data), 1):
            got = decode_all(data, max_len, chunk)
            assert len(got) == 1, "%d frames" % len(got)
            j = frame_json(got[0])
            assert subset(v["frame"], j), "decoded %s, want %s" % (j, v["frame"])
            if v.get("canonical", True):
                again = codec.encode(got[0])
                assert again == data, "re-encoded as %s" % again.hex()

    def test_exchanges(self):
        doc = load("exchanges.json")
        passed = skipped = 0
        failures = []
        for x in doc["exchanges"]:
            why = skip_reason(x, client_only=True)
            if why:
                print("SKIP exchange %s: %s" % (x["name"], why))
                skipped += 1
                continue
            try:
                Runner(x).run(x)
                passed += 1
            except AssertionError as e:
                failures.append("exchange %s: %s" % (x["name"], e))
        print("conformance exchanges (python): %d passed, %d skipped, %d failed"
              % (passed, skipped, len(failures)))
        self.assertEqual(failures, [])


if __name__ == "__main__":
    unittest.main()
