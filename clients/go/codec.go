package tether

// Wire protocol v1 (docs/PROTOCOL.md): preamble, frames, and an incremental decoder that
// checks every length before it buffers anything.
//
//	stream   = preamble *frame
//	preamble = "TTHR" version:u8                 (5 bytes, each side sends one)
//	frame    = length:u32be body:length bytes     (length 0 = HEARTBEAT, no body)
//	body     = type:u8 fields...

import (
	"encoding/binary"
	"fmt"
	"unicode"
	"unicode/utf8"
)

// Protocol constants.
const (
	Version            = 1
	DefaultMaxFrameLen = 1 << 20
	MaxClientIDLen     = 255
	MaxTextLen         = 1024
	MaxCredentialLen   = 8192
	TokenLen           = 16
)

// Preamble is what each side sends first: "TTHR" and the version.
var Preamble = []byte{'T', 'T', 'H', 'R', Version}

// Frame types (PROTOCOL.md §5).
const (
	typeData    = 0x01
	typePing    = 0x02
	typePong    = 0x03
	typeClose   = 0x04
	typeAck     = 0x05
	typeSeqData = 0x06
	typeAuth    = 0x07
	typeAuthOK  = 0x08
	typeHello   = 0x10
	typeWelcome = 0x11
	typeRefuse  = 0x12
	typeProbe   = 0x20
	typeExtMin  = 0x80
)

// HELLO and WELCOME flags.
const (
	HelloSession         = 0x01
	HelloResume          = 0x02
	HelloCredential      = 0x04
	WelcomeSession       = 0x01
	WelcomeResumed       = 0x02
	WelcomeCredentialTTL = 0x04
	helloKnownFlags      = HelloSession | HelloResume | HelloCredential
	welcomeKnownFlags    = WelcomeSession | WelcomeResumed | WelcomeCredentialTTL
)

// Close and refusal codes (PROTOCOL.md §9). 1000 and above belong to applications.
const (
	CodeNormal             uint16 = 0
	CodeGoingAway          uint16 = 1
	CodeProtocolError      uint16 = 2
	CodeHeartbeatTimeout   uint16 = 3
	CodeIdleTimeout        uint16 = 4
	CodeReplaced           uint16 = 5
	CodePolicyViolation    uint16 = 6
	CodeCredentialExpired  uint16 = 7
	CodeSlowConsumer       uint16 = 8
	CodeServerFull         uint16 = 10
	CodeBadHello           uint16 = 11
	CodeUnsupportedVersion uint16 = 12
	CodeHandshakeTimeout   uint16 = 13
	CodeSessionUnknown     uint16 = 14
	CodeRefused            uint16 = 15
	CodeSessionBusy        uint16 = 16
	CodeUnauthorized       uint16 = 17
	CodeIDNotAllowed       uint16 = 18
	CodeThrottled          uint16 = 19
)

var codeNames = map[uint16]string{
	0: "normal", 1: "going-away", 2: "protocol-error", 3: "heartbeat-timeout", 4: "idle-timeout",
	5: "replaced", 6: "policy-violation", 7: "credential-expired", 8: "slow-consumer",
	10: "server-full", 11: "bad-hello", 12: "unsupported-version", 13: "handshake-timeout",
	14: "session-unknown", 15: "refused", 16: "session-busy", 17: "unauthorized",
	18: "id-not-allowed", 19: "throttled",
}

// CodeName is a code's short name ("normal", "session-busy", "application" for 1000+).
func CodeName(code uint16) string {
	if code >= 1000 {
		return "application"
	}
	if n, ok := codeNames[code]; ok {
		return n
	}
	return "unknown"
}

// ProtocolError is bytes that break the protocol. Kind is "oversize", "unknown-type" or
// "malformed" (the conformance vectors' classes); each closes the connection.
type ProtocolError struct {
	Kind string
	Why  string
}

func (e *ProtocolError) Error() string { return e.Why }

func malformed(frame, why string) error {
	return &ProtocolError{"malformed", "malformed " + frame + " frame: " + why}
}

// Frame is one decoded frame: one of the types below.
type Frame interface{ frameName() string }

