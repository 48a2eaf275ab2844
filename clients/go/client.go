// Package tether is a client for tether servers (docs/PROTOCOL.md): it reconnects on its
// own with capped, fully jittered backoff, detects a dead server within the bound the
// server dictates, and keeps a session across reconnects so that every message arrives
// exactly once and in order — or a SessionLost event names the sequence numbers that may
// be missing. Standard library only, no cgo.
//
//	Start --> dial --ok--> Connected --> Resumed? --> Message* --error--> Disconnected(d)
//	           ^                                                             |
//	           +--- sleep(delay) <-- Reconnecting(attempt, delay) <-- d.Retry() == "backoff"
//	                d.Retry() == "now": at once (a new session after SESSION_UNKNOWN)
//	                d.Retry() == "never": SessionLost(unacked, unsent)? then Stopped(d)
//
// Each connection is one goroutine driving a sans-IO Conn, plus a reader goroutine and, while
// bytes are being written, a writer; the Conn is only ever touched by its driver.
package tether

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand"
	"net"
	"sync"
	"syscall"
	"time"
)

const (
	closeLinger       = 2 * time.Second
	transmitHighWater = 256 << 10
	readChunk         = 4 << 10
)

// Config configures a Client. Zero values take the defaults in brackets.
type Config struct {
	Addr     string // host:port
	ClientID string // 1-255 bytes of UTF-8, no control, format or separator characters

	NoSession bool // plain DATA, no resume [a session]
	// Credential, when set, is called for every HELLO and for each refresh (AUTH) before
	// the credential ttl from the server runs out.
	Credential func(ctx context.Context) ([]byte, error)
	TLS        *tls.Config // nil: plain TCP; ServerName defaults to Addr's host

	Heartbeat    time.Duration // requested (the server decides) [no preference]
	DetectWithin time.Duration // socket keepalive and TCP_USER_TIMEOUT [the server's dead-after]
	PathTimeout  time.Duration // idle timeout of the path, for keepalive [none]

	BackoffBase time.Duration // [100ms]
	BackoffCap  time.Duration // [30s]
	MaxAttempts int           // delays handed out before giving up; 0: retry forever
	Seed        int64         // jitter seed [random]

	HandshakeTimeout time.Duration // TCP + TLS + tether handshake [10s]
	MaxFrameLen      uint32        // [1 MiB]
	Session          SessionConfig // replay bounds and ACK timing [4 MiB, 4096, 32, 20ms]
	OutboxBytes      int           // messages waiting for a connection before Send blocks [1 MiB]
	CloseTimeout     time.Duration // Close waits this long for the queue to drain [5s]

	// Dial, when set, replaces net.Dialer.DialContext (tests, proxies).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
}

// Event is what a Client reports: Connected, Resumed, Message, SessionLost, Disconnected,
// Reconnecting or Stopped (always last).
type Event interface{ clientEvent() }

// Connected: connected (again); the WELCOME has h, d, the session grant and credential ttl.
type Connected struct{ Welcome Welcome }

// Disconnected: a connection ended or an attempt failed.
type Disconnected struct{ Disconnect Disconnect }

// Reconnecting: waiting Delay before attempt Attempt (1-based).
type Reconnecting struct {
	Attempt int
	Delay   time.Duration
}

// Stopped: the client stopped for good (closed, REPLACED, a refusal retrying cannot fix,
// attempts exhausted). Always the last event.
type Stopped struct{ Disconnect Disconnect }

func (Connected) clientEvent()    {}
func (Disconnected) clientEvent() {}
func (Reconnecting) clientEvent() {}
func (Stopped) clientEvent()      {}
func (Message) clientEvent()      {}
func (Resumed) clientEvent()      {}
func (SessionLost) clientEvent()  {}

// StoppedError is returned by Send once the client stopped.
type StoppedError struct{ Disconnect Disconnect }

func (e *StoppedError) Error() string { return "tether: client stopped: " + e.Disconnect.String() }

// SocketOptions are the per-socket second line of defence.
type SocketOptions struct {
	KeepaliveIdle, KeepaliveInterval time.Duration
	KeepaliveCount                   int
	UserTimeout                      time.Duration
}

