// Figures for BENCHMARKS.md against a `tether serve --echo`:
//
//   mono build/Bench.exe throughput 127.0.0.1:7300 100000   # 64 B messages through a session
//   mono build/Bench.exe idle 127.0.0.1:7300 1000           # RSS per idle connection
//
// (test.sh builds build/Bench.exe.) throughput keeps at most 1000 messages in flight:
// unwindowed, a fast client can deadlock the reference echo server (its echo loop waits for
// room in the client's replay buffer while it has stopped reading, and so the client's ACKs).

using System;
using System.Collections.Concurrent;
using System.Diagnostics;
using System.IO;
using System.Linq;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using Tether;

static class Bench
{
    static long RssKiB()
    {
        foreach (var line in File.ReadAllLines("/proc/self/status"))
            if (line.StartsWith("VmRSS:")) return long.Parse(line.Split(new[] { ' ', '\t' }, StringSplitOptions.RemoveEmptyEntries)[1]);
        return 0;
    }

    static int Main(string[] args)
    {
        string mode = args[0];
        int colon = args[1].LastIndexOf(':');
        string host = args[1].Substring(0, colon);
        int port = int.Parse(args[1].Substring(colon + 1));
        int n = int.Parse(args[2]);
        if (mode == "throughput")
        {
            var c = new TetherClient(new TetherClientOptions { Host = host, Port = port, ClientId = "bench-csharp" });
            var connected = new ManualResetEventSlim();
            var done = new ManualResetEventSlim();
            int got = 0;
            bool ordered = true;
            var window = new SemaphoreSlim(1000);
            c.Connected += (s, e) => connected.Set();
            c.MessageReceived += (s, e) =>
            {
                if (int.Parse(Encoding.ASCII.GetString(e.Payload, 0, 6)) != got) ordered = false;
                window.Release();
                if (++got == n) done.Set();
            };
            c.Start();
            connected.Wait();
            var sw = Stopwatch.StartNew();
            Task.Run(async () =>
            {
                var pad = new string('x', 58);
                for (int i = 0; i < n; i++)
                {
                    await window.WaitAsync().ConfigureAwait(false);
                    await c.SendAsync(Encoding.ASCII.GetBytes(i.ToString("D6") + pad)).ConfigureAwait(false);
                }
            });
            done.Wait();
            double el = sw.Elapsed.TotalSeconds;
            c.CloseAsync().Wait();
            if (!ordered) { Console.WriteLine("out of order"); return 1; }
            Console.WriteLine("csharp throughput: " + n + " messages of 64 B each way in " + el.ToString("F2") + " s = " + (n / el).ToString("F0") + " msg/s each way");
        }
        else
        {
            Thread.Sleep(500);
            GC.Collect();
            long before = RssKiB();
            var up = new CountdownEvent(n);
            var cs = Enumerable.Range(0, n).Select(i =>
            {
                var c = new TetherClient(new TetherClientOptions { Host = host, Port = port, ClientId = "idle-csharp-" + i });
                int once = 0;
                c.Connected += (s, e) => { if (Interlocked.Exchange(ref once, 1) == 0) up.Signal(); };
                c.Start();
                return c;
            }).ToList();
            up.Wait();
            Thread.Sleep(3000);
            GC.Collect();
            long after = RssKiB();
            Console.WriteLine("csharp idle: " + n + " connections, RSS " + before + " KiB -> " + after + " KiB, " + ((after - before) / (double)n).ToString("F1") + " KiB per connection");
            Task.WaitAll(cs.Select(c => c.CloseAsync()).ToArray(), 10000);
        }
        return 0;
    }
}
