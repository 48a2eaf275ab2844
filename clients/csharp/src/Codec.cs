// Wire protocol v1 (docs/PROTOCOL.md): preamble, frames, and an incremental decoder that
// checks every length before it buffers anything.
//
//   stream   = preamble *frame
//   preamble = "TTHR" version:u8                 (5 bytes, each side sends one)
//   frame    = length:u32be body:length bytes     (length 0 = HEARTBEAT, no body)
//   body     = type:u8 fields...
//
// C# 7.2 and the .NET Standard 2.0 surface only, so the source drops into Unity.

using System;
using System.Collections.Generic;
using System.Globalization;
using System.IO;
using System.Text;

namespace Tether
{
    /// <summary>Close and refusal codes (PROTOCOL.md §9). 1000 and above belong to applications.</summary>
    public static class CloseCode
    {
        public const ushort Normal = 0;
        public const ushort GoingAway = 1;
        public const ushort ProtocolError = 2;
        public const ushort HeartbeatTimeout = 3;
        public const ushort IdleTimeout = 4;
        public const ushort Replaced = 5;
        public const ushort PolicyViolation = 6;
        public const ushort CredentialExpired = 7;
        public const ushort SlowConsumer = 8;
        public const ushort ServerFull = 10;
        public const ushort BadHello = 11;
        public const ushort UnsupportedVersion = 12;
        public const ushort HandshakeTimeout = 13;
        public const ushort SessionUnknown = 14;
        public const ushort Refused = 15;
        public const ushort SessionBusy = 16;
        public const ushort Unauthorized = 17;
        public const ushort IdNotAllowed = 18;
        public const ushort Throttled = 19;

        static readonly string[] Names = {
            "normal", "going-away", "protocol-error", "heartbeat-timeout", "idle-timeout", "replaced",
            "policy-violation", "credential-expired", "slow-consumer", null, "server-full", "bad-hello",
            "unsupported-version", "handshake-timeout", "session-unknown", "refused", "session-busy",
            "unauthorized", "id-not-allowed", "throttled",
        };

        /// <summary>"normal", "session-busy", "application" (1000+) or "unknown".</summary>
        public static string Name(ushort code)
        {
            if (code >= 1000) return "application";
            if (code < Names.Length && Names[code] != null) return Names[code];
            return "unknown";
        }
    }

    /// <summary>Bytes that break the protocol. Kind is "oversize", "unknown-type" or "malformed".</summary>
    public sealed class ProtocolException : Exception
    {
        public readonly string Kind;
        public ProtocolException(string kind, string why) : base(why) { Kind = kind; }

        internal static ProtocolException Malformed(string frame, string why)
        {
            return new ProtocolException("malformed", "malformed " + frame + " frame: " + why);
        }
    }

    /// <summary>One decoded frame.</summary>
    public abstract class Frame
    {
        public abstract string Name { get; }
    }

    public sealed class Heartbeat : Frame
    {
        public static readonly Heartbeat Instance = new Heartbeat();
        public override string Name { get { return "HEARTBEAT"; } }
    }

    public sealed class Data : Frame
    {
        public byte[] Payload;
        public override string Name { get { return "DATA"; } }
    }

    public sealed class SeqData : Frame
    {
        public ulong Seq;
        public byte[] Payload;
        public override string Name { get { return "SEQ_DATA"; } }
    }

    public sealed class Ping : Frame
    {
        public ulong Nonce;
        public override string Name { get { return "PING"; } }
    }

    public sealed class Pong : Frame
    {
        public ulong Nonce;
        public override string Name { get { return "PONG"; } }
    }

    public sealed class Ack : Frame
    {
        public ulong Seq;
        public override string Name { get { return "ACK"; } }
    }

    public sealed class Close : Frame
    {
        public ushort Code;
        public string Text = "";
        public override string Name { get { return "CLOSE"; } }
    }

    public sealed class Refuse : Frame
    {
        public ushort Code;
        public string Text = "";
        public override string Name { get { return "REFUSE"; } }
    }

    /// <summary>The resume block of a HELLO.</summary>
    public sealed class Resume
    {
        public ulong SessionId;
        public byte[] Token;
        public ulong LastReceived;
    }

    public sealed class Hello : Frame
    {
        public byte Flags;
        public uint HeartbeatMs;
        public string ClientId;
        public bool WantSession;
        public Resume Resume;
        public byte[] Credential;
        public override string Name { get { return "HELLO"; } }

