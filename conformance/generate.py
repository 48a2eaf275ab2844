#!/usr/bin/env python3
"""Writes the tether conformance vectors: frames.json and exchanges.json.

    python3 conformance/generate.py           # rewrite both files
    python3 conformance/generate.py --check   # exit 1 if they are not what this script writes

The vectors are data; this script is only how they are kept readable and consistent. Its
tiny encoder is checked against the reference implementation by the Rust runner
(`crates/tether-proto/tests/conformance.rs`), and against each client by that client's own
runner. The format is described in conformance/README.md.
"""

import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# --- encoding -------------------------------------------------------------------------------

PRE = b"TTHR\x01"
HB = b"\x00\x00\x00\x00"
MAX_U64 = (1 << 64) - 1


def u8(n):
    return struct.pack(">B", n)


def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def u64(n):
    return struct.pack(">Q", n)


def frame(t, body=b""):
    return u32(1 + len(body)) + u8(t) + body


def data(p):
    return frame(0x01, p)


def ping(n):
    return frame(0x02, u64(n))


def pong(n):
    return frame(0x03, u64(n))


def close(code, text=b""):
    return frame(0x04, u16(code) + (text.encode() if isinstance(text, str) else text))


def ack(seq):
    return frame(0x05, u64(seq))


def seq_data(seq, p):
    return frame(0x06, u64(seq) + p)


def auth(cred):
    return frame(0x07, cred)


def auth_ok(ttl):
    return frame(0x08, u32(ttl))


def refuse(code, text=b""):
    return frame(0x12, u16(code) + (text.encode() if isinstance(text, str) else text))


def ext(t, body=b""):
    return frame(t, body)


def hello(cid, hb=10000, session=False, resume=None, credential=None, flags=None):
    """resume = (session_id, token, last_received)."""
    idb = cid.encode() if isinstance(cid, str) else cid
    if flags is None:
        flags = 0
        if session or resume is not None:
            flags |= 0x01
        if resume is not None:
            flags |= 0x02
        if credential is not None:
            flags |= 0x04
    body = u8(flags) + u32(hb) + u8(len(idb)) + idb
    if resume is not None:
        sid, tok, lr = resume
        body += u64(sid) + tok + u64(lr)
    if credential is not None:
        body += u16(len(credential)) + credential
    return frame(0x10, body)


def welcome(h, d, session=None, ttl=None, flags=None):
    """session = (session_id, token, last_received, linger_ms, resumed)."""
    if flags is None:
        flags = 0
        if session is not None:
            flags |= 0x01
            if session[4]:
                flags |= 0x02
        if ttl is not None:
            flags |= 0x04
    body = u8(flags) + u32(h) + u32(d)
    if session is not None:
        sid, tok, lr, linger, _ = session
        body += u64(sid) + tok + u64(lr) + u32(linger)
    if ttl is not None:
        body += u32(ttl)
    return frame(0x11, body)


def hx(b):
    return b.hex()


# --- frames.json ----------------------------------------------------------------------------

SID = 0x0102030405060708
SID2 = 0x1112131415161718
TOK_A = bytes(range(0xA0, 0xB0))
TOK_B = bytes(range(0xB0, 0xC0))
TOK_C = bytes(range(0xC0, 0xD0))
JWT = b"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZW1vIn0.c2lnbmF0dXJl"


def s(n):
    """u64 values are decimal strings in the vectors (JSON numbers lose precision past 2^53)."""
    return str(n)


def session_fields(sid, tok, lr, linger=None, resumed=None):
    out = {"session_id": s(sid), "token": hx(tok), "last_received": s(lr)}
    if linger is not None:
        out["linger_ms"] = linger
    if resumed is not None:
        out["resumed"] = resumed
    return out


def valid(name, b, fr, note=None, requires=None, max_frame_len=None, canonical=True):
    v = {"name": name, "hex": hx(b), "frame": fr}
    if not canonical:
        v["canonical"] = False
    if note:
        v["note"] = note
    if requires:
        v["requires"] = requires
    if max_frame_len is not None:
        v["max_frame_len"] = max_frame_len
    return v


def bad(name, b, error, why, requires=None, max_frame_len=None):
    v = {"name": name, "hex": hx(b), "error": error, "why": why}
    if requires:
        v["requires"] = requires
    if max_frame_len is not None:
        v["max_frame_len"] = max_frame_len
    return v


