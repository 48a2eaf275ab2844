package tether

// Runs the shared conformance vectors (../../conformance, format in its README) against this
// client: every frame through the codec, every client exchange through Conn on a virtual
// clock. Server-role exchanges are skipped visibly (this is a client library).

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"
)

var supported = map[string]bool{"auth": true, "token-rotation": true, "coalesce": true, "policy-violation": true, "ack-on-close": true}

type obj = map[string]interface{}

func loadVectors(t *testing.T, name string) obj {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "..", "conformance", name))
	if err != nil {
		t.Fatalf("cannot open the vectors: %v", err)
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.UseNumber()
	var doc obj
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return doc
}

func skipReason(v obj, clientOnly bool) string {
	var missing []string
	if req, ok := v["requires"].([]interface{}); ok {
		for _, r := range req {
			if !supported[r.(string)] {
				missing = append(missing, r.(string))
			}
		}
	}
	if len(missing) > 0 {
		return "requires " + strings.Join(missing, ", ")
	}
	if clientOnly && v["role"] != "client" {
		return "server role (this is a client library)"
	}
	return ""
}

func num(n uint64) json.Number { return json.Number(strconv.FormatUint(n, 10)) }
func u64s(n uint64) string     { return strconv.FormatUint(n, 10) }

func unhex(t *testing.T, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex %q", s)
	}
	return b
}

func intOf(v interface{}) int {
	n, _ := v.(json.Number).Int64()
	return int(n)
}

func grantJSON(s *SessionGrant) obj {
	return obj{"session_id": u64s(s.SessionID), "token": hex.EncodeToString(s.Token[:]),
		"last_received": u64s(s.LastReceived), "linger_ms": num(uint64(s.LingerMs)), "resumed": s.Resumed}
}

func frameJSON(f Frame) obj {
	switch f := f.(type) {
	case Heartbeat:
		return obj{"type": "HEARTBEAT"}
	case Data:
		return obj{"type": "DATA", "payload": hex.EncodeToString(f.Payload)}
	case SeqData:
		return obj{"type": "SEQ_DATA", "seq": u64s(f.Seq), "payload": hex.EncodeToString(f.Payload)}
	case Ping:
		return obj{"type": "PING", "nonce": u64s(f.Nonce)}
	case Pong:
		return obj{"type": "PONG", "nonce": u64s(f.Nonce)}
	case Ack:
		return obj{"type": "ACK", "seq": u64s(f.Seq)}
	case Close:
		return obj{"type": "CLOSE", "code": num(uint64(f.Code)), "text": f.Text}
	case Refuse:
		return obj{"type": "REFUSE", "code": num(uint64(f.Code)), "text": f.Text}
	case Hello:
		o := obj{"type": "HELLO", "flags": num(uint64(f.Flags)), "want_session": f.WantSession,
			"heartbeat_ms": num(uint64(f.HeartbeatMs)), "client_id": f.ClientID}
		if r := f.Resume; r != nil {
			o["resume"] = obj{"session_id": u64s(r.SessionID), "token": hex.EncodeToString(r.Token[:]), "last_received": u64s(r.LastReceived)}
		}
		if f.Credential != nil {
			o["credential"] = hex.EncodeToString(f.Credential)
		}
		return o
	case Welcome:
		o := obj{"type": "WELCOME", "flags": num(uint64(f.Flags)), "heartbeat_ms": num(uint64(f.HeartbeatMs)),
			"dead_after_ms": num(uint64(f.DeadAfterMs))}
		if f.Session != nil {
			o["session"] = grantJSON(f.Session)
		}
		if f.CredentialTTLMs != nil {
			o["credential_ttl_ms"] = num(uint64(*f.CredentialTTLMs))
		}
		return o
	case Probe:
		return obj{"type": "PROBE", "body": hex.EncodeToString(f.Body)}
	case Extension:
		return obj{"type": "EXTENSION", "ext_type": num(uint64(f.Type))}
	case Auth:
		return obj{"type": "AUTH", "credential": hex.EncodeToString(f.Credential)}
	case AuthOK:
		return obj{"type": "AUTH_OK", "credential_ttl_ms": num(uint64(f.CredentialTTLMs))}
	}
	panic(fmt.Sprintf("%T", f))
}

