// Sessions that lose nothing (PROTOCOL.md §12): sequence numbers, cumulative ACKs, a bounded
// replay buffer, and resumption after a reconnect.
//
//   send(msg) -> replay buffer [acked+1 ..= lastSeq]   (bounded in bytes and messages)
//                  | SEQ_DATA(seq, msg) ----------> peer: seq == lastReceived+1 -> deliver
//                  |                                      seq <= lastReceived  -> duplicate, drop
//                  <------------------- ACK(n) <-- peer: after AckEvery messages or AckDelay
//   OnAck(n): drop entries <= n

using System;
using System.Collections.Generic;

namespace Tether
{
    /// <summary>Replay bounds and ACK timing; the defaults are the reference's.</summary>
    public sealed class SessionConfig
    {
        public int MaxReplayBytes = 4 << 20;
        public int MaxReplayMessages = 4096;
        public ulong AckEvery = 32;
        public long AckDelayMs = 20;
    }

    /// <summary>An inclusive range of sequence numbers.</summary>
    public sealed class SeqRange
    {
        public readonly ulong First, Last;
        public SeqRange(ulong first, ulong last) { First = first; Last = last; }
        public override string ToString() { return First + "..=" + Last; }
    }

    /// <summary>One side's session state, handed from one connection to the next.</summary>
    public sealed class Session
    {
        public readonly ulong Id;
        public byte[] Token;
        readonly SessionConfig cfg;
        ulong lastSeq, acked, sent, ackSent;
        public ulong LastReceived;
        // Unacknowledged messages, oldest first: seq acked+1 ..= lastSeq are replay[head ..].
        readonly List<byte[]> replay = new List<byte[]>();
        int head;
        int replayBytes;
        long ackDeadline;
        bool hasAckTimer;

        public Session(ulong id, byte[] token, SessionConfig cfg)
        {
            Id = id;
            Token = token;
            this.cfg = cfg ?? new SessionConfig();
        }

        /// <summary>Messages sent but not acknowledged (they may not have arrived), or null.</summary>
        public SeqRange Unacked { get { return lastSeq > acked ? new SeqRange(acked + 1, lastSeq) : null; } }

        /// <summary>A message of n bytes fits; an empty buffer always takes one.</summary>
        public bool HasRoom(int n)
        {
            int count = replay.Count - head;
            return count == 0 || (count < cfg.MaxReplayMessages && replayBytes + n <= cfg.MaxReplayBytes);
        }

        internal bool Push(byte[] msg)
        {
            if (!HasRoom(msg.Length)) return false;
            lastSeq++;
            replayBytes += msg.Length;
            replay.Add(msg);
            return true;
        }

        /// <summary>The next message to transmit on this connection, marked as sent.</summary>
        internal bool NextToSend(out ulong seq, out byte[] msg)
        {
            seq = 0;
            msg = null;
            if (sent >= lastSeq) return false;
            sent++;
            seq = sent;
            msg = replay[head + (int)(sent - acked - 1)];
            return true;
        }

        internal bool OnAck(ulong seq, out ulong sentSoFar)
        {
            sentSoFar = lastSeq;
            if (seq > lastSeq) return false;
            while (acked < seq)
            {
                replayBytes -= replay[head].Length;
                replay[head] = null;
                head++;
                acked++;
            }
            if (head == replay.Count) { replay.Clear(); head = 0; }
            else if (head > 1024 && head * 2 > replay.Count) { replay.RemoveRange(0, head); head = 0; }
            if (sent < acked) sent = acked;
            return true;
        }

        internal bool Resume(ulong peerLastReceived, out ulong replayed)
        {
            replayed = 0;
            ulong s;
            if (!OnAck(peerLastReceived, out s)) return false;
            sent = acked;
            hasAckTimer = false;
            ackSent = 0;
            replayed = lastSeq - acked;
            return true;
        }

        internal const int Deliver = 0, Duplicate = 1, Gap = 2;

        internal int OnData(long now, ulong seq)
        {
            if (seq <= LastReceived) return Duplicate;
            if (seq != LastReceived + 1) return Gap;
            LastReceived = seq;
            if (!hasAckTimer) { hasAckTimer = true; ackDeadline = now + cfg.AckDelayMs; }
            return Deliver;
        }

        internal bool PollAck(long now, bool force, out ulong ack)
        {
            ack = 0;
            if (LastReceived <= ackSent) return false;
            bool due = force || LastReceived - ackSent >= cfg.AckEvery || (hasAckTimer && now >= ackDeadline);
            if (!due) return false;
            ackSent = LastReceived;
            hasAckTimer = false;
            ack = LastReceived;
            return true;
        }

        internal long? PollTimeout()
        {
            if (LastReceived > ackSent && hasAckTimer) return ackDeadline;
            return null;
        }
    }
}