def frames():
    t1024 = "a" * 1024
    id255 = "x" * 255
    out = [
        valid("heartbeat", HB, {"type": "HEARTBEAT"}, "length 0 is a heartbeat: no type byte"),
        valid("data-empty", data(b""), {"type": "DATA", "payload": ""},
              "an empty message is DATA, not a heartbeat"),
        valid("data-hi", data(b"hi"), {"type": "DATA", "payload": hx(b"hi")}),
        valid("ping", ping(SID), {"type": "PING", "nonce": s(SID)}),
        valid("pong-max-nonce", pong(MAX_U64), {"type": "PONG", "nonce": s(MAX_U64)}),
        valid("close-normal-bye", close(0, "bye"), {"type": "CLOSE", "code": 0, "text": "bye"}),
        valid("close-empty-text", close(3), {"type": "CLOSE", "code": 3, "text": ""}),
        valid("close-utf8-text", close(1000, "ünïcode ✓"),
              {"type": "CLOSE", "code": 1000, "text": "ünïcode ✓"}),
        valid("close-text-1024-bytes", close(2, t1024), {"type": "CLOSE", "code": 2, "text": t1024},
              "1024 bytes of text is the most allowed"),
        valid("close-code-max", close(65535, "x"), {"type": "CLOSE", "code": 65535, "text": "x"},
              "any code is accepted and reported as-is"),
        valid("ack", ack(1), {"type": "ACK", "seq": "1"}),
        valid("seq-data", seq_data(1, b"hi"), {"type": "SEQ_DATA", "seq": "1", "payload": hx(b"hi")}),
        valid("seq-data-empty-payload", seq_data(MAX_U64, b""),
              {"type": "SEQ_DATA", "seq": s(MAX_U64), "payload": ""}),
        valid("hello-c1", hello("c1"),
              {"type": "HELLO", "flags": 0, "heartbeat_ms": 10000, "client_id": "c1"}),
        valid("hello-no-preference", hello("demo", hb=0),
              {"type": "HELLO", "flags": 0, "heartbeat_ms": 0, "client_id": "demo"},
              "heartbeat_ms 0 = no preference"),
        valid("hello-session", hello("demo", session=True),
              {"type": "HELLO", "flags": 1, "heartbeat_ms": 10000, "client_id": "demo"}),
        valid("hello-resume", hello("demo", resume=(SID, TOK_A, 7)),
              {"type": "HELLO", "flags": 3, "heartbeat_ms": 10000, "client_id": "demo",
               "resume": session_fields(SID, TOK_A, 7)}),
        valid("hello-resume-flag-alone", hello("demo", resume=(SID, TOK_A, 7), flags=0x02),
              {"type": "HELLO", "want_session": True, "heartbeat_ms": 10000, "client_id": "demo",
               "resume": session_fields(SID, TOK_A, 7)},
              "RESUME implies SESSION; senders set both (0x03)", canonical=False),
        valid("hello-id-255-bytes", hello(id255),
              {"type": "HELLO", "flags": 0, "heartbeat_ms": 10000, "client_id": id255}),
        valid("hello-utf8-id", hello("jörg-📱"),
              {"type": "HELLO", "flags": 0, "heartbeat_ms": 10000, "client_id": "jörg-📱"}),
        valid("welcome", welcome(10000, 30000),
              {"type": "WELCOME", "flags": 0, "heartbeat_ms": 10000, "dead_after_ms": 30000}),
        valid("welcome-session", welcome(1000, 3000, session=(SID, TOK_A, 0, 30000, False)),
              {"type": "WELCOME", "flags": 1, "heartbeat_ms": 1000, "dead_after_ms": 3000,
               "session": session_fields(SID, TOK_A, 0, 30000, False)}),
        valid("welcome-resumed", welcome(1000, 3000, session=(SID, TOK_B, 42, 30000, True)),
              {"type": "WELCOME", "flags": 3, "heartbeat_ms": 1000, "dead_after_ms": 3000,
               "session": session_fields(SID, TOK_B, 42, 30000, True)}),
        valid("refuse-server-full", refuse(10, "full"), {"type": "REFUSE", "code": 10, "text": "full"}),
        valid("probe", frame(0x20, b"\x01\x02"), {"type": "PROBE", "body": "0102"}),
        valid("extension-empty", ext(0x80), {"type": "EXTENSION", "ext_type": 128},
              "skipped whole after the handshake"),
        valid("extension-body", ext(0xFF, b"\x01\x02\x03"), {"type": "EXTENSION", "ext_type": 255},
              "the body is skipped, not kept", canonical=False),
        valid("max-frame-len-exactly", data(b"x" * 15), {"type": "DATA", "payload": hx(b"x" * 15)},
              "length 16 with max_frame_len 16 is accepted", max_frame_len=16),
        # Protocol additions (credentials).
        valid("hello-credential", hello("demo", credential=JWT),
              {"type": "HELLO", "flags": 4, "heartbeat_ms": 10000, "client_id": "demo",
               "credential": hx(JWT)}, requires=["auth"]),
        valid("hello-session-resume-credential", hello("demo", resume=(SID, TOK_A, 7), credential=JWT),
              {"type": "HELLO", "flags": 7, "heartbeat_ms": 10000, "client_id": "demo",
               "resume": session_fields(SID, TOK_A, 7), "credential": hx(JWT)},
              "order: client id, resume block, credential", requires=["auth"]),
        valid("hello-credential-8192-bytes", hello("demo", credential=b"k" * 8192),
              {"type": "HELLO", "flags": 4, "heartbeat_ms": 10000, "client_id": "demo",
               "credential": hx(b"k" * 8192)}, requires=["auth"]),
        valid("welcome-credential-ttl", welcome(10000, 30000, ttl=600000),
              {"type": "WELCOME", "flags": 4, "heartbeat_ms": 10000, "dead_after_ms": 30000,
               "credential_ttl_ms": 600000}, requires=["auth"]),
        valid("welcome-session-credential-ttl",
              welcome(1000, 3000, session=(SID, TOK_A, 0, 30000, False), ttl=0),
              {"type": "WELCOME", "flags": 5, "heartbeat_ms": 1000, "dead_after_ms": 3000,
               "session": session_fields(SID, TOK_A, 0, 30000, False), "credential_ttl_ms": 0},
              "ttl 0: the credential does not expire", requires=["auth"]),
        valid("auth", auth(JWT), {"type": "AUTH", "credential": hx(JWT)}, requires=["auth"]),
        # The byte examples of PROTOCOL.md §5 and §13, exactly as printed there.
        valid("doc-hello-credential", hello("demo", credential=b"tok"),
              {"type": "HELLO", "flags": 4, "heartbeat_ms": 10000, "client_id": "demo",
               "credential": hx(b"tok")}, "PROTOCOL.md §5", requires=["auth"]),
        valid("doc-welcome-credential-ttl", welcome(10000, 30000, ttl=600000),
              {"type": "WELCOME", "flags": 4, "heartbeat_ms": 10000, "dead_after_ms": 30000,
               "credential_ttl_ms": 600000}, "PROTOCOL.md §5", requires=["auth"]),
        valid("doc-auth", auth(b"tok2"), {"type": "AUTH", "credential": hx(b"tok2")}, "PROTOCOL.md §5",
              requires=["auth"]),
        valid("doc-auth-ok", auth_ok(600000), {"type": "AUTH_OK", "credential_ttl_ms": 600000},
              "PROTOCOL.md §5", requires=["auth"]),
        valid("auth-ok", auth_ok(600000), {"type": "AUTH_OK", "credential_ttl_ms": 600000},
              requires=["auth"]),
        # Malformed.
        bad("oversize", u32(1048577), "oversize",
            "length 1048577 > max_frame_len: decided on the 4-byte prefix alone", max_frame_len=1048576),
        bad("oversize-max-u32", b"\xff\xff\xff\xff", "oversize", "never allocate 4 GiB",
            max_frame_len=1048576),
        bad("oversize-custom-max", u32(17), "oversize", "length 17 > max_frame_len 16",
            max_frame_len=16),
        bad("unknown-type-00", frame(0x00), "unknown-type", "type 0x00 with length 1 is not a heartbeat"),
        bad("unknown-type-09", frame(0x09, b"abc"), "unknown-type", "reserved core type"),
        bad("unknown-type-13", frame(0x13), "unknown-type", "reserved core type"),
        bad("unknown-type-7f", frame(0x7F), "unknown-type", "reserved core type"),
        bad("ping-short", frame(0x02, b"\x00" * 7), "malformed", "PING body must be 8 bytes"),
        bad("ping-long", frame(0x02, b"\x00" * 9), "malformed", "PING body must be 8 bytes"),
        bad("pong-empty", frame(0x03), "malformed", "PONG body must be 8 bytes"),
        bad("ack-short", frame(0x05, b"\x00" * 7), "malformed", "ACK body must be 8 bytes"),
        bad("ack-long", frame(0x05, b"\x00" * 9), "malformed", "ACK body must be 8 bytes"),
        bad("seq-data-short", frame(0x06, b"\x00" * 7), "malformed", "SEQ_DATA needs its 8-byte seq"),
        bad("close-no-code", frame(0x04), "malformed", "CLOSE needs its code"),
        bad("close-half-code", frame(0x04, b"\x00"), "malformed", "CLOSE needs its 2-byte code"),
        bad("close-bad-utf8", close(0, b"\xff\xfe"), "malformed", "text must be UTF-8"),
        bad("close-text-1025-bytes", close(0, "a" * 1025), "malformed", "text longer than 1024 bytes"),
        bad("refuse-bad-utf8", refuse(10, b"\xc3"), "malformed", "text must be UTF-8"),
        bad("hello-too-short", frame(0x10, b"\x00\x00\x00"), "malformed", "HELLO shorter than its fixed fields"),
        bad("hello-unknown-flag", hello("demo", flags=0x08), "malformed", "flag 0x08 is not defined"),
        bad("hello-empty-id", frame(0x10, b"\x00" + u32(0) + b"\x00"), "malformed", "id_len 0"),
        bad("hello-id-past-frame", frame(0x10, b"\x00" + u32(0) + b"\x05abc"), "malformed",
            "client id runs past the frame"),
        bad("hello-id-bad-utf8", frame(0x10, b"\x00" + u32(0) + b"\x02\xc3\x28"), "malformed",
            "client id is not UTF-8"),
        bad("hello-trailing-byte", frame(0x10, b"\x00" + u32(0) + b"\x01a" + b"\x00"), "malformed",
            "nothing may follow the client id without RESUME"),
        bad("hello-resume-short", frame(0x10, b"\x03" + u32(0) + b"\x01a" + b"\x00" * 31), "malformed",
            "resume block must be 32 bytes"),
        bad("hello-resume-long", frame(0x10, b"\x03" + u32(0) + b"\x01a" + b"\x00" * 33), "malformed",
            "resume block must be 32 bytes (trailing byte)"),
        bad("welcome-too-short", frame(0x11, b"\x00" + u32(1000) + b"\x00\x00\x03"), "malformed",
            "WELCOME shorter than its fixed fields"),
        bad("welcome-unknown-flag", welcome(1000, 3000, flags=0x08), "malformed", "flag 0x08 is not defined"),
        bad("welcome-zero-heartbeat", welcome(0, 3000), "malformed", "heartbeat_ms must be > 0"),
        bad("welcome-zero-dead-after", welcome(1000, 0), "malformed", "dead_after_ms must be > 0"),
        bad("welcome-resumed-without-session", welcome(1000, 3000, flags=0x02), "malformed",
            "RESUMED is only valid with SESSION"),
        bad("welcome-trailing-byte", frame(0x11, b"\x00" + u32(1000) + u32(3000) + b"\x00"),
            "malformed", "nothing may follow dead_after_ms without SESSION"),
        bad("welcome-session-short", frame(0x11, b"\x01" + u32(1000) + u32(3000) + b"\x00" * 35), "malformed",
            "session block must be 36 bytes"),
        bad("hello-credential-empty", frame(0x10, b"\x04" + u32(0) + b"\x01a" + u16(0)), "malformed",
            "cred_len 0", requires=["auth"]),
        bad("hello-credential-8193-bytes", hello("demo", credential=b"k" * 8193), "malformed",
            "cred_len > 8192", requires=["auth"]),
        bad("hello-credential-past-frame", frame(0x10, b"\x04" + u32(0) + b"\x01a" + u16(10) + b"abcde"),
            "malformed", "credential runs past the frame", requires=["auth"]),
        bad("hello-credential-trailing-byte", frame(0x10, b"\x04" + u32(0) + b"\x01a" + u16(1) + b"kk"),
            "malformed", "nothing may follow the credential", requires=["auth"]),
        bad("hello-credential-missing-length", frame(0x10, b"\x04" + u32(0) + b"\x01a"), "malformed",
            "flag CREDENTIAL without cred_len", requires=["auth"]),
        bad("welcome-ttl-missing", frame(0x11, b"\x04" + u32(1000) + u32(3000)), "malformed",
            "flag CREDENTIAL_TTL without its 4 bytes", requires=["auth"]),
        bad("welcome-ttl-short", frame(0x11, b"\x04" + u32(1000) + u32(3000) + b"\x00\x00"), "malformed",
            "credential_ttl_ms must be 4 bytes", requires=["auth"]),
        bad("auth-empty", frame(0x07), "malformed", "AUTH needs a credential of 1..8192 bytes",
            requires=["auth"]),
        bad("auth-8193-bytes", auth(b"k" * 8193), "malformed", "credential longer than 8192 bytes",
            requires=["auth"]),
        bad("auth-ok-short", frame(0x08, b"\x00\x00\x27"), "malformed", "AUTH_OK body must be 4 bytes",
            requires=["auth"]),
        bad("auth-ok-long", frame(0x08, b"\x00" * 5), "malformed", "AUTH_OK body must be 4 bytes",
            requires=["auth"]),
    ]
    return out