// subset: every key of want is in got with the same value.
func subset(want, got interface{}) bool {
	switch w := want.(type) {
	case obj:
		g, ok := got.(obj)
		if !ok {
			return false
		}
		for k, v := range w {
			gv, ok := g[k]
			if !ok || !subset(v, gv) {
				return false
			}
		}
		return true
	case []interface{}:
		g, ok := got.([]interface{})
		if !ok || len(g) != len(w) {
			return false
		}
		for i := range w {
			if !subset(w[i], g[i]) {
				return false
			}
		}
		return true
	}
	return reflect.DeepEqual(want, got)
}

func decodeAll(data []byte, max uint32, chunk int) ([]Frame, error) {
	d := Decoder{MaxFrameLen: max}
	var out []Frame
	for i := 0; i < len(data); i += chunk {
		end := i + chunk
		if end > len(data) {
			end = len(data)
		}
		if err := d.Feed(data[i:end], func(f Frame) bool { out = append(out, f); return true }); err != nil {
			return nil, err
		}
	}
	if d.Buffered() != 0 {
		return nil, fmt.Errorf("%d bytes left over", d.Buffered())
	}
	return out, nil
}

func TestConformanceFrames(t *testing.T) {
	doc := loadVectors(t, "frames.json")
	passed, skipped, failed := 0, 0, 0
	for _, x := range doc["frames"].([]interface{}) {
		v := x.(obj)
		name := v["name"].(string)
		if why := skipReason(v, false); why != "" {
			t.Logf("SKIP frame %s: %s", name, why)
			fmt.Printf("SKIP frame %s: %s\n", name, why)
			skipped++
			continue
		}
		if err := checkFrame(t, v); err != nil {
			t.Errorf("frame %s: %v", name, err)
			failed++
		} else {
			passed++
		}
	}
	fmt.Printf("conformance frames (go): %d passed, %d skipped, %d failed\n", passed, skipped, failed)
}

func checkFrame(t *testing.T, v obj) error {
	data := unhex(t, v["hex"].(string))
	max := uint32(DefaultMaxFrameLen)
	if m, ok := v["max_frame_len"]; ok {
		max = uint32(intOf(m))
	}
	if want, ok := v["error"].(string); ok {
		if want == "oversize" {
			data = data[:4]
		}
		for _, chunk := range []int{len(data), 1} {
			fs, err := decodeAll(data, max, chunk)
			if err == nil {
				return fmt.Errorf("decoded %v, want error %s", fs, want)
			}
			pe, ok := err.(*ProtocolError)
			if !ok || pe.Kind != want {
				return fmt.Errorf("error %v, want %s", err, want)
			}
		}
		return nil
	}
	for _, chunk := range []int{len(data), 1} {
		fs, err := decodeAll(data, max, chunk)
		if err != nil {
			return err
		}
		if len(fs) != 1 {
			return fmt.Errorf("%d frames", len(fs))
		}
		if j := frameJSON(fs[0]); !subset(v["frame"], j) {
			return fmt.Errorf("decoded %v, want %v", j, v["frame"])
		}
		if c, ok := v["canonical"]; !ok || c != false {
			if again := AppendFrame(nil, fs[0]); !bytes.Equal(again, data) {
				return fmt.Errorf("re-encoded as %x", again)
			}
		}
	}
	return nil
}

func TestConformanceExchanges(t *testing.T) {
	doc := loadVectors(t, "exchanges.json")
	passed, skipped, failed := 0, 0, 0
	for _, e := range doc["exchanges"].([]interface{}) {
		x := e.(obj)
		name := x["name"].(string)
		if why := skipReason(x, true); why != "" {
			t.Logf("SKIP exchange %s: %s", name, why)
			fmt.Printf("SKIP exchange %s: %s\n", name, why)
			skipped++
			continue
		}
		if err := newRunner(t, x).run(x); err != nil {
			t.Errorf("exchange %s: %v", name, err)
			failed++
		} else {
			passed++
		}
	}
	fmt.Printf("conformance exchanges (go): %d passed, %d skipped, %d failed\n", passed, skipped, failed)
}

