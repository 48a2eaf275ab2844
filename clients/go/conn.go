package tether

// Conn is one tether client connection as a sans-IO state machine: preamble, handshake,
// frames, liveness, session and credential refresh. No sockets, no clock: every input
// carries now (a time.Duration from any origin) and PollTimeout says when HandleTimeout is
// next needed. The Client drives it over TCP/TLS; the conformance test drives it on a
// virtual clock.
//
//	preamble + HELLO  ------------------->  (queued by NewConn)
//	Established      <-------------------  preamble + WELCOME | REFUSE
//	DATA / SEQ_DATA / ACK / heartbeats / PING / PONG / AUTH / AUTH_OK  <------>
//	Closed(Disconnect)                      always the last event
//
// Liveness (PROTOCOL.md §7), from the WELCOME's h and d:
//
//	lastTx --h--> send HEARTBEAT     (only if nothing was sent for h)
//	lastRx --d--> peer dead          (never earlier than d; any byte counts)

import (
	"bytes"
	"errors"
	"fmt"
	"time"
)

// Disconnect reasons (labels shared with the reference implementation).
const (
	ReasonPeerClosed       = "peer-closed"
	ReasonPeerReset        = "peer-reset"
	ReasonHeartbeatTimeout = "heartbeat-timeout"
	ReasonKeepaliveTimeout = "keepalive-timeout"
	ReasonUserTimeout      = "user-timeout"
	ReasonProtocolError    = "protocol-error"
	ReasonRefused          = "refused"
	ReasonReplaced         = "replaced"
	ReasonLocalClose       = "local-close"
	ReasonPeerClose        = "peer-close"
	ReasonIOError          = "io-error"
	ReasonConnectRefused   = "connect-refused"
)

// What a reconnecting client does after a disconnect.
const (
	RetryBackoff = "backoff"
	RetryNow     = "now"
	RetryNever   = "never"
)

// Disconnect says why a connection ended. Code and Text are set for "refused" and
// "peer-close" (Code 5 for "replaced"); HasCode says whether Code is meaningful.
type Disconnect struct {
	Reason    string
	Code      uint16
	HasCode   bool
	Text      string
	SilentFor time.Duration
}

// Retry is what a reconnecting client does next: "never" (REPLACED, a refusal retrying
// cannot fix, the application closed), "now" (SESSION_UNKNOWN: a new session at once) or
// "backoff".
func (d Disconnect) Retry() string {
	switch d.Reason {
	case ReasonReplaced, ReasonLocalClose:
		return RetryNever
	case ReasonRefused:
		switch d.Code {
		case CodeBadHello, CodeUnsupportedVersion, CodeUnauthorized, CodeIDNotAllowed:
			return RetryNever
		case CodeSessionUnknown:
			return RetryNow
		}
	}
	return RetryBackoff
}

func (d Disconnect) String() string {
	s := d.Reason
	if d.HasCode {
		s += fmt.Sprintf(" %d (%s)", d.Code, CodeName(d.Code))
	}
	if d.Text != "" {
		s += ": " + d.Text
	}
	return s
}

// ConnEvent is what a Conn reports: one of the types below.
type ConnEvent interface{ connEvent() }

// Established: the handshake completed with this WELCOME.
type Established struct{ Welcome Welcome }

// Message is an application message from the server.
type Message struct{ Payload []byte }

// Resumed: the session was resumed; Replayed of our messages are sent again.
type Resumed struct{ Replayed uint64 }

// SessionLost: the session cannot continue. Unacked (nil: nothing outstanding) are our
// messages sent but never acknowledged, which may not have arrived; Unsent are messages
// never sent (only when the client stops for good).
type SessionLost struct {
	Unacked *SeqRange
	Unsent  [][]byte
}

// AuthDue: 90 % of the credential's ttl passed; send AUTH with a fresh credential.
type AuthDue struct{}

// AuthOKed: the server accepted a refreshed credential.
type AuthOKed struct{ CredentialTTLMs uint32 }

// Closed: the connection ended; always the last event.
type Closed struct{ Disconnect Disconnect }