# --- exchanges.json -------------------------------------------------------------------------

CLIENT_DEFAULTS = {
    "client_id": "demo",
    "heartbeat_ms": 10000,
    "session": False,
    "handshake_timeout_ms": 10000,
    "max_frame_len": 1048576,
    "ack_every": 32,
    "ack_delay_ms": 20,
    "max_replay_messages": 4096,
    "max_replay_bytes": 4194304,
}

SERVER_DEFAULTS = {
    "handshake_timeout_ms": 10000,
    "max_frame_len": 1048576,
    "ack_every": 32,
    "ack_delay_ms": 20,
    "max_replay_messages": 4096,
    "max_replay_bytes": 4194304,
}


class X:
    """Builds one exchange."""

    def __init__(self, name, description, role="client", requires=None, **config):
        self.name = name
        self.description = description
        self.role = role
        self.requires = requires or []
        base = CLIENT_DEFAULTS if role == "client" else SERVER_DEFAULTS
        self.config = dict(base, **config)
        self.steps = []

    def send(self, t, b):
        self.steps.append({"at_ms": t, "send": hx(b)})
        return self

    def send_frames(self, t, frames_):
        self.steps.append({"at_ms": t, "send_frames": frames_})
        return self

    def nothing(self, t):
        return self.send(t, b"")

    def recv(self, t, b):
        self.steps.append({"at_ms": t, "recv": hx(b)})
        return self

    def eof(self, t):
        self.steps.append({"at_ms": t, "recv_eof": True})
        return self

    def reset(self, t):
        self.steps.append({"at_ms": t, "recv_reset": True})
        return self

    def event(self, t, ev):
        self.steps.append({"at_ms": t, "event": ev})
        return self

    def app(self, t, op, **kw):
        self.steps.append({"at_ms": t, "app": dict({"op": op}, **kw)})
        return self

    def app_send(self, t, payload, result="ok"):
        return self.app(t, "send", payload=hx(payload), result=result)

    def json(self):
        out = {
            "name": self.name,
            "role": self.role,
            "description": self.description,
            "config": self.config,
            "steps": self.steps,
        }
        if self.requires:
            out["requires"] = self.requires
        return out