        public static Hello Create(string clientId, uint heartbeatMs, bool wantSession, Resume resume, byte[] credential)
        {
            var h = new Hello { ClientId = clientId, HeartbeatMs = heartbeatMs, WantSession = wantSession || resume != null, Resume = resume, Credential = credential };
            if (h.WantSession) h.Flags |= Codec.HelloSession;
            if (resume != null) h.Flags |= Codec.HelloResume;
            if (credential != null) h.Flags |= Codec.HelloCredential;
            return h;
        }
    }

    /// <summary>The session block of a WELCOME.</summary>
    public sealed class SessionGrant
    {
        public ulong SessionId;
        public byte[] Token;
        public ulong LastReceived;
        public uint LingerMs;
        public bool Resumed;
    }

    /// <summary>The server's acceptance: h, d, the session grant and the credential ttl.</summary>
    public sealed class Welcome : Frame
    {
        public byte Flags;
        public uint HeartbeatMs;
        public uint DeadAfterMs;
        public SessionGrant Session;
        public uint? CredentialTtlMs;
        public override string Name { get { return "WELCOME"; } }

        public static Welcome Create(uint h, uint d, SessionGrant session, uint? ttl)
        {
            var w = new Welcome { HeartbeatMs = h, DeadAfterMs = d, Session = session, CredentialTtlMs = ttl };
            if (session != null) { w.Flags |= Codec.WelcomeSession; if (session.Resumed) w.Flags |= Codec.WelcomeResumed; }
            if (ttl.HasValue) w.Flags |= Codec.WelcomeCredentialTtl;
            return w;
        }
    }

    public sealed class Probe : Frame
    {
        public byte[] Body;
        public override string Name { get { return "PROBE"; } }
    }

    public sealed class Extension : Frame
    {
        public byte Type;
        public override string Name { get { return "EXTENSION"; } }
    }

    public sealed class Auth : Frame
    {
        public byte[] Credential;
        public override string Name { get { return "AUTH"; } }
    }

    public sealed class AuthOk : Frame
    {
        public uint CredentialTtlMs;
        public override string Name { get { return "AUTH_OK"; } }
    }

    /// <summary>Encoding, decoding, and the client-id rules.</summary>
    public static class Codec
    {
        public const byte Version = 1;
        public const uint DefaultMaxFrameLen = 1 << 20;
        public const int MaxClientIdLen = 255;
        public const int MaxTextLen = 1024;
        public const int MaxCredentialLen = 8192;
        public const int TokenLen = 16;
        public const byte HelloSession = 0x01, HelloResume = 0x02, HelloCredential = 0x04;
        public const byte WelcomeSession = 0x01, WelcomeResumed = 0x02, WelcomeCredentialTtl = 0x04;
        public static readonly byte[] Preamble = { (byte)'T', (byte)'T', (byte)'H', (byte)'R', Version };

        const byte TData = 0x01, TPing = 0x02, TPong = 0x03, TClose = 0x04, TAck = 0x05, TSeqData = 0x06,
            TAuth = 0x07, TAuthOk = 0x08, THello = 0x10, TWelcome = 0x11, TRefuse = 0x12, TProbe = 0x20, TExtMin = 0x80;

        static readonly UTF8Encoding StrictUtf8 = new UTF8Encoding(false, true);

        /// <summary>Why id is not acceptable (PROTOCOL.md §6.1), or null: 1-255 bytes of UTF-8
        /// without control (Cc), format (Cf) or line/paragraph separator characters.</summary>
        public static string ClientIdProblem(string id)
        {
            if (id == null) return "is null";
            int n;
            try { n = StrictUtf8.GetByteCount(id); }
            catch (ArgumentException) { return "is not valid UTF-16 (lone surrogate)"; }
            if (n == 0 || n > MaxClientIdLen) return "must be 1-255 bytes of UTF-8 (is " + n + ")";
            for (int i = 0; i < id.Length; i++)
            {
                var cat = CharUnicodeInfo.GetUnicodeCategory(id, i);
                if (cat == UnicodeCategory.Control || cat == UnicodeCategory.Format
                    || cat == UnicodeCategory.LineSeparator || cat == UnicodeCategory.ParagraphSeparator)
                    return "contains U+" + ((int)id[i]).ToString("X4");
                if (char.IsHighSurrogate(id[i])) i++;
            }
            return null;
        }

        // --- encoding ------------------------------------------------------------------------

