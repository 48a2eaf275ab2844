// The reconnecting client: one Conn per connection (a reader task, a writer task and a
// timer drive it under one lock), a supervisor that reconnects with capped exponential
// backoff and full jitter, and a session carried from one connection to the next.
//
//   Start --> connect --ok--> Connected --> Resumed? --> Message* --error--> Disconnected(d)
//               ^                                                              |
//               +--- delay <-- Reconnecting(attempt, delay) <-- d.Retry == "backoff"
//                    d.Retry == "now": at once (a new session after SESSION_UNKNOWN)
//                    d.Retry == "never": SessionLost(unacked, unsent)? then Stopped(d)
//
// Events are raised in order on the SynchronizationContext captured by the constructor
// (Unity's main thread), or, without one, on a pool thread one at a time. Library code
// never resumes on that context (ConfigureAwait(false) throughout).

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Authentication;
using System.Security.Cryptography.X509Certificates;
using System.Threading;
using System.Threading.Tasks;

namespace Tether
{
    /// <summary>TLS settings: the server name (default: the host), a private CA (certificate or
    /// PEM/DER file) or the system's roots, a client certificate (or PKCS#12 file + password),
    /// or your own validation callback.</summary>
    public sealed class TlsOptions
    {
        public string ServerName;
        public X509Certificate2 CaCertificate;
        public string CaFile;
        public X509Certificate2 ClientCertificate;
        public string ClientCertificateFile;
        public string ClientCertificatePassword;
        public RemoteCertificateValidationCallback Validate;
        public SslProtocols Protocols = SslProtocols.Tls12;
    }

    public sealed class TetherClientOptions
    {
        public string Host = "127.0.0.1";
        public int Port = 7300;
        /// <summary>1-255 bytes of UTF-8, no control, format or separator characters.</summary>
        public string ClientId;
        /// <summary>Ask for a resumable session (exactly-once across reconnects). Default true.</summary>
        public bool Session = true;
        /// <summary>Called for every HELLO and for each refresh before the server's ttl runs out.</summary>
        public Func<CancellationToken, Task<byte[]>> Credential;
        /// <summary>null: plain TCP.</summary>
        public TlsOptions Tls;
        public TimeSpan Heartbeat = TimeSpan.Zero;
        /// <summary>Socket keepalive and TCP_USER_TIMEOUT; zero: the server's dead-after.</summary>
        public TimeSpan DetectWithin = TimeSpan.Zero;
        public TimeSpan PathTimeout = TimeSpan.Zero;
        public TimeSpan BackoffBase = TimeSpan.FromMilliseconds(100);
        public TimeSpan BackoffCap = TimeSpan.FromSeconds(30);
        /// <summary>Delays handed out before giving up; 0 retries forever.</summary>
        public int MaxAttempts = 0;
        public int? Seed;
        public TimeSpan HandshakeTimeout = TimeSpan.FromSeconds(10);
        public uint MaxFrameLen = Codec.DefaultMaxFrameLen;
        public SessionConfig SessionConfig = new SessionConfig();
        /// <summary>Bytes waiting for a connection before SendAsync waits.</summary>
        public int OutboxBytes = 1 << 20;
        public TimeSpan CloseTimeout = TimeSpan.FromSeconds(5);
    }

    public sealed class ConnectedEventArgs : EventArgs { public Welcome Welcome; }
    public sealed class MessageEventArgs : EventArgs { public byte[] Payload; }
    public sealed class ResumedEventArgs : EventArgs { public ulong Replayed; }
    /// <summary>Unacked: sent but never acknowledged, may be lost (null: none). Unsent: never sent.</summary>
    public sealed class SessionLostEventArgs : EventArgs { public SeqRange Unacked; public List<byte[]> Unsent; }
    public sealed class DisconnectedEventArgs : EventArgs { public Disconnect Disconnect; }
    public sealed class ReconnectingEventArgs : EventArgs { public int Attempt; public TimeSpan Delay; }