def est(h=1000, d=3000, session=None, ttl=None):
    ev = {"type": "established", "heartbeat_ms": h, "dead_after_ms": d, "session": session}
    if ttl is not None:
        ev["credential_ttl_ms"] = ttl
    return ev


def closed(reason, retry=None, **kw):
    ev = {"type": "closed", "reason": reason}
    ev.update(kw)
    if retry is not None:
        ev["retry"] = retry
    return ev


def msg(p):
    return {"type": "message", "payload": hx(p)}


def lost(first=None, last=None):
    return {"type": "session-lost", "unacked": None if first is None else [s(first), s(last)]}


def hs(x, t=10, h=1000, d=3000, **kw):
    """The plain handshake: hello at 0, welcome at t."""
    x.send(0, PRE + hello(x.config["client_id"], x.config["heartbeat_ms"]))
    x.recv(t, PRE + welcome(h, d))
    x.event(t, est(h, d))
    return x


def hs_session(x, t=10, sid=SID, tok=TOK_A, h=1000, d=3000, linger=30000):
    x.send(0, PRE + hello(x.config["client_id"], x.config["heartbeat_ms"], session=True))
    x.recv(t, PRE + welcome(h, d, session=(sid, tok, 0, linger, False)))
    x.event(t, est(h, d, session=session_fields(sid, tok, 0, linger, False)))
    return x


REFUSALS = [
    (10, "server-full", "server is at its limit of 100000 connections", "backoff"),
    (11, "bad-hello", "invalid client id", "never"),
    (12, "unsupported-version", "unsupported protocol version 2", "never"),
    (13, "handshake-timeout", "no hello within the handshake deadline", "backoff"),
    (15, "refused", "not accepting", "backoff"),
    (16, "session-busy", "session still attached to the previous connection; retry", "backoff"),
    (17, "unauthorized", "credential expired", "never"),
    (18, "id-not-allowed", "the credential does not allow this id", "never"),
    (19, "throttled", "too many failed attempts", "backoff"),
    (1000, "application", "maintenance", "backoff"),
]

CLOSES = [
    (0, "normal", "bye", "peer-close", "backoff"),
    (1, "going-away", "server shutting down", "peer-close", "backoff"),
    (2, "protocol-error", "SEQ_DATA 3 but 2 was expected", "peer-close", "backoff"),
    (3, "heartbeat-timeout", "nothing received within dead_after", "peer-close", "backoff"),
    (4, "idle-timeout", "no application data for 60000 ms", "peer-close", "backoff"),
    (5, "replaced", "replaced by a newer connection with the same client id", "replaced", "never"),
    (6, "policy-violation", "9 heartbeats within 4000 ms", "peer-close", "backoff"),
    (7, "credential-expired", "credential expired", "peer-close", "backoff"),
    (8, "slow-consumer", "unsent bytes above the bound", "peer-close", "backoff"),
    (4000, "application", "kicked", "peer-close", "backoff"),
]


