"""Wire protocol v1 (docs/PROTOCOL.md): preamble, frames, and an incremental decoder that
checks every length before it buffers anything.

    stream   = preamble *frame
    preamble = "TTHR" version:u8                 (5 bytes, each side sends one)
    frame    = length:u32be body:length bytes     (length 0 = HEARTBEAT, no body)
    body     = type:u8 fields...

Frames are small classes with ``__slots__``; ``encode(frame)`` returns bytes and
``Decoder.feed(data)`` yields every complete frame.
"""

import struct
import unicodedata

MAGIC = b"TTHR"
VERSION = 1
PREAMBLE = MAGIC + bytes([VERSION])
DEFAULT_MAX_FRAME_LEN = 1 << 20
MAX_CLIENT_ID_LEN = 255
MAX_TEXT_LEN = 1024
MAX_CREDENTIAL_LEN = 8192
TOKEN_LEN = 16

# Frame types (PROTOCOL.md §5).
DATA = 0x01
PING = 0x02
PONG = 0x03
CLOSE = 0x04
ACK = 0x05
SEQ_DATA = 0x06
AUTH = 0x07
AUTH_OK = 0x08
HELLO = 0x10
WELCOME = 0x11
REFUSE = 0x12
PROBE = 0x20
EXTENSION_MIN = 0x80

HELLO_SESSION = 0x01
HELLO_RESUME = 0x02
HELLO_CREDENTIAL = 0x04
WELCOME_SESSION = 0x01
WELCOME_RESUMED = 0x02
WELCOME_CREDENTIAL_TTL = 0x04

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_HEADER = _U32
_HB = b"\x00\x00\x00\x00"


class CloseCode:
    """Close and refusal codes (PROTOCOL.md §9). 1000 and above belong to applications."""

    NORMAL = 0
    GOING_AWAY = 1
    PROTOCOL_ERROR = 2
    HEARTBEAT_TIMEOUT = 3
    IDLE_TIMEOUT = 4
    REPLACED = 5
    POLICY_VIOLATION = 6
    CREDENTIAL_EXPIRED = 7
    SLOW_CONSUMER = 8
    SERVER_FULL = 10
    BAD_HELLO = 11
    UNSUPPORTED_VERSION = 12
    HANDSHAKE_TIMEOUT = 13
    SESSION_UNKNOWN = 14
    REFUSED = 15
    SESSION_BUSY = 16
    UNAUTHORIZED = 17
    ID_NOT_ALLOWED = 18
    THROTTLED = 19

    _NAMES = {
        0: "normal", 1: "going-away", 2: "protocol-error", 3: "heartbeat-timeout",
        4: "idle-timeout", 5: "replaced", 6: "policy-violation", 7: "credential-expired",
        8: "slow-consumer", 10: "server-full", 11: "bad-hello", 12: "unsupported-version",
        13: "handshake-timeout", 14: "session-unknown", 15: "refused", 16: "session-busy",
        17: "unauthorized", 18: "id-not-allowed", 19: "throttled",
    }

    @staticmethod
    def name(code):
        """``"normal"``, ``"session-busy"``, ``"application"`` (1000+) or ``"unknown"``."""
        if code >= 1000:
            return "application"
        return CloseCode._NAMES.get(code, "unknown")


class ProtocolError(Exception):
    """Bytes that break the protocol. ``kind`` is ``oversize``, ``unknown-type`` or
    ``malformed`` (the conformance vectors' classes); every kind closes the connection."""

    def __init__(self, kind, why):
        super().__init__(why)
        self.kind = kind
        self.why = why


def _malformed(frame, why):
    return ProtocolError("malformed", "malformed %s frame: %s" % (frame, why))


# --- frames ---------------------------------------------------------------------------------


class Heartbeat:
    __slots__ = ()

    def __eq__(self, other):
        return isinstance(other, Heartbeat)

    def __repr__(self):
        return "Heartbeat()"


HEARTBEAT = Heartbeat()


class _Frame:
    __slots__ = ()

    def __eq__(self, other):
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (k, getattr(self, k)) for k in self.__slots__))


class Data(_Frame):
    __slots__ = ("payload",)

    def __init__(self, payload):
        self.payload = payload


class SeqData(_Frame):
    __slots__ = ("seq", "payload")

    def __init__(self, seq, payload):
        self.seq = seq
        self.payload = payload


class Ping(_Frame):
    __slots__ = ("nonce",)

    def __init__(self, nonce):
        self.nonce = nonce


