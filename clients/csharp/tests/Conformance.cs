// Runs the shared conformance vectors (../../conformance, format in its README) against this
// client: every frame through the codec, every client exchange through Conn on a virtual
// clock. Server-role exchanges are skipped visibly (this is a client library).

using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Text;

namespace Tether.Tests
{
    static class Conformance
    {
        static readonly HashSet<string> Supported = new HashSet<string> { "auth", "token-rotation", "coalesce", "policy-violation", "ack-on-close" };

        static Dictionary<string, object> Load(string name)
        {
            var path = Path.Combine(Path.Combine(Path.Combine(TestRunner.Repo, "conformance"), ""), name);
            return (Dictionary<string, object>)Json.Parse(File.ReadAllText(path, Encoding.UTF8));
        }

        static string SkipReason(Dictionary<string, object> v, bool clientOnly)
        {
            object req;
            if (v.TryGetValue("requires", out req))
            {
                var missing = ((List<object>)req).Cast<string>().Where(r => !Supported.Contains(r)).ToList();
                if (missing.Count > 0) return "requires " + string.Join(", ", missing);
            }
            if (clientOnly && (string)v["role"] != "client") return "server role (this is a client library)";
            return null;
        }

        public static byte[] Unhex(string s)
        {
            var b = new byte[s.Length / 2];
            for (int i = 0; i < b.Length; i++) b[i] = Convert.ToByte(s.Substring(2 * i, 2), 16);
            return b;
        }

        public static string Hex(byte[] b)
        {
            if (b == null) return "";
            var s = new StringBuilder(b.Length * 2);
            foreach (var x in b) s.Append(x.ToString("x2"));
            return s.ToString();
        }

        static Dictionary<string, object> O(params object[] kv)
        {
            var d = new Dictionary<string, object>();
            for (int i = 0; i < kv.Length; i += 2) d[(string)kv[i]] = kv[i + 1];
            return d;
        }

        static Dictionary<string, object> GrantJson(SessionGrant s)
        {
            return O("session_id", s.SessionId.ToString(), "token", Hex(s.Token), "last_received", s.LastReceived.ToString(),
                "linger_ms", (long)s.LingerMs, "resumed", s.Resumed);
        }

        public static Dictionary<string, object> FrameJson(Frame f)
        {
            if (f is Heartbeat) return O("type", "HEARTBEAT");
            if (f is Data d) return O("type", "DATA", "payload", Hex(d.Payload));
            if (f is SeqData sd) return O("type", "SEQ_DATA", "seq", sd.Seq.ToString(), "payload", Hex(sd.Payload));
            if (f is Ping p) return O("type", "PING", "nonce", p.Nonce.ToString());
            if (f is Pong q) return O("type", "PONG", "nonce", q.Nonce.ToString());
            if (f is Ack a) return O("type", "ACK", "seq", a.Seq.ToString());
            if (f is Close c) return O("type", "CLOSE", "code", (long)c.Code, "text", c.Text);
            if (f is Refuse r) return O("type", "REFUSE", "code", (long)r.Code, "text", r.Text);
            if (f is Hello h)
            {
                var o = O("type", "HELLO", "flags", (long)h.Flags, "want_session", h.WantSession, "heartbeat_ms", (long)h.HeartbeatMs, "client_id", h.ClientId);
                if (h.Resume != null) o["resume"] = O("session_id", h.Resume.SessionId.ToString(), "token", Hex(h.Resume.Token), "last_received", h.Resume.LastReceived.ToString());
                if (h.Credential != null) o["credential"] = Hex(h.Credential);
                return o;
            }
            if (f is Welcome w)
            {
                var o = O("type", "WELCOME", "flags", (long)w.Flags, "heartbeat_ms", (long)w.HeartbeatMs, "dead_after_ms", (long)w.DeadAfterMs);
                if (w.Session != null) o["session"] = GrantJson(w.Session);
                if (w.CredentialTtlMs.HasValue) o["credential_ttl_ms"] = (long)w.CredentialTtlMs.Value;
                return o;
            }
            if (f is Probe pr) return O("type", "PROBE", "body", Hex(pr.Body));
            if (f is Extension e) return O("type", "EXTENSION", "ext_type", (long)e.Type);
            if (f is Auth au) return O("type", "AUTH", "credential", Hex(au.Credential));
            if (f is AuthOk ok) return O("type", "AUTH_OK", "credential_ttl_ms", (long)ok.CredentialTtlMs);
            throw new ArgumentException(f.ToString());
        }