def exchanges():
    xs = []

    # Handshake.
    x = X("client-handshake", "preamble + HELLO at once; WELCOME establishes; the client answers nothing")
    hs(x).nothing(10)
    xs.append(x)

    x = X("client-handshake-split-reads",
          "the server's preamble and WELCOME arrive in pieces; any byte counts, the frame completes later")
    x.send(0, PRE + hello("demo"))
    w = PRE + welcome(1000, 3000)
    x.recv(10, w[:2]).recv(11, w[2:7]).recv(12, w[7:])
    x.event(12, est()).nothing(12)
    xs.append(x)

    x = X("client-hello-fields", "client id, requested heartbeat", client_id="jörg-📱", heartbeat_ms=0)
    x.send(0, PRE + hello("jörg-📱", hb=0))
    xs.append(x)

    x = X("client-handshake-timeout", "no answer within handshake_timeout: close, send nothing",
          handshake_timeout_ms=5000)
    x.send(0, PRE + hello("demo"))
    x.event(5000, closed("protocol-error", "backoff")).nothing(5000)
    xs.append(x)

    x = X("client-not-tether", "the server's first bytes are not TTHR: close without sending anything")
    x.send(0, PRE + hello("demo")).recv(5, b"HTTP/1.1 400 Bad Request\r\n")
    x.event(5, closed("protocol-error", "backoff")).nothing(5)
    xs.append(x)

    x = X("client-bad-server-version", "TTHR with version 2: close without sending anything")
    x.send(0, PRE + hello("demo")).recv(5, b"TTHR\x02")
    x.event(5, closed("protocol-error", "backoff")).nothing(5)
    xs.append(x)

    x = X("client-data-before-welcome", "anything but WELCOME or REFUSE first is a protocol error; no CLOSE before the handshake")
    x.send(0, PRE + hello("demo")).recv(5, PRE + data(b"x"))
    x.event(5, closed("protocol-error", "backoff")).nothing(5)
    xs.append(x)

    x = X("client-extension-before-welcome", "extension frames are skipped only after the handshake")
    x.send(0, PRE + hello("demo")).recv(5, PRE + ext(0x80) + welcome(1000, 3000))
    x.event(5, closed("protocol-error", "backoff")).nothing(5)
    xs.append(x)

    x = X("client-welcome-zero-heartbeat", "a malformed WELCOME is a protocol error")
    x.send(0, PRE + hello("demo")).recv(5, PRE + welcome(0, 3000))
    x.event(5, closed("protocol-error", "backoff")).nothing(5)
    xs.append(x)

    # Refusals.
    for code, name, text, retry in REFUSALS:
        x = X(f"client-refused-{name}", f"REFUSE({code}): the connection ends; reconnect decision: {retry}")
        x.send(0, PRE + hello("demo")).recv(5, PRE + refuse(code, text))
        x.event(5, closed("refused", retry, code=code, text=text)).nothing(5)
        xs.append(x)

    # Heartbeats and dead peers.
    x = X("client-heartbeat-at-h",
          "a heartbeat exactly h after the last frame sent; data postpones it; the clocks start at WELCOME")
    hs(x)
    x.send(1010, HB).recv(1015, HB).send(2010, HB)
    x.app_send(2500, b"x").send(2500, data(b"x"))
    x.recv(2600, HB).send(3500, HB).recv(3600, HB).send(4500, HB)
    xs.append(x)

    x = X("client-heartbeat-coalesced",
          "optional: when the peer's heartbeat arrives and ours is due within h/2, send ours at once",
          requires=["coalesce"])
    hs(x)
    x.recv(700, HB).send(700, HB)
    x.recv(1300, HB).send(1300, HB)
    x.send(2300, HB)
    xs.append(x)

    x = X("client-dead-at-d",
          "nothing received for d: dead exactly at last_rx + d; CLOSE(HEARTBEAT_TIMEOUT) goes out")
    hs(x)
    x.recv(500, HB)
    x.send(1010, HB).send(2010, HB).send(3010, HB)
    x.event(3500, closed("heartbeat-timeout", "backoff", silent_for_ms=3000))
    x.send_frames(3500, [{"type": "CLOSE", "code": 3}])
    xs.append(x)

    x = X("client-any-byte-counts", "part of a frame is a received byte: it postpones the dead timer")
    hs(x)
    x.send(1010, HB).recv(2000, b"\x00\x00\x00").send(2010, HB).send(3010, HB).send(4010, HB)
    x.event(5000, closed("heartbeat-timeout", "backoff", silent_for_ms=3000))
    x.send_frames(5000, [{"type": "CLOSE", "code": 3}])
    xs.append(x)

    x = X("client-ping-pong", "PING is answered with PONG at once; the PONG counts as sending")
    hs(x)
    x.recv(100, ping(SID)).send(100, pong(SID))
    x.send(1100, HB)
    xs.append(x)

    x = X("client-unknown-pong-ignored", "a PONG that answers nothing is ignored")
    hs(x)
    x.recv(100, pong(5)).nothing(100).send(1010, HB)
    xs.append(x)

    x = X("client-extension-skipped", "after the handshake an unknown extension frame is skipped whole")
    hs(x)
    x.recv(100, ext(0x80, b"abc") + ext(0xFF) + data(b"x"))
    x.event(100, msg(b"x")).nothing(100)
    xs.append(x)

    # Closing.
    for code, name, text, reason, retry in CLOSES:
        x = X(f"client-peer-close-{name}",
              f"CLOSE({code}) from the server: reason {reason}; bytes after CLOSE are ignored; reconnect: {retry}")
        hs(x)
        x.recv(100, close(code, text) + data(b"late"))
        ev = closed(reason, retry) if reason == "replaced" else closed(reason, retry, code=code, text=text)
        x.event(100, ev).nothing(100)
        xs.append(x)

    x = X("client-local-close", "the application closes: CLOSE(code, text) goes out")
    hs(x)
    x.app(100, "close", code=0, text="bye").send(100, close(0, "bye"))
    x.event(100, closed("local-close", "never"))
    x.app_send(101, b"x", result="closed")
    xs.append(x)

    x = X("client-close-flushes-ack",
          "optional: an orderly close first sends the ACK owed, so the server does not report its last "
          "messages as possibly lost", session=True, requires=["ack-on-close"])
    hs_session(x)
    x.recv(100, seq_data(1, b"a")).event(100, msg(b"a"))
    x.app(105, "close", code=0, text="bye").send(105, ack(1) + close(0, "bye"))
    x.event(105, closed("local-close", "never"))
    xs.append(x)

    x = X("client-eof", "FIN without CLOSE: peer-closed")
    hs(x).eof(100).event(100, closed("peer-closed", "backoff")).nothing(100)
    xs.append(x)

    x = X("client-reset", "RST: peer-reset")
    hs(x).reset(100).event(100, closed("peer-reset", "backoff")).nothing(100)
    xs.append(x)

    x = X("client-eof-during-handshake", "FIN before WELCOME: peer-closed")
    x.send(0, PRE + hello("demo")).eof(5).event(5, closed("peer-closed", "backoff")).nothing(5)
    xs.append(x)

    # Protocol errors after the handshake: CLOSE(PROTOCOL_ERROR) goes out.
    def perr(name, description, payload, session=False, before=None):
        x = X(f"client-protocol-error-{name}", description, session=session)
        (hs_session if session else hs)(x)
        if before:
            before(x)
        x.recv(200, payload)
        x.event(200, closed("protocol-error", "backoff"))
        x.send_frames(200, [{"type": "CLOSE", "code": 2}])
        xs.append(x)

    perr("unknown-type", "a reserved core type after the handshake", frame(0x09, b"abc"))
    perr("oversize", "length above max_frame_len: decided on the 4-byte prefix alone", u32(1048577))
    perr("malformed-ping", "PING with a 7-byte body", frame(0x02, b"\x00" * 7))
    perr("bad-utf8-close", "CLOSE with invalid UTF-8 text", close(0, b"\xff"))
    perr("welcome-again", "WELCOME after the handshake", welcome(1000, 3000))
    perr("hello-from-server", "HELLO sent to a client", hello("x"))
    perr("seq-data-without-session", "SEQ_DATA without a negotiated session", seq_data(1, b"x"))
    perr("ack-without-session", "ACK without a negotiated session", ack(1))
    perr("data-on-session", "DATA on a session connection (SEQ_DATA expected)", data(b"x"), session=True)
    perr("seq-gap", "SEQ_DATA 2 when 1 was expected", seq_data(2, b"x"), session=True)
    perr("ack-beyond-sent", "ACK of a sequence number never sent", ack(2), session=True,
         before=lambda x: x.app_send(100, b"m1").send(100, seq_data(1, b"m1")))

    # Sending.
    x = X("client-send-before-welcome", "the handshake must complete before a message can be sent")
    x.send(0, PRE + hello("demo")).app_send(1, b"x", result="not-established").nothing(1)
    xs.append(x)

    x = X("client-message-too-long", "a message must fit max_frame_len - 1 bytes (DATA)", max_frame_len=16)
    hs(x)
    x.app_send(100, b"x" * 16, result="too-long").nothing(100)
    x.app_send(101, b"x" * 15).send(101, data(b"x" * 15))
    xs.append(x)

    # Sessions.
    x = X("client-session-new", "a session: SEQ_DATA numbered from 1, delayed and piggybacked ACKs, duplicates dropped",
          session=True)
    hs_session(x)
    x.app_send(100, b"hi").send(100, seq_data(1, b"hi"))
    x.recv(150, ack(1))
    x.recv(200, seq_data(1, b"yo")).event(200, msg(b"yo")).nothing(200)
    x.send(220, ack(1))
    x.recv(300, seq_data(2, b"a")).event(300, msg(b"a"))
    x.app_send(310, b"b").send(310, seq_data(2, b"b") + ack(2))
    x.recv(400, seq_data(2, b"a")).nothing(400)
    x.recv(500, ack(2)).nothing(500)
    xs.append(x)

    x = X("client-ack-every", "ack_every messages force an ACK at once; the rest wait ack_delay", session=True)
    hs_session(x)
    many = b"".join(seq_data(i, b"m%d" % i) for i in range(1, 41))
    x.recv(100, many)
    for i in range(1, 41):
        x.event(100, msg(b"m%d" % i))
    x.send(100, ack(32)).send(120, ack(40))
    xs.append(x)

    x = X("client-old-ack-ignored", "an ACK at or below what was already acknowledged is ignored", session=True)
    hs_session(x)
    x.app_send(100, b"a").app_send(101, b"b")
    x.send(101, seq_data(1, b"a") + seq_data(2, b"b"))
    x.recv(150, ack(2)).recv(160, ack(1)).nothing(160)
    xs.append(x)

    x = X("client-session-not-granted", "a server without sessions: WELCOME without the block, plain DATA",
          session=True)
    x.send(0, PRE + hello("demo", session=True)).recv(10, PRE + welcome(1000, 3000))
    x.event(10, est()).app_send(100, b"x").send(100, data(b"x"))
    xs.append(x)

    x = X("client-replay-full", "a full replay buffer refuses new messages (the application waits) until an ACK",
          session=True, max_replay_messages=2)
    hs_session(x)
    x.app_send(100, b"a").app_send(100, b"b").app_send(100, b"c", result="full")
    x.send(100, seq_data(1, b"a") + seq_data(2, b"b"))
    x.recv(150, ack(1)).app_send(150, b"c").send(150, seq_data(3, b"c"))
    xs.append(x)

    x = X("client-replay-bytes", "the byte bound; an empty buffer always takes one message",
          session=True, max_replay_bytes=10)
    hs_session(x)
    x.app_send(100, b"x" * 16).app_send(100, b"y", result="full")
    x.send(100, seq_data(1, b"x" * 16))
    x.recv(150, ack(1)).app_send(150, b"y" * 6).app_send(150, b"z" * 4).app_send(150, b"w", result="full")
    x.send(150, seq_data(2, b"y" * 6) + seq_data(3, b"z" * 4))
    xs.append(x)

    def first_connection(x, sent=(b"m1", b"m2", b"m3"), acked=1, got=(b"s1", b"s2"), tok=TOK_A):
        hs_session(x, tok=tok)
        t = 100
        for i, m in enumerate(sent, 1):
            x.app_send(t, m).send(t, seq_data(i, m))
            t += 1
        if acked:
            x.recv(150, ack(acked))
        if got:
            x.recv(200, b"".join(seq_data(i, m) for i, m in enumerate(got, 1)))
            for m in got:
                x.event(200, msg(m))
            x.send(220, ack(len(got)))
        x.reset(300).event(300, closed("peer-reset", "backoff"))
        x.app(400, "reconnect")
        return x

    x = X("client-resume-replay",
          "resume: HELLO carries the last received seq; WELCOME, the server's ACK and its replay arrive in one read; "
          "the client ACKs, then replays what the server lacks; both dedup",
          session=True)
    first_connection(x)
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 2)))
    x.recv(450, PRE + welcome(1000, 3000, session=(SID, TOK_A, 2, 30000, True)) + ack(2)
           + seq_data(2, b"s2") + seq_data(3, b"s3"))
    x.event(450, est(session=session_fields(SID, TOK_A, 2, 30000, True)))
    x.event(450, {"type": "resumed", "replayed": 1})
    x.event(450, msg(b"s3"))
    x.send(450, ack(2) + seq_data(3, b"m3"))
    x.send(470, ack(3))
    x.app_send(500, b"m4").send(500, seq_data(4, b"m4"))
    xs.append(x)

    x = X("client-resume-beyond-sent",
          "a WELCOME claiming more than the client sent is a protocol error", session=True)
    first_connection(x, sent=(b"m1",), acked=0, got=())
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 0)))
    x.recv(450, PRE + welcome(1000, 3000, session=(SID, TOK_A, 5, 30000, True)))
    x.event(450, est(session=session_fields(SID, TOK_A, 5, 30000, True)))
    x.event(450, closed("protocol-error", "backoff"))
    x.send_frames(450, [{"type": "CLOSE", "code": 2}])
    xs.append(x)

    x = X("client-session-expired",
          "the session expired on the server (linger over, restart): REFUSE(SESSION_UNKNOWN) reports the "
          "unacknowledged range, and the next connection starts a new session at once",
          session=True)
    first_connection(x)
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 2)))
    x.recv(450, PRE + refuse(14, "unknown or expired session"))
    x.event(450, lost(2, 3))
    x.event(450, closed("refused", "now", code=14))
    x.app(450, "reconnect").send(450, PRE + hello("demo", session=True))
    x.recv(460, PRE + welcome(1000, 3000, session=(SID2, TOK_C, 0, 30000, False)))
    x.event(460, est(session=session_fields(SID2, TOK_C, 0, 30000, False)))
    x.app_send(500, b"n1").send(500, seq_data(1, b"n1"))
    xs.append(x)

    x = X("client-session-expired-nothing-outstanding",
          "SESSION_UNKNOWN with every message acknowledged: session-lost with no range", session=True)
    first_connection(x, sent=(b"m1",), acked=1, got=())
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 0)))
    x.recv(450, PRE + refuse(14, "unknown or expired session"))
    x.event(450, lost())
    x.event(450, closed("refused", "now", code=14))
    xs.append(x)

    x = X("client-session-busy",
          "REFUSE(SESSION_BUSY): the session is not lost; retry after a backoff delay with the same resume",
          session=True)
    first_connection(x)
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 2)))
    x.recv(450, PRE + refuse(16, "session still attached to the previous connection; retry"))
    x.event(450, closed("refused", "backoff", code=16))
    x.app(600, "reconnect").send(600, PRE + hello("demo", resume=(SID, TOK_A, 2)))
    xs.append(x)

    x = X("client-resume-answered-with-new-session",
          "the server granted a new session instead of resuming: the old one is lost, numbering restarts",
          session=True)
    first_connection(x)
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 2)))
    x.recv(450, PRE + welcome(1000, 3000, session=(SID2, TOK_C, 0, 30000, False)))
    x.event(450, est(session=session_fields(SID2, TOK_C, 0, 30000, False)))
    x.event(450, lost(2, 3))
    x.app_send(500, b"n1").send(500, seq_data(1, b"n1"))
    xs.append(x)

    x = X("client-token-rotation",
          "a WELCOME with RESUMED carries a new token; the next resume must present the newest one",
          session=True, requires=["token-rotation"])
    first_connection(x, sent=(b"m1",), acked=1, got=())
    x.send(400, PRE + hello("demo", resume=(SID, TOK_A, 0)))
    x.recv(450, PRE + welcome(1000, 3000, session=(SID, TOK_B, 1, 30000, True)))
    x.event(450, est(session=session_fields(SID, TOK_B, 1, 30000, True)))
    x.event(450, {"type": "resumed", "replayed": 0})
    x.reset(500).event(500, closed("peer-reset", "backoff"))
    x.app(600, "reconnect").send(600, PRE + hello("demo", resume=(SID, TOK_B, 0)))
    xs.append(x)

    # Credentials (protocol additions).
    x = X("client-credential-refresh",
          "HELLO with a credential; WELCOME with its ttl; AUTH at 90 % of the ttl; AUTH_OK restarts the clock",
          requires=["auth"], credential=hx(JWT))
    x.send(0, PRE + hello("demo", credential=JWT))
    x.recv(10, PRE + welcome(10000, 30000, ttl=10000))
    x.event(10, est(10000, 30000, ttl=10000))
    x.event(9010, {"type": "auth-due"})
    x.app(9010, "auth", credential=hx(b"cred-2")).send(9010, auth(b"cred-2"))
    x.recv(9050, auth_ok(10000)).event(9050, {"type": "auth-ok", "credential_ttl_ms": 10000})
    x.event(18050, {"type": "auth-due"})
    x.app(18050, "auth", credential=hx(b"cred-3")).send(18050, auth(b"cred-3"))
    x.recv(18100, close(7, "credential expired"))
    x.event(18100, closed("peer-close", "backoff", code=7))
    xs.append(x)

    x = X("client-credential-no-expiry", "ttl 0: the credential does not expire, no refresh",
          requires=["auth"], credential=hx(JWT))
    x.send(0, PRE + hello("demo", credential=JWT))
    x.recv(10, PRE + welcome(10000, 30000, ttl=0))
    x.event(10, est(10000, 30000, ttl=0))
    x.recv(5000, HB).send(10010, HB).recv(15000, HB).send(20010, HB)
    xs.append(x)

    x = X("client-credential-with-resume", "HELLO flags 0x07: client id, resume block, credential",
          requires=["auth"], credential=hx(JWT), session=True)
    x.send(0, PRE + hello("demo", session=True, credential=JWT))
    x.recv(10, PRE + welcome(1000, 3000, session=(SID, TOK_A, 0, 30000, False), ttl=600000))
    x.event(10, est(session=session_fields(SID, TOK_A, 0, 30000, False), ttl=600000))
    x.reset(100).event(100, closed("peer-reset", "backoff"))
    x.app(200, "reconnect").send(200, PRE + hello("demo", resume=(SID, TOK_A, 0), credential=JWT))
    xs.append(x)

    x = X("client-auth-ok-unexpected", "AUTH_OK with no AUTH outstanding is a protocol error",
          requires=["auth"], credential=hx(JWT))
    x.send(0, PRE + hello("demo", credential=JWT))
    x.recv(10, PRE + welcome(1000, 3000, ttl=600000)).event(10, est(ttl=600000))
    x.recv(100, auth_ok(600000)).event(100, closed("protocol-error", "backoff"))
    x.send_frames(100, [{"type": "CLOSE", "code": 2}])
    xs.append(x)

    x = X("client-ttl-without-credential", "CREDENTIAL_TTL in answer to a HELLO without CREDENTIAL is a protocol error",
          requires=["auth"])
    x.send(0, PRE + hello("demo")).recv(10, PRE + welcome(1000, 3000, ttl=600000))
    x.event(10, closed("protocol-error", "backoff")).nothing(10)
    xs.append(x)

    # Server role (the reference server's state machine; clients skip these).
    def srv(name, description, **kw):
        return X(name, description, role="server", **kw)

    x = srv("server-accept", "HELLO, the application accepts, preamble + WELCOME")
    x.recv(0, PRE + hello("demo"))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": False, "resume": None})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000).send(0, PRE + welcome(1000, 3000))
    x.event(0, est())
    x.send(1000, HB)
    xs.append(x)

    x = srv("server-bad-magic", "not tether: close without sending anything")
    x.recv(0, b"GET / HTTP/1.1\r\n").event(0, closed("protocol-error")).nothing(0)
    xs.append(x)

    x = srv("server-unsupported-version", "TTHR version 2: preamble (version 1) + REFUSE(UNSUPPORTED_VERSION)")
    x.recv(0, b"TTHR\x02").event(0, closed("refused", code=12))
    x.send_frames(0, [{"type": "PREAMBLE", "version": 1}, {"type": "REFUSE", "code": 12}])
    xs.append(x)

    x = srv("server-malformed-hello", "a malformed HELLO is a protocol error: close without a word (not BAD_HELLO)")
    x.recv(0, PRE + frame(0x10, b"\x00" + u32(0) + b"\x00")).event(0, closed("protocol-error")).nothing(0)
    xs.append(x)

    x = srv("server-heartbeat-before-hello", "a heartbeat before HELLO is a protocol error")
    x.recv(0, PRE + HB).event(0, closed("protocol-error")).nothing(0)
    xs.append(x)

    x = srv("server-extension-before-hello", "an extension frame before HELLO is a protocol error")
    x.recv(0, PRE + ext(0x80) + hello("demo")).event(0, closed("protocol-error")).nothing(0)
    xs.append(x)

    x = srv("server-frame-before-welcome", "frames after HELLO and before the answer are a protocol error")
    x.recv(0, PRE + hello("demo") + data(b"x"))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": False, "resume": None})
    x.event(0, closed("protocol-error")).nothing(0)
    xs.append(x)

    x = srv("server-handshake-timeout", "no HELLO within the handshake timeout: preamble + REFUSE(HANDSHAKE_TIMEOUT)",
            handshake_timeout_ms=2000)
    x.recv(0, PRE).event(2000, closed("protocol-error"))
    x.send_frames(2000, [{"type": "PREAMBLE", "version": 1}, {"type": "REFUSE", "code": 13}])
    xs.append(x)

    x = srv("server-heartbeats-one-read-count-once",
            "heartbeats that arrive together count once towards the flood rule")
    x.recv(0, PRE + hello("demo"))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": False, "resume": None})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000, enforce_heartbeat=True)
    x.send(0, PRE + welcome(1000, 3000)).event(0, est())
    x.recv(20, HB * 20)
    for t in range(40, 180, 20):
        x.recv(t, HB)
    x.nothing(160)
    xs.append(x)

    x = srv("server-flood",
            "more than 8 heartbeats within 4h: CLOSE(POLICY_VIOLATION), reported as policy-violation",
            requires=["policy-violation"])
    x.recv(0, PRE + hello("demo"))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": False, "resume": None})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000, enforce_heartbeat=True)
    x.send(0, PRE + welcome(1000, 3000)).event(0, est())
    for t in range(20, 180, 20):
        x.recv(t, HB)
    x.recv(180, HB).event(180, closed("policy-violation"))
    x.send_frames(180, [{"type": "CLOSE", "code": 6}])
    xs.append(x)

    x = srv("server-answers-heartbeats",
            "optional (PROTOCOL.md §7 rule 1): the server answers a client heartbeat at once when "
            "it sent nothing for h/2; its own heartbeat is a fallback h + h/8 after its last send; "
            "dead still exactly d after the last byte",
            requires=["answer"])
    x.recv(0, PRE + hello("demo"))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": False, "resume": None})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000, enforce_heartbeat=True,
          answer_heartbeats=True)
    x.send(0, PRE + welcome(1000, 3000)).event(0, est())
    x.recv(1000, HB).send(1000, HB)
    x.recv(2010, HB).send(2010, HB)
    # Less than h/2 after the server's last send: not answered (and not a flood).
    x.recv(2300, HB).nothing(2300)
    x.nothing(3134).send(3135, HB)
    x.send(4260, HB)
    x.event(5300, closed("heartbeat-timeout"))
    x.send_frames(5300, [{"type": "CLOSE", "code": 3}])
    xs.append(x)

    held = {"session_id": s(SID), "token": hx(TOK_A), "linger_ms": 30000,
            "sent": [hx(b"s1"), hx(b"s2"), hx(b"s3")], "acked": 0, "received": 2}

    x = srv("server-resume-replay",
            "resume: WELCOME with the server's last_received, then its ACK, then the replay of seq > R_c")
    x.recv(0, PRE + hello("demo", resume=(SID, TOK_A, 1)))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": True,
                "resume": session_fields(SID, TOK_A, 1)})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000, resume=held)
    x.send(0, PRE + welcome(1000, 3000, session=(SID, TOK_A, 2, 30000, True)) + ack(2)
           + seq_data(2, b"s2") + seq_data(3, b"s3"))
    x.event(0, est(session=session_fields(SID, TOK_A, 2, 30000, True)))
    x.event(0, {"type": "resumed", "replayed": 2})
    xs.append(x)

    x = srv("server-resume-beyond-sent",
            "a RESUME claiming more than was sent: WELCOME, then CLOSE(PROTOCOL_ERROR); the held session is not changed")
    x.recv(0, PRE + hello("demo", resume=(SID, TOK_A, 5)))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": True,
                "resume": session_fields(SID, TOK_A, 5)})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000, resume=held)
    x.event(0, est(session=session_fields(SID, TOK_A, 2, 30000, True)))
    x.event(0, closed("protocol-error"))
    x.send_frames(0, [{"type": "PREAMBLE", "version": 1}, {"type": "WELCOME", "flags": 3},
                      {"type": "CLOSE", "code": 2}])
    xs.append(x)

    x = srv("server-new-session", "HELLO with SESSION: WELCOME with the session block; SEQ_DATA and ACK")
    x.recv(0, PRE + hello("demo", session=True))
    x.event(0, {"type": "hello", "client_id": "demo", "want_session": True, "resume": None})
    x.app(0, "accept", heartbeat_ms=1000, dead_after_ms=3000,
          session={"session_id": s(SID), "token": hx(TOK_A), "linger_ms": 30000})
    x.send(0, PRE + welcome(1000, 3000, session=(SID, TOK_A, 0, 30000, False)))
    x.event(0, est(session=session_fields(SID, TOK_A, 0, 30000, False)))
    x.recv(100, seq_data(1, b"hi")).event(100, msg(b"hi")).send(120, ack(1))
    xs.append(x)

    return [x.json() for x in xs]


