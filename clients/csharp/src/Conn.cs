// One tether client connection as a sans-IO state machine: preamble, handshake, frames,
// liveness, session and credential refresh. No sockets, no clock: every input carries now
// (milliseconds from any origin) and PollTimeout says when HandleTimeout is next needed. The
// TetherClient drives it over TCP/TLS; the conformance test drives it on a virtual clock.
//
//   preamble + HELLO  ------------------->  (queued by the constructor)
//   Established      <-------------------  preamble + WELCOME | REFUSE
//   DATA / SEQ_DATA / ACK / heartbeats / PING / PONG / AUTH / AUTH_OK  <------>
//   Closed(Disconnect)                      always the last event
//
// Liveness (PROTOCOL.md §7), from the WELCOME's h and d:
//   lastTx --h--> send HEARTBEAT     (only if nothing was sent for h)
//   lastRx --d--> peer dead          (never earlier than d; any byte counts)

using System;
using System.Collections.Generic;
using System.Text;

namespace Tether
{
    /// <summary>Disconnect reasons (labels shared with the reference implementation) and what a
    /// reconnecting client does next.</summary>
    public static class Reason
    {
        public const string PeerClosed = "peer-closed";
        public const string PeerReset = "peer-reset";
        public const string HeartbeatTimeout = "heartbeat-timeout";
        public const string KeepaliveTimeout = "keepalive-timeout";
        public const string UserTimeout = "user-timeout";
        public const string ProtocolError = "protocol-error";
        public const string Refused = "refused";
        public const string Replaced = "replaced";
        public const string LocalClose = "local-close";
        public const string PeerClose = "peer-close";
        public const string IoError = "io-error";
        public const string ConnectRefused = "connect-refused";

        public const string RetryBackoff = "backoff";
        public const string RetryNow = "now";
        public const string RetryNever = "never";
    }

    /// <summary>Why a connection ended. Code and Text are set for "refused" and "peer-close"
    /// (Code 5 for "replaced").</summary>
    public sealed class Disconnect
    {
        public readonly string Reason;
        public readonly ushort? Code;
        public readonly string Text;
        public long SilentForMs;

        public Disconnect(string reason, ushort? code = null, string text = "")
        {
            Reason = reason;
            Code = code;
            Text = text ?? "";
        }

        /// <summary>"never" (REPLACED, a refusal retrying cannot fix, the application closed),
        /// "now" (SESSION_UNKNOWN: a new session at once) or "backoff".</summary>
        public string Retry
        {
            get
            {
                if (Reason == Tether.Reason.Replaced || Reason == Tether.Reason.LocalClose) return Tether.Reason.RetryNever;
                if (Reason == Tether.Reason.Refused && Code.HasValue)
                {
                    switch (Code.Value)
                    {
                        case CloseCode.BadHello:
                        case CloseCode.UnsupportedVersion:
                        case CloseCode.Unauthorized:
                        case CloseCode.IdNotAllowed:
                            return Tether.Reason.RetryNever;
                        case CloseCode.SessionUnknown:
                            return Tether.Reason.RetryNow;
                    }
                }
                return Tether.Reason.RetryBackoff;
            }
        }

        public override string ToString()
        {
            var s = new StringBuilder(Reason);
            if (Code.HasValue) s.Append(' ').Append(Code.Value).Append(" (").Append(CloseCode.Name(Code.Value)).Append(')');
            if (Text.Length > 0) s.Append(": ").Append(Text);
            return s.ToString();
        }
    }

    public abstract class ConnEvent { }
    public sealed class EstablishedEvent : ConnEvent { public Welcome Welcome; }
    public sealed class MessageEvent : ConnEvent { public byte[] Payload; }
    public sealed class ResumedEvent : ConnEvent { public ulong Replayed; }
    /// <summary>The session cannot continue. Unacked (null: nothing outstanding): our messages
    /// sent but never acknowledged, which may not have arrived. Unsent: messages never sent
    /// (only when the client stops for good).</summary>
    public sealed class SessionLostEvent : ConnEvent { public SeqRange Unacked; public List<byte[]> Unsent = new List<byte[]>(); }
    public sealed class AuthDueEvent : ConnEvent { }
    public sealed class AuthOkEvent : ConnEvent { public uint CredentialTtlMs; }
    public sealed class ClosedEvent : ConnEvent { public Disconnect Disconnect; }

    public enum SendResult { Ok, Full, NotEstablished, Closed, TooLong }

    public sealed class ConnConfig
    {
        public uint MaxFrameLen = Codec.DefaultMaxFrameLen;
        public long HandshakeTimeoutMs = 10000;
        public SessionConfig Session = new SessionConfig();
    }