        static List<Frame> DecodeAll(byte[] data, uint max, int chunk)
        {
            var d = new Decoder(max);
            var o = new List<Frame>();
            for (int i = 0; i < data.Length; i += chunk)
                d.Feed(data, i, Math.Min(chunk, data.Length - i), f => { o.Add(f); return true; });
            if (d.Buffered != 0) throw new Exception(d.Buffered + " bytes left over");
            return o;
        }

        public static void Frames()
        {
            var doc = Load("frames.json");
            int passed = 0, skipped = 0;
            var failures = new List<string>();
            foreach (Dictionary<string, object> v in (List<object>)doc["frames"])
            {
                var name = (string)v["name"];
                var why = SkipReason(v, false);
                if (why != null) { Console.WriteLine("SKIP frame " + name + ": " + why); skipped++; continue; }
                try { CheckFrame(v); passed++; }
                catch (Exception e) { failures.Add("frame " + name + ": " + e.Message); }
            }
            Console.WriteLine("conformance frames (csharp): " + passed + " passed, " + skipped + " skipped, " + failures.Count + " failed");
            if (failures.Count > 0) throw new Exception(string.Join("\n", failures));
        }

        static void CheckFrame(Dictionary<string, object> v)
        {
            var data = Unhex((string)v["hex"]);
            object m;
            uint max = v.TryGetValue("max_frame_len", out m) ? (uint)(long)m : Codec.DefaultMaxFrameLen;
            object err;
            if (v.TryGetValue("error", out err))
            {
                var want = (string)err;
                if (want == "oversize") data = data.Take(4).ToArray();
                foreach (var chunk in new[] { data.Length, 1 })
                {
                    try
                    {
                        var fs = DecodeAll(data, max, chunk);
                        throw new Exception("decoded " + fs.Count + " frames, want error " + want);
                    }
                    catch (ProtocolException e)
                    {
                        if (e.Kind != want) throw new Exception("error " + e.Kind + " (" + e.Message + "), want " + want);
                    }
                }
                return;
            }
            foreach (var chunk in new[] { data.Length, 1 })
            {
                var fs = DecodeAll(data, max, chunk);
                if (fs.Count != 1) throw new Exception(fs.Count + " frames");
                var j = FrameJson(fs[0]);
                if (!Json.Subset(v["frame"], j)) throw new Exception("decoded " + Json.Show(j) + ", want " + Json.Show(v["frame"]));
                object canon;
                if (!v.TryGetValue("canonical", out canon) || !false.Equals(canon))
                {
                    var again = Codec.Encode(fs[0]);
                    if (Hex(again) != Hex(data)) throw new Exception("re-encoded as " + Hex(again));
                }
            }
        }

        public static void Exchanges()
        {
            var doc = Load("exchanges.json");
            int passed = 0, skipped = 0;
            var failures = new List<string>();
            foreach (Dictionary<string, object> x in (List<object>)doc["exchanges"])
            {
                var name = (string)x["name"];
                var why = SkipReason(x, true);
                if (why != null) { Console.WriteLine("SKIP exchange " + name + ": " + why); skipped++; continue; }
                try { new Runner(x).Run(x); passed++; }
                catch (Exception e) { failures.Add("exchange " + name + ": " + e.Message); }
            }
            Console.WriteLine("conformance exchanges (csharp): " + passed + " passed, " + skipped + " skipped, " + failures.Count + " failed");
            if (failures.Count > 0) throw new Exception(string.Join("\n", failures));
        }