// DeriveSocketOptions turns a detection bound (and the path's idle timeout, 0 if unknown)
// into keepalive and TCP_USER_TIMEOUT as docs/PLAN.md does: idle + count x interval <= bound.
func DeriveSocketOptions(detectWithin, path time.Duration) SocketOptions {
	d := detectWithin.Seconds()
	p := math.Inf(1)
	if path > 0 {
		p = path.Seconds()
	}
	clamp := func(v float64, lo, hi int) int {
		n := int(v)
		if n < lo {
			n = lo
		}
		if n > hi {
			n = hi
		}
		return n
	}
	idle := clamp(math.Min(d/2, p/3), 1, 32767)
	interval := clamp(math.Min((d-float64(idle))/3, p/3), 1, 32767)
	count := clamp((d-float64(idle))/float64(interval), 1, 127)
	return SocketOptions{time.Duration(idle) * time.Second, time.Duration(interval) * time.Second, count, detectWithin}
}

// Backoff is capped exponential backoff with full jitter: delay n is uniform in
// [0, min(cap, base * 2^n)].
type Backoff struct {
	Base, Cap   time.Duration
	MaxAttempts int
	attempt     int
	rng         *rand.Rand
}

// NewBackoff seeds the jitter.
func NewBackoff(base, cap time.Duration, maxAttempts int, seed int64) *Backoff {
	return &Backoff{Base: base, Cap: cap, MaxAttempts: maxAttempts, rng: rand.New(rand.NewSource(seed))}
}

// Ceiling is the window's upper bound for attempt n (0-based).
func (b *Backoff) Ceiling(n int) time.Duration {
	c := float64(b.Base) * math.Pow(2, float64(n))
	if c > float64(b.Cap) || math.IsInf(c, 1) {
		return b.Cap
	}
	return time.Duration(c)
}

// Next is the next delay; false once MaxAttempts delays were handed out.
func (b *Backoff) Next() (time.Duration, bool) {
	if b.MaxAttempts > 0 && b.attempt >= b.MaxAttempts {
		return 0, false
	}
	d := time.Duration(b.rng.Int63n(int64(b.Ceiling(b.attempt)) + 1))
	b.attempt++
	return d, true
}

// Attempt is how many delays were handed out since the last Reset.
func (b *Backoff) Attempt() int { return b.attempt }

// Reset starts over (after a connection succeeded).
func (b *Backoff) Reset() { b.attempt = 0 }

// Client is a reconnecting tether client. Safe for concurrent use.
type Client struct {
	cfg     Config
	connCfg ConnConfig
	origin  time.Time

	mu          sync.Mutex
	outbox      [][]byte
	outboxBytes int
	space       chan struct{} // closed (and replaced) when the outbox has room
	stopped     *Disconnect
	finished    bool
	events      []Event
	evReady     chan struct{} // closed (and replaced) when events are appended
	connected   bool

	kick      chan struct{}
	closeCh   chan struct{}
	closeOnce sync.Once
	done      chan struct{}
	lingers   sync.WaitGroup
	evOnce    sync.Once
	evCh      chan Event
}

// Start validates cfg and starts connecting in the background. Cancelling ctx stops the
// client abruptly; Close stops it in order.
func Start(ctx context.Context, cfg Config) (*Client, error) {
	if p := ClientIDProblem(cfg.ClientID); p != "" {
		return nil, fmt.Errorf("tether: invalid client id %q: %s", cfg.ClientID, p)
	}
	if _, _, err := net.SplitHostPort(cfg.Addr); err != nil {
		return nil, fmt.Errorf("tether: invalid address %q: %w", cfg.Addr, err)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&cfg.BackoffBase, 100*time.Millisecond)
	def(&cfg.BackoffCap, 30*time.Second)
	def(&cfg.HandshakeTimeout, 10*time.Second)
	def(&cfg.CloseTimeout, 5*time.Second)
	if cfg.MaxFrameLen == 0 {
		cfg.MaxFrameLen = DefaultMaxFrameLen
	}
	if cfg.OutboxBytes == 0 {
		cfg.OutboxBytes = 1 << 20
	}
	if cfg.Seed == 0 {
		cfg.Seed = time.Now().UnixNano()
	}
	c := &Client{
		cfg:     cfg,
		connCfg: ConnConfig{MaxFrameLen: cfg.MaxFrameLen, HandshakeTimeout: cfg.HandshakeTimeout, Session: cfg.Session},
		origin:  time.Now(),
		space:   make(chan struct{}),
		evReady: make(chan struct{}),
		kick:    make(chan struct{}, 1),
		closeCh: make(chan struct{}),
		done:    make(chan struct{}),
	}
	go c.run(ctx)
	return c, nil
}