    /// <summary>A client connection; see the file comment. Not thread-safe: one owner.</summary>
    public sealed class Conn
    {
        enum State { Preamble, AwaitWelcome, Established, Closed }

        readonly ConnConfig cfg;
        State state = State.Preamble;
        readonly byte[] pre = new byte[5];
        int preGot;
        readonly Decoder decoder;
        List<byte> output = new List<byte>();
        readonly Queue<ConnEvent> events = new Queue<ConnEvent>();
        long handshakeDeadline;
        bool inHandshake = true;
        long lastRx, lastTx, h, d;
        bool hbThisRead;
        Session session;
        readonly bool wantSession, hasCredential;
        long authDue;
        bool hasAuthDue, authOutstanding;

        public Welcome Welcome { get; private set; }

        /// <summary>Queues the preamble and HELLO; with session the HELLO resumes it.</summary>
        public Conn(long now, ConnConfig cfg, Hello hello, Session session)
        {
            this.cfg = cfg;
            decoder = new Decoder(cfg.MaxFrameLen);
            handshakeDeadline = now + cfg.HandshakeTimeoutMs;
            lastRx = lastTx = now;
            this.session = session;
            wantSession = hello.WantSession || session != null;
            hasCredential = hello.Credential != null;
            if (session != null)
                hello = Hello.Create(hello.ClientId, hello.HeartbeatMs, true,
                    new Resume { SessionId = session.Id, Token = session.Token, LastReceived = session.LastReceived }, hello.Credential);
            output.AddRange(Codec.Preamble);
            Codec.Append(output, hello);
        }

        public bool IsEstablished { get { return state == State.Established; } }
        public bool IsClosed { get { return state == State.Closed; } }
        public long LastRx { get { return lastRx; } }

        /// <summary>A message of n bytes can be sent now (the replay buffer has room).</summary>
        public bool CanSend(int n) { return session == null || session.HasRoom(n); }

        /// <summary>The session, to hand to the next connection (after this one ended).</summary>
        public Session TakeSession()
        {
            var s = session;
            session = null;
            return s;
        }

        public int PendingTransmit { get { return output.Count; } }

        /// <summary>Everything waiting to be written; forgets it.</summary>
        public byte[] TakeTransmit()
        {
            if (output.Count == 0) return null;
            var b = output.ToArray();
            output = new List<byte>();
            return b;
        }

        public ConnEvent PollEvent() { return events.Count > 0 ? events.Dequeue() : null; }

        public SendResult Send(long now, byte[] payload)
        {
            if (state == State.Closed) return SendResult.Closed;
            if (state != State.Established) return SendResult.NotEstablished;
            long max = (long)cfg.MaxFrameLen - (session != null ? 9 : 1);
            if (payload.Length > max) return SendResult.TooLong;
            if (session != null)
            {
                if (!session.Push(payload)) return SendResult.Full;
                PumpSession(now);
                return SendResult.Ok;
            }
            Codec.AppendData(output, payload);
            OnSend(now);
            return SendResult.Ok;
        }

        /// <summary>Sends AUTH with a fresh credential (PROTOCOL.md §13).</summary>
        public void Auth(long now, byte[] credential)
        {
            if (state != State.Established) throw new InvalidOperationException("not established");
            if (!hasCredential) throw new InvalidOperationException("AUTH needs a HELLO with a credential");
            if (credential == null || credential.Length < 1 || credential.Length > Codec.MaxCredentialLen)
                throw new ArgumentException("a credential is 1-8192 bytes");
            if (authOutstanding) throw new InvalidOperationException("an AUTH is already waiting for its AUTH_OK");
            authOutstanding = true;
            hasAuthDue = false;
            Codec.Append(output, new Auth { Credential = credential });
            OnSend(now);
        }

        /// <summary>Closes in order: an ACK we owe (so the peer does not report its last messages
        /// as possibly lost), then CLOSE(code, text), if established.</summary>
        public void Close(long now, ushort code, string text)
        {
            ulong a;
            if (state == State.Established && session != null && session.PollAck(now, true, out a)) Codec.AppendAck(output, a);
            CloseWith(now, code, text, new Disconnect(code == CloseCode.Replaced ? Reason.Replaced : Reason.LocalClose));
        }

        public void HandleEof(long now) { Finish(now, new Disconnect(Reason.PeerClosed)); }

        /// <summary>reason: Reason.PeerReset, KeepaliveTimeout, UserTimeout or IoError.</summary>
        public void HandleTransportError(long now, string reason, string text = "") { Finish(now, new Disconnect(reason, null, text)); }

