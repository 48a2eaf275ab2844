package tether

// The client against the real `tether serve` (built from this repository) and against
// scripted servers. Bounds on real sockets are loose and two-sided (the machine may be busy).

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

const nChaos = 10000

func startClient(t *testing.T, cfg Config) *Client {
	t.Helper()
	c, err := Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// until returns the next event of one of the given kinds, and every event seen on the way.
func until(t *testing.T, c *Client, timeout time.Duration, match func(Event) bool) (Event, []Event) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var seen []Event
	for {
		ev, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for an event: %v; seen %v", err, seen)
		}
		seen = append(seen, ev)
		if match(ev) {
			return ev, seen
		}
	}
}

func isConnected(ev Event) bool    { _, ok := ev.(Connected); return ok }
func isDisconnected(ev Event) bool { _, ok := ev.(Disconnected); return ok }
func isMessage(ev Event) bool      { _, ok := ev.(Message); return ok }
func isStopped(ev Event) bool      { _, ok := ev.(Stopped); return ok }

func TestChaos10000EachWayExactlyOnceInOrder(t *testing.T) {
	srv := startServer(t)
	proxy := startResettingProxy(t, srv.addr, 50*time.Millisecond)
	c := startClient(t, Config{Addr: proxy.ln.Addr().String(), ClientID: "chaos-go", BackoffBase: 20 * time.Millisecond, BackoffCap: 200 * time.Millisecond, Seed: 7})
	started := time.Now()
	errc := make(chan error, 1)
	go func() {
		// Paced (5 messages every 2 ms, ~4 s in all) so that the transfer spans many resets,
		// and evenly, so that resets cut messages in flight: in bursts of 50 every 20 ms, Go
		// sent each burst in well under a millisecond and a run in six saw no reset cut one
		// (0 replayed).
		for i := 1; i <= nChaos; i++ {
			if err := c.Send(context.Background(), []byte(fmt.Sprintf("%05d", i))); err != nil {
				errc <- err
				return
			}
			if i%5 == 0 {
				time.Sleep(2 * time.Millisecond)
			}
		}
		errc <- nil
	}()
	expect, connects, replayed := 1, 0, uint64(0)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	for expect <= nChaos {
		ev, err := c.Next(ctx)
		if err != nil {
			t.Fatalf("after %d echoes: %v", expect-1, err)
		}
		switch e := ev.(type) {
		case Message:
			got := 0
			fmt.Sscanf(string(e.Payload), "%d", &got)
			if got != expect {
				t.Fatalf("echo %d arrived when %d was next", got, expect)
			}
			expect++
		case Connected:
			connects++
		case Resumed:
			replayed += e.Replayed
		case SessionLost, Stopped:
			t.Fatalf("unexpected %#v", e)
		}
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	fmt.Printf("chaos (go): %d messages each way, %d connections, %d resets, %d replayed, %.1f s\n",
		nChaos, connects, proxy.Resets(), replayed, time.Since(started).Seconds())
	if proxy.Resets() <= 20 || connects <= 20 {
		t.Fatalf("only %d resets and %d connections: the proxy must actually reset", proxy.Resets(), connects)
	}
	if replayed == 0 {
		t.Fatal("some messages must have been replayed after a resume")
	}
}

func TestSilentServerDetectedWithinDeadAfter(t *testing.T) {
	s := startSilentServer(t)
	c := startClient(t, Config{Addr: s.ln.Addr().String(), ClientID: "silent-go", NoSession: true, BackoffBase: 5 * time.Second, BackoffCap: 5 * time.Second})
	ev, _ := until(t, c, 10*time.Second, isConnected)
	if d := ev.(Connected).Welcome.DeadAfterMs; d != 3000 {
		t.Fatalf("dead_after %d", d)
	}
	ev, _ = until(t, c, 10*time.Second, isDisconnected)
	detected := time.Now()
	if r := ev.(Disconnected).Disconnect.Reason; r != ReasonHeartbeatTimeout {
		t.Fatalf("reason %s", r)
	}
	s.mu.Lock()
	after := detected.Sub(s.welcomed[0])
	got := append([]byte(nil), s.received...)
	s.mu.Unlock()
	fmt.Printf("silent server (go): detected %.2f s after the WELCOME (d = 3 s)\n", after.Seconds())
	if after < 2900*time.Millisecond || after > 4500*time.Millisecond {
		t.Fatalf("detected after %v, want about 3 s", after)
	}
	if n := bytes.Count(got, []byte{0, 0, 0, 0}); n < 2 {
		t.Fatalf("%d heartbeats: want one every h = 1 s", n)
	}
	// The CLOSE(HEARTBEAT_TIMEOUT) that goes out just before the RST is best effort: the
	// peer's kernel may discard it when the RST arrives (the conformance vectors check it).
}

func TestIdleConnectionKeptAliveByHeartbeats(t *testing.T) {
	srv := startServer(t)
	c := startClient(t, Config{Addr: srv.addr, ClientID: "idle-go"})
	ev, _ := until(t, c, 10*time.Second, isConnected)
	d := time.Duration(ev.(Connected).Welcome.DeadAfterMs) * time.Millisecond
	time.Sleep(d * 3 / 2)
	if !c.Connected() {
		t.Fatal("not connected after idling 1.5 d")
	}
	if err := c.Send(context.Background(), []byte("still here")); err != nil {
		t.Fatal(err)
	}
	ev, seen := until(t, c, 10*time.Second, isMessage)
	if string(ev.(Message).Payload) != "still here" {
		t.Fatalf("got %q", ev.(Message).Payload)
	}
	for _, e := range seen {
		if isDisconnected(e) {
			t.Fatalf("disconnected while idle: %v", e)
		}
	}
}

func TestTLSAndMutualTLS(t *testing.T) {
	srv := startServer(t)
	for _, mutual := range []bool{false, true} {
		p := startTLSProxy(t, srv.addr, mutual)
		tc := &tls.Config{RootCAs: certPool(t), ServerName: "localhost"}
		if mutual {
			cert, err := tls.LoadX509KeyPair(tlsFile("client.pem"), tlsFile("client.key"))
			if err != nil {
				t.Fatal(err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		c := startClient(t, Config{Addr: p.ln.Addr().String(), ClientID: "tls-go", TLS: tc})
		until(t, c, 10*time.Second, isConnected)
		if err := c.Send(context.Background(), []byte("over tls")); err != nil {
			t.Fatal(err)
		}
		ev, _ := until(t, c, 10*time.Second, isMessage)
		if string(ev.(Message).Payload) != "over tls" {
			t.Fatalf("got %q", ev.(Message).Payload)
		}
		_ = c.Close()
		if mutual {
			p.mu.Lock()
			subj := p.subjects
			p.mu.Unlock()
			if len(subj) == 0 || subj[len(subj)-1] != "demo-client" {
				t.Fatalf("client certificate not presented: %v", subj)
			}
		}
	}
}

func TestTLSUntrustedServerIsAnError(t *testing.T) {
	srv := startServer(t)
	p := startTLSProxy(t, srv.addr, false)
	c := startClient(t, Config{Addr: p.ln.Addr().String(), ClientID: "tls-bad-go", TLS: &tls.Config{ServerName: "localhost"}, MaxAttempts: 1})
	ev, seen := until(t, c, 20*time.Second, isStopped)
	for _, e := range seen {
		if isConnected(e) {
			t.Fatal("connected to an untrusted server")
		}
	}
	d := ev.(Stopped).Disconnect
	if d.Reason != ReasonIOError || !strings.Contains(d.Text, "certificate") {
		t.Fatalf("stopped with %v", d)
	}
}

func TestReplacedIsTerminal(t *testing.T) {
	srv := startServer(t)
	a := startClient(t, Config{Addr: srv.addr, ClientID: "twin-go"})
	until(t, a, 10*time.Second, isConnected)
	b := startClient(t, Config{Addr: srv.addr, ClientID: "twin-go"})
	until(t, b, 10*time.Second, isConnected)
	ev, seen := until(t, a, 10*time.Second, isStopped)
	d := ev.(Stopped).Disconnect
	if d.Reason != ReasonReplaced || d.Retry() != RetryNever {
		t.Fatalf("stopped with %v", d)
	}
	for _, e := range seen {
		if _, ok := e.(Reconnecting); ok {
			t.Fatal("a replaced client must not reconnect")
		}
	}
	if _, err := a.Next(context.Background()); err != io.EOF {
		t.Fatalf("after Stopped: %v", err)
	}
	var se *StoppedError
	if err := a.Send(context.Background(), []byte("x")); !errors.As(err, &se) {
		t.Fatalf("send after stop: %v", err)
	}
}

func TestConnectRefusedIsRetriedWithBackoff(t *testing.T) {
	c := startClient(t, Config{Addr: freePort(t), ClientID: "nobody-go", BackoffBase: 50 * time.Millisecond, BackoffCap: 100 * time.Millisecond, MaxAttempts: 3})
	_, seen := until(t, c, 20*time.Second, isStopped)
	var reasons []string
	var attempts []int
	for _, e := range seen {
		switch e := e.(type) {
		case Disconnected:
			reasons = append(reasons, e.Disconnect.Reason)
		case Reconnecting:
			attempts = append(attempts, e.Attempt)
			if e.Delay > 100*time.Millisecond {
				t.Fatalf("delay %v above the cap", e.Delay)
			}
		}
	}
	if fmt.Sprint(reasons) != "[connect-refused connect-refused connect-refused connect-refused]" || fmt.Sprint(attempts) != "[1 2 3]" {
		t.Fatalf("reasons %v attempts %v", reasons, attempts)
	}
}

func TestBackoffIsFullJitterCappedAndResets(t *testing.T) {
	b := NewBackoff(100*time.Millisecond, time.Second, 20, 1)
	var max time.Duration
	for n := 0; n < 20; n++ {
		d, ok := b.Next()
		if !ok || d < 0 || d > b.Ceiling(n) || b.Ceiling(n) > time.Second {
			t.Fatalf("delay %d: %v (ceiling %v)", n, d, b.Ceiling(n))
		}
		if n >= 5 && d > max {
			max = d
		}
	}
	if _, ok := b.Next(); ok {
		t.Fatal("gave a 21st delay")
	}
	if max < 300*time.Millisecond {
		t.Fatalf("later delays use the whole window, max %v", max)
	}
	b.Reset()
	if d, _ := b.Next(); d > 100*time.Millisecond {
		t.Fatalf("after reset %v", d)
	}
}

func TestClientIDRules(t *testing.T) {
	for _, ok := range []string{"sensor-1", "jörg-📱", strings.Repeat("x", 255), strings.Repeat("ü", 127), "a b"} {
		if p := ClientIDProblem(ok); p != "" {
			t.Errorf("%q: %s", ok, p)
		}
	}
	for _, bad := range []string{"", strings.Repeat("x", 256), strings.Repeat("ü", 128), "a\x00b", "a\x7f", "a\u0085",
		"a\u200bb", "\ufeffa", "a\u2028b", "a\u2029b", "a\u202eb", "a\nb", "\xff"} {
		if ClientIDProblem(bad) == "" {
			t.Errorf("%q accepted", bad)
		}
	}
	if _, err := Start(context.Background(), Config{Addr: "127.0.0.1:1", ClientID: "bad\nid"}); err == nil {
		t.Fatal("Start accepted a bad id")
	}
}

func TestReconnectDecisions(t *testing.T) {
	refused := func(code uint16) Disconnect { return Disconnect{Reason: ReasonRefused, Code: code, HasCode: true} }
	for _, d := range []Disconnect{{Reason: ReasonReplaced, Code: 5, HasCode: true}, {Reason: ReasonLocalClose},
		refused(CodeBadHello), refused(CodeUnsupportedVersion), refused(CodeUnauthorized), refused(CodeIDNotAllowed)} {
		if d.Retry() != RetryNever {
			t.Errorf("%v: %s", d, d.Retry())
		}
	}
	if d := refused(CodeSessionUnknown); d.Retry() != RetryNow {
		t.Errorf("%v: %s", d, d.Retry())
	}
	for _, code := range []uint16{CodeServerFull, CodeHandshakeTimeout, CodeRefused, CodeSessionBusy, CodeThrottled, 1000} {
		if d := refused(code); d.Retry() != RetryBackoff {
			t.Errorf("%v: %s", d, d.Retry())
		}
	}
	for _, r := range []string{ReasonPeerClosed, ReasonPeerReset, ReasonHeartbeatTimeout, ReasonKeepaliveTimeout,
		ReasonUserTimeout, ReasonProtocolError, ReasonIOError, ReasonConnectRefused, ReasonPeerClose} {
		if d := (Disconnect{Reason: r}); d.Retry() != RetryBackoff {
			t.Errorf("%v: %s", d, d.Retry())
		}
	}
}

func TestSocketOptionsDerivedAndReadBack(t *testing.T) {
	if o := DeriveSocketOptions(30*time.Second, 0); o != (SocketOptions{15 * time.Second, 5 * time.Second, 3, 30 * time.Second}) {
		t.Fatalf("30 s: %+v", o)
	}
	if o := DeriveSocketOptions(3*time.Second, 4*time.Second); o != (SocketOptions{time.Second, time.Second, 2, 3 * time.Second}) {
		t.Fatalf("3 s over 4 s: %+v", o)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	want := DeriveSocketOptions(30*time.Second, 0)
	if err := applySocketOptions(nc.(*net.TCPConn), want); err != nil {
		t.Fatal(err)
	}
	got, err := readSocketOptions(nc.(*net.TCPConn))
	if err != nil {
		t.Skipf("cannot read socket options back here: %v", err)
	}
	if got != want {
		t.Fatalf("kernel has %+v, want %+v", got, want)
	}
}

func TestSendBlocksWhileTheOutboxIsFullAndAStopReportsTheUnsent(t *testing.T) {
	c := startClient(t, Config{Addr: freePort(t), ClientID: "full-go", OutboxBytes: 10, BackoffBase: 5 * time.Second, BackoffCap: 5 * time.Second})
	if err := c.Send(context.Background(), []byte("123456")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := c.Send(ctx, []byte("abcdef")); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second send: %v (should have waited for room)", err)
	}
	blocked := make(chan error, 1)
	go func() { blocked <- c.Send(context.Background(), []byte("abcdef")) }()
	time.Sleep(100 * time.Millisecond)
	_ = c.Close()
	var se *StoppedError
	if err := <-blocked; !errors.As(err, &se) {
		t.Fatalf("blocked send after close: %v", err)
	}
	var lost []SessionLost
	var last Event
	for {
		ev, err := c.Next(context.Background())
		if err != nil {
			break
		}
		if l, ok := ev.(SessionLost); ok {
			lost = append(lost, l)
		}
		last = ev
	}
	if len(lost) != 1 || len(lost[0].Unsent) != 1 || string(lost[0].Unsent[0]) != "123456" || lost[0].Unacked != nil {
		t.Fatalf("session lost events %+v", lost)
	}
	if s, ok := last.(Stopped); !ok || s.Disconnect.Reason != ReasonLocalClose {
		t.Fatalf("last event %#v", last)
	}
}

func TestCredentialInHelloAndRefreshedBeforeTheTTL(t *testing.T) {
	// A scripted server (the reference server cannot verify credentials yet).
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type result struct {
		hello Hello
		auth  []byte
		after time.Duration
	}
	res := make(chan result, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		head := make([]byte, 9)
		if _, err := io.ReadFull(c, head); err != nil {
			return
		}
		body := make([]byte, binary.BigEndian.Uint32(head[5:]))
		if _, err := io.ReadFull(c, body); err != nil {
			return
		}
		f, _ := ParseBody(body)
		ttl := uint32(1000)
		w := NewWelcomeForTest(10000, 30000, &ttl)
		_, _ = c.Write(append(append([]byte(nil), Preamble...), AppendFrame(nil, w)...))
		welcomed := time.Now()
		dec := Decoder{MaxFrameLen: DefaultMaxFrameLen}
		buf := make([]byte, 4096)
		var got []byte
		for got == nil {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			_ = dec.Feed(buf[:n], func(f Frame) bool {
				if a, ok := f.(Auth); ok {
					got = a.Credential
				}
				return true
			})
		}
		after := time.Since(welcomed)
		_, _ = c.Write(AppendFrame(nil, AuthOK{0}))
		res <- result{f.(Hello), got, after}
		_, _ = io.Copy(io.Discard, c)
	}()
	var calls int32
	c := startClient(t, Config{Addr: ln.Addr().String(), ClientID: "cred-go", NoSession: true,
		Credential: func(ctx context.Context) ([]byte, error) {
			n := atomic.AddInt32(&calls, 1)
			return []byte(fmt.Sprintf("cred-%d", n)), nil
		}})
	var r result
	select {
	case r = <-res:
	case <-time.After(10 * time.Second):
		t.Fatal("no AUTH")
	}
	time.Sleep(300 * time.Millisecond)
	_ = c.Close()
	if string(r.hello.Credential) != "cred-1" || r.hello.Flags != HelloCredential {
		t.Fatalf("hello %+v", r.hello)
	}
	if string(r.auth) != "cred-2" || r.after < 850*time.Millisecond || r.after > 1500*time.Millisecond {
		t.Fatalf("auth %q after %v", r.auth, r.after)
	}
	if n := atomic.LoadInt32(&calls); n != 2 {
		t.Fatalf("%d credential calls: no refresh after AUTH_OK(0)", n)
	}
}

// NewWelcomeForTest builds a WELCOME with its flags.
func NewWelcomeForTest(h, d uint32, ttl *uint32) Welcome {
	w := Welcome{HeartbeatMs: h, DeadAfterMs: d, CredentialTTLMs: ttl}
	if ttl != nil {
		w.Flags |= WelcomeCredentialTTL
	}
	return w
}

func TestCancellingTheContextStopsTheClient(t *testing.T) {
	srv := startServer(t)
	ctx, cancel := context.WithCancel(context.Background())
	c, err := Start(ctx, Config{Addr: srv.addr, ClientID: "ctx-go"})
	if err != nil {
		t.Fatal(err)
	}
	until(t, c, 10*time.Second, isConnected)
	cancel()
	ev, _ := until(t, c, 10*time.Second, isStopped)
	if r := ev.(Stopped).Disconnect.Reason; r != ReasonLocalClose {
		t.Fatalf("stopped with %s", r)
	}
	_ = c.Close()
}
