// Per-socket second line of defence: TCP_NODELAY, SO_KEEPALIVE with idle/interval/count and
// TCP_USER_TIMEOUT, as far as the platform lets a .NET Standard 2.0 library set them:
//
//   .NET Core 3+      SocketOptionName.TcpKeepAliveTime/Interval/RetryCount
//   Mono, .NET Fx     IOControlCode.KeepAliveValues (idle and interval)
//   Linux, Android    setsockopt(TCP_KEEPCNT, TCP_USER_TIMEOUT) through libc
//
// Every step is best effort: heartbeats and dead-after do not depend on any of it.

using System;
using System.IO;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace Tether
{
    public sealed class SocketOptions
    {
        public int KeepaliveIdleSeconds, KeepaliveIntervalSeconds, KeepaliveCount;
        public long UserTimeoutMs;

        /// <summary>Keepalive and TCP_USER_TIMEOUT for a detection bound (and the path's idle
        /// timeout, 0 if unknown), as docs/PLAN.md derives them: idle + count x interval &lt;= bound.</summary>
        public static SocketOptions Derive(long detectWithinMs, long pathTimeoutMs)
        {
            double d = detectWithinMs / 1000.0;
            double p = pathTimeoutMs > 0 ? pathTimeoutMs / 1000.0 : double.PositiveInfinity;
            int idle = Clamp(Math.Min(d / 2, p / 3), 1, 32767);
            int interval = Clamp(Math.Min((d - idle) / 3, p / 3), 1, 32767);
            int count = Clamp((d - idle) / interval, 1, 127);
            return new SocketOptions { KeepaliveIdleSeconds = idle, KeepaliveIntervalSeconds = interval, KeepaliveCount = count, UserTimeoutMs = detectWithinMs };
        }

        static int Clamp(double v, int lo, int hi)
        {
            if (double.IsNaN(v) || v < lo) return lo;
            if (v > hi) return hi;
            return (int)v;
        }

        const int IPPROTO_TCP = 6, TCP_KEEPIDLE = 4, TCP_KEEPINTVL = 5, TCP_KEEPCNT = 6, TCP_USER_TIMEOUT = 18;

        [DllImport("libc", SetLastError = true)]
        static extern int setsockopt(IntPtr fd, int level, int name, ref int value, int length);

        [DllImport("libc", SetLastError = true)]
        static extern int getsockopt(IntPtr fd, int level, int name, ref int value, ref int length);

        static readonly bool IsLinux = File.Exists("/proc/sys/net/ipv4/tcp_keepalive_time");
        // Mono (and so Unity) rejects the .NET Core option names, loudly: do not try them there.
        static readonly bool IsMono = Type.GetType("Mono.Runtime") != null;

        /// <summary>Applies what this platform allows; returns what was set (best effort).</summary>
        public void Apply(Socket s)
        {
            try { s.NoDelay = true; } catch (SocketException) { }
            try { s.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.KeepAlive, true); } catch (SocketException) { }
            bool managed = false;
            if (!IsMono) try
            {
                // .NET Core 3.0+: TcpKeepAliveTime = 3, TcpKeepAliveInterval = 17, TcpKeepAliveRetryCount = 16.
                s.SetSocketOption(SocketOptionLevel.Tcp, (SocketOptionName)3, KeepaliveIdleSeconds);
                s.SetSocketOption(SocketOptionLevel.Tcp, (SocketOptionName)17, KeepaliveIntervalSeconds);
                s.SetSocketOption(SocketOptionLevel.Tcp, (SocketOptionName)16, KeepaliveCount);
                managed = true;
            }
            catch (SocketException) { }
            if (!managed)
            {
                try
                {
                    var v = new byte[12];
                    BitConverter.GetBytes(1).CopyTo(v, 0);
                    BitConverter.GetBytes(KeepaliveIdleSeconds * 1000).CopyTo(v, 4);
                    BitConverter.GetBytes(KeepaliveIntervalSeconds * 1000).CopyTo(v, 8);
                    s.IOControl(IOControlCode.KeepAliveValues, v, null);
                }
                catch (Exception e) when (e is SocketException || e is PlatformNotSupportedException || e is NotSupportedException) { }
            }
            if (!IsLinux) return;
            try
            {
                int idle = KeepaliveIdleSeconds, intvl = KeepaliveIntervalSeconds, cnt = KeepaliveCount, ut = (int)UserTimeoutMs;
                setsockopt(s.Handle, IPPROTO_TCP, TCP_KEEPIDLE, ref idle, 4);
                setsockopt(s.Handle, IPPROTO_TCP, TCP_KEEPINTVL, ref intvl, 4);
                setsockopt(s.Handle, IPPROTO_TCP, TCP_KEEPCNT, ref cnt, 4);
                setsockopt(s.Handle, IPPROTO_TCP, TCP_USER_TIMEOUT, ref ut, 4);
            }
            catch (Exception e) when (e is DllNotFoundException || e is EntryPointNotFoundException) { }
        }

        /// <summary>Reads the options back from the kernel (Linux; null elsewhere). For tests.</summary>
        public static SocketOptions ReadBack(Socket s)
        {
            if (!IsLinux) return null;
            try
            {
                Func<int, int> get = name => { int v = 0, len = 4; getsockopt(s.Handle, IPPROTO_TCP, name, ref v, ref len); return v; };
                return new SocketOptions
                {
                    KeepaliveIdleSeconds = get(TCP_KEEPIDLE), KeepaliveIntervalSeconds = get(TCP_KEEPINTVL),
                    KeepaliveCount = get(TCP_KEEPCNT), UserTimeoutMs = get(TCP_USER_TIMEOUT),
                };
            }
            catch (Exception e) when (e is DllNotFoundException || e is EntryPointNotFoundException) { return null; }
        }

        public override string ToString()
        {
            return "keepalive " + KeepaliveIdleSeconds + "s+" + KeepaliveCount + "x" + KeepaliveIntervalSeconds + "s, user timeout " + UserTimeoutMs + "ms";
        }
    }
}
