// Test helpers: the real `tether serve`, a proxy that resets every connection on a timer, a
// silent server, a TLS-terminating proxy, and an event recorder.

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using System.Text.RegularExpressions;
using System.Threading;
using System.Threading.Tasks;

namespace Tether.Tests
{
    static class Support
    {
        static readonly Stopwatch Clock = Stopwatch.StartNew();
        public static long Now() { return Clock.ElapsedMilliseconds; }

        public static void Forget(Task t)
        {
            t.ContinueWith(x => { var ignored = x.Exception; }, TaskContinuationOptions.OnlyOnFaulted);
        }

        public static string TlsFile(string name)
        {
            return Path.Combine(Path.Combine(Path.Combine(Path.Combine(TestRunner.Repo, "clients"), "testdata"), "tls"), name);
        }

        /// <summary>$TETHER_BIN, else the newest of target/release/tether and target/debug/tether.</summary>
        public static string FindTether()
        {
            var env = Environment.GetEnvironmentVariable("TETHER_BIN");
            if (!string.IsNullOrEmpty(env)) return File.Exists(env) ? env : null;
            return new[] { "release", "debug" }
                .Select(k => Path.Combine(Path.Combine(Path.Combine(TestRunner.Repo, "target"), k), "tether"))
                .Where(File.Exists)
                .OrderByDescending(File.GetLastWriteTimeUtc)
                .FirstOrDefault();
        }

        public static string NeedTether()
        {
            var bin = FindTether();
            if (bin == null) throw new SkipException("no tether binary: build it (cargo build --release -p tether-cli) or set TETHER_BIN");
            return bin;
        }

        public static int FreePort()
        {
            var l = new TcpListener(IPAddress.Loopback, 0);
            l.Start();
            int port = ((IPEndPoint)l.LocalEndpoint).Port;
            l.Stop();
            return port;
        }

        public static void Reset(Socket s)
        {
            try { s.LingerState = new LingerOption(true, 0); } catch (Exception) { }
            try { s.Close(); } catch (Exception) { }
        }
    }

    /// <summary>`tether serve --listen 127.0.0.1:0 --http off --echo --detect-within 2s`; the
    /// address is read from its log.</summary>
    sealed class Server : IDisposable
    {
        readonly Process proc;
        public readonly int Port;
        public readonly List<string> Log = new List<string>();

        public Server()
        {
            var psi = new ProcessStartInfo(Support.NeedTether(), "serve --listen 127.0.0.1:0 --http off --echo --detect-within 2s")
            {
                UseShellExecute = false, RedirectStandardError = true, RedirectStandardOutput = true,
            };
            proc = Process.Start(psi);
            var got = new TaskCompletionSource<int>();
            DataReceivedEventHandler onLine = (s, e) =>
            {
                if (e.Data == null) return;
                lock (Log) Log.Add(e.Data);
                var m = Regex.Match(e.Data, @"listening\s.*addr=""?[^\s""]+:(\d+)");
                if (m.Success) got.TrySetResult(int.Parse(m.Groups[1].Value));
            };
            proc.ErrorDataReceived += onLine;
            proc.OutputDataReceived += onLine;
            proc.BeginErrorReadLine();
            proc.BeginOutputReadLine();
            if (!got.Task.Wait(20000)) { Dispose(); throw new Exception("tether serve did not start: " + string.Join("\n", Log)); }
            Port = got.Task.Result;
        }

        public void Dispose()
        {
            try
            {
                if (!proc.HasExited) proc.Kill();
                proc.WaitForExit(5000);
            }
            catch (Exception) { }
        }
    }

    /// <summary>Forwards to the upstream and resets (RST, SO_LINGER 0) every live connection,
    /// both sides, every period.</summary>
    sealed class ResettingProxy : IDisposable
    {
        readonly TcpListener listener = new TcpListener(IPAddress.Loopback, 0);
        readonly int upstream;
        readonly List<Socket[]> live = new List<Socket[]>();
        readonly Timer ticker;
        public int Resets;
        public int Port { get { return ((IPEndPoint)listener.LocalEndpoint).Port; } }

        public ResettingProxy(int upstream, int periodMs)
        {
            this.upstream = upstream;
            listener.Start();
            ticker = new Timer(_ =>
            {
                lock (live)
                {
                    foreach (var pair in live) { Support.Reset(pair[0]); Support.Reset(pair[1]); Resets++; }
                    live.Clear();
                }
            }, null, periodMs, periodMs);
            Support.Forget(AcceptLoop());
        }

        async Task AcceptLoop()
        {
            while (true)
            {
                Socket c;
                try { c = await Task.Factory.FromAsync(listener.BeginAcceptSocket, listener.EndAcceptSocket, null).ConfigureAwait(false); }
                catch (Exception) { return; }
                Support.Forget(Handle(c));
            }
        }