    /// <summary>SendAsync on a client that stopped.</summary>
    public sealed class ClientStoppedException : Exception
    {
        public readonly Disconnect Disconnect;
        public ClientStoppedException(Disconnect d) : base("tether client stopped: " + d) { Disconnect = d; }
    }

    /// <summary>Capped exponential backoff with full jitter: delay n is uniform in
    /// [0, min(cap, base * 2^n)].</summary>
    public sealed class Backoff
    {
        readonly TimeSpan baseDelay, cap;
        readonly int maxAttempts;
        readonly Random rng;
        public int Attempt { get; private set; }

        public Backoff(TimeSpan baseDelay, TimeSpan cap, int maxAttempts, int seed)
        {
            this.baseDelay = baseDelay;
            this.cap = cap;
            this.maxAttempts = maxAttempts;
            rng = new Random(seed);
        }

        public TimeSpan Ceiling(int n)
        {
            double c = baseDelay.TotalMilliseconds * Math.Pow(2, Math.Min(n, 1000));
            return c > cap.TotalMilliseconds ? cap : TimeSpan.FromMilliseconds(c);
        }

        /// <summary>The next delay, or null once MaxAttempts delays were handed out.</summary>
        public TimeSpan? Next()
        {
            if (maxAttempts > 0 && Attempt >= maxAttempts) return null;
            var d = TimeSpan.FromMilliseconds(rng.NextDouble() * Ceiling(Attempt).TotalMilliseconds);
            Attempt++;
            return d;
        }

        public void Reset() { Attempt = 0; }
    }

    /// <summary>A tether client that reconnects on its own and resumes its session. Thread-safe.</summary>
    public sealed class TetherClient : IDisposable
    {
        public event EventHandler<ConnectedEventArgs> Connected;
        public event EventHandler<MessageEventArgs> MessageReceived;
        public event EventHandler<ResumedEventArgs> Resumed;
        public event EventHandler<SessionLostEventArgs> SessionLost;
        public event EventHandler<DisconnectedEventArgs> Disconnected;
        public event EventHandler<ReconnectingEventArgs> Reconnecting;
        /// <summary>The client stopped for good; always the last event.</summary>
        public event EventHandler<DisconnectedEventArgs> Stopped;

        internal const int CloseLingerMs = 2000;
        static readonly Stopwatch Clock = Stopwatch.StartNew();
        internal static long Now() { return Clock.ElapsedMilliseconds; }

        readonly TetherClientOptions opts;
        readonly ConnConfig connCfg;
        readonly SynchronizationContext context;
        internal readonly object Gate = new object();
        readonly LinkedList<byte[]> outbox = new LinkedList<byte[]>();
        int outboxBytes;
        TaskCompletionSource<bool> space = NewSignal();
        readonly CancellationTokenSource closeCts = new CancellationTokenSource();
        readonly TaskCompletionSource<bool> completion = NewSignal();
        internal volatile bool Closing;
        Disconnect stopped;
        Link link;
        Task run;
        readonly object dispatchGate = new object();
        readonly Queue<Action> dispatchQueue = new Queue<Action>();
        bool dispatching;
        readonly List<Task> lingers = new List<Task>();

        public TetherClient(TetherClientOptions options)
        {
            if (options == null) throw new ArgumentNullException("options");
            var p = Codec.ClientIdProblem(options.ClientId);
            if (p != null) throw new ArgumentException("invalid client id: " + p, "options");
            opts = options;
            connCfg = new ConnConfig
            {
                MaxFrameLen = options.MaxFrameLen,
                HandshakeTimeoutMs = (long)options.HandshakeTimeout.TotalMilliseconds,
                Session = options.SessionConfig ?? new SessionConfig(),
            };
            context = SynchronizationContext.Current;
        }