// Heartbeat is the empty frame (length 0).
type Heartbeat struct{}

// Data is an application message on a connection without a session.
type Data struct{ Payload []byte }

// SeqData is a sequenced application message (sessions).
type SeqData struct {
	Seq     uint64
	Payload []byte
}

// Ping asks for a Pong with the same nonce.
type Ping struct{ Nonce uint64 }

// Pong answers a Ping.
type Pong struct{ Nonce uint64 }

// Ack acknowledges every sequence number up to and including Seq.
type Ack struct{ Seq uint64 }

// Close ends a connection in order.
type Close struct {
	Code uint16
	Text string
}

// Refuse answers a HELLO with a refusal.
type Refuse struct {
	Code uint16
	Text string
}

// Resume is the resume block of a HELLO.
type Resume struct {
	SessionID    uint64
	Token        [TokenLen]byte
	LastReceived uint64
}

// Hello is the client's first frame.
type Hello struct {
	Flags       byte
	HeartbeatMs uint32
	ClientID    string
	WantSession bool
	Resume      *Resume
	Credential  []byte
}

// SessionGrant is the session block of a WELCOME.
type SessionGrant struct {
	SessionID    uint64
	Token        [TokenLen]byte
	LastReceived uint64
	LingerMs     uint32
	Resumed      bool
}

// Welcome is the server's acceptance: h, d, the session grant, the credential ttl.
type Welcome struct {
	Flags           byte
	HeartbeatMs     uint32
	DeadAfterMs     uint32
	Session         *SessionGrant
	CredentialTTLMs *uint32
}

// Probe is a `tether probe` request.
type Probe struct{ Body []byte }

// Extension is an extension frame (type >= 0x80), skipped after the handshake.
type Extension struct{ Type byte }

// Auth carries a fresh credential (client to server).
type Auth struct{ Credential []byte }

// AuthOK answers Auth with the new credential's ttl (0: no expiry).
type AuthOK struct{ CredentialTTLMs uint32 }

func (Heartbeat) frameName() string { return "HEARTBEAT" }
func (Data) frameName() string      { return "DATA" }
func (SeqData) frameName() string   { return "SEQ_DATA" }
func (Ping) frameName() string      { return "PING" }
func (Pong) frameName() string      { return "PONG" }
func (Ack) frameName() string       { return "ACK" }
func (Close) frameName() string     { return "CLOSE" }
func (Refuse) frameName() string    { return "REFUSE" }
func (Hello) frameName() string     { return "HELLO" }
func (Welcome) frameName() string   { return "WELCOME" }
func (Probe) frameName() string     { return "PROBE" }
func (Extension) frameName() string { return "EXTENSION" }
func (Auth) frameName() string      { return "AUTH" }
func (AuthOK) frameName() string    { return "AUTH_OK" }

// NewHello builds a HELLO with its flags.
func NewHello(clientID string, heartbeatMs uint32, wantSession bool, resume *Resume, credential []byte) Hello {
	h := Hello{HeartbeatMs: heartbeatMs, ClientID: clientID, WantSession: wantSession || resume != nil, Resume: resume, Credential: credential}
	if h.WantSession {
		h.Flags |= HelloSession
	}
	if resume != nil {
		h.Flags |= HelloResume
	}
	if credential != nil {
		h.Flags |= HelloCredential
	}
	return h
}

// ClientIDProblem says why id is not acceptable (PROTOCOL.md §6.1), or "" when it is:
// 1-255 bytes of UTF-8 without control (Cc), format (Cf) or line/paragraph separator
// characters.
func ClientIDProblem(id string) string {
	if len(id) == 0 || len(id) > MaxClientIDLen {
		return fmt.Sprintf("must be 1-255 bytes of UTF-8 (is %d)", len(id))
	}
	if !utf8.ValidString(id) {
		return "is not UTF-8"
	}
	for _, r := range id {
		if unicode.Is(unicode.Cc, r) || unicode.Is(unicode.Cf, r) || r == '\u2028' || r == '\u2029' {
			return fmt.Sprintf("contains U+%04X", r)
		}
	}
	return ""
}