        async Task Handle(Socket c)
        {
            var u = new Socket(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            try { await Task.Factory.FromAsync(u.BeginConnect, u.EndConnect, (EndPoint)new IPEndPoint(IPAddress.Loopback, upstream), null).ConfigureAwait(false); }
            catch (Exception) { Support.Reset(c); return; }
            var pair = new[] { c, u };
            lock (live) live.Add(pair);
            await Task.WhenAny(Pipe(c, u), Pipe(u, c)).ConfigureAwait(false);
            Support.Reset(c);
            Support.Reset(u);
            lock (live) live.Remove(pair);
        }

        static async Task Pipe(Socket from, Socket to)
        {
            var buf = new byte[65536];
            try
            {
                using (var a = new NetworkStream(from, false))
                using (var b = new NetworkStream(to, false))
                    while (true)
                    {
                        int n = await a.ReadAsync(buf, 0, buf.Length).ConfigureAwait(false);
                        if (n == 0) return;
                        await b.WriteAsync(buf, 0, n).ConfigureAwait(false);
                    }
            }
            catch (Exception) { }
        }

        public void Dispose()
        {
            ticker.Dispose();
            listener.Stop();
            lock (live) foreach (var pair in live) { Support.Reset(pair[0]); Support.Reset(pair[1]); }
        }
    }

    /// <summary>Answers the handshake with the client-handshake vector's WELCOME (h = 1 s,
    /// d = 3 s) and then never sends a byte.</summary>
    sealed class SilentServer : IDisposable
    {
        readonly TcpListener listener = new TcpListener(IPAddress.Loopback, 0);
        readonly byte[] answer;
        readonly List<Socket> conns = new List<Socket>();
        public readonly List<long> Welcomed = new List<long>();
        public readonly List<byte> Received = new List<byte>();
        public int Port { get { return ((IPEndPoint)listener.LocalEndpoint).Port; } }

        public SilentServer()
        {
            var doc = (Dictionary<string, object>)Json.Parse(File.ReadAllText(Path.Combine(Path.Combine(TestRunner.Repo, "conformance"), "exchanges.json")));
            var x = ((List<object>)doc["exchanges"]).Cast<Dictionary<string, object>>().First(e => (string)e["name"] == "client-handshake");
            answer = Conformance.Unhex((string)((List<object>)x["steps"]).Cast<Dictionary<string, object>>().First(st => st.ContainsKey("recv"))["recv"]);
            listener.Start();
            Support.Forget(Task.Run(() => AcceptLoop()));
        }

        async Task AcceptLoop()
        {
            while (true)
            {
                Socket c;
                try { c = await Task.Factory.FromAsync(listener.BeginAcceptSocket, listener.EndAcceptSocket, null).ConfigureAwait(false); }
                catch (Exception) { return; }
                lock (conns) conns.Add(c);
                Support.Forget(Task.Run(() => Serve(c)));
            }
        }

        void Serve(Socket c)
        {
            try
            {
                var head = ReadExactly(c, 9);
                ReadExactly(c, (head[5] << 24) | (head[6] << 16) | (head[7] << 8) | head[8]);
                c.Send(answer);
                lock (Welcomed) Welcomed.Add(Support.Now());
                var buf = new byte[4096];
                while (true)
                {
                    int n = c.Receive(buf);
                    if (n == 0) return;
                    lock (Received) Received.AddRange(buf.Take(n));
                }
            }
            catch (Exception) { }
        }

        static byte[] ReadExactly(Socket c, int n)
        {
            var b = new byte[n];
            int got = 0;
            while (got < n)
            {
                int k = c.Receive(b, got, n - got, SocketFlags.None);
                if (k == 0) throw new EndOfStreamException();
                got += k;
            }
            return b;
        }

        public void Dispose()
        {
            listener.Stop();
            lock (conns) foreach (var c in conns) c.Close();
        }
    }

    /// <summary>Terminates TLS (the test certificate for localhost) in front of a plain
    /// upstream; with mutual, a client certificate from the test CA is required.</summary>
    sealed class TlsProxy : IDisposable
    {
        readonly TcpListener listener = new TcpListener(IPAddress.Loopback, 0);
        readonly int upstream;
        readonly bool mutual;
        readonly X509Certificate2 cert = new X509Certificate2(Support.TlsFile("server.p12"), "tether");
        readonly X509Certificate2 ca = new X509Certificate2(Support.TlsFile("ca.pem"));
        public readonly List<string> Subjects = new List<string>();
        public int Port { get { return ((IPEndPoint)listener.LocalEndpoint).Port; } }

        public TlsProxy(int upstream, bool mutual)
        {
            this.upstream = upstream;
            this.mutual = mutual;
            listener.Start();
            Support.Forget(Task.Run(() => AcceptLoop()));
        }