class Pong(_Frame):
    __slots__ = ("nonce",)

    def __init__(self, nonce):
        self.nonce = nonce


class Ack(_Frame):
    __slots__ = ("seq",)

    def __init__(self, seq):
        self.seq = seq


class Close(_Frame):
    __slots__ = ("code", "text")

    def __init__(self, code, text=""):
        self.code = code
        self.text = text


class Refuse(_Frame):
    __slots__ = ("code", "text")

    def __init__(self, code, text=""):
        self.code = code
        self.text = text


class Resume(_Frame):
    """The resume block of a HELLO."""

    __slots__ = ("session_id", "token", "last_received")

    def __init__(self, session_id, token, last_received):
        self.session_id = session_id
        self.token = token
        self.last_received = last_received


class Hello(_Frame):
    __slots__ = ("client_id", "heartbeat_ms", "want_session", "resume", "credential", "flags")

    def __init__(self, client_id, heartbeat_ms=0, want_session=False, resume=None,
                 credential=None, flags=None):
        self.client_id = client_id
        self.heartbeat_ms = heartbeat_ms
        self.want_session = want_session or resume is not None
        self.resume = resume
        self.credential = credential
        if flags is None:
            flags = 0
            if self.want_session:
                flags |= HELLO_SESSION
            if resume is not None:
                flags |= HELLO_RESUME
            if credential is not None:
                flags |= HELLO_CREDENTIAL
        self.flags = flags


class SessionGrant(_Frame):
    """The session block of a WELCOME."""

    __slots__ = ("session_id", "token", "last_received", "linger_ms", "resumed")

    def __init__(self, session_id, token, last_received, linger_ms, resumed):
        self.session_id = session_id
        self.token = token
        self.last_received = last_received
        self.linger_ms = linger_ms
        self.resumed = resumed


class Welcome(_Frame):
    __slots__ = ("heartbeat_ms", "dead_after_ms", "session", "credential_ttl_ms", "flags")

    def __init__(self, heartbeat_ms, dead_after_ms, session=None, credential_ttl_ms=None, flags=None):
        self.heartbeat_ms = heartbeat_ms
        self.dead_after_ms = dead_after_ms
        self.session = session
        self.credential_ttl_ms = credential_ttl_ms
        if flags is None:
            flags = 0
            if session is not None:
                flags |= WELCOME_SESSION
                if session.resumed:
                    flags |= WELCOME_RESUMED
            if credential_ttl_ms is not None:
                flags |= WELCOME_CREDENTIAL_TTL
        self.flags = flags


class Probe(_Frame):
    __slots__ = ("body",)

    def __init__(self, body):
        self.body = body


class Extension(_Frame):
    __slots__ = ("ext_type",)

    def __init__(self, ext_type):
        self.ext_type = ext_type


class Auth(_Frame):
    __slots__ = ("credential",)

    def __init__(self, credential):
        self.credential = credential


class AuthOk(_Frame):
    __slots__ = ("credential_ttl_ms",)

    def __init__(self, credential_ttl_ms):
        self.credential_ttl_ms = credential_ttl_ms


def frame_name(f):
    return {Heartbeat: "HEARTBEAT", Data: "DATA", SeqData: "SEQ_DATA", Ping: "PING", Pong: "PONG",
            Ack: "ACK", Close: "CLOSE", Refuse: "REFUSE", Hello: "HELLO", Welcome: "WELCOME",
            Probe: "PROBE", Extension: "EXTENSION", Auth: "AUTH", AuthOk: "AUTH_OK"}[type(f)]


# --- client ids -----------------------------------------------------------------------------


def client_id_problem(client_id):
    """Why ``client_id`` is not acceptable (PROTOCOL.md §6.1), or None: 1-255 bytes of UTF-8
    without control characters (Cc), format characters (Cf) or line/paragraph separators."""
    if not isinstance(client_id, str):
        return "must be a str"
    n = len(client_id.encode("utf-8", "surrogatepass"))
    if n == 0 or n > MAX_CLIENT_ID_LEN:
        return "must be 1-255 bytes of UTF-8 (is %d)" % n
    for ch in client_id:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            return "contains U+%04X (%s)" % (ord(ch), cat)
    return None


# --- encoding -------------------------------------------------------------------------------


def _truncate_text(text):
    b = text.encode("utf-8")
    if len(b) <= MAX_TEXT_LEN:
        return b
    return b[:MAX_TEXT_LEN].decode("utf-8", "ignore").encode("utf-8")