type stamped struct {
	at time.Duration
	v  interface{}
}

type runner struct {
	t      *testing.T
	cfg    ConnConfig
	hello  Hello
	now    time.Duration
	conn   *Conn
	out    []stamped
	events []stamped
}

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func newRunner(t *testing.T, x obj) *runner {
	c := x["config"].(obj)
	r := &runner{t: t}
	r.cfg = ConnConfig{
		MaxFrameLen:      uint32(intOf(c["max_frame_len"])),
		HandshakeTimeout: ms(intOf(c["handshake_timeout_ms"])),
		Session: SessionConfig{
			MaxReplayBytes: intOf(c["max_replay_bytes"]), MaxReplayMessages: intOf(c["max_replay_messages"]),
			AckEvery: uint64(intOf(c["ack_every"])), AckDelay: ms(intOf(c["ack_delay_ms"])),
		},
	}
	var cred []byte
	if s, ok := c["credential"].(string); ok {
		cred = unhex(t, s)
	}
	r.hello = NewHello(c["client_id"].(string), uint32(intOf(c["heartbeat_ms"])), c["session"] == true, nil, cred)
	r.conn = NewConn(0, r.cfg, r.hello, nil)
	r.collect()
	return r
}

func eventJSON(ev ConnEvent) obj {
	switch e := ev.(type) {
	case Established:
		w := e.Welcome
		o := obj{"type": "established", "heartbeat_ms": num(uint64(w.HeartbeatMs)), "dead_after_ms": num(uint64(w.DeadAfterMs)), "session": nil}
		if w.Session != nil {
			o["session"] = grantJSON(w.Session)
		}
		if w.CredentialTTLMs != nil {
			o["credential_ttl_ms"] = num(uint64(*w.CredentialTTLMs))
		}
		return o
	case Message:
		return obj{"type": "message", "payload": hex.EncodeToString(e.Payload)}
	case Resumed:
		return obj{"type": "resumed", "replayed": num(e.Replayed)}
	case SessionLost:
		var u interface{}
		if e.Unacked != nil {
			u = []interface{}{u64s(e.Unacked.First), u64s(e.Unacked.Last)}
		}
		return obj{"type": "session-lost", "unacked": u}
	case AuthDue:
		return obj{"type": "auth-due"}
	case AuthOKed:
		return obj{"type": "auth-ok", "credential_ttl_ms": num(uint64(e.CredentialTTLMs))}
	case Closed:
		d := e.Disconnect
		o := obj{"type": "closed", "reason": d.Reason, "silent_for_ms": num(uint64(d.SilentFor / time.Millisecond)), "retry": d.Retry()}
		if d.HasCode {
			o["code"] = num(uint64(d.Code))
			o["text"] = d.Text
		}
		return o
	}
	return nil
}

func (r *runner) collect() {
	if b := r.conn.TakeTransmit(); len(b) > 0 {
		r.out = append(r.out, stamped{r.now, b})
	}
	for ev := r.conn.PollEvent(); ev != nil; ev = r.conn.PollEvent() {
		if j := eventJSON(ev); j != nil {
			r.events = append(r.events, stamped{r.now, j})
		}
	}
}

func (r *runner) advance(t time.Duration) error {
	if t < r.now {
		return fmt.Errorf("steps go back in time")
	}
	for i := 0; i < 100000; i++ {
		d, ok := r.conn.PollTimeout()
		if !ok || d > t {
			r.now = t
			return nil
		}
		if d > r.now {
			r.now = d
		}
		r.conn.HandleTimeout(r.now)
		r.collect()
	}
	return fmt.Errorf("timers do not settle")
}