func (c *Client) now() time.Duration { return time.Since(c.origin) }

func (c *Client) poke() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

func (c *Client) closing() bool {
	select {
	case <-c.closeCh:
		return true
	default:
		return false
	}
}

// Send queues one message. With a session it is delivered exactly once, in order, unless a
// SessionLost event names its sequence number. Blocks while the outbox is full (until ctx
// is done); returns a *StoppedError once the client stopped.
func (c *Client) Send(ctx context.Context, msg []byte) error {
	limit := int(c.cfg.MaxFrameLen) - 1
	if !c.cfg.NoSession {
		limit -= 8
	}
	if len(msg) > limit {
		return fmt.Errorf("tether: message of %d bytes exceeds the maximum of %d", len(msg), limit)
	}
	c.mu.Lock()
	for {
		if c.stopped != nil {
			d := *c.stopped
			c.mu.Unlock()
			return &StoppedError{d}
		}
		if len(c.outbox) == 0 || c.outboxBytes+len(msg) <= c.cfg.OutboxBytes {
			break
		}
		ch := c.space
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
		c.mu.Lock()
	}
	c.outbox = append(c.outbox, append([]byte(nil), msg...))
	c.outboxBytes += len(msg)
	c.mu.Unlock()
	c.poke()
	return nil
}

// Next returns the next event, blocking until there is one; io.EOF after Stopped.
func (c *Client) Next(ctx context.Context) (Event, error) {
	for {
		c.mu.Lock()
		if len(c.events) > 0 {
			ev := c.events[0]
			c.events[0] = nil
			c.events = c.events[1:]
			c.mu.Unlock()
			return ev, nil
		}
		if c.finished {
			c.mu.Unlock()
			return nil, io.EOF
		}
		ch := c.evReady
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Events is a channel of the events (closed after Stopped), for select loops. Use either
// Events or Next, not both.
func (c *Client) Events() <-chan Event {
	c.evOnce.Do(func() {
		c.evCh = make(chan Event)
		go func() {
			defer close(c.evCh)
			for {
				ev, err := c.Next(context.Background())
				if err != nil {
					return
				}
				c.evCh <- ev
			}
		}()
	})
	return c.evCh
}

// Connected reports whether a connection is established.
func (c *Client) Connected() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.connected
}

// Queued is how many messages wait for a connection.
func (c *Client) Queued() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.outbox)
}

// Close closes in order once the queued messages went out (at most CloseTimeout, then
// abruptly), and stops. Safe to call more than once.
func (c *Client) Close() error {
	c.closeOnce.Do(func() { close(c.closeCh) })
	c.poke()
	select {
	case <-c.done:
	case <-time.After(c.cfg.CloseTimeout):
		c.mu.Lock()
		c.outbox, c.outboxBytes = nil, 0 // give up on the queue: the CLOSE goes out now
		c.mu.Unlock()
		c.poke()
		<-c.done
	}
	c.lingers.Wait()
	return nil
}

func (c *Client) emit(evs ...Event) {
	c.mu.Lock()
	c.events = append(c.events, evs...)
	close(c.evReady)
	c.evReady = make(chan struct{})
	c.mu.Unlock()
}

func (c *Client) setConnected(v bool) {
	c.mu.Lock()
	c.connected = v
	c.mu.Unlock()
}