func (Established) connEvent() {}
func (Message) connEvent()     {}
func (Resumed) connEvent()     {}
func (SessionLost) connEvent() {}
func (AuthDue) connEvent()     {}
func (AuthOKed) connEvent()    {}
func (Closed) connEvent()      {}

// Errors from Conn.Send.
var (
	ErrFull           = errors.New("tether: replay buffer full")
	ErrNotEstablished = errors.New("tether: connection not established yet")
	ErrClosed         = errors.New("tether: connection closed")
	ErrTooLong        = errors.New("tether: message longer than the maximum frame length")
)

// ConnConfig configures a Conn. Zero values: 1 MiB frames, 10 s handshake timeout.
type ConnConfig struct {
	MaxFrameLen      uint32
	HandshakeTimeout time.Duration
	Session          SessionConfig
}

type connState int

const (
	statePreamble connState = iota
	stateAwaitWelcome
	stateEstablished
	stateClosed
)

// Conn is a client connection; see the file comment.
type Conn struct {
	cfg   ConnConfig
	state connState
	pre   []byte
	dec   Decoder
	out   []byte
	evs   []ConnEvent

	handshakeDeadline time.Duration
	inHandshake       bool
	lastRx, lastTx    time.Duration
	h, d              time.Duration
	hbThisRead        bool

	session         *Session
	wantSession     bool
	hasCredential   bool
	authDue         time.Duration
	hasAuthDue      bool
	authOutstanding bool
	welcome         *Welcome
}