        static Dictionary<string, object> EventJson(ConnEvent ev)
        {
            if (ev is EstablishedEvent es)
            {
                var w = es.Welcome;
                var o = O("type", "established", "heartbeat_ms", (long)w.HeartbeatMs, "dead_after_ms", (long)w.DeadAfterMs,
                    "session", w.Session != null ? GrantJson(w.Session) : null);
                if (w.CredentialTtlMs.HasValue) o["credential_ttl_ms"] = (long)w.CredentialTtlMs.Value;
                return o;
            }
            if (ev is MessageEvent me) return O("type", "message", "payload", Hex(me.Payload));
            if (ev is ResumedEvent re) return O("type", "resumed", "replayed", (long)re.Replayed);
            if (ev is SessionLostEvent sl)
                return O("type", "session-lost", "unacked", sl.Unacked == null ? null : new List<object> { sl.Unacked.First.ToString(), sl.Unacked.Last.ToString() });
            if (ev is AuthDueEvent) return O("type", "auth-due");
            if (ev is AuthOkEvent ao) return O("type", "auth-ok", "credential_ttl_ms", (long)ao.CredentialTtlMs);
            if (ev is ClosedEvent ce)
            {
                var d = ce.Disconnect;
                var o = O("type", "closed", "reason", d.Reason, "silent_for_ms", d.SilentForMs, "retry", d.Retry);
                if (d.Code.HasValue) { o["code"] = (long)d.Code.Value; o["text"] = d.Text; }
                return o;
            }
            return null;
        }

        sealed class Runner
        {
            readonly ConnConfig cfg;
            readonly Hello hello;
            long now;
            Conn conn;
            readonly List<KeyValuePair<long, byte[]>> outs = new List<KeyValuePair<long, byte[]>>();
            readonly List<KeyValuePair<long, object>> events = new List<KeyValuePair<long, object>>();

            static long L(object o) { return (long)o; }

            public Runner(Dictionary<string, object> x)
            {
                var c = (Dictionary<string, object>)x["config"];
                cfg = new ConnConfig
                {
                    MaxFrameLen = (uint)L(c["max_frame_len"]),
                    HandshakeTimeoutMs = L(c["handshake_timeout_ms"]),
                    Session = new SessionConfig
                    {
                        MaxReplayBytes = (int)L(c["max_replay_bytes"]), MaxReplayMessages = (int)L(c["max_replay_messages"]),
                        AckEvery = (ulong)L(c["ack_every"]), AckDelayMs = L(c["ack_delay_ms"]),
                    },
                };
                object cred;
                hello = Hello.Create((string)c["client_id"], (uint)L(c["heartbeat_ms"]), true.Equals(c["session"]), null,
                    c.TryGetValue("credential", out cred) ? Unhex((string)cred) : null);
                conn = new Conn(0, cfg, hello, null);
                Collect();
            }

            void Collect()
            {
                var b = conn.TakeTransmit();
                if (b != null) outs.Add(new KeyValuePair<long, byte[]>(now, b));
                for (var ev = conn.PollEvent(); ev != null; ev = conn.PollEvent())
                {
                    var j = EventJson(ev);
                    if (j != null) events.Add(new KeyValuePair<long, object>(now, j));
                }
            }

            void Advance(long t)
            {
                if (t < now) throw new Exception("steps go back in time");
                for (int i = 0; i < 100000; i++)
                {
                    var d = conn.PollTimeout();
                    if (!d.HasValue || d.Value > t) { now = t; return; }
                    now = Math.Max(now, d.Value);
                    conn.HandleTimeout(now);
                    Collect();
                }
                throw new Exception("timers do not settle");
            }