        async Task AcceptLoop()
        {
            while (true)
            {
                TcpClient c;
                try { c = await listener.AcceptTcpClientAsync().ConfigureAwait(false); }
                catch (Exception) { return; }
                Support.Forget(Task.Run(() => Serve(c)));
            }
        }

        bool ValidateClient(object sender, X509Certificate peer, X509Chain chain, SslPolicyErrors errors)
        {
            if (!mutual) return true;
            if (peer == null) return false;
            using (var ch = new X509Chain())
            {
                ch.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                ch.ChainPolicy.VerificationFlags = X509VerificationFlags.AllowUnknownCertificateAuthority;
                ch.ChainPolicy.ExtraStore.Add(ca);
                return ch.Build(new X509Certificate2(peer)) && ch.ChainElements[ch.ChainElements.Count - 1].Certificate.Thumbprint == ca.Thumbprint;
            }
        }

        async Task Serve(TcpClient c)
        {
            using (c)
            using (var ssl = new SslStream(c.GetStream(), false, ValidateClient))
            {
                try
                {
                    await ssl.AuthenticateAsServerAsync(cert, mutual, SslProtocols.Tls12, false).ConfigureAwait(false);
                    if (ssl.RemoteCertificate != null) lock (Subjects) Subjects.Add(ssl.RemoteCertificate.Subject);
                    using (var u = new TcpClient())
                    {
                        await u.ConnectAsync(IPAddress.Loopback, upstream).ConfigureAwait(false);
                        var us = u.GetStream();
                        await Task.WhenAny(ssl.CopyToAsync(us), us.CopyToAsync(ssl)).ConfigureAwait(false);
                    }
                }
                catch (Exception) { }
            }
        }

        public void Dispose() { listener.Stop(); }
    }

    /// <summary>Every event of a client, in order, with the thread it was raised on.</summary>
    sealed class Recorder
    {
        public readonly BlockingCollection<object> Events = new BlockingCollection<object>();
        public readonly List<object> Seen = new List<object>();
        public readonly ConcurrentBag<int> Threads = new ConcurrentBag<int>();

        public Recorder(TetherClient c)
        {
            c.Connected += (s, e) => Add(e);
            c.MessageReceived += (s, e) => Add(e);
            c.Resumed += (s, e) => Add(e);
            c.SessionLost += (s, e) => Add(e);
            c.Disconnected += (s, e) => Add(e);
            c.Reconnecting += (s, e) => Add(e);
            c.Stopped += (s, e) => Add(new StoppedArgs { Disconnect = e.Disconnect });
        }

        void Add(object e)
        {
            Threads.Add(Thread.CurrentThread.ManagedThreadId);
            Events.Add(e);
        }

        /// <summary>The next event of type T, keeping every event seen on the way in Seen.</summary>
        public T Until<T>(int timeoutMs) where T : class
        {
            var deadline = Support.Now() + timeoutMs;
            while (true)
            {
                object e;
                if (!Events.TryTake(out e, (int)Math.Max(1, deadline - Support.Now())))
                    throw new Exception("no " + typeof(T).Name + " within " + timeoutMs + " ms; seen " + string.Join(", ", Seen.Select(Describe)));
                Seen.Add(e);
                var t = e as T;
                if (t != null) return t;
            }
        }

        public static string Describe(object e)
        {
            var d = e as DisconnectedEventArgs;
            if (d != null) return "Disconnected(" + d.Disconnect + ")";
            var s = e as StoppedArgs;
            if (s != null) return "Stopped(" + s.Disconnect + ")";
            return e.GetType().Name;
        }
    }

    /// <summary>Distinguishes Stopped from Disconnected in a Recorder.</summary>
    sealed class StoppedArgs
    {
        public Disconnect Disconnect;
    }

    /// <summary>A single-threaded SynchronizationContext (a stand-in for Unity's main thread).</summary>
    sealed class LoopContext : SynchronizationContext, IDisposable
    {
        readonly BlockingCollection<KeyValuePair<SendOrPostCallback, object>> queue = new BlockingCollection<KeyValuePair<SendOrPostCallback, object>>();
        public readonly Thread Thread;

        public LoopContext()
        {
            Thread = new Thread(() =>
            {
                SetSynchronizationContext(this);
                foreach (var item in queue.GetConsumingEnumerable()) item.Key(item.Value);
            }) { IsBackground = true, Name = "main" };
            Thread.Start();
        }

        public override void Post(SendOrPostCallback d, object state) { queue.Add(new KeyValuePair<SendOrPostCallback, object>(d, state)); }

        public override void Send(SendOrPostCallback d, object state)
        {
            var done = new ManualResetEventSlim();
            Post(_ => { d(state); done.Set(); }, null);
            done.Wait();
        }

        public void Dispose() { queue.CompleteAdding(); }
    }
}