// stop ends the client. What can no longer be delivered is reported: the session's
// unacknowledged range (unless the connection was closed in order: the server read
// everything before our CLOSE) and the messages never sent.
func (c *Client) stop(d Disconnect, s *Session, orderly bool) {
	c.mu.Lock()
	var unacked *SeqRange
	if s != nil && !orderly {
		unacked = s.Unacked()
	}
	unsent := c.outbox
	c.outbox, c.outboxBytes = nil, 0
	c.stopped = &d
	c.connected = false
	close(c.space)
	c.space = make(chan struct{})
	if unacked != nil || len(unsent) > 0 {
		c.events = append(c.events, SessionLost{Unacked: unacked, Unsent: unsent})
	}
	c.events = append(c.events, Stopped{d})
	c.finished = true
	close(c.evReady)
	c.evReady = make(chan struct{})
	c.mu.Unlock()
}

func (c *Client) run(ctx context.Context) {
	defer close(c.done)
	b := NewBackoff(c.cfg.BackoffBase, c.cfg.BackoffCap, c.cfg.MaxAttempts, c.cfg.Seed)
	var session *Session
	for {
		if c.closing() || ctx.Err() != nil {
			c.stop(Disconnect{Reason: ReasonLocalClose}, session, false)
			return
		}
		var cred []byte
		if c.cfg.Credential != nil {
			var err error
			cctx, cancel := context.WithTimeout(ctx, c.cfg.HandshakeTimeout)
			cred, err = c.cfg.Credential(cctx)
			cancel()
			if err != nil {
				d := Disconnect{Reason: ReasonIOError, Text: "credential provider failed: " + err.Error()}
				c.emit(Disconnected{d})
				if !c.pause(ctx, b, d, session) {
					return
				}
				continue
			}
		}
		hello := NewHello(c.cfg.ClientID, uint32(c.cfg.Heartbeat/time.Millisecond), !c.cfg.NoSession, nil, cred)
		d, established, s := c.connectOnce(ctx, hello, session)
		session = s
		if established {
			b.Reset()
		}
		if c.closing() || ctx.Err() != nil {
			orderly := d.Reason == ReasonLocalClose && established
			if d.Reason != ReasonLocalClose {
				d = Disconnect{Reason: ReasonLocalClose}
			}
			c.stop(d, session, orderly)
			return
		}
		switch d.Retry() {
		case RetryNever:
			c.stop(d, session, false)
			return
		case RetryNow:
			continue
		}
		if !c.pause(ctx, b, d, session) {
			return
		}
	}
}

// pause waits the next backoff delay; false when the client stopped instead.
func (c *Client) pause(ctx context.Context, b *Backoff, d Disconnect, s *Session) bool {
	delay, ok := b.Next()
	if !ok {
		c.stop(d, s, false)
		return false
	}
	c.emit(Reconnecting{b.Attempt(), delay})
	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.closeCh:
	case <-ctx.Done():
	}
	c.stop(Disconnect{Reason: ReasonLocalClose}, s, false)
	return false
}

func (c *Client) sockopts(deadAfter time.Duration) SocketOptions {
	d := c.cfg.DetectWithin
	if d == 0 {
		d = deadAfter
	}
	if d == 0 {
		d = 30 * time.Second
	}
	return DeriveSocketOptions(d, c.cfg.PathTimeout)
}

func classifyDial(err error, timeout time.Duration) Disconnect {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return Disconnect{Reason: ReasonConnectRefused}
	case errors.Is(err, context.DeadlineExceeded):
		return Disconnect{Reason: ReasonIOError, Text: fmt.Sprintf("connect timed out after %v", timeout)}
	}
	return Disconnect{Reason: ReasonIOError, Text: err.Error()}
}