            byte[] TakeOut(out long last)
            {
                last = outs.Count > 0 ? outs[outs.Count - 1].Key : -1;
                var all = outs.SelectMany(o => o.Value).ToArray();
                outs.Clear();
                return all;
            }

            public void Run(Dictionary<string, object> x)
            {
                int i = 0;
                foreach (Dictionary<string, object> step in (List<object>)x["steps"])
                {
                    long t = L(step["at_ms"]);
                    Advance(t);
                    try { Step(step, t); }
                    catch (Exception e) { throw new Exception("step " + i + " at " + t + " ms: " + e.Message); }
                    Collect();
                    i++;
                }
                if (outs.Count > 0) throw new Exception("unexpected bytes after the last step: " + Hex(outs[0].Value));
                if (events.Count > 0) throw new Exception("unexpected event after the last step: " + Json.Show(events[0].Value));
            }

            void Step(Dictionary<string, object> step, long t)
            {
                object v;
                if (step.TryGetValue("recv", out v)) { var b = Unhex((string)v); conn.HandleInput(now, b, 0, b.Length); }
                else if (step.ContainsKey("recv_eof")) conn.HandleEof(now);
                else if (step.ContainsKey("recv_reset")) conn.HandleTransportError(now, Reason.PeerReset);
                else if (step.TryGetValue("send", out v))
                {
                    long last;
                    var got = TakeOut(out last);
                    if (Hex(got) != (string)v) throw new Exception("sent " + Hex(got) + ", want " + v);
                    if (got.Length > 0 && last != t) throw new Exception("sent at " + last + " ms");
                }
                else if (step.TryGetValue("send_frames", out v))
                {
                    long last;
                    var got = TakeOut(out last);
                    if (last != t) throw new Exception("sent at " + last + " ms");
                    var frames = new List<object>();
                    int off = 0;
                    if (got.Length >= 5 && got[0] == 'T' && got[1] == 'T' && got[2] == 'H' && got[3] == 'R')
                    {
                        frames.Add(O("type", "PREAMBLE", "version", (long)got[4]));
                        off = 5;
                    }
                    foreach (var f in DecodeAll(got.Skip(off).ToArray(), uint.MaxValue, Math.Max(1, got.Length))) frames.Add(FrameJson(f));
                    if (!Json.Subset(v, frames)) throw new Exception("sent " + Json.Show(frames) + ", want " + Json.Show(v));
                }
                else if (step.TryGetValue("event", out v))
                {
                    if (events.Count == 0) throw new Exception("no event, want " + Json.Show(v));
                    var ev = events[0];
                    events.RemoveAt(0);
                    if (!Json.Subset(v, ev.Value)) throw new Exception("event " + Json.Show(ev.Value) + ", want " + Json.Show(v));
                    if (ev.Key != t) throw new Exception("event " + Json.Show(ev.Value) + " at " + ev.Key + " ms");
                }
                else if (step.TryGetValue("app", out v)) App((Dictionary<string, object>)v);
                else throw new Exception("unknown step " + Json.Show(step));
            }

            void App(Dictionary<string, object> a)
            {
                switch ((string)a["op"])
                {
                    case "send":
                        {
                            var r = conn.Send(now, Unhex((string)a["payload"]));
                            var got = r == SendResult.Ok ? "ok" : r == SendResult.Full ? "full" : r == SendResult.NotEstablished ? "not-established" : r == SendResult.Closed ? "closed" : "too-long";
                            object want;
                            if (!a.TryGetValue("result", out want)) want = "ok";
                            if (got != (string)want) throw new Exception("send result " + got + ", want " + want);
                            break;
                        }
                    case "close": conn.Close(now, (ushort)L(a["code"]), (string)a["text"]); break;
                    case "reconnect": conn = new Conn(now, cfg, hello, conn.TakeSession()); break;
                    case "auth": conn.Auth(now, Unhex((string)a["credential"])); break;
                    default: throw new Exception("unknown app op " + a["op"]);
                }
            }
        }
    }
}