// NewConn queues the preamble and HELLO; with session the HELLO resumes it.
func NewConn(now time.Duration, cfg ConnConfig, hello Hello, session *Session) *Conn {
	if cfg.MaxFrameLen == 0 {
		cfg.MaxFrameLen = DefaultMaxFrameLen
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	cfg.Session = cfg.Session.withDefaults()
	c := &Conn{
		cfg: cfg, dec: Decoder{MaxFrameLen: cfg.MaxFrameLen},
		handshakeDeadline: now + cfg.HandshakeTimeout, inHandshake: true,
		lastRx: now, lastTx: now,
		session: session, wantSession: hello.WantSession || session != nil,
		hasCredential: hello.Credential != nil,
	}
	if session != nil {
		hello = NewHello(hello.ClientID, hello.HeartbeatMs, true,
			&Resume{SessionID: session.ID, Token: session.Token, LastReceived: session.LastReceived}, hello.Credential)
	}
	c.out = append(c.out, Preamble...)
	c.out = AppendFrame(c.out, hello)
	return c
}

// Established is true once the handshake completed and until the connection ends.
func (c *Conn) Established() bool { return c.state == stateEstablished }

// Closed is true once the connection ended (bytes may still wait to be written).
func (c *Conn) Closed() bool { return c.state == stateClosed }

// Welcome is the server's WELCOME, once received.
func (c *Conn) Welcome() *Welcome { return c.welcome }

// LastRx is when anything was last received.
func (c *Conn) LastRx() time.Duration { return c.lastRx }

// CanSend says whether a message of n bytes can be sent now (the replay buffer has room).
func (c *Conn) CanSend(n int) bool { return c.session == nil || c.session.HasRoom(n) }

// TakeSession hands the session to the next connection (after this one ended).
func (c *Conn) TakeSession() *Session {
	s := c.session
	c.session = nil
	return s
}

// PendingTransmit is what waits to be written.
func (c *Conn) PendingTransmit() []byte { return c.out }

// Transmitted says n bytes of PendingTransmit were written.
func (c *Conn) Transmitted(n int) {
	if n >= len(c.out) {
		c.out = nil
		return
	}
	c.out = c.out[n:]
}

// TakeTransmit returns everything waiting to be written and forgets it.
func (c *Conn) TakeTransmit() []byte {
	b := c.out
	c.out = nil
	return b
}

// PollEvent returns the next event, or nil.
func (c *Conn) PollEvent() ConnEvent {
	if len(c.evs) == 0 {
		return nil
	}
	ev := c.evs[0]
	c.evs[0] = nil
	c.evs = c.evs[1:]
	if len(c.evs) == 0 {
		c.evs = nil
	}
	return ev
}

// Send queues one message: ErrFull (the replay buffer is full: wait for an ACK),
// ErrNotEstablished, ErrClosed or ErrTooLong.
func (c *Conn) Send(now time.Duration, payload []byte) error {
	switch c.state {
	case stateClosed:
		return ErrClosed
	case stateEstablished:
	default:
		return ErrNotEstablished
	}
	max := int(c.cfg.MaxFrameLen) - 1
	if c.session != nil {
		max -= 8
	}
	if len(payload) > max {
		return ErrTooLong
	}
	if c.session != nil {
		if !c.session.push(payload) {
			return ErrFull
		}
		c.pumpSession(now)
		return nil
	}
	c.out = AppendData(c.out, payload)
	c.onSend(now)
	return nil
}

// Auth sends AUTH with a fresh credential (PROTOCOL.md §13).
func (c *Conn) Auth(now time.Duration, credential []byte) error {
	if c.state != stateEstablished {
		return ErrNotEstablished
	}
	if !c.hasCredential {
		return errors.New("tether: AUTH needs a HELLO with a credential")
	}
	if len(credential) < 1 || len(credential) > MaxCredentialLen {
		return errors.New("tether: a credential is 1-8192 bytes")
	}
	if c.authOutstanding {
		return errors.New("tether: an AUTH is already waiting for its AUTH_OK")
	}
	c.authOutstanding = true
	c.hasAuthDue = false
	c.out = AppendFrame(c.out, Auth{Credential: credential})
	c.onSend(now)
	return nil
}

// Close closes in order: an ACK we owe (so the peer does not report its last messages as
// possibly lost), then CLOSE(code, text), if established.
func (c *Conn) Close(now time.Duration, code uint16, text string) {
	if c.state == stateEstablished && c.session != nil {
		if a, ok := c.session.pollAck(now, true); ok {
			c.out = AppendAck(c.out, a)
		}
	}
	reason := ReasonLocalClose
	if code == CodeReplaced {
		reason = ReasonReplaced
	}
	c.closeWith(now, code, text, Disconnect{Reason: reason})
}

// HandleEOF: the peer's FIN.
func (c *Conn) HandleEOF(now time.Duration) { c.finish(now, Disconnect{Reason: ReasonPeerClosed}) }

// HandleTransportError: reason is ReasonPeerReset, ReasonKeepaliveTimeout,
// ReasonUserTimeout or ReasonIOError.
func (c *Conn) HandleTransportError(now time.Duration, reason, text string) {
	c.finish(now, Disconnect{Reason: reason, Text: text})
}

// HandleInput feeds bytes the transport delivered (one read).
func (c *Conn) HandleInput(now time.Duration, data []byte) {
	if c.state == stateClosed || len(data) == 0 {
		return
	}
	if now > c.lastRx {
		c.lastRx = now
	}
	if c.state == statePreamble {
		need := 5 - len(c.pre)
		if need > len(data) {
			need = len(data)
		}
		c.pre = append(c.pre, data[:need]...)
		data = data[need:]
		if len(c.pre) < 5 {
			return
		}
		if !bytes.Equal(c.pre[:4], Preamble[:4]) {
			head := append(append([]byte(nil), c.pre...), data[:min(len(data), 11)]...)
			c.finish(now, Disconnect{Reason: ReasonProtocolError, Text: fmt.Sprintf("not a tether server: it answered %q", head)})
			return
		}
		if c.pre[4] != Version {
			c.finish(now, Disconnect{Reason: ReasonProtocolError, Text: fmt.Sprintf("unsupported protocol version %d", c.pre[4])})
			return
		}
		c.pre = nil
		c.state = stateAwaitWelcome
		if len(data) == 0 {
			return
		}
	}
	c.hbThisRead = false
	err := c.dec.Feed(data, func(f Frame) bool {
		c.handleFrame(now, f)
		return c.state != stateClosed
	})
	if err != nil && c.state != stateClosed {
		c.protocolError(now, err.Error())
	}
}

// PollTimeout is when HandleTimeout is next needed (false: never).
func (c *Conn) PollTimeout() (time.Duration, bool) {
	if c.state == stateClosed {
		return 0, false
	}
	if c.inHandshake {
		return c.handshakeDeadline, true
	}
	t := c.lastTx + c.h
	if d := c.lastRx + c.d; d < t {
		t = d
	}
	if c.session != nil {
		if a, ok := c.session.pollTimeout(); ok && a < t {
			t = a
		}
	}
	if c.hasAuthDue && c.authDue < t {
		t = c.authDue
	}
	return t, true
}

// HandleTimeout acts on whatever is due at now; harmless when nothing is.
func (c *Conn) HandleTimeout(now time.Duration) {
	if c.state == stateClosed {
		return
	}
	if c.inHandshake {
		if now >= c.handshakeDeadline {
			c.finish(now, Disconnect{Reason: ReasonProtocolError, Text: "handshake timeout: no welcome"})
		}
		return
	}
	c.sendDueAck(now)
	if now >= c.lastRx+c.d {
		c.closeWith(now, CodeHeartbeatTimeout, "nothing received within dead_after", Disconnect{Reason: ReasonHeartbeatTimeout})
		return
	}
	if c.hasAuthDue && now >= c.authDue {
		c.hasAuthDue = false
		c.evs = append(c.evs, AuthDue{})
	}
	if now >= c.lastTx+c.h {
		c.lastTx = now
		// Bytes still waiting to be written prove us alive when they arrive.
		if len(c.out) == 0 {
			c.out = append(c.out, 0, 0, 0, 0)
		}
	}
}

func min(a, b int) int {
	if a < b {
		return a
	}
	return b
}

func (c *Conn) onSend(now time.Duration) {
	if now > c.lastTx {
		c.lastTx = now
	}
}

func (c *Conn) handleFrame(now time.Duration, f Frame) {
	if c.state == stateAwaitWelcome {
		switch f := f.(type) {
		case Welcome:
			c.onWelcome(now, f)
		case Refuse:
			if f.Code == CodeSessionUnknown && c.session != nil {
				old := c.TakeSession()
				c.evs = append(c.evs, SessionLost{Unacked: old.Unacked()})
			}
			c.finish(now, Disconnect{Reason: ReasonRefused, Code: f.Code, HasCode: true, Text: f.Text})
		default:
			c.protocolError(now, "expected WELCOME or REFUSE, got "+f.frameName())
		}
		return
	}
	c.handleEstablished(now, f)
}

func (c *Conn) onWelcome(now time.Duration, w Welcome) {
	if w.CredentialTTLMs != nil && !c.hasCredential {
		c.protocolError(now, "CREDENTIAL_TTL without a credential in the HELLO")
		return
	}
	c.state = stateEstablished
	c.inHandshake = false
	c.h = time.Duration(w.HeartbeatMs) * time.Millisecond
	c.d = time.Duration(w.DeadAfterMs) * time.Millisecond
	c.lastTx, c.lastRx = now, now
	c.welcome = &w
	if w.CredentialTTLMs != nil && *w.CredentialTTLMs > 0 {
		c.hasAuthDue = true
		c.authDue = now + time.Duration(*w.CredentialTTLMs)*time.Millisecond*9/10
	}
	c.evs = append(c.evs, Established{w})
	g, s := w.Session, c.session
	if g != nil && s != nil && g.Resumed && g.SessionID == s.ID {
		n, err := s.resume(g.LastReceived)
		if err != nil {
			e := err.(ackBeyondSent)
			c.protocolError(now, fmt.Sprintf("server resumed from %d but only %d were sent", e.acked, e.sent))
			return
		}
		s.Token = g.Token // rotation: always keep the newest token
		if a, ok := s.pollAck(now, true); ok {
			c.out = AppendAck(c.out, a)
		}
		c.evs = append(c.evs, Resumed{n})
		c.pumpSession(now)
		return
	}
	if s != nil {
		c.session = nil
		c.evs = append(c.evs, SessionLost{Unacked: s.Unacked()})
	}
	if g != nil && c.wantSession {
		c.session = NewSession(g.SessionID, g.Token, c.cfg.Session)
	}
}

func (c *Conn) handleEstablished(now time.Duration, f Frame) {
	s := c.session
	switch f := f.(type) {
	case Heartbeat:
		// Heartbeats in one read count once (they were queued behind a stall).
		if !c.hbThisRead {
			c.hbThisRead = true
			// Coalesce: if ours is due within h/2, send it now, in this wake-up.
			if c.lastTx+c.h <= now+c.h/2 {
				c.lastTx = now
				if len(c.out) == 0 {
					c.out = append(c.out, 0, 0, 0, 0)
				}
			}
		}
	case SeqData:
		if s == nil {
			c.protocolError(now, "SEQ_DATA without a negotiated session")
			return
		}
		switch s.onData(now, f.Seq) {
		case received:
			c.evs = append(c.evs, Message{f.Payload})
			c.sendDueAck(now)
		case gap:
			c.protocolError(now, fmt.Sprintf("SEQ_DATA %d but %d was expected", f.Seq, s.LastReceived+1))
		}
	case Data:
		if s != nil {
			c.protocolError(now, "DATA on a session connection (SEQ_DATA expected)")
			return
		}
		c.evs = append(c.evs, Message{f.Payload})
	case Ack:
		if s == nil {
			c.protocolError(now, "ACK without a negotiated session")
			return
		}
		if err := s.onAck(f.Seq); err != nil {
			e := err.(ackBeyondSent)
			c.protocolError(now, fmt.Sprintf("ACK %d beyond the last sent sequence %d", e.acked, e.sent))
		}
	case Ping:
		c.out = AppendFrame(c.out, Pong{f.Nonce})
		c.onSend(now)
	case Pong, Extension:
	case Close:
		reason := ReasonPeerClose
		if f.Code == CodeReplaced {
			reason = ReasonReplaced
		}
		c.finish(now, Disconnect{Reason: reason, Code: f.Code, HasCode: true, Text: f.Text})
	case AuthOK:
		if !c.authOutstanding {
			c.protocolError(now, "AUTH_OK without an AUTH")
			return
		}
		c.authOutstanding = false
		c.hasAuthDue = f.CredentialTTLMs > 0
		c.authDue = now + time.Duration(f.CredentialTTLMs)*time.Millisecond*9/10
		c.evs = append(c.evs, AuthOKed{f.CredentialTTLMs})
	default:
		c.protocolError(now, "unexpected "+f.frameName()+" after the handshake")
	}
}

func (c *Conn) pumpSession(now time.Duration) {
	s := c.session
	sent := false
	for {
		seq, msg, ok := s.nextToSend()
		if !ok {
			break
		}
		c.out = AppendSeqData(c.out, seq, msg)
		sent = true
	}
	if sent {
		if a, ok := s.pollAck(now, true); ok {
			c.out = AppendAck(c.out, a)
		}
		c.onSend(now)
	}
}

func (c *Conn) sendDueAck(now time.Duration) {
	if c.session == nil {
		return
	}
	if a, ok := c.session.pollAck(now, false); ok {
		c.out = AppendAck(c.out, a)
		c.onSend(now)
	}
}

func (c *Conn) protocolError(now time.Duration, why string) {
	c.closeWith(now, CodeProtocolError, why, Disconnect{Reason: ReasonProtocolError, Text: why})
}

func (c *Conn) closeWith(now time.Duration, code uint16, text string, d Disconnect) {
	if c.state == stateClosed {
		return
	}
	if c.state == stateEstablished {
		c.out = AppendFrame(c.out, Close{code, text})
	}
	c.finish(now, d)
}

func (c *Conn) finish(now time.Duration, d Disconnect) {
	if c.state == stateClosed {
		return
	}
	c.state = stateClosed
	c.inHandshake = false
	if now > c.lastRx {
		d.SilentFor = now - c.lastRx
	}
	c.evs = append(c.evs, Closed{d})
}
