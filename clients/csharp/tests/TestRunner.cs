// A minimal test runner (Mono's minimal install has no NUnit): runs each test, prints
// PASS / FAIL / SKIP lines and a summary, exits 1 if anything failed.

using System;
using System.Collections.Generic;
using System.Diagnostics;
using System.IO;

namespace Tether.Tests
{
    sealed class SkipException : Exception
    {
        public SkipException(string why) : base(why) { }
    }

    static class TestRunner
    {
        /// <summary>The repository root (clients/csharp/../..), found from the working directory.</summary>
        public static readonly string Repo = FindRepo();

        static string FindRepo()
        {
            var dir = Directory.GetCurrentDirectory();
            while (dir != null && !File.Exists(Path.Combine(Path.Combine(dir, "conformance"), "exchanges.json")))
                dir = Path.GetDirectoryName(dir);
            if (dir == null) throw new Exception("cannot find the repository root (conformance/exchanges.json)");
            return dir;
        }

        static int Main(string[] args)
        {
            var tests = new List<KeyValuePair<string, Action>>
            {
                new KeyValuePair<string, Action>("conformance frames", Conformance.Frames),
                new KeyValuePair<string, Action>("conformance exchanges", Conformance.Exchanges),
            };
            tests.AddRange(ClientTests.All());
            int passed = 0, failed = 0, skipped = 0;
            foreach (var t in tests)
            {
                if (args.Length > 0 && !t.Key.Contains(args[0])) continue;
                var sw = Stopwatch.StartNew();
                try
                {
                    t.Value();
                    Console.WriteLine("PASS " + t.Key + " (" + sw.ElapsedMilliseconds + " ms)");
                    passed++;
                }
                catch (SkipException e)
                {
                    Console.WriteLine("SKIP " + t.Key + ": " + e.Message);
                    skipped++;
                }
                catch (Exception e)
                {
                    var inner = e is AggregateException ae && ae.InnerExceptions.Count == 1 ? ae.InnerException : e;
                    Console.WriteLine("FAIL " + t.Key + " (" + sw.ElapsedMilliseconds + " ms): " + inner);
                    failed++;
                }
            }
            Console.WriteLine("csharp tests: " + passed + " passed, " + skipped + " skipped, " + failed + " failed");
            return failed > 0 ? 1 : 0;
        }
    }
}
