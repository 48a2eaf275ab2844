// This client in `tether lab --client-cmd` (contract: docs/LAB.md, "Bring your own client"):
//
//   ./test.sh builds build/LabClient.exe next to build/Tether.dll
//   tether lab run blackhole --client-cmd 'mono clients/csharp/build/LabClient.exe {server}'
//
// Prints READY once the server's greeting arrived, RECEIVED for each later message,
// DETECTED <reason> when the connection is gone; sends a message for each SEND line on stdin;
// exits when stdin closes.

using System;
using System.Text;
using Tether;

static class LabClient
{
    static readonly object Out = new object();

    static void Say(string line)
    {
        lock (Out) { Console.Out.WriteLine(line); Console.Out.Flush(); }
    }

    static int Main(string[] args)
    {
        if (args.Length != 1) { Console.Error.WriteLine("usage: LabClient.exe HOST:PORT"); return 2; }
        int colon = args[0].LastIndexOf(':');
        var client = new TetherClient(new TetherClientOptions { Host = args[0].Substring(0, colon), Port = int.Parse(args[0].Substring(colon + 1)), ClientId = "lab-csharp" });
        bool greeted = false, detected = false, hello = false;
        client.Connected += (s, e) => { if (!hello) { hello = true; client.SendAsync(Encoding.ASCII.GetBytes("hello")); } };
        client.MessageReceived += (s, e) => { Say(greeted ? "RECEIVED" : "READY"); greeted = true; };
        client.Disconnected += (s, e) => { if (greeted && !detected && e.Disconnect.Reason != Reason.LocalClose) { detected = true; Say("DETECTED " + e.Disconnect.Reason); } };
        client.Start();
        string line;
        while ((line = Console.In.ReadLine()) != null)
            if (line.Trim() == "SEND") client.SendAsync(Encoding.ASCII.GetBytes("after the fault"));
        client.CloseAsync().Wait(2000);
        return 0;
    }
}
