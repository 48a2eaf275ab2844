// The client against the real `tether serve` (built from this repository) and against
// scripted servers. Bounds on real sockets are loose and two-sided (the machine may be busy).

using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace Tether.Tests
{
    static class ClientTests
    {
        const int N = 10000;

        public static List<KeyValuePair<string, Action>> All()
        {
            return new List<KeyValuePair<string, Action>>
            {
                T("chaos: 10,000 each way through a 50 ms resetting proxy, exactly once, in order", Chaos),
                T("silent server detected at d, not before", SilentServerDetected),
                T("idle connection kept alive by heartbeats", IdleKeptAlive),
                T("TLS and mutual TLS through a terminating proxy", TlsAndMutualTls),
                T("TLS: an untrusted server is an error", TlsUntrusted),
                T("REPLACED is terminal", ReplacedIsTerminal),
                T("connect refused is retried with capped backoff", ConnectRefusedRetried),
                T("events are raised on the captured SynchronizationContext, in order", EventsOnContext),
                T("backoff is full jitter, capped, and resets", BackoffJitter),
                T("client id rules", ClientIdRules),
                T("reconnect decisions", ReconnectDecisions),
                T("socket options derived and read back from the kernel", SocketOptionsReadBack),
                T("SendAsync waits while the outbox is full; a stop reports the unsent", OutboxFull),
                T("credential in HELLO and refreshed before the ttl", CredentialRefresh),
            };
        }

        static KeyValuePair<string, Action> T(string name, Action a) { return new KeyValuePair<string, Action>(name, a); }

        static void Check(bool cond, string what)
        {
            if (!cond) throw new Exception(what);
        }

        static TetherClient Client(TetherClientOptions o, out Recorder rec)
        {
            var c = new TetherClient(o);
            rec = new Recorder(c);
            c.Start();
            return c;
        }

        static void Chaos()
        {
            using (var srv = new Server())
            using (var proxy = new ResettingProxy(srv.Port, 50))
            {
                Recorder rec;
                var c = Client(new TetherClientOptions { Port = proxy.Port, ClientId = "chaos-cs", BackoffBase = TimeSpan.FromMilliseconds(20), BackoffCap = TimeSpan.FromMilliseconds(200), Seed = 7 }, out rec);
                var started = Support.Now();
                var producer = Task.Run(async () =>
                {
                    // Paced (50 messages every 20 ms, ~4 s in all) so the transfer spans many resets.
                    for (int i = 1; i <= N; i++)
                    {
                        await c.SendAsync(Encoding.ASCII.GetBytes(i.ToString("D5"))).ConfigureAwait(false);
                        if (i % 50 == 0) await Task.Delay(20).ConfigureAwait(false);
                    }
                });
                int expect = 1, connects = 0;
                ulong replayed = 0;
                var deadline = Support.Now() + 240000;
                while (expect <= N)
                {
                    object e;
                    if (!rec.Events.TryTake(out e, (int)Math.Max(1, deadline - Support.Now()))) throw new Exception("stalled after " + (expect - 1) + " echoes");
                    var m = e as MessageEventArgs;
                    if (m != null)
                    {
                        int got = int.Parse(Encoding.ASCII.GetString(m.Payload));
                        Check(got == expect, "echo " + got + " arrived when " + expect + " was next");
                        expect++;
                    }
                    else if (e is ConnectedEventArgs) connects++;
                    else if (e is ResumedEventArgs) replayed += ((ResumedEventArgs)e).Replayed;
                    else if (e is SessionLostEventArgs || e is StoppedArgs) throw new Exception("unexpected " + Recorder.Describe(e));
                }
                producer.Wait();
                c.CloseAsync().Wait();
                Console.WriteLine("chaos (csharp): " + N + " messages each way, " + connects + " connections, " + proxy.Resets + " resets, " + replayed + " replayed, " + ((Support.Now() - started) / 1000.0).ToString("F1") + " s");
                Check(proxy.Resets > 20 && connects > 20, "the proxy must actually reset connections");
                Check(replayed > 0, "some messages must have been replayed after a resume");
            }
        }

        static void SilentServerDetected()
        {
            using (var s = new SilentServer())
            {
                Recorder rec;
                var c = Client(new TetherClientOptions { Port = s.Port, ClientId = "silent-cs", Session = false, BackoffBase = TimeSpan.FromSeconds(5), BackoffCap = TimeSpan.FromSeconds(5) }, out rec);
                var con = rec.Until<ConnectedEventArgs>(10000);
                Check(con.Welcome.DeadAfterMs == 3000, "dead_after " + con.Welcome.DeadAfterMs);
                var d = rec.Until<DisconnectedEventArgs>(10000);
                long detected = Support.Now();
                c.CloseAsync().Wait();
                Check(d.Disconnect.Reason == Reason.HeartbeatTimeout, "reason " + d.Disconnect);
                long after;
                lock (s.Welcomed) after = detected - s.Welcomed[0];
                Console.WriteLine("silent server (csharp): detected " + (after / 1000.0).ToString("F2") + " s after the WELCOME (d = 3 s)");
                Check(after >= 2900 && after <= 4500, "detected after " + after + " ms, want about 3000");
                byte[] got;
                lock (s.Received) got = s.Received.ToArray();
                int hbs = 0;
                for (int i = 0; i + 4 <= got.Length; i += 4) if (got[i] == 0 && got[i + 1] == 0 && got[i + 2] == 0 && got[i + 3] == 0) hbs++;
                Check(hbs >= 2, hbs + " heartbeats: want one every h = 1 s");
                // The CLOSE(HEARTBEAT_TIMEOUT) just before the RST is best effort (the vectors check it).
            }
        }

        static void IdleKeptAlive()
        {
            using (var srv = new Server())
            {
                Recorder rec;
                var c = Client(new TetherClientOptions { Port = srv.Port, ClientId = "idle-cs" }, out rec);
                var con = rec.Until<ConnectedEventArgs>(10000);
                Thread.Sleep((int)(con.Welcome.DeadAfterMs * 3 / 2));
                Check(c.IsConnected, "not connected after idling 1.5 d");
                c.SendAsync(Encoding.UTF8.GetBytes("still here")).Wait();
                var m = rec.Until<MessageEventArgs>(10000);
                Check(Encoding.UTF8.GetString(m.Payload) == "still here", "echo");
                Check(!rec.Seen.Any(e => e is DisconnectedEventArgs), "disconnected while idle");
                c.CloseAsync().Wait();
            }
        }

        static void TlsAndMutualTls()
        {
            using (var srv = new Server())
                foreach (var mutual in new[] { false, true })
                    using (var p = new TlsProxy(srv.Port, mutual))
                    {
                        var tls = new TlsOptions { CaFile = Support.TlsFile("ca.pem"), ServerName = "localhost" };
                        if (mutual) { tls.ClientCertificateFile = Support.TlsFile("client.p12"); tls.ClientCertificatePassword = "tether"; }
                        Recorder rec;
                        var c = Client(new TetherClientOptions { Port = p.Port, ClientId = "tls-cs", Tls = tls }, out rec);
                        rec.Until<ConnectedEventArgs>(10000);
                        c.SendAsync(Encoding.UTF8.GetBytes("over tls")).Wait();
                        var m = rec.Until<MessageEventArgs>(10000);
                        Check(Encoding.UTF8.GetString(m.Payload) == "over tls", "echo over tls");
                        c.CloseAsync().Wait();
                        if (mutual) lock (p.Subjects) Check(p.Subjects.Count > 0 && p.Subjects.Last().Contains("demo-client"), "client certificate presented");
                    }
        }

        static void TlsUntrusted()
        {
            using (var srv = new Server())
            using (var p = new TlsProxy(srv.Port, false))
            {
                Recorder rec;
                var c = Client(new TetherClientOptions { Port = p.Port, ClientId = "tls-bad-cs", Tls = new TlsOptions { ServerName = "localhost" }, MaxAttempts = 1 }, out rec);
                var st = rec.Until<StoppedArgs>(20000);
                Check(!rec.Seen.Any(e => e is ConnectedEventArgs), "connected to an untrusted server");
                Check(st.Disconnect.Reason == Reason.IoError && st.Disconnect.Text.StartsWith("tls"), "stopped with " + st.Disconnect);
                c.CloseAsync().Wait();
            }
        }

        static void ReplacedIsTerminal()
        {
            using (var srv = new Server())
            {
                Recorder ra, rb;
                var a = Client(new TetherClientOptions { Port = srv.Port, ClientId = "twin-cs" }, out ra);
                ra.Until<ConnectedEventArgs>(10000);
                var b = Client(new TetherClientOptions { Port = srv.Port, ClientId = "twin-cs" }, out rb);
                rb.Until<ConnectedEventArgs>(10000);
                var st = ra.Until<StoppedArgs>(10000);
                Check(st.Disconnect.Reason == Reason.Replaced && st.Disconnect.Retry == Reason.RetryNever, "stopped with " + st.Disconnect);
                Check(!ra.Seen.Any(e => e is ReconnectingEventArgs), "a replaced client must not reconnect");
                try { a.SendAsync(new byte[] { 1 }).Wait(); throw new Exception("send after stop succeeded"); }
                catch (AggregateException e) { Check(e.InnerException is ClientStoppedException, "send after stop: " + e.InnerException); }
                b.CloseAsync().Wait();
            }
        }

        static void ConnectRefusedRetried()
        {
            Recorder rec;
            var c = Client(new TetherClientOptions { Port = Support.FreePort(), ClientId = "nobody-cs", BackoffBase = TimeSpan.FromMilliseconds(50), BackoffCap = TimeSpan.FromMilliseconds(100), MaxAttempts = 3 }, out rec);
            rec.Until<StoppedArgs>(20000);
            var reasons = rec.Seen.OfType<DisconnectedEventArgs>().Select(e => e.Disconnect.Reason).ToList();
            var attempts = rec.Seen.OfType<ReconnectingEventArgs>().ToList();
            Check(reasons.Count == 4 && reasons.All(r => r == Reason.ConnectRefused), "reasons " + string.Join(",", reasons));
            Check(string.Join(",", attempts.Select(a => a.Attempt)) == "1,2,3", "attempts");
            Check(attempts.All(a => a.Delay <= TimeSpan.FromMilliseconds(100)), "delay above the cap");
            c.CloseAsync().Wait();
        }

        static void EventsOnContext()
        {
            using (var srv = new Server())
            using (var main = new LoopContext())
            {
                TetherClient c = null;
                Recorder rec = null;
                main.Send(_ =>
                {
                    c = new TetherClient(new TetherClientOptions { Port = srv.Port, ClientId = "unity-cs" }); // captures the context
                    rec = new Recorder(c);
                    c.Start();
                }, null);
                rec.Until<ConnectedEventArgs>(10000);
                for (int i = 0; i < 200; i++) c.SendAsync(Encoding.ASCII.GetBytes(i.ToString())).Wait();
                for (int i = 0; i < 200; i++)
                {
                    var m = rec.Until<MessageEventArgs>(10000);
                    Check(Encoding.ASCII.GetString(m.Payload) == i.ToString(), "message " + i + " out of order");
                }
                c.CloseAsync().Wait();
                rec.Until<StoppedArgs>(10000);
                Check(rec.Threads.All(t => t == main.Thread.ManagedThreadId), "an event was raised off the context's thread");
            }
        }

        static void BackoffJitter()
        {
            var b = new Backoff(TimeSpan.FromMilliseconds(100), TimeSpan.FromSeconds(1), 20, 1);
            var ds = new List<TimeSpan>();
            for (int n = 0; n < 20; n++)
            {
                var d = b.Next();
                Check(d.HasValue && d.Value >= TimeSpan.Zero && d.Value <= b.Ceiling(n) && b.Ceiling(n) <= TimeSpan.FromSeconds(1), "delay " + n);
                ds.Add(d.Value);
            }
            Check(!b.Next().HasValue, "a 21st delay");
            Check(ds.Skip(5).Max() > TimeSpan.FromMilliseconds(300), "later delays use the whole window");
            b.Reset();
            Check(b.Next().Value <= TimeSpan.FromMilliseconds(100), "after reset");
        }

        static void ClientIdRules()
        {
            foreach (var ok in new[] { "sensor-1", "jörg-📱", new string('x', 255), new string('ü', 127), "a b" })
                Check(Codec.ClientIdProblem(ok) == null, ok + ": " + Codec.ClientIdProblem(ok));
            foreach (var bad in new[] { "", new string('x', 256), new string('ü', 128), "a\u0000b", "a\u007f", "a\u0085", "a\u200bb", "\ufeffa", "a\u2028b", "a\u2029b", "a\u202eb", "a\nb", "a\ud800" })
                Check(Codec.ClientIdProblem(bad) != null, "accepted " + bad);
            try { new TetherClient(new TetherClientOptions { ClientId = "bad\nid" }); throw new Exception("constructor accepted a bad id"); }
            catch (ArgumentException) { }
        }

        static void ReconnectDecisions()
        {
            Func<ushort, Disconnect> refused = code => new Disconnect(Reason.Refused, code);
            foreach (var d in new[] { new Disconnect(Reason.Replaced, 5), new Disconnect(Reason.LocalClose), refused(CloseCode.BadHello), refused(CloseCode.UnsupportedVersion), refused(CloseCode.Unauthorized), refused(CloseCode.IdNotAllowed) })
                Check(d.Retry == Reason.RetryNever, d + ": " + d.Retry);
            Check(refused(CloseCode.SessionUnknown).Retry == Reason.RetryNow, "session-unknown");
            foreach (var code in new ushort[] { CloseCode.ServerFull, CloseCode.HandshakeTimeout, CloseCode.Refused, CloseCode.SessionBusy, CloseCode.Throttled, 1000 })
                Check(refused(code).Retry == Reason.RetryBackoff, "refused " + code);
            foreach (var r in new[] { Reason.PeerClosed, Reason.PeerReset, Reason.HeartbeatTimeout, Reason.KeepaliveTimeout, Reason.UserTimeout, Reason.ProtocolError, Reason.IoError, Reason.ConnectRefused, Reason.PeerClose })
                Check(new Disconnect(r).Retry == Reason.RetryBackoff, r);
        }

        static void SocketOptionsReadBack()
        {
            var o = SocketOptions.Derive(30000, 0);
            Check(o.KeepaliveIdleSeconds == 15 && o.KeepaliveIntervalSeconds == 5 && o.KeepaliveCount == 3 && o.UserTimeoutMs == 30000, "30 s: " + o);
            var lab = SocketOptions.Derive(3000, 4000);
            Check(lab.KeepaliveIdleSeconds == 1 && lab.KeepaliveIntervalSeconds == 1 && lab.KeepaliveCount == 2, "3 s over 4 s: " + lab);
            var l = new TcpListener(IPAddress.Loopback, 0);
            l.Start();
            using (var c = new TcpClient())
            {
                c.Connect((IPEndPoint)l.LocalEndpoint);
                o.Apply(c.Client);
                var got = SocketOptions.ReadBack(c.Client);
                if (got == null) throw new SkipException("cannot read socket options back on this platform");
                Check(got.KeepaliveIdleSeconds == 15 && got.KeepaliveIntervalSeconds == 5 && got.KeepaliveCount == 3 && got.UserTimeoutMs == 30000, "kernel has " + got);
                Check(c.Client.NoDelay, "TCP_NODELAY");
            }
            l.Stop();
        }

        static void OutboxFull()
        {
            Recorder rec;
            var c = Client(new TetherClientOptions { Port = Support.FreePort(), ClientId = "full-cs", OutboxBytes = 10, BackoffBase = TimeSpan.FromSeconds(5), BackoffCap = TimeSpan.FromSeconds(5) }, out rec);
            c.SendAsync(Encoding.ASCII.GetBytes("123456")).Wait();
            using (var cts = new CancellationTokenSource(200))
            {
                try { c.SendAsync(Encoding.ASCII.GetBytes("abcdef"), cts.Token).Wait(); throw new Exception("second send did not wait"); }
                catch (AggregateException e) { Check(e.InnerException is OperationCanceledException, "second send: " + e.InnerException); }
            }
            var blocked = c.SendAsync(Encoding.ASCII.GetBytes("abcdef"));
            Thread.Sleep(100);
            Check(!blocked.IsCompleted, "the blocked send waits for room");
            c.CloseAsync().Wait();
            try { blocked.Wait(); throw new Exception("blocked send succeeded"); }
            catch (AggregateException e) { Check(e.InnerException is ClientStoppedException, "blocked send: " + e.InnerException); }
            rec.Until<StoppedArgs>(5000);
            var lost = rec.Seen.OfType<SessionLostEventArgs>().ToList();
            Check(lost.Count == 1 && lost[0].Unsent.Count == 1 && Encoding.ASCII.GetString(lost[0].Unsent[0]) == "123456" && lost[0].Unacked == null, "session lost");
            Check(((StoppedArgs)rec.Seen.Last()).Disconnect.Reason == Reason.LocalClose, "stopped with local-close");
        }

        static void CredentialRefresh()
        {
            // A scripted server (the reference server cannot verify credentials yet).
            var l = new TcpListener(IPAddress.Loopback, 0);
            l.Start();
            Hello hello = null;
            byte[] auth = null;
            long after = 0;
            var server = Task.Run(() =>
            {
                using (var s = l.AcceptSocket())
                {
                    var head = Read(s, 9);
                    int n = (head[5] << 24) | (head[6] << 16) | (head[7] << 8) | head[8];
                    var body = Read(s, n);
                    hello = (Hello)Codec.ParseBody(body, 0, body.Length);
                    var w = Codec.Preamble.Concat(Codec.Encode(Welcome.Create(10000, 30000, null, 1000))).ToArray();
                    s.Send(w);
                    long welcomed = Support.Now();
                    var dec = new Decoder(Codec.DefaultMaxFrameLen);
                    var buf = new byte[4096];
                    while (auth == null)
                    {
                        int k = s.Receive(buf);
                        if (k == 0) return;
                        dec.Feed(buf, 0, k, f => { var a = f as Auth; if (a != null) auth = a.Credential; return true; });
                    }
                    after = Support.Now() - welcomed;
                    s.Send(Codec.Encode(new AuthOk { CredentialTtlMs = 0 }));
                    while (s.Receive(buf) > 0) { }
                }
            });
            int calls = 0;
            Recorder rec;
            var c = Client(new TetherClientOptions
            {
                Port = ((IPEndPoint)l.LocalEndpoint).Port, ClientId = "cred-cs", Session = false,
                Credential = ct => Task.FromResult(Encoding.ASCII.GetBytes("cred-" + Interlocked.Increment(ref calls))),
            }, out rec);
            rec.Until<ConnectedEventArgs>(10000);
            var deadline = Support.Now() + 10000;
            while (auth == null && Support.Now() < deadline) Thread.Sleep(20);
            Thread.Sleep(300);
            c.CloseAsync().Wait();
            l.Stop();
            server.Wait(5000);
            Check(hello != null && Encoding.ASCII.GetString(hello.Credential) == "cred-1" && hello.Flags == Codec.HelloCredential, "hello credential");
            Check(auth != null && Encoding.ASCII.GetString(auth) == "cred-2", "AUTH credential");
            Check(after >= 850 && after <= 1500, "AUTH after " + after + " ms, want about 900");
            Check(calls == 2, calls + " credential calls: no refresh after AUTH_OK(0)");
        }

        static byte[] Read(Socket s, int n)
        {
            var b = new byte[n];
            for (int got = 0; got < n;)
            {
                int k = s.Receive(b, got, n - got, SocketFlags.None);
                if (k == 0) throw new EndOfStreamException();
                got += k;
            }
            return b;
        }
    }
}