        public void HandleInput(long now, byte[] data, int offset, int count)
        {
            if (state == State.Closed || count == 0) return;
            if (now > lastRx) lastRx = now;
            if (state == State.Preamble)
            {
                int take = Math.Min(5 - preGot, count);
                Buffer.BlockCopy(data, offset, pre, preGot, take);
                preGot += take;
                offset += take;
                count -= take;
                if (preGot < 5) return;
                if (pre[0] != 'T' || pre[1] != 'T' || pre[2] != 'H' || pre[3] != 'R')
                {
                    var head = new byte[5 + Math.Min(count, 11)];
                    Buffer.BlockCopy(pre, 0, head, 0, 5);
                    Buffer.BlockCopy(data, offset, head, 5, head.Length - 5);
                    var shown = new StringBuilder();
                    foreach (var b in head) shown.Append(b >= 0x20 && b < 0x7f ? ((char)b).ToString() : "\\x" + b.ToString("x2"));
                    Finish(now, new Disconnect(Reason.ProtocolError, null, "not a tether server: it answered \"" + shown + "\""));
                    return;
                }
                if (pre[4] != Codec.Version)
                {
                    Finish(now, new Disconnect(Reason.ProtocolError, null, "unsupported protocol version " + pre[4]));
                    return;
                }
                state = State.AwaitWelcome;
                if (count == 0) return;
            }
            hbThisRead = false;
            try
            {
                decoder.Feed(data, offset, count, f =>
                {
                    HandleFrame(now, f);
                    return state != State.Closed;
                });
            }
            catch (ProtocolException e)
            {
                if (state != State.Closed) ProtocolError(now, e.Message);
            }
        }

        /// <summary>When HandleTimeout is next needed (null: never).</summary>
        public long? PollTimeout()
        {
            if (state == State.Closed) return null;
            if (inHandshake) return handshakeDeadline;
            long t = Math.Min(lastTx + h, lastRx + d);
            if (session != null)
            {
                var a = session.PollTimeout();
                if (a.HasValue && a.Value < t) t = a.Value;
            }
            if (hasAuthDue && authDue < t) t = authDue;
            return t;
        }

        /// <summary>Acts on whatever is due at now; harmless when nothing is.</summary>
        public void HandleTimeout(long now)
        {
            if (state == State.Closed) return;
            if (inHandshake)
            {
                if (now >= handshakeDeadline) Finish(now, new Disconnect(Reason.ProtocolError, null, "handshake timeout: no welcome"));
                return;
            }
            SendDueAck(now);
            if (now >= lastRx + d)
            {
                CloseWith(now, CloseCode.HeartbeatTimeout, "nothing received within dead_after", new Disconnect(Reason.HeartbeatTimeout));
                return;
            }
            if (hasAuthDue && now >= authDue)
            {
                hasAuthDue = false;
                events.Enqueue(new AuthDueEvent());
            }
            if (now >= lastTx + h)
            {
                lastTx = now;
                // Bytes still waiting to be written prove us alive when they arrive.
                if (output.Count == 0) Codec.AppendHeartbeat(output);
            }
        }

        void OnSend(long now) { if (now > lastTx) lastTx = now; }

        void HandleFrame(long now, Frame f)
        {
            if (state == State.AwaitWelcome)
            {
                if (f is Welcome w) OnWelcome(now, w);
                else if (f is Refuse r)
                {
                    if (r.Code == CloseCode.SessionUnknown && session != null)
                        events.Enqueue(new SessionLostEvent { Unacked = TakeSession().Unacked });
                    Finish(now, new Disconnect(Reason.Refused, r.Code, r.Text));
                }
                else ProtocolError(now, "expected WELCOME or REFUSE, got " + f.Name);
                return;
            }
            HandleEstablished(now, f);
        }