// --- encoding -------------------------------------------------------------------------------

func truncateText(s string) string {
	if len(s) <= MaxTextLen {
		return s
	}
	end := MaxTextLen
	for end > 0 && !utf8.RuneStart(s[end]) {
		end--
	}
	return s[:end]
}

func putHeader(out []byte, length int, t byte) []byte {
	out = binary.BigEndian.AppendUint32(out, uint32(length))
	return append(out, t)
}

// AppendData appends a DATA frame.
func AppendData(out, payload []byte) []byte {
	out = putHeader(out, 1+len(payload), typeData)
	return append(out, payload...)
}

// AppendSeqData appends a SEQ_DATA frame.
func AppendSeqData(out []byte, seq uint64, payload []byte) []byte {
	out = putHeader(out, 9+len(payload), typeSeqData)
	out = binary.BigEndian.AppendUint64(out, seq)
	return append(out, payload...)
}

// AppendAck appends an ACK frame.
func AppendAck(out []byte, seq uint64) []byte {
	out = putHeader(out, 9, typeAck)
	return binary.BigEndian.AppendUint64(out, seq)
}

// AppendFrame appends f's bytes, length prefix included. CLOSE/REFUSE text is truncated at
// 1024 bytes on a character boundary.
func AppendFrame(out []byte, f Frame) []byte {
	switch f := f.(type) {
	case Heartbeat:
		return append(out, 0, 0, 0, 0)
	case Data:
		return AppendData(out, f.Payload)
	case SeqData:
		return AppendSeqData(out, f.Seq, f.Payload)
	case Ack:
		return AppendAck(out, f.Seq)
	case Ping:
		return binary.BigEndian.AppendUint64(putHeader(out, 9, typePing), f.Nonce)
	case Pong:
		return binary.BigEndian.AppendUint64(putHeader(out, 9, typePong), f.Nonce)
	case Close:
		t := truncateText(f.Text)
		out = binary.BigEndian.AppendUint16(putHeader(out, 3+len(t), typeClose), f.Code)
		return append(out, t...)
	case Refuse:
		t := truncateText(f.Text)
		out = binary.BigEndian.AppendUint16(putHeader(out, 3+len(t), typeRefuse), f.Code)
		return append(out, t...)
	case Hello:
		n := 7 + len(f.ClientID)
		if f.Resume != nil {
			n += 32
		}
		if f.Credential != nil {
			n += 2 + len(f.Credential)
		}
		out = putHeader(out, n, typeHello)
		out = append(out, f.Flags)
		out = binary.BigEndian.AppendUint32(out, f.HeartbeatMs)
		out = append(out, byte(len(f.ClientID)))
		out = append(out, f.ClientID...)
		if r := f.Resume; r != nil {
			out = binary.BigEndian.AppendUint64(out, r.SessionID)
			out = append(out, r.Token[:]...)
			out = binary.BigEndian.AppendUint64(out, r.LastReceived)
		}
		if f.Credential != nil {
			out = binary.BigEndian.AppendUint16(out, uint16(len(f.Credential)))
			out = append(out, f.Credential...)
		}
		return out
	case Welcome:
		n := 10
		if f.Session != nil {
			n += 36
		}
		if f.CredentialTTLMs != nil {
			n += 4
		}
		out = putHeader(out, n, typeWelcome)
		out = append(out, f.Flags)
		out = binary.BigEndian.AppendUint32(out, f.HeartbeatMs)
		out = binary.BigEndian.AppendUint32(out, f.DeadAfterMs)
		if s := f.Session; s != nil {
			out = binary.BigEndian.AppendUint64(out, s.SessionID)
			out = append(out, s.Token[:]...)
			out = binary.BigEndian.AppendUint64(out, s.LastReceived)
			out = binary.BigEndian.AppendUint32(out, s.LingerMs)
		}
		if f.CredentialTTLMs != nil {
			out = binary.BigEndian.AppendUint32(out, *f.CredentialTTLMs)
		}
		return out
	case Probe:
		return append(putHeader(out, 1+len(f.Body), typeProbe), f.Body...)
	case Extension:
		return putHeader(out, 1, f.Type)
	case Auth:
		return append(putHeader(out, 1+len(f.Credential), typeAuth), f.Credential...)
	case AuthOK:
		return binary.BigEndian.AppendUint32(putHeader(out, 5, typeAuthOK), f.CredentialTTLMs)
	}
	panic(fmt.Sprintf("tether: not a frame: %T", f))
}