        static void U16(List<byte> o, ushort v) { o.Add((byte)(v >> 8)); o.Add((byte)v); }
        static void U32(List<byte> o, uint v) { o.Add((byte)(v >> 24)); o.Add((byte)(v >> 16)); o.Add((byte)(v >> 8)); o.Add((byte)v); }
        static void U64(List<byte> o, ulong v) { U32(o, (uint)(v >> 32)); U32(o, (uint)v); }
        static void Header(List<byte> o, int length, byte type) { U32(o, (uint)length); o.Add(type); }

        static byte[] TruncateText(string s)
        {
            var b = Encoding.UTF8.GetBytes(s ?? "");
            if (b.Length <= MaxTextLen) return b;
            int end = MaxTextLen;
            while (end > 0 && (b[end] & 0xC0) == 0x80) end--;
            var t = new byte[end];
            Array.Copy(b, t, end);
            return t;
        }

        public static void AppendData(List<byte> o, byte[] payload)
        {
            Header(o, 1 + payload.Length, TData);
            o.AddRange(payload);
        }

        public static void AppendSeqData(List<byte> o, ulong seq, byte[] payload)
        {
            Header(o, 9 + payload.Length, TSeqData);
            U64(o, seq);
            o.AddRange(payload);
        }

        public static void AppendAck(List<byte> o, ulong seq)
        {
            Header(o, 9, TAck);
            U64(o, seq);
        }

        public static void AppendHeartbeat(List<byte> o) { U32(o, 0); }

        /// <summary>Appends f's bytes, length prefix included. CLOSE/REFUSE text is truncated at
        /// 1024 bytes on a character boundary.</summary>
        public static void Append(List<byte> o, Frame f)
        {
            if (f is Heartbeat) { U32(o, 0); return; }
            if (f is Data d) { AppendData(o, d.Payload); return; }
            if (f is SeqData sd) { AppendSeqData(o, sd.Seq, sd.Payload); return; }
            if (f is Ack a) { AppendAck(o, a.Seq); return; }
            if (f is Ping p) { Header(o, 9, TPing); U64(o, p.Nonce); return; }
            if (f is Pong q) { Header(o, 9, TPong); U64(o, q.Nonce); return; }
            if (f is Close c) { var t = TruncateText(c.Text); Header(o, 3 + t.Length, TClose); U16(o, c.Code); o.AddRange(t); return; }
            if (f is Refuse r) { var t = TruncateText(r.Text); Header(o, 3 + t.Length, TRefuse); U16(o, r.Code); o.AddRange(t); return; }
            if (f is Hello h)
            {
                var id = Encoding.UTF8.GetBytes(h.ClientId);
                int n = 7 + id.Length + (h.Resume != null ? 32 : 0) + (h.Credential != null ? 2 + h.Credential.Length : 0);
                Header(o, n, THello);
                o.Add(h.Flags);
                U32(o, h.HeartbeatMs);
                o.Add((byte)id.Length);
                o.AddRange(id);
                if (h.Resume != null) { U64(o, h.Resume.SessionId); o.AddRange(h.Resume.Token); U64(o, h.Resume.LastReceived); }
                if (h.Credential != null) { U16(o, (ushort)h.Credential.Length); o.AddRange(h.Credential); }
                return;
            }
            if (f is Welcome w)
            {
                Header(o, 10 + (w.Session != null ? 36 : 0) + (w.CredentialTtlMs.HasValue ? 4 : 0), TWelcome);
                o.Add(w.Flags);
                U32(o, w.HeartbeatMs);
                U32(o, w.DeadAfterMs);
                if (w.Session != null) { U64(o, w.Session.SessionId); o.AddRange(w.Session.Token); U64(o, w.Session.LastReceived); U32(o, w.Session.LingerMs); }
                if (w.CredentialTtlMs.HasValue) U32(o, w.CredentialTtlMs.Value);
                return;
            }
            if (f is Probe pr) { Header(o, 1 + pr.Body.Length, TProbe); o.AddRange(pr.Body); return; }
            if (f is Extension e) { Header(o, 1, e.Type); return; }
            if (f is Auth au) { Header(o, 1 + au.Credential.Length, TAuth); o.AddRange(au.Credential); return; }
            if (f is AuthOk ok) { Header(o, 5, TAuthOk); U32(o, ok.CredentialTtlMs); return; }
            throw new ArgumentException("not a frame: " + f);
        }

        public static byte[] Encode(Frame f)
        {
            var o = new List<byte>();
            Append(o, f);
            return o.ToArray();
        }