        void OnWelcome(long now, Welcome w)
        {
            if (w.CredentialTtlMs.HasValue && !hasCredential)
            {
                ProtocolError(now, "CREDENTIAL_TTL without a credential in the HELLO");
                return;
            }
            state = State.Established;
            inHandshake = false;
            h = w.HeartbeatMs;
            d = w.DeadAfterMs;
            lastTx = lastRx = now;
            Welcome = w;
            if (w.CredentialTtlMs.HasValue && w.CredentialTtlMs.Value > 0)
            {
                hasAuthDue = true;
                authDue = now + (long)w.CredentialTtlMs.Value * 9 / 10;
            }
            events.Enqueue(new EstablishedEvent { Welcome = w });
            var g = w.Session;
            var s = session;
            if (g != null && s != null && g.Resumed && g.SessionId == s.Id)
            {
                ulong n;
                if (!s.Resume(g.LastReceived, out n))
                {
                    ProtocolError(now, "server resumed from " + g.LastReceived + " but fewer were sent");
                    return;
                }
                s.Token = g.Token; // rotation: always keep the newest token
                ulong a;
                if (s.PollAck(now, true, out a)) Codec.AppendAck(output, a);
                events.Enqueue(new ResumedEvent { Replayed = n });
                PumpSession(now);
                return;
            }
            if (s != null)
            {
                session = null;
                events.Enqueue(new SessionLostEvent { Unacked = s.Unacked });
            }
            if (g != null && wantSession) session = new Session(g.SessionId, g.Token, cfg.Session);
        }

        void HandleEstablished(long now, Frame f)
        {
            var s = session;
            if (f is Heartbeat)
            {
                // Heartbeats in one read count once (they were queued behind a stall).
                if (!hbThisRead)
                {
                    hbThisRead = true;
                    // Coalesce: if ours is due within h/2, send it now, in this wake-up.
                    if (lastTx + h <= now + h / 2)
                    {
                        lastTx = now;
                        if (output.Count == 0) Codec.AppendHeartbeat(output);
                    }
                }
            }
            else if (f is SeqData sd)
            {
                if (s == null) { ProtocolError(now, "SEQ_DATA without a negotiated session"); return; }
                int r = s.OnData(now, sd.Seq);
                if (r == Session.Deliver)
                {
                    events.Enqueue(new MessageEvent { Payload = sd.Payload });
                    SendDueAck(now);
                }
                else if (r == Session.Gap) ProtocolError(now, "SEQ_DATA " + sd.Seq + " but " + (s.LastReceived + 1) + " was expected");
            }
            else if (f is Data data)
            {
                if (s != null) { ProtocolError(now, "DATA on a session connection (SEQ_DATA expected)"); return; }
                events.Enqueue(new MessageEvent { Payload = data.Payload });
            }
            else if (f is Ack ack)
            {
                if (s == null) { ProtocolError(now, "ACK without a negotiated session"); return; }
                ulong sentSoFar;
                if (!s.OnAck(ack.Seq, out sentSoFar)) ProtocolError(now, "ACK " + ack.Seq + " beyond the last sent sequence " + sentSoFar);
            }
            else if (f is Ping ping)
            {
                Codec.Append(output, new Pong { Nonce = ping.Nonce });
                OnSend(now);
            }
            else if (f is Pong || f is Extension) { }
            else if (f is Close c)
            {
                Finish(now, new Disconnect(c.Code == CloseCode.Replaced ? Reason.Replaced : Reason.PeerClose, c.Code, c.Text));
            }
            else if (f is AuthOk ok)
            {
                if (!authOutstanding) { ProtocolError(now, "AUTH_OK without an AUTH"); return; }
                authOutstanding = false;
                hasAuthDue = ok.CredentialTtlMs > 0;
                authDue = now + (long)ok.CredentialTtlMs * 9 / 10;
                events.Enqueue(new AuthOkEvent { CredentialTtlMs = ok.CredentialTtlMs });
            }
            else ProtocolError(now, "unexpected " + f.Name + " after the handshake");
        }

        void PumpSession(long now)
        {
            bool sent = false;
            ulong seq;
            byte[] msg;
            while (session.NextToSend(out seq, out msg))
            {
                Codec.AppendSeqData(output, seq, msg);
                sent = true;
            }
            if (sent)
            {
                ulong a;
                if (session.PollAck(now, true, out a)) Codec.AppendAck(output, a);
                OnSend(now);
            }
        }

        void SendDueAck(long now)
        {
            ulong a;
            if (session != null && session.PollAck(now, false, out a))
            {
                Codec.AppendAck(output, a);
                OnSend(now);
            }
        }

        void ProtocolError(long now, string why)
        {
            CloseWith(now, CloseCode.ProtocolError, why, new Disconnect(Reason.ProtocolError, null, why));
        }

        void CloseWith(long now, ushort code, string text, Disconnect dc)
        {
            if (state == State.Closed) return;
            if (state == State.Established) Codec.Append(output, new Close { Code = code, Text = text });
            Finish(now, dc);
        }

        void Finish(long now, Disconnect dc)
        {
            if (state == State.Closed) return;
            state = State.Closed;
            inHandshake = false;
            dc.SilentForMs = Math.Max(0, now - lastRx);
            events.Enqueue(new ClosedEvent { Disconnect = dc });
        }
    }
}