// --- decoding -------------------------------------------------------------------------------

func parseText(frame string, b []byte) (string, error) {
	if len(b) > MaxTextLen {
		return "", malformed(frame, "text longer than 1024 bytes")
	}
	if !utf8.Valid(b) {
		return "", malformed(frame, "text is not UTF-8")
	}
	return string(b), nil
}

func clone(b []byte) []byte { return append([]byte(nil), b...) }

// ParseBody parses one frame body (everything after the length prefix; never empty).
func ParseBody(body []byte) (Frame, error) {
	t, rest := body[0], body[1:]
	switch t {
	case typeData:
		return Data{clone(rest)}, nil
	case typeSeqData:
		if len(rest) < 8 {
			return nil, malformed("SEQ_DATA", "shorter than its sequence number")
		}
		return SeqData{binary.BigEndian.Uint64(rest), clone(rest[8:])}, nil
	case typePing, typePong, typeAck:
		name := map[byte]string{typePing: "PING", typePong: "PONG", typeAck: "ACK"}[t]
		if len(rest) != 8 {
			return nil, malformed(name, "body must be exactly 8 bytes after the type")
		}
		n := binary.BigEndian.Uint64(rest)
		switch t {
		case typePing:
			return Ping{n}, nil
		case typePong:
			return Pong{n}, nil
		}
		return Ack{n}, nil
	case typeClose, typeRefuse:
		name := "CLOSE"
		if t == typeRefuse {
			name = "REFUSE"
		}
		if len(rest) < 2 {
			return nil, malformed(name, "missing code")
		}
		code := binary.BigEndian.Uint16(rest)
		text, err := parseText(name, rest[2:])
		if err != nil {
			return nil, err
		}
		if t == typeClose {
			return Close{code, text}, nil
		}
		return Refuse{code, text}, nil
	case typeHello:
		return parseHello(rest)
	case typeWelcome:
		return parseWelcome(rest)
	case typeAuth:
		if len(rest) < 1 || len(rest) > MaxCredentialLen {
			return nil, malformed("AUTH", "credential must be 1-8192 bytes")
		}
		return Auth{clone(rest)}, nil
	case typeAuthOK:
		if len(rest) != 4 {
			return nil, malformed("AUTH_OK", "body must be exactly 4 bytes after the type")
		}
		return AuthOK{binary.BigEndian.Uint32(rest)}, nil
	case typeProbe:
		return Probe{clone(rest)}, nil
	}
	if t >= typeExtMin {
		return Extension{t}, nil
	}
	return nil, &ProtocolError{"unknown-type", fmt.Sprintf("unknown frame type 0x%02x", t)}
}

func parseHello(b []byte) (Frame, error) {
	const F = "HELLO"
	if len(b) < 6 {
		return nil, malformed(F, "too short")
	}
	flags := b[0]
	if flags&^helloKnownFlags != 0 {
		return nil, malformed(F, "unknown flag bits")
	}
	h := Hello{Flags: flags, HeartbeatMs: binary.BigEndian.Uint32(b[1:]), WantSession: flags&(HelloSession|HelloResume) != 0}
	idLen := int(b[5])
	if idLen == 0 {
		return nil, malformed(F, "empty client id")
	}
	pos := 6
	if len(b) < pos+idLen {
		return nil, malformed(F, "client id runs past the frame")
	}
	if !utf8.Valid(b[pos : pos+idLen]) {
		return nil, malformed(F, "client id is not UTF-8")
	}
	h.ClientID = string(b[pos : pos+idLen])
	pos += idLen
	if flags&HelloResume != 0 {
		if len(b) < pos+32 {
			return nil, malformed(F, "resume fields must be 32 bytes")
		}
		r := &Resume{SessionID: binary.BigEndian.Uint64(b[pos:]), LastReceived: binary.BigEndian.Uint64(b[pos+24:])}
		copy(r.Token[:], b[pos+8:pos+24])
		h.Resume = r
		pos += 32
	}
	if flags&HelloCredential != 0 {
		if len(b) < pos+2 {
			return nil, malformed(F, "missing credential length")
		}
		n := int(binary.BigEndian.Uint16(b[pos:]))
		pos += 2
		if n < 1 || n > MaxCredentialLen {
			return nil, malformed(F, "credential must be 1-8192 bytes")
		}
		if len(b) < pos+n {
			return nil, malformed(F, "credential runs past the frame")
		}
		h.Credential = clone(b[pos : pos+n])
		pos += n
	}
	if pos != len(b) {
		return nil, malformed(F, "trailing bytes")
	}
	return h, nil
}