func (c *Client) connectOnce(ctx context.Context, hello Hello, session *Session) (Disconnect, bool, *Session) {
	conn := NewConn(c.now(), c.connCfg, hello, session)
	dctx, cancel := context.WithTimeout(ctx, c.cfg.HandshakeTimeout)
	defer cancel()
	dial := c.cfg.Dial
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	nc, err := dial(dctx, "tcp", c.cfg.Addr)
	if err != nil {
		d := classifyDial(err, c.cfg.HandshakeTimeout)
		c.emit(Disconnected{d})
		return d, false, conn.TakeSession()
	}
	tcp, _ := nc.(*net.TCPConn)
	if tcp != nil {
		_ = applySocketOptions(tcp, c.sockopts(0))
	}
	rw := nc
	if c.cfg.TLS != nil {
		tc := c.cfg.TLS.Clone()
		if tc.ServerName == "" {
			tc.ServerName, _, _ = net.SplitHostPort(c.cfg.Addr)
		}
		t := tls.Client(nc, tc)
		if err := t.HandshakeContext(dctx); err != nil {
			nc.Close()
			d := Disconnect{Reason: ReasonIOError, Text: "tls: " + err.Error()}
			c.emit(Disconnected{d})
			return d, false, conn.TakeSession()
		}
		rw = t
	}
	return c.drive(ctx, conn, rw, tcp)
}

func isFailure(reason string) bool {
	switch reason {
	case ReasonHeartbeatTimeout, ReasonKeepaliveTimeout, ReasonUserTimeout, ReasonPeerReset, ReasonIOError:
		return true
	}
	return false
}

func classifyRead(conn *Conn, err error, lastWrite time.Duration, now time.Duration) {
	switch {
	case errors.Is(err, io.EOF):
		conn.HandleEOF(now)
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNABORTED):
		conn.HandleTransportError(now, ReasonPeerReset, "")
	case errors.Is(err, syscall.ETIMEDOUT):
		if lastWrite >= 0 && lastWrite >= conn.LastRx() {
			conn.HandleTransportError(now, ReasonUserTimeout, "")
		} else {
			conn.HandleTransportError(now, ReasonKeepaliveTimeout, "")
		}
	default:
		conn.HandleTransportError(now, ReasonIOError, err.Error())
	}
}

// feed moves queued messages into the connection while its replay buffer has room.
func (c *Client) feed(conn *Conn, now time.Duration) {
	c.mu.Lock()
	moved := false
	for len(c.outbox) > 0 && conn.CanSend(len(c.outbox[0])) && len(conn.PendingTransmit()) < transmitHighWater {
		msg := c.outbox[0]
		c.outbox[0] = nil
		c.outbox = c.outbox[1:]
		c.outboxBytes -= len(msg)
		_ = conn.Send(now, msg) // length checked in Send, room checked above
		moved = true
	}
	if len(c.outbox) == 0 {
		c.outbox = nil
	}
	closeNow := len(c.outbox) == 0 && c.closing()
	if moved {
		close(c.space)
		c.space = make(chan struct{})
	}
	c.mu.Unlock()
	if closeNow {
		conn.Close(now, CodeNormal, "client closing")
	}
}

