package tether

// Sessions that lose nothing (PROTOCOL.md §12): sequence numbers, cumulative ACKs, a
// bounded replay buffer, and resumption after a reconnect.
//
//	send(msg) -> replay buffer [acked+1 ..= lastSeq]   (bounded in bytes and messages)
//	               | SEQ_DATA(seq, msg) ----------> peer: seq == lastReceived+1 -> deliver
//	               |                                      seq <= lastReceived  -> duplicate, drop
//	               <------------------- ACK(n) <-- peer: after AckEvery messages or AckDelay
//	onAck(n): drop entries <= n

import (
	"fmt"
	"time"
)

// SessionConfig bounds the replay buffer and times ACKs. Zero values take the reference's
// defaults: 4 MiB, 4096 messages, an ACK after 32 messages or 20 ms.
type SessionConfig struct {
	MaxReplayBytes    int
	MaxReplayMessages int
	AckEvery          uint64
	AckDelay          time.Duration
}

func (c SessionConfig) withDefaults() SessionConfig {
	if c.MaxReplayBytes == 0 {
		c.MaxReplayBytes = 4 << 20
	}
	if c.MaxReplayMessages == 0 {
		c.MaxReplayMessages = 4096
	}
	if c.AckEvery == 0 {
		c.AckEvery = 32
	}
	if c.AckDelay == 0 {
		c.AckDelay = 20 * time.Millisecond
	}
	return c
}

// SeqRange is an inclusive range of sequence numbers.
type SeqRange struct{ First, Last uint64 }

func (r SeqRange) String() string { return fmt.Sprintf("%d..=%d", r.First, r.Last) }

type ackBeyondSent struct{ acked, sent uint64 }

func (e ackBeyondSent) Error() string {
	return fmt.Sprintf("%d acknowledged but only %d sent", e.acked, e.sent)
}

// Session is one side's session state, handed from one connection to the next.
type Session struct {
	ID    uint64
	Token [TokenLen]byte
	cfg   SessionConfig

	lastSeq      uint64 // last message pushed
	acked        uint64 // highest seq the peer acknowledged
	replay       [][]byte
	replayBytes  int
	sent         uint64 // last seq transmitted on the current connection
	LastReceived uint64 // highest seq received in order
	ackSent      uint64
	ackDeadline  time.Duration
	hasAckTimer  bool
}

// NewSession starts a session with the given id and token.
func NewSession(id uint64, token [TokenLen]byte, cfg SessionConfig) *Session {
	return &Session{ID: id, Token: token, cfg: cfg.withDefaults()}
}

// Unacked is the range of messages sent but not acknowledged (they may not have arrived).
func (s *Session) Unacked() *SeqRange {
	if s.lastSeq > s.acked {
		return &SeqRange{s.acked + 1, s.lastSeq}
	}
	return nil
}

// HasRoom says whether a message of n bytes fits; an empty buffer always takes one.
func (s *Session) HasRoom(n int) bool {
	return len(s.replay) == 0 || (len(s.replay) < s.cfg.MaxReplayMessages && s.replayBytes+n <= s.cfg.MaxReplayBytes)
}

func (s *Session) push(msg []byte) bool {
	if !s.HasRoom(len(msg)) {
		return false
	}
	s.lastSeq++
	s.replayBytes += len(msg)
	s.replay = append(s.replay, msg)
	return true
}

func (s *Session) nextToSend() (uint64, []byte, bool) {
	if s.sent >= s.lastSeq {
		return 0, nil, false
	}
	s.sent++
	return s.sent, s.replay[s.sent-s.acked-1], true
}

func (s *Session) onAck(seq uint64) error {
	if seq > s.lastSeq {
		return ackBeyondSent{seq, s.lastSeq}
	}
	for s.acked < seq {
		s.replayBytes -= len(s.replay[0])
		s.replay[0] = nil
		s.replay = s.replay[1:]
		s.acked++
	}
	if len(s.replay) == 0 {
		s.replay = nil // release the backing array
	}
	if s.sent < s.acked {
		s.sent = s.acked
	}
	return nil
}

func (s *Session) resume(peerLastReceived uint64) (uint64, error) {
	if err := s.onAck(peerLastReceived); err != nil {
		return 0, err
	}
	s.sent = s.acked
	s.hasAckTimer = false
	s.ackSent = 0
	return s.lastSeq - s.acked, nil
}

const (
	received  = 0
	duplicate = 1
	gap       = 2
)

func (s *Session) onData(now time.Duration, seq uint64) int {
	if seq <= s.LastReceived {
		return duplicate
	}
	if seq != s.LastReceived+1 {
		return gap
	}
	s.LastReceived = seq
	if !s.hasAckTimer {
		s.hasAckTimer = true
		s.ackDeadline = now + s.cfg.AckDelay
	}
	return received
}

func (s *Session) pollAck(now time.Duration, force bool) (uint64, bool) {
	if s.LastReceived <= s.ackSent {
		return 0, false
	}
	due := force || s.LastReceived-s.ackSent >= s.cfg.AckEvery || (s.hasAckTimer && now >= s.ackDeadline)
	if !due {
		return 0, false
	}
	s.ackSent = s.LastReceived
	s.hasAckTimer = false
	return s.LastReceived, true
}

func (s *Session) pollTimeout() (time.Duration, bool) {
	if s.LastReceived > s.ackSent && s.hasAckTimer {
		return s.ackDeadline, true
	}
	return 0, false
}