        // --- decoding ------------------------------------------------------------------------

        internal static ushort RU16(byte[] b, int i) { return (ushort)((b[i] << 8) | b[i + 1]); }
        internal static uint RU32(byte[] b, int i) { return ((uint)b[i] << 24) | ((uint)b[i + 1] << 16) | ((uint)b[i + 2] << 8) | b[i + 3]; }
        internal static ulong RU64(byte[] b, int i) { return ((ulong)RU32(b, i) << 32) | RU32(b, i + 4); }

        static byte[] Slice(byte[] b, int start, int end)
        {
            var r = new byte[end - start];
            Buffer.BlockCopy(b, start, r, 0, r.Length);
            return r;
        }

        static string Text(string frame, byte[] b, int start, int end)
        {
            if (end - start > MaxTextLen) throw ProtocolException.Malformed(frame, "text longer than 1024 bytes");
            try { return StrictUtf8.GetString(b, start, end - start); }
            catch (ArgumentException) { throw ProtocolException.Malformed(frame, "text is not UTF-8"); }
        }

        /// <summary>Parses one frame body: b[start..end) is everything after the length prefix
        /// (never empty).</summary>
        public static Frame ParseBody(byte[] b, int start, int end)
        {
            byte t = b[start];
            int p = start + 1, n = end - p;
            switch (t)
            {
                case TData: return new Data { Payload = Slice(b, p, end) };
                case TSeqData:
                    if (n < 8) throw ProtocolException.Malformed("SEQ_DATA", "shorter than its sequence number");
                    return new SeqData { Seq = RU64(b, p), Payload = Slice(b, p + 8, end) };
                case TPing:
                case TPong:
                case TAck:
                    if (n != 8) throw ProtocolException.Malformed(t == TPing ? "PING" : t == TPong ? "PONG" : "ACK", "body must be exactly 8 bytes after the type");
                    if (t == TPing) return new Ping { Nonce = RU64(b, p) };
                    if (t == TPong) return new Pong { Nonce = RU64(b, p) };
                    return new Ack { Seq = RU64(b, p) };
                case TClose:
                case TRefuse:
                    {
                        string name = t == TClose ? "CLOSE" : "REFUSE";
                        if (n < 2) throw ProtocolException.Malformed(name, "missing code");
                        var code = RU16(b, p);
                        var text = Text(name, b, p + 2, end);
                        if (t == TClose) return new Close { Code = code, Text = text };
                        return new Refuse { Code = code, Text = text };
                    }
                case THello: return ParseHello(b, p, end);
                case TWelcome: return ParseWelcome(b, p, end);
                case TAuth:
                    if (n < 1 || n > MaxCredentialLen) throw ProtocolException.Malformed("AUTH", "credential must be 1-8192 bytes");
                    return new Auth { Credential = Slice(b, p, end) };
                case TAuthOk:
                    if (n != 4) throw ProtocolException.Malformed("AUTH_OK", "body must be exactly 4 bytes after the type");
                    return new AuthOk { CredentialTtlMs = RU32(b, p) };
                case TProbe: return new Probe { Body = Slice(b, p, end) };
            }
            if (t >= TExtMin) return new Extension { Type = t };
            throw new ProtocolException("unknown-type", "unknown frame type 0x" + t.ToString("x2"));
        }

        static Frame ParseHello(byte[] b, int p, int end)
        {
            const string F = "HELLO";
            if (end - p < 6) throw ProtocolException.Malformed(F, "too short");
            byte flags = b[p];
            if ((flags & ~(HelloSession | HelloResume | HelloCredential)) != 0) throw ProtocolException.Malformed(F, "unknown flag bits");
            var h = new Hello { Flags = flags, HeartbeatMs = RU32(b, p + 1), WantSession = (flags & (HelloSession | HelloResume)) != 0 };
            int idLen = b[p + 5];
            if (idLen == 0) throw ProtocolException.Malformed(F, "empty client id");
            int pos = p + 6;
            if (end - pos < idLen) throw ProtocolException.Malformed(F, "client id runs past the frame");
            try { h.ClientId = StrictUtf8.GetString(b, pos, idLen); }
            catch (ArgumentException) { throw ProtocolException.Malformed(F, "client id is not UTF-8"); }
            pos += idLen;
            if ((flags & HelloResume) != 0)
            {
                if (end - pos < 32) throw ProtocolException.Malformed(F, "resume fields must be 32 bytes");
                h.Resume = new Resume { SessionId = RU64(b, pos), Token = Slice(b, pos + 8, pos + 24), LastReceived = RU64(b, pos + 24) };
                pos += 32;
            }
            if ((flags & HelloCredential) != 0)
            {
                if (end - pos < 2) throw ProtocolException.Malformed(F, "missing credential length");
                int n = RU16(b, pos);
                pos += 2;
                if (n < 1 || n > MaxCredentialLen) throw ProtocolException.Malformed(F, "credential must be 1-8192 bytes");
                if (end - pos < n) throw ProtocolException.Malformed(F, "credential runs past the frame");
                h.Credential = Slice(b, pos, pos + n);
                pos += n;
            }
            if (pos != end) throw ProtocolException.Malformed(F, "trailing bytes");
            return h;
        }