# --- output ---------------------------------------------------------------------------------

def documents():
    fr = {
        "format": "tether-conformance-frames",
        "version": 1,
        "spec": "docs/PROTOCOL.md",
        "notes": [
            "hex: the complete frame, 4-byte length prefix included (no preamble).",
            "u64 fields (seq, nonce, session_id, last_received) are decimal strings; other integers are numbers.",
            "payload, body, token and credential are hex; text and client_id are strings.",
            "error: oversize | unknown-type | malformed. Each is a protocol error for the receiver.",
            "max_frame_len: the receiver's limit for this vector (default 1048576).",
            "requires: features a runner must implement to run the vector; others skip it visibly.",
        ],
        "frames": frames(),
    }
    ex = {
        "format": "tether-conformance-exchanges",
        "version": 1,
        "spec": "docs/PROTOCOL.md",
        "notes": ["See conformance/README.md for the step semantics and how a runner drives them."],
        "exchanges": exchanges(),
    }
    return {"frames.json": fr, "exchanges.json": ex}


def render(doc):
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    stale = []
    for name, doc in documents().items():
        path = os.path.join(HERE, name)
        text = render(doc)
        if check:
            try:
                with open(path, encoding="utf-8") as f:
                    if f.read() != text:
                        stale.append(name)
            except FileNotFoundError:
                stale.append(name)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
    if stale:
        print("stale: " + ", ".join(stale) + " (run python3 conformance/generate.py)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