func (c *Client) drive(ctx context.Context, conn *Conn, rw net.Conn, tcp *net.TCPConn) (Disconnect, bool, *Session) {
	rx := make(chan []byte)
	rxErr := make(chan error, 1)
	wdone := make(chan error, 1)
	authCh := make(chan []byte, 1)
	quit := make(chan struct{})
	go func() {
		buf := make([]byte, readChunk)
		for {
			n, err := rw.Read(buf)
			if n > 0 {
				b := append([]byte(nil), buf[:n]...)
				select {
				case rx <- b:
				case <-quit:
					return
				}
			}
			if err != nil {
				rxErr <- err
				return
			}
		}
	}()
	// Writes run on a goroutine of their own, one at a time, so that timers keep firing while
	// a write blocks; an idle connection has none.
	write := func(b []byte) {
		go func() {
			_, err := rw.Write(b)
			wdone <- err
		}()
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var disc Disconnect
	established, writing, readDone := false, false, false
	var lastWrite time.Duration = -1
	for {
		now := c.now()
		if conn.Established() {
			c.feed(conn, now)
		} else if c.closing() && !conn.Closed() {
			conn.Close(now, CodeNormal, "client closing") // not established: nothing to flush
		}
		for ev := conn.PollEvent(); ev != nil; ev = conn.PollEvent() {
			switch e := ev.(type) {
			case Established:
				established = true
				c.setConnected(true)
				if c.cfg.DetectWithin == 0 && tcp != nil {
					_ = applySocketOptions(tcp, c.sockopts(time.Duration(e.Welcome.DeadAfterMs)*time.Millisecond))
				}
				c.emit(Connected{e.Welcome})
			case Message:
				c.emit(e)
			case Resumed:
				c.emit(e)
			case SessionLost:
				c.emit(e)
			case AuthDue:
				if c.cfg.Credential != nil {
					go func() {
						cctx, cancel := context.WithTimeout(ctx, c.cfg.HandshakeTimeout)
						defer cancel()
						if cred, err := c.cfg.Credential(cctx); err == nil {
							select {
							case authCh <- cred:
							case <-quit:
							}
						}
					}()
				}
			case Closed:
				disc = e.Disconnect
				c.setConnected(false)
				c.emit(Disconnected{disc})
			}
		}
		if !writing && len(conn.PendingTransmit()) > 0 && !conn.Closed() {
			write(conn.TakeTransmit())
			writing = true
			lastWrite = now
		}
		if conn.Closed() {
			break
		}
		if dl, ok := conn.PollTimeout(); ok {
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
			timer.Reset(dl - c.now())
		}
		select {
		case b := <-rx:
			conn.HandleInput(c.now(), b)
		case err := <-rxErr:
			readDone = true
			classifyRead(conn, err, lastWrite, c.now())
		case err := <-wdone:
			writing = false
			if err != nil {
				classifyRead(conn, err, c.now(), c.now())
			}
		case <-timer.C:
			now := c.now()
			if dl, ok := conn.PollTimeout(); ok && dl > now {
				now = dl // the timer fired for dl: time is at least that
			}
			conn.HandleTimeout(now)
		case <-c.kick:
		case cred := <-authCh:
			_ = conn.Auth(c.now(), cred)
		case <-ctx.Done():
			conn.Close(c.now(), CodeGoingAway, "client stopped")
		}
	}
	c.finishConn(conn, rw, tcp, disc, writing, readDone, rx, rxErr, wdone, quit)
	return disc, established, conn.TakeSession()
}

// finishConn closes the transport: abortively (RST) after a failure, so that nothing is
// retransmitted into a dead path; otherwise in order (the CLOSE frame, FIN, then the
// peer's FIN or a 2 s linger) in the background.
func (c *Client) finishConn(conn *Conn, rw net.Conn, tcp *net.TCPConn, d Disconnect, writing, readDone bool,
	rx chan []byte, rxErr chan error, wdone chan error, quit chan struct{}) {
	if isFailure(d.Reason) {
		// The CLOSE frame may still reach a half-alive peer: one short, best-effort write.
		if rest := conn.TakeTransmit(); len(rest) > 0 && !writing {
			_ = rw.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			_, _ = rw.Write(rest)
		}
		if tcp != nil {
			setAbortiveClose(tcp)
		}
		rw.Close()
		close(quit)
		return
	}
	rest := conn.TakeTransmit()
	c.lingers.Add(1)
	go func() {
		defer c.lingers.Done()
		defer close(quit)
		defer rw.Close()
		deadline := time.Now().Add(closeLinger)
		_ = rw.SetDeadline(deadline)
		if writing {
			if err := <-wdone; err != nil {
				return
			}
		}
		if len(rest) > 0 {
			if _, err := rw.Write(rest); err != nil {
				return
			}
		}
		type closeWriter interface{ CloseWrite() error }
		if cw, ok := rw.(closeWriter); ok && !readDone && cw.CloseWrite() == nil {
			// Keep reading (and discarding) until the peer's FIN, so that unread data does
			// not turn our close into an RST.
			linger := time.NewTimer(time.Until(deadline))
			defer linger.Stop()
			for {
				select {
				case <-rx:
				case <-rxErr:
					return
				case <-linger.C:
					return
				}
			}
		}
	}()
}