        static Frame ParseWelcome(byte[] b, int p, int end)
        {
            const string F = "WELCOME";
            if (end - p < 9) throw ProtocolException.Malformed(F, "too short");
            byte flags = b[p];
            if ((flags & ~(WelcomeSession | WelcomeResumed | WelcomeCredentialTtl)) != 0) throw ProtocolException.Malformed(F, "unknown flag bits");
            var w = new Welcome { Flags = flags, HeartbeatMs = RU32(b, p + 1), DeadAfterMs = RU32(b, p + 5) };
            if (w.HeartbeatMs == 0 || w.DeadAfterMs == 0) throw ProtocolException.Malformed(F, "heartbeat and dead_after must be positive");
            int pos = p + 9;
            if ((flags & WelcomeSession) != 0)
            {
                if (end - pos < 36) throw ProtocolException.Malformed(F, "session fields must be 36 bytes");
                w.Session = new SessionGrant
                {
                    SessionId = RU64(b, pos), Token = Slice(b, pos + 8, pos + 24), LastReceived = RU64(b, pos + 24),
                    LingerMs = RU32(b, pos + 32), Resumed = (flags & WelcomeResumed) != 0,
                };
                pos += 36;
            }
            else if ((flags & WelcomeResumed) != 0) throw ProtocolException.Malformed(F, "resumed flag without a session");
            if ((flags & WelcomeCredentialTtl) != 0)
            {
                if (end - pos < 4) throw ProtocolException.Malformed(F, "credential_ttl_ms must be 4 bytes");
                w.CredentialTtlMs = RU32(b, pos);
                pos += 4;
            }
            if (pos != end) throw ProtocolException.Malformed(F, "trailing bytes");
            return w;
        }
    }

    /// <summary>Incremental frame decoder. The announced length is checked against MaxFrameLen
    /// as soon as the 4-byte prefix is there, before anything is buffered for the body; an
    /// idle decoder holds no buffer.</summary>
    public sealed class Decoder
    {
        public readonly uint MaxFrameLen;
        byte[] tail = EmptyBytes;
        static readonly byte[] EmptyBytes = new byte[0];

        public Decoder(uint maxFrameLen) { MaxFrameLen = maxFrameLen; }

        public int Buffered { get { return tail.Length; } }

        /// <summary>Decodes the frames completed by data[offset..offset+count), calling sink for
        /// each in order; sink returns false to stop (the rest is dropped). Throws
        /// ProtocolException; after that the decoder must not be used again.</summary>
        public void Feed(byte[] data, int offset, int count, Func<Frame, bool> sink)
        {
            byte[] buf = data;
            int pos = offset, end = offset + count;
            if (tail.Length > 0)
            {
                buf = new byte[tail.Length + count];
                Buffer.BlockCopy(tail, 0, buf, 0, tail.Length);
                Buffer.BlockCopy(data, offset, buf, tail.Length, count);
                pos = 0;
                end = buf.Length;
            }
            tail = EmptyBytes;
            while (end - pos >= 4)
            {
                uint n = Codec.RU32(buf, pos);
                if (n > MaxFrameLen) throw new ProtocolException("oversize", "frame of " + n + " bytes exceeds the maximum of " + MaxFrameLen);
                if ((long)(end - pos) < 4L + n) break;
                Frame f = n == 0 ? (Frame)Heartbeat.Instance : Codec.ParseBody(buf, pos + 4, pos + 4 + (int)n);
                pos += 4 + (int)n;
                if (!sink(f)) return;
            }
            if (pos < end)
            {
                tail = new byte[end - pos];
                Buffer.BlockCopy(buf, pos, tail, 0, tail.Length);
            }
        }
    }
}