func (r *runner) takeOut() (time.Duration, []byte) {
	var last time.Duration = -1
	var b []byte
	for _, o := range r.out {
		last = o.at
		b = append(b, o.v.([]byte)...)
	}
	r.out = nil
	return last, b
}

func (r *runner) run(x obj) error {
	for i, s := range x["steps"].([]interface{}) {
		step := s.(obj)
		t := ms(intOf(step["at_ms"]))
		if err := r.advance(t); err != nil {
			return err
		}
		if err := r.step(step, t); err != nil {
			return fmt.Errorf("step %d at %d ms: %v", i, t/time.Millisecond, err)
		}
		r.collect()
	}
	if len(r.out) > 0 {
		return fmt.Errorf("unexpected bytes after the last step: %x", r.out[0].v)
	}
	if len(r.events) > 0 {
		return fmt.Errorf("unexpected event after the last step: %v", r.events[0].v)
	}
	return nil
}

func (r *runner) step(step obj, t time.Duration) error {
	switch {
	case step["recv"] != nil:
		r.conn.HandleInput(r.now, unhex(r.t, step["recv"].(string)))
	case step["recv_eof"] != nil:
		r.conn.HandleEOF(r.now)
	case step["recv_reset"] != nil:
		r.conn.HandleTransportError(r.now, ReasonPeerReset, "")
	case step["send"] != nil:
		last, got := r.takeOut()
		want := unhex(r.t, step["send"].(string))
		if !bytes.Equal(got, want) {
			return fmt.Errorf("sent %x, want %x", got, want)
		}
		if len(got) > 0 && last != t {
			return fmt.Errorf("sent at %v", last)
		}
	case step["send_frames"] != nil:
		last, got := r.takeOut()
		if last != t {
			return fmt.Errorf("sent at %v", last)
		}
		var frames []interface{}
		if len(got) >= 5 && bytes.Equal(got[:4], Preamble[:4]) {
			frames = append(frames, obj{"type": "PREAMBLE", "version": num(uint64(got[4]))})
			got = got[5:]
		}
		fs, err := decodeAll(got, 1<<31, len(got)+1)
		if err != nil {
			return fmt.Errorf("cannot decode what was sent: %v", err)
		}
		for _, f := range fs {
			frames = append(frames, frameJSON(f))
		}
		if !subset(step["send_frames"], frames) {
			return fmt.Errorf("sent %v, want %v", frames, step["send_frames"])
		}
	case step["event"] != nil:
		if len(r.events) == 0 {
			return fmt.Errorf("no event, want %v", step["event"])
		}
		ev := r.events[0]
		r.events = r.events[1:]
		if !subset(step["event"], ev.v) {
			return fmt.Errorf("event %v, want %v", ev.v, step["event"])
		}
		if ev.at != t {
			return fmt.Errorf("event %v at %v", ev.v, ev.at)
		}
	case step["app"] != nil:
		return r.app(step["app"].(obj))
	default:
		return fmt.Errorf("unknown step %v", step)
	}
	return nil
}

func (r *runner) app(a obj) error {
	switch a["op"] {
	case "send":
		err := r.conn.Send(r.now, unhex(r.t, a["payload"].(string)))
		got := map[error]string{nil: "ok", ErrFull: "full", ErrNotEstablished: "not-established", ErrClosed: "closed", ErrTooLong: "too-long"}[err]
		want := "ok"
		if w, ok := a["result"].(string); ok {
			want = w
		}
		if got != want {
			return fmt.Errorf("send result %q (%v), want %s", got, err, want)
		}
	case "close":
		r.conn.Close(r.now, uint16(intOf(a["code"])), a["text"].(string))
	case "reconnect":
		r.conn = NewConn(r.now, r.cfg, r.hello, r.conn.TakeSession())
	case "auth":
		return r.conn.Auth(r.now, unhex(r.t, a["credential"].(string)))
	default:
		return fmt.Errorf("unknown app op %v", a["op"])
	}
	return nil
}