func parseWelcome(b []byte) (Frame, error) {
	const F = "WELCOME"
	if len(b) < 9 {
		return nil, malformed(F, "too short")
	}
	flags := b[0]
	if flags&^welcomeKnownFlags != 0 {
		return nil, malformed(F, "unknown flag bits")
	}
	w := Welcome{Flags: flags, HeartbeatMs: binary.BigEndian.Uint32(b[1:]), DeadAfterMs: binary.BigEndian.Uint32(b[5:])}
	if w.HeartbeatMs == 0 || w.DeadAfterMs == 0 {
		return nil, malformed(F, "heartbeat and dead_after must be positive")
	}
	pos := 9
	if flags&WelcomeSession != 0 {
		if len(b) < pos+36 {
			return nil, malformed(F, "session fields must be 36 bytes")
		}
		s := &SessionGrant{
			SessionID:    binary.BigEndian.Uint64(b[pos:]),
			LastReceived: binary.BigEndian.Uint64(b[pos+24:]),
			LingerMs:     binary.BigEndian.Uint32(b[pos+32:]),
			Resumed:      flags&WelcomeResumed != 0,
		}
		copy(s.Token[:], b[pos+8:pos+24])
		w.Session = s
		pos += 36
	} else if flags&WelcomeResumed != 0 {
		return nil, malformed(F, "resumed flag without a session")
	}
	if flags&WelcomeCredentialTTL != 0 {
		if len(b) < pos+4 {
			return nil, malformed(F, "credential_ttl_ms must be 4 bytes")
		}
		ttl := binary.BigEndian.Uint32(b[pos:])
		w.CredentialTTLMs = &ttl
		pos += 4
	}
	if pos != len(b) {
		return nil, malformed(F, "trailing bytes")
	}
	return w, nil
}

// Decoder decodes frames incrementally. The announced length is checked against
// MaxFrameLen as soon as the 4-byte prefix is there, before anything is buffered for the
// body; an idle decoder holds no buffer.
type Decoder struct {
	MaxFrameLen uint32
	buf         []byte
}

// Buffered is how many bytes wait for an incomplete frame.
func (d *Decoder) Buffered() int { return len(d.buf) }

// Feed decodes the frames completed by data, calling sink for each in order; sink returns
// false to stop (the rest is dropped). After an error the decoder must not be used again.
func (d *Decoder) Feed(data []byte, sink func(Frame) bool) error {
	buf := data
	if len(d.buf) > 0 {
		buf = append(d.buf, data...)
	}
	d.buf = nil
	for len(buf) >= 4 {
		n := binary.BigEndian.Uint32(buf)
		if n > d.MaxFrameLen {
			return &ProtocolError{"oversize", fmt.Sprintf("frame of %d bytes exceeds the maximum of %d", n, d.MaxFrameLen)}
		}
		end := 4 + int(n)
		if len(buf) < end {
			break
		}
		var f Frame = Heartbeat{}
		if n > 0 {
			var err error
			if f, err = ParseBody(buf[4:end]); err != nil {
				return err
			}
		}
		buf = buf[end:]
		if !sink(f) {
			return nil
		}
	}
	if len(buf) > 0 {
		d.buf = clone(buf)
	}
	return nil
}