def _framed(t, body):
    return _HEADER.pack(1 + len(body)) + bytes((t,)) + body


def encode_data(payload):
    return _HEADER.pack(1 + len(payload)) + b"\x01" + payload


def encode_seq_data(seq, payload):
    return _HEADER.pack(9 + len(payload)) + b"\x06" + _U64.pack(seq) + payload


def encode_ack(seq):
    return b"\x00\x00\x00\x09\x05" + _U64.pack(seq)


def encode(f):
    """The frame's bytes, length prefix included. CLOSE/REFUSE text is truncated at 1024
    bytes on a character boundary."""
    t = type(f)
    if t is Heartbeat:
        return _HB
    if t is Data:
        return encode_data(f.payload)
    if t is SeqData:
        return encode_seq_data(f.seq, f.payload)
    if t is Ack:
        return encode_ack(f.seq)
    if t is Ping:
        return _framed(PING, _U64.pack(f.nonce))
    if t is Pong:
        return _framed(PONG, _U64.pack(f.nonce))
    if t is Close:
        return _framed(CLOSE, _U16.pack(f.code) + _truncate_text(f.text))
    if t is Refuse:
        return _framed(REFUSE, _U16.pack(f.code) + _truncate_text(f.text))
    if t is Hello:
        idb = f.client_id.encode("utf-8")
        body = bytes((f.flags,)) + _U32.pack(f.heartbeat_ms) + bytes((len(idb),)) + idb
        if f.resume is not None:
            r = f.resume
            body += _U64.pack(r.session_id) + r.token + _U64.pack(r.last_received)
        if f.credential is not None:
            body += _U16.pack(len(f.credential)) + f.credential
        return _framed(HELLO, body)
    if t is Welcome:
        body = bytes((f.flags,)) + _U32.pack(f.heartbeat_ms) + _U32.pack(f.dead_after_ms)
        if f.session is not None:
            s = f.session
            body += _U64.pack(s.session_id) + s.token + _U64.pack(s.last_received) + _U32.pack(s.linger_ms)
        if f.credential_ttl_ms is not None:
            body += _U32.pack(f.credential_ttl_ms)
        return _framed(WELCOME, body)
    if t is Probe:
        return _framed(PROBE, f.body)
    if t is Extension:
        return _framed(f.ext_type, b"")
    if t is Auth:
        return _framed(AUTH, f.credential)
    if t is AuthOk:
        return _framed(AUTH_OK, _U32.pack(f.credential_ttl_ms))
    raise TypeError("not a frame: %r" % (f,))


# --- decoding -------------------------------------------------------------------------------


def _text(frame, b):
    if len(b) > MAX_TEXT_LEN:
        raise _malformed(frame, "text longer than 1024 bytes")
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(frame, "text is not UTF-8") from None


def parse_body(body):
    """Parses one frame body (everything after the length prefix; never empty)."""
    t = body[0]
    rest = body[1:]
    if t == DATA:
        return Data(rest)
    if t == SEQ_DATA:
        if len(rest) < 8:
            raise _malformed("SEQ_DATA", "shorter than its sequence number")
        return SeqData(_U64.unpack_from(rest)[0], rest[8:])
    if t in (PING, PONG, ACK):
        name = {PING: "PING", PONG: "PONG", ACK: "ACK"}[t]
        if len(rest) != 8:
            raise _malformed(name, "body must be exactly 8 bytes after the type")
        n = _U64.unpack(rest)[0]
        return Ping(n) if t == PING else Pong(n) if t == PONG else Ack(n)
    if t in (CLOSE, REFUSE):
        name = "CLOSE" if t == CLOSE else "REFUSE"
        if len(rest) < 2:
            raise _malformed(name, "missing code")
        code = _U16.unpack_from(rest)[0]
        text = _text(name, rest[2:])
        return Close(code, text) if t == CLOSE else Refuse(code, text)
    if t == HELLO:
        return _parse_hello(rest)
    if t == WELCOME:
        return _parse_welcome(rest)
    if t == AUTH:
        if not 1 <= len(rest) <= MAX_CREDENTIAL_LEN:
            raise _malformed("AUTH", "credential must be 1-8192 bytes")
        return Auth(rest)
    if t == AUTH_OK:
        if len(rest) != 4:
            raise _malformed("AUTH_OK", "body must be exactly 4 bytes after the type")
        return AuthOk(_U32.unpack(rest)[0])
    if t == PROBE:
        return Probe(rest)
    if t >= EXTENSION_MIN:
        return Extension(t)
    raise ProtocolError("unknown-type", "unknown frame type 0x%02x" % t)