        /// <summary>Lets a task run on without awaiting it, observing its exception.</summary>
        internal static void Forget(Task t)
        {
            t.ContinueWith(x => { var ignored = x.Exception; }, CancellationToken.None,
                TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
        }

        static TaskCompletionSource<bool> NewSignal()
        {
            return new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        /// <summary>Starts connecting in the background.</summary>
        public void Start()
        {
            lock (Gate)
            {
                if (run != null) return;
                run = Task.Run(() => RunAsync());
            }
        }

        public bool IsConnected { get { lock (Gate) return link != null && link.IsUp; } }
        public int Queued { get { lock (Gate) return outbox.Count; } }
        /// <summary>Why the client stopped, or null while it runs.</summary>
        public Disconnect StoppedWith { get { lock (Gate) return stopped; } }
        /// <summary>Completes when the client stopped.</summary>
        public Task Completion { get { return completion.Task; } }

        /// <summary>Queues one message. With a session it is delivered exactly once, in order,
        /// unless SessionLost names its sequence number. Waits while the outbox is full;
        /// throws ClientStoppedException once the client stopped.</summary>
        public async Task SendAsync(byte[] message, CancellationToken cancel = default(CancellationToken))
        {
            if (message == null) throw new ArgumentNullException("message");
            long limit = (long)opts.MaxFrameLen - (opts.Session ? 9 : 1);
            if (message.Length > limit) throw new ArgumentException("message of " + message.Length + " bytes exceeds the maximum of " + limit);
            var copy = (byte[])message.Clone();
            while (true)
            {
                Task wait;
                lock (Gate)
                {
                    if (stopped != null) throw new ClientStoppedException(stopped);
                    if (outbox.Count == 0 || outboxBytes + copy.Length <= opts.OutboxBytes)
                    {
                        outbox.AddLast(copy);
                        outboxBytes += copy.Length;
                        break;
                    }
                    wait = space.Task;
                }
                if (cancel.CanBeCanceled)
                {
                    var tcs = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
                    using (cancel.Register(() => tcs.TrySetResult(true)))
                        await Task.WhenAny(wait, tcs.Task).ConfigureAwait(false);
                    cancel.ThrowIfCancellationRequested();
                }
                else await wait.ConfigureAwait(false);
            }
            Link l;
            lock (Gate) l = link;
            if (l != null) l.Pump();
        }

        /// <summary>Closes in order once the queued messages went out (at most CloseTimeout,
        /// then abruptly), and stops.</summary>
        public async Task CloseAsync()
        {
            Task r;
            Link l;
            lock (Gate)
            {
                Closing = true;
                r = run;
                l = link;
            }
            closeCts.Cancel();
            if (r == null)
            {
                Stop(new Disconnect(Reason.LocalClose), null, false);
                return;
            }
            if (l != null) l.Pump();
            if (await Task.WhenAny(r, Task.Delay(opts.CloseTimeout)).ConfigureAwait(false) != r)
            {
                lock (Gate)
                {
                    outbox.Clear(); // give up on the queue: the CLOSE goes out now
                    outboxBytes = 0;
                    l = link;
                }
                if (l != null) l.Pump();
                await Task.WhenAny(r, Task.Delay(CloseLingerMs)).ConfigureAwait(false);
            }
            Task[] ls;
            lock (Gate) ls = lingers.ToArray();
            await Task.WhenAny(Task.WhenAll(ls), Task.Delay(CloseLingerMs + 500)).ConfigureAwait(false);
        }

        /// <summary>Starts an orderly close without waiting for it.</summary>
        public void Dispose() { Forget(CloseAsync()); }

        // --- events ----------------------------------------------------------------------------

        /// <summary>Queues an event (call under Gate so events keep the order they happened in).</summary>
        internal void Raise<T>(EventHandler<T> which, T args) where T : EventArgs
        {
            lock (dispatchGate) dispatchQueue.Enqueue(() => { var h = which; if (h != null) h(this, args); });
        }

        internal void RaiseConnected(Welcome w) { Raise(Connected, new ConnectedEventArgs { Welcome = w }); }
        internal void RaiseMessage(byte[] p) { Raise(MessageReceived, new MessageEventArgs { Payload = p }); }
        internal void RaiseResumed(ulong n) { Raise(Resumed, new ResumedEventArgs { Replayed = n }); }
        internal void RaiseSessionLost(SeqRange u, List<byte[]> unsent) { Raise(SessionLost, new SessionLostEventArgs { Unacked = u, Unsent = unsent ?? new List<byte[]>() }); }
        internal void RaiseDisconnected(Disconnect d) { Raise(Disconnected, new DisconnectedEventArgs { Disconnect = d }); }

        /// <summary>Runs the queued events: posted in order to the captured context, or run
        /// here, one dispatcher at a time, outside every lock of the client.</summary>
        internal void Dispatch()
        {
            if (context != null)
            {
                lock (dispatchGate)
                    while (dispatchQueue.Count > 0)
                    {
                        var a = dispatchQueue.Dequeue();
                        context.Post(_ => a(), null);
                    }
                return;
            }
            lock (dispatchGate)
            {
                if (dispatching) return;
                dispatching = true;
            }
            while (true)
            {
                Action a;
                lock (dispatchGate)
                {
                    if (dispatchQueue.Count == 0) { dispatching = false; return; }
                    a = dispatchQueue.Dequeue();
                }
                try { a(); }
                catch (Exception) { } // a handler's exception must not stop the client
            }
        }

        // --- internals -------------------------------------------------------------------------

        /// <summary>Moves queued messages into the connection while its replay buffer has room
        /// (under Gate).</summary>
        internal void FeedLocked(Conn conn, long now)
        {
            bool moved = false;
            while (outbox.Count > 0 && conn.CanSend(outbox.First.Value.Length) && conn.PendingTransmit < 256 * 1024)
            {
                var m = outbox.First.Value;
                outbox.RemoveFirst();
                outboxBytes -= m.Length;
                conn.Send(now, m);
                moved = true;
            }
            if (moved)
            {
                var s = space;
                space = NewSignal();
                s.TrySetResult(true);
            }
            if (Closing && outbox.Count == 0 && !conn.IsClosed) conn.Close(now, CloseCode.Normal, "client closing");
        }

        internal void AddLinger(Task t) { lock (Gate) { lingers.RemoveAll(x => x.IsCompleted); lingers.Add(t); } }

        internal SocketOptions SocketOptionsFor(long deadAfterMs)
        {
            long d = (long)opts.DetectWithin.TotalMilliseconds;
            if (d == 0) d = deadAfterMs;
            if (d == 0) d = 30000;
            return SocketOptions.Derive(d, (long)opts.PathTimeout.TotalMilliseconds);
        }

        internal bool SocketOptionsFromServer { get { return opts.DetectWithin == TimeSpan.Zero; } }

        internal Func<CancellationToken, Task<byte[]>> CredentialProvider { get { return opts.Credential; } }

        /// <summary>Stops for good. What can no longer be delivered is reported: the session's
        /// unacknowledged range (unless the connection was closed in order: the server read
        /// everything before our CLOSE) and the messages never sent.</summary>
        void Stop(Disconnect d, Session s, bool orderly)
        {
            TaskCompletionSource<bool> wake;
            lock (Gate)
            {
                if (stopped != null) return;
                var unacked = s != null && !orderly ? s.Unacked : null;
                var unsent = new List<byte[]>(outbox);
                outbox.Clear();
                outboxBytes = 0;
                stopped = d;
                wake = space;
                if (unacked != null || unsent.Count > 0) RaiseSessionLost(unacked, unsent);
                Raise(Stopped, new DisconnectedEventArgs { Disconnect = d });
            }
            wake.TrySetResult(true);
            Dispatch();
            completion.TrySetResult(true);
        }

        async Task RunAsync()
        {
            var backoff = new Backoff(opts.BackoffBase, opts.BackoffCap, opts.MaxAttempts, opts.Seed ?? Environment.TickCount);
            Session session = null;
            while (true)
            {
                if (Closing) { Stop(new Disconnect(Reason.LocalClose), session, false); return; }
                byte[] cred = null;
                if (opts.Credential != null)
                {
                    try { cred = await opts.Credential(closeCts.Token).ConfigureAwait(false); }
                    catch (Exception e)
                    {
                        var d0 = new Disconnect(Reason.IoError, null, "credential provider failed: " + e.Message);
                        lock (Gate) RaiseDisconnected(d0);
                        Dispatch();
                        if (!await PauseAsync(backoff, d0, session).ConfigureAwait(false)) return;
                        continue;
                    }
                }
                var hello = Hello.Create(opts.ClientId, (uint)opts.Heartbeat.TotalMilliseconds, opts.Session, null, cred);
                var conn = new Conn(Now(), connCfg, hello, session);
                session = null;
                Disconnect d;
                bool established = false;
                var connected = await ConnectAsync().ConfigureAwait(false);
                if (connected.Error != null)
                {
                    d = connected.Error;
                    lock (Gate) RaiseDisconnected(d);
                    Dispatch();
                }
                else
                {
                    var l = new Link(this, conn, connected.Socket, connected.Stream);
                    lock (Gate) link = l;
                    l.Start();
                    d = await l.Ended.ConfigureAwait(false);
                    established = l.WasEstablished;
                }
                lock (Gate) session = conn.TakeSession();
                if (established) backoff.Reset();
                if (Closing)
                {
                    bool orderly = d.Reason == Reason.LocalClose && established;
                    Stop(d.Reason == Reason.LocalClose ? d : new Disconnect(Reason.LocalClose), session, orderly);
                    return;
                }
                if (d.Retry == Reason.RetryNever) { Stop(d, session, false); return; }
                if (d.Retry == Reason.RetryNow) continue;
                if (!await PauseAsync(backoff, d, session).ConfigureAwait(false)) return;
            }
        }

        async Task<bool> PauseAsync(Backoff backoff, Disconnect d, Session session)
        {
            var delay = backoff.Next();
            if (!delay.HasValue) { Stop(d, session, false); return false; }
            lock (Gate) Raise(Reconnecting, new ReconnectingEventArgs { Attempt = backoff.Attempt, Delay = delay.Value });
            Dispatch();
            try { await Task.Delay(delay.Value, closeCts.Token).ConfigureAwait(false); }
            catch (TaskCanceledException) { }
            if (Closing) { Stop(new Disconnect(Reason.LocalClose), session, false); return false; }
            return true;
        }

        sealed class Connection
        {
            public Socket Socket;
            public Stream Stream;
            public Disconnect Error;
        }

        async Task<Connection> ConnectAsync()
        {
            var deadline = Task.Delay(opts.HandshakeTimeout);
            Socket sock = null;
            try
            {
                var addrs = await Dns.GetHostAddressesAsync(opts.Host).ConfigureAwait(false);
                if (addrs.Length == 0) return new Connection { Error = new Disconnect(Reason.IoError, null, "no address for " + opts.Host) };
                var addr = addrs[0];
                foreach (var a in addrs) if (a.AddressFamily == AddressFamily.InterNetwork) { addr = a; break; }
                sock = new Socket(addr.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                var s = sock;
                var connect = Task.Factory.FromAsync(s.BeginConnect, s.EndConnect, (EndPoint)new IPEndPoint(addr, opts.Port), null);
                if (await Task.WhenAny(connect, deadline).ConfigureAwait(false) != connect)
                {
                    sock.Close();
                    Forget(connect);
                    return new Connection { Error = new Disconnect(Reason.IoError, null, "connect timed out after " + opts.HandshakeTimeout) };
                }
                await connect.ConfigureAwait(false);
                SocketOptionsFor(0).Apply(sock);
                Stream stream = new NetworkStream(sock, false);
                if (opts.Tls != null)
                {
                    var ssl = new SslStream(stream, false, Validator(opts.Tls), null);
                    var certs = new X509CertificateCollection();
                    var cc = opts.Tls.ClientCertificate;
                    if (cc == null && opts.Tls.ClientCertificateFile != null) cc = new X509Certificate2(opts.Tls.ClientCertificateFile, opts.Tls.ClientCertificatePassword);
                    if (cc != null) certs.Add(cc);
                    var auth = ssl.AuthenticateAsClientAsync(opts.Tls.ServerName ?? opts.Host, certs, opts.Tls.Protocols, false);
                    if (await Task.WhenAny(auth, deadline).ConfigureAwait(false) != auth)
                    {
                        sock.Close();
                        Forget(auth);
                        return new Connection { Error = new Disconnect(Reason.IoError, null, "tls handshake timed out") };
                    }
                    await auth.ConfigureAwait(false);
                    stream = ssl;
                }
                return new Connection { Socket = sock, Stream = stream };
            }
            catch (Exception e)
            {
                if (sock != null) sock.Close();
                var se = Link.FindSocketError(e);
                if (se == SocketError.ConnectionRefused) return new Connection { Error = new Disconnect(Reason.ConnectRefused) };
                var inner = e is AggregateException && e.InnerException != null ? e.InnerException : e;
                var prefix = e is AuthenticationException || inner is AuthenticationException ? "tls: " : "";
                return new Connection { Error = new Disconnect(Reason.IoError, null, prefix + inner.Message) };
            }
        }

        static RemoteCertificateValidationCallback Validator(TlsOptions t)
        {
            if (t.Validate != null) return t.Validate;
            var ca = t.CaCertificate;
            if (ca == null && t.CaFile != null) ca = new X509Certificate2(t.CaFile);
            if (ca == null) return (s, cert, chain, errors) => errors == SslPolicyErrors.None;
            return (s, cert, chain, errors) =>
            {
                if ((errors & ~SslPolicyErrors.RemoteCertificateChainErrors) != SslPolicyErrors.None || cert == null) return false;
                using (var ch = new X509Chain())
                {
                    ch.ChainPolicy.RevocationMode = X509RevocationMode.NoCheck;
                    ch.ChainPolicy.VerificationFlags = X509VerificationFlags.AllowUnknownCertificateAuthority;
                    ch.ChainPolicy.ExtraStore.Add(ca);
                    if (!ch.Build(new X509Certificate2(cert))) return false;
                    var root = ch.ChainElements[ch.ChainElements.Count - 1].Certificate;
                    return root.Thumbprint == ca.Thumbprint;
                }
            };
        }
    }

    /// <summary>One connection: the Conn, the socket, a reader task, a writer task and a timer,
    /// all touching the Conn under the client's Gate.</summary>
    sealed class Link
    {
        readonly TetherClient client;
        readonly Conn conn;
        readonly Socket sock;
        readonly Stream stream;
        readonly Timer timer;
        long armed = long.MaxValue;
        bool writing, finished, readDone, up;
        long lastWrite = -1;
        Disconnect disconnect;
        readonly SemaphoreSlim writeSignal = new SemaphoreSlim(0);
        readonly TaskCompletionSource<Disconnect> ended = new TaskCompletionSource<Disconnect>(TaskCreationOptions.RunContinuationsAsynchronously);
        readonly TaskCompletionSource<bool> readEnded = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
        Task inflight = Task.FromResult(true); // the write in progress, if any

        public Link(TetherClient client, Conn conn, Socket sock, Stream stream)
        {
            this.client = client;
            this.conn = conn;
            this.sock = sock;
            this.stream = stream;
            timer = new Timer(OnTimer, null, Timeout.Infinite, Timeout.Infinite);
        }

        public Task<Disconnect> Ended { get { return ended.Task; } }
        public bool WasEstablished { get; private set; }
        public bool IsUp { get { return up; } }

        public void Start()
        {
            Pump();
            TetherClient.Forget(Task.Run(() => ReadLoop()));
            TetherClient.Forget(Task.Run(() => WriteLoop()));
        }

        internal static SocketError? FindSocketError(Exception e)
        {
            for (var x = e; x != null; x = x.InnerException)
            {
                var se = x as SocketException;
                if (se != null) return se.SocketErrorCode;
                var ae = x as AggregateException;
                if (ae != null && ae.InnerExceptions.Count > 0) return FindSocketError(ae.InnerExceptions[0]);
            }
            return null;
        }

        void TransportError(long now, Exception e, bool wrote)
        {
            var se = FindSocketError(e);
            if (se == SocketError.ConnectionReset || se == SocketError.ConnectionAborted || se == SocketError.Shutdown)
                conn.HandleTransportError(now, Reason.PeerReset);
            else if (se == SocketError.TimedOut)
                conn.HandleTransportError(now, wrote ? Reason.UserTimeout : Reason.KeepaliveTimeout);
            else
                conn.HandleTransportError(now, Reason.IoError, e.Message);
        }

        /// <summary>One step: outbox into the Conn, events out, writer signalled, timer armed,
        /// and the end handled. Safe from any thread.</summary>
        public void Pump()
        {
            bool signal = false, finishNow = false;
            lock (client.Gate)
            {
                if (finished) return;
                long now = TetherClient.Now();
                if (conn.IsEstablished) client.FeedLocked(conn, now);
                else if (client.Closing && !conn.IsClosed) conn.Close(now, CloseCode.Normal, "client closing");
                for (var ev = conn.PollEvent(); ev != null; ev = conn.PollEvent())
                {
                    if (ev is EstablishedEvent es)
                    {
                        WasEstablished = up = true;
                        if (client.SocketOptionsFromServer) client.SocketOptionsFor(es.Welcome.DeadAfterMs).Apply(sock);
                        client.RaiseConnected(es.Welcome);
                    }
                    else if (ev is MessageEvent me) client.RaiseMessage(me.Payload);
                    else if (ev is ResumedEvent re) client.RaiseResumed(re.Replayed);
                    else if (ev is SessionLostEvent sl) client.RaiseSessionLost(sl.Unacked, null);
                    else if (ev is AuthDueEvent) RefreshCredential();
                    else if (ev is ClosedEvent ce)
                    {
                        disconnect = ce.Disconnect;
                        up = false;
                        client.RaiseDisconnected(ce.Disconnect);
                    }
                }
                if (!writing && conn.PendingTransmit > 0 && !conn.IsClosed)
                {
                    writing = true;
                    signal = true;
                }
                if (conn.IsClosed)
                {
                    finished = finishNow = true;
                }
                else
                {
                    var dl = conn.PollTimeout();
                    if (dl.HasValue && dl.Value < armed)
                    {
                        armed = dl.Value;
                        timer.Change(Math.Max(0, dl.Value - now), Timeout.Infinite);
                    }
                }
            }
            client.Dispatch();
            if (signal) writeSignal.Release();
            if (finishNow) Finish();
        }

        void OnTimer(object _)
        {
            lock (client.Gate)
            {
                if (finished) return;
                long at = armed;
                armed = long.MaxValue;
                // The timer fired for `at`: time is at least that.
                conn.HandleTimeout(Math.Max(TetherClient.Now(), at));
            }
            Pump();
        }

        void RefreshCredential()
        {
            var provider = client.CredentialProvider;
            if (provider == null) return;
            TetherClient.Forget(Task.Run(async () =>
            {
                byte[] cred;
                try { cred = await provider(CancellationToken.None).ConfigureAwait(false); }
                catch (Exception) { return; } // the server closes at the ttl (credential-expired)
                lock (client.Gate)
                {
                    if (finished || !conn.IsEstablished) return;
                    try { conn.Auth(TetherClient.Now(), cred); }
                    catch (Exception) { return; }
                }
                Pump();
            }));
        }

        async Task ReadLoop()
        {
            var buf = new byte[4096];
            while (true)
            {
                int n;
                try { n = await stream.ReadAsync(buf, 0, buf.Length).ConfigureAwait(false); }
                catch (Exception e)
                {
                    lock (client.Gate)
                    {
                        readDone = true;
                        if (!conn.IsClosed) TransportError(TetherClient.Now(), e, lastWrite >= 0 && lastWrite >= conn.LastRx);
                    }
                    readEnded.TrySetResult(true);
                    Pump();
                    return;
                }
                lock (client.Gate)
                {
                    if (n == 0)
                    {
                        readDone = true;
                        conn.HandleEof(TetherClient.Now());
                    }
                    else conn.HandleInput(TetherClient.Now(), buf, 0, n);
                }
                if (n == 0)
                {
                    readEnded.TrySetResult(true);
                    Pump();
                    return;
                }
                Pump();
            }
        }

        async Task WriteLoop()
        {
            while (true)
            {
                await writeSignal.WaitAsync().ConfigureAwait(false);
                byte[] b;
                lock (client.Gate)
                {
                    if (finished) return;
                    b = conn.TakeTransmit();
                    if (b == null) { writing = false; continue; }
                    lastWrite = TetherClient.Now();
                }
                try
                {
                    Task t;
                    lock (client.Gate) inflight = t = WriteAndFlush(b);
                    await t.ConfigureAwait(false);
                }
                catch (Exception e)
                {
                    lock (client.Gate)
                    {
                        writing = false;
                        if (!conn.IsClosed) TransportError(TetherClient.Now(), e, true);
                    }
                    Pump();
                    return;
                }
                lock (client.Gate) writing = false;
                Pump();
            }
        }

        async Task WriteAndFlush(byte[] b)
        {
            await stream.WriteAsync(b, 0, b.Length).ConfigureAwait(false);
            await stream.FlushAsync().ConfigureAwait(false);
        }

        static bool IsFailure(string reason)
        {
            return reason == Reason.HeartbeatTimeout || reason == Reason.KeepaliveTimeout || reason == Reason.UserTimeout
                || reason == Reason.PeerReset || reason == Reason.IoError;
        }

        /// <summary>Closes the transport: abortively (RST) after a failure, so nothing is
        /// retransmitted into a dead path; otherwise in order (the CLOSE frame, FIN, then the
        /// peer's FIN or a 2 s linger) in the background.</summary>
        void Finish()
        {
            timer.Change(Timeout.Infinite, Timeout.Infinite);
            timer.Dispose();
            byte[] rest;
            bool busy;
            Task pending;
            lock (client.Gate)
            {
                rest = conn.TakeTransmit();
                busy = writing;
                pending = inflight;
            }
            var d = disconnect ?? new Disconnect(Reason.IoError, null, "connection ended");
            ended.TrySetResult(d);
            writeSignal.Release(); // lets an idle writer see `finished` and return
            if (IsFailure(d.Reason))
            {
                // The CLOSE frame may still reach a half-alive peer: one short, best-effort write.
                if (rest != null && !busy)
                {
                    try
                    {
                        sock.SendTimeout = 100;
                        stream.Write(rest, 0, rest.Length);
                    }
                    catch (Exception) { }
                }
                try { sock.LingerState = new LingerOption(true, 0); } catch (Exception) { }
                try { stream.Dispose(); } catch (Exception) { }
                sock.Close();
                return;
            }
            client.AddLinger(LingerAsync(rest, pending));
        }

        async Task LingerAsync(byte[] rest, Task pending)
        {
            var deadline = Task.Delay(TetherClient.CloseLingerMs);
            try
            {
                // Never two writes at once on one stream: let the one in progress end first.
                if (await Task.WhenAny(pending, deadline).ConfigureAwait(false) != pending) rest = null;
                if (rest != null)
                {
                    var w = stream.WriteAsync(rest, 0, rest.Length);
                    if (await Task.WhenAny(w, deadline).ConfigureAwait(false) == w) await stream.FlushAsync().ConfigureAwait(false);
                }
                if (!readDone)
                {
                    sock.Shutdown(SocketShutdown.Send);
                    await Task.WhenAny(readEnded.Task, deadline).ConfigureAwait(false);
                }
            }
            catch (Exception) { }
            try { stream.Dispose(); } catch (Exception) { }
            sock.Close();
        }
    }
}