def _parse_hello(b):
    F = "HELLO"
    if len(b) < 6:
        raise _malformed(F, "too short")
    flags = b[0]
    if flags & ~(HELLO_SESSION | HELLO_RESUME | HELLO_CREDENTIAL):
        raise _malformed(F, "unknown flag bits")
    hb = _U32.unpack_from(b, 1)[0]
    id_len = b[5]
    if id_len == 0:
        raise _malformed(F, "empty client id")
    pos = 6
    if len(b) < pos + id_len:
        raise _malformed(F, "client id runs past the frame")
    try:
        cid = b[pos:pos + id_len].decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed(F, "client id is not UTF-8") from None
    pos += id_len
    resume = None
    if flags & HELLO_RESUME:
        if len(b) < pos + 32:
            raise _malformed(F, "resume fields must be 32 bytes")
        resume = Resume(_U64.unpack_from(b, pos)[0], b[pos + 8:pos + 24], _U64.unpack_from(b, pos + 24)[0])
        pos += 32
    credential = None
    if flags & HELLO_CREDENTIAL:
        if len(b) < pos + 2:
            raise _malformed(F, "missing credential length")
        n = _U16.unpack_from(b, pos)[0]
        pos += 2
        if not 1 <= n <= MAX_CREDENTIAL_LEN:
            raise _malformed(F, "credential must be 1-8192 bytes")
        if len(b) < pos + n:
            raise _malformed(F, "credential runs past the frame")
        credential = b[pos:pos + n]
        pos += n
    if pos != len(b):
        raise _malformed(F, "trailing bytes")
    return Hello(cid, hb, bool(flags & (HELLO_SESSION | HELLO_RESUME)), resume, credential, flags)


def _parse_welcome(b):
    F = "WELCOME"
    if len(b) < 9:
        raise _malformed(F, "too short")
    flags = b[0]
    if flags & ~(WELCOME_SESSION | WELCOME_RESUMED | WELCOME_CREDENTIAL_TTL):
        raise _malformed(F, "unknown flag bits")
    h = _U32.unpack_from(b, 1)[0]
    d = _U32.unpack_from(b, 5)[0]
    if h == 0 or d == 0:
        raise _malformed(F, "heartbeat and dead_after must be positive")
    pos = 9
    session = None
    if flags & WELCOME_SESSION:
        if len(b) < pos + 36:
            raise _malformed(F, "session fields must be 36 bytes")
        session = SessionGrant(_U64.unpack_from(b, pos)[0], b[pos + 8:pos + 24],
                               _U64.unpack_from(b, pos + 24)[0], _U32.unpack_from(b, pos + 32)[0],
                               bool(flags & WELCOME_RESUMED))
        pos += 36
    elif flags & WELCOME_RESUMED:
        raise _malformed(F, "resumed flag without a session")
    ttl = None
    if flags & WELCOME_CREDENTIAL_TTL:
        if len(b) < pos + 4:
            raise _malformed(F, "credential_ttl_ms must be 4 bytes")
        ttl = _U32.unpack_from(b, pos)[0]
        pos += 4
    if pos != len(b):
        raise _malformed(F, "trailing bytes")
    return Welcome(h, d, session, ttl, flags)


class Decoder:
    """Incremental decoder. ``feed(data)`` yields each complete frame in turn (so a consumer
    that stops after a CLOSE never sees what follows); an incomplete tail is kept for the
    next call. The announced length is checked against ``max_frame_len`` as soon as the
    4-byte prefix is there, before anything is buffered for the body. After a
    ``ProtocolError`` the decoder must not be used again."""

    __slots__ = ("max_frame_len", "_buf")

    def __init__(self, max_frame_len=DEFAULT_MAX_FRAME_LEN):
        self.max_frame_len = max_frame_len
        self._buf = b""

    @property
    def buffered(self):
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data):
        """Generator over the frames completed by ``data``. Raises ProtocolError."""
        buf = self._buf + data if self._buf else bytes(data)
        self._buf = b""
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            length = _HEADER.unpack_from(buf, pos)[0]
            if length > self.max_frame_len:
                raise ProtocolError("oversize", "frame of %d bytes exceeds the maximum of %d"
                                    % (length, self.max_frame_len))
            end = pos + 4 + length
            if end > n:
                break
            frame = HEARTBEAT if length == 0 else parse_body(buf[pos + 4:end])
            pos = end
            yield frame
        if pos < n:
            self._buf = buf[pos:]
