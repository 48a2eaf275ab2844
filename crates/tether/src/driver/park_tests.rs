//! Parked connections (`park.rs`): the lot changes where an idle connection waits, never
//! what it does or when. Paused time over in-memory transports, like the driver's other
//! rules; the far end is the hand-driven `Peer`.

use std::cell::Cell;

use super::*;

thread_local! {
    /// Tasks the lot spawned on this thread (a `#[tokio::test]` runtime runs its tasks on
    /// the test's thread).
    static UNPARKED: Cell<usize> = const { Cell::new(0) };
}

fn unparked() -> usize {
    UNPARKED.with(Cell::get)
}

/// The test lot's way back: counts, then spawns the task as the server does.
fn unpark(r: Resume<DuplexStream, TestSink>) {
    UNPARKED.with(|u| u.set(u.get() + 1));
    tokio::spawn(resume(r));
}

type TestLot = Arc<Lot<DuplexStream, TestSink>>;

/// What [`server`] gives: the server's shared state, the lot (when parking), the client, the
/// sink's log and the instant of the WELCOME.
type Parked = (
    Arc<Shared>,
    Option<TestLot>,
    Peer,
    Log,
    tokio::time::Instant,
);

/// A server connection accepting as `tether::Server` does (answering heartbeats), parked in
/// a lot of its own when `park`, and a hand-driven client established with it. Returns the
/// server's shared state, the lot, the client, the sink's log and the instant of the
/// WELCOME.
async fn server(park: bool) -> Parked {
    server_with(park, None).await
}

/// [`server`], drawing on `budgets` when given (as a `tether::Server` connection does).
async fn server_with(park: bool, budgets: Option<&Arc<Budgets>>) -> Parked {
    UNPARKED.with(|u| u.set(0));
    let (io, far) = tokio::io::duplex(64 * 1024);
    let shared = match budgets {
        Some(b) => Shared::server(Limits::default(), b.clone()),
        None => Shared::new(Limits::default()),
    };
    let sink = TestSink {
        answer: true,
        ..Default::default()
    };
    let log = sink.log.clone();
    let lot = park.then(|| Lot::new(unpark).expect("a lot id"));
    let conn = Conn::server(now(), ConnConfig::default());
    tokio::spawn(resume(start(io, conn, shared.clone(), sink, lot.clone())));
    let mut peer = Peer::client(far).await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    let welcomed = tnow();
    // Let the server's task see the connection idle.
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    if let Some(lot) = &lot {
        assert_eq!(lot.parked(), 1, "idle after the handshake: parked");
    }
    (shared, lot, peer, log, welcomed)
}

/// The connection left the lot and its end was reported once: by one task, with one
/// `Closed` event in the sink's log.
async fn ended_once(lot: &TestLot, log: &Log) {
    tokio::task::yield_now().await;
    assert_eq!(
        (lot.parked(), unparked()),
        (0, 1),
        "the end reported by one task"
    );
    let closed = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, e)| matches!(e, ConnEvent::Closed(_)))
        .count();
    assert_eq!(closed, 1, "one Closed event");
}

fn data_bytes(payload: &[u8]) -> BytesMut {
    let mut b = BytesMut::new();
    codec::encode(&Frame::Data(Bytes::copy_from_slice(payload)), &mut b);
    b
}

/// The client's heartbeats are read and answered in the lot, in the instant they arrive,
/// and the server's own heartbeat timer (the fallback) never fires: 24 intervals, no task.
#[tokio::test(start_paused = true)]
async fn a_parked_connection_answers_heartbeats_without_a_task() {
    let (server, lot, mut peer, _log, welcomed) = server(true).await;
    let lot = lot.unwrap();
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let out0 = server.stats.snapshot().heartbeats_out;
    let intervals = 24u32;
    for k in 1..=intervals {
        tokio::time::sleep_until(welcomed + H * k).await;
        heartbeat_answered_at_once(&mut peer, &mut dec, &hb, k).await;
        assert_eq!(lot.parked(), 1, "interval {k}: still parked");
    }
    assert!(server.done().is_none());
    assert_eq!(
        server.stats.snapshot().heartbeats_out - out0,
        u64::from(intervals)
    );
    assert_eq!(unparked(), 0, "no task was spawned for the connection");
}

/// What the application queues for a parked connection goes out in the instant it is
/// queued: written by the lot when it fits the socket; a message too big to write at once
/// gets the connection its task back, arrives whole, and the connection parks again.
#[tokio::test(start_paused = true)]
async fn a_send_to_a_parked_connection_goes_out_in_the_same_instant() {
    let (server, lot, mut peer, _log, _) = server(true).await;
    let lot = lot.unwrap();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    tokio::time::sleep(H / 2).await;
    let queued = tnow();
    assert!(server.try_send(Bytes::from_static(b"hello")));
    let mut got = Vec::new();
    while got.is_empty() {
        tokio::task::yield_now().await;
        got = frames_now(&mut peer.io, &mut dec).await;
    }
    assert_eq!(got, vec![Frame::Data(Bytes::from_static(b"hello"))]);
    assert_eq!(tnow(), queued, "delivered in the instant it was queued");
    assert_eq!((lot.parked(), unparked()), (1, 0), "written from the lot");

    // Four times the duplex's capacity: the lot cannot write it at once.
    let big = Bytes::from(vec![7u8; 256 * 1024]);
    let queued = tnow();
    assert!(server.try_send(big.clone()));
    let mut got = Vec::new();
    while got.is_empty() {
        tokio::task::yield_now().await;
        got = frames_now(&mut peer.io, &mut dec).await;
    }
    assert_eq!(got, vec![Frame::Data(big)]);
    assert_eq!(tnow(), queued, "delivered in the instant it was queued");
    assert_eq!(
        unparked(),
        1,
        "the connection got its task back to write it"
    );
    tokio::task::yield_now().await;
    assert_eq!(lot.parked(), 1, "and parked again once it was written");
}

/// A parked connection whose client goes silent keeps both detection bounds exactly: the
/// fallback heartbeats at h + h/8 and 2(h + h/8), CLOSE(heartbeat-timeout) at d after the
/// last byte, `silent_for == d`; the end is reported once, by a task.
#[tokio::test(start_paused = true)]
async fn a_parked_silent_peer_is_declared_dead_at_d() {
    let (server, lot, mut peer, log, welcomed) = server(true).await;
    let lot = lot.unwrap();
    heartbeat_thrice_then_fall_silent(&mut peer, welcomed).await;
    let d = server.closed().await;
    assert_eq!(d.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(d.silent_for, D);
    ended_once(&lot, &log).await;
}

/// A handle's close reaches a parked connection at once (CLOSE in the same instant, as a
/// server's shutdown sends it), and the connection ends when the client answers with FIN.
#[tokio::test(start_paused = true)]
async fn a_close_asked_of_a_parked_connection_goes_out_at_once() {
    let (server, lot, mut peer, _log, _) = server(true).await;
    let lot = lot.unwrap();
    tokio::time::sleep(H / 3).await;
    let asked = tnow();
    server.close(CloseCode::GOING_AWAY, "server shutting down");
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let mut got = Vec::new();
    for _ in 0..1000 {
        tokio::task::yield_now().await;
        got = frames_now(&mut peer.io, &mut dec).await;
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(
        got,
        vec![Frame::Close {
            code: CloseCode::GOING_AWAY,
            text: "server shutting down".into()
        }]
    );
    assert_eq!(tnow(), asked);
    peer.io.shutdown().await.unwrap();
    let d = server.closed().await;
    assert_eq!(d.reason, DisconnectReason::LocalClose);
    tokio::task::yield_now().await;
    assert_eq!(lot.parked(), 0);
}

/// One run of a scenario against the server connection: heartbeats, a message each way,
/// then silence until the server gives up. Everything either end saw, as offsets from the
/// WELCOME.
async fn scenario(park: bool) -> (Vec<(Duration, String)>, Vec<(Duration, String)>, Disconnect) {
    let (server, _lot, mut peer, log, welcomed) = server(park).await;
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let mut frames = Vec::new();
    let seen = |frames: &mut Vec<(Duration, String)>, got: Vec<Frame>| {
        for f in got {
            frames.push((tnow() - welcomed, format!("{f:?}")));
        }
    };
    for k in 1..=4u32 {
        tokio::time::sleep_until(welcomed + H * k - H / 4).await;
        match k {
            2 => peer.io.write_all(&data_bytes(b"up")).await.unwrap(),
            3 => assert!(server.try_send(Bytes::from_static(b"down"))),
            _ => {}
        }
        tokio::task::yield_now().await;
        let got = frames_now(&mut peer.io, &mut dec).await;
        seen(&mut frames, got);
        tokio::time::sleep_until(welcomed + H * k).await;
        peer.io.write_all(&hb).await.unwrap();
        tokio::task::yield_now().await;
        let got = frames_now(&mut peer.io, &mut dec).await;
        seen(&mut frames, got);
    }
    for (t, f) in frames_until_eof(&mut peer.io, &mut dec).await {
        frames.push((t - welcomed, format!("{f:?}")));
    }
    let d = server.closed().await;
    let events = log
        .lock()
        .unwrap()
        .iter()
        .map(|(t, e)| (t.saturating_duration_since(welcomed), format!("{e:?}")))
        .collect();
    (frames, events, d)
}

/// Parking changes no event and no instant: the same scenario with and without a lot gives
/// the same frames to the client, the same events to the application, at the same offsets,
/// and the same end.
#[tokio::test(start_paused = true)]
async fn parking_changes_no_event_and_no_instant() {
    let (frames_task, events_task, end_task) = scenario(false).await;
    let (frames_lot, events_lot, end_lot) = scenario(true).await;
    assert_eq!(frames_lot, frames_task);
    assert_eq!(events_lot, events_task);
    assert_eq!(end_lot, end_task);
    assert_eq!(end_lot.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(end_lot.silent_for, D);
    assert!(
        events_lot.iter().any(|(_, e)| e.contains("Message")),
        "the client's message reached the application: {events_lot:?}"
    );
    assert!(
        frames_lot.iter().any(|(_, f)| f.contains("Data")),
        "the application's message reached the client: {frames_lot:?}"
    );
}

/// A full server backlog does not take an idle connection out of the lot: it still reads and
/// answers heartbeats there (no task spawned per heartbeat while the application catches
/// up). A message read during the pause is held and gets the connection its task back; the
/// task takes the connection's place in the backlog's queue (not the lot's stale waker), so
/// the message goes out as soon as the application makes room, and the connection parks
/// again.
#[tokio::test(start_paused = true)]
async fn a_full_backlog_keeps_an_idle_connection_parked_and_a_held_message_goes_out_on_room() {
    let budgets = Arc::new(Budgets::new(150, 1 << 20, 1 << 20));
    let (shared, lot, mut peer, log, _) = server_with(true, Some(&budgets)).await;
    let lot = lot.unwrap();
    for _ in 0..2 {
        peer.conn.send(now(), &[9; 100]).unwrap();
    }
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2));
    assert_eq!(lot.parked(), 1, "paused, holding nothing: parked");
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let start = tnow();
    for k in 1..=6u32 {
        tokio::time::sleep_until(start + H * k).await;
        peer.io.write_all(&hb).await.unwrap();
        tokio::task::yield_now().await;
        assert_eq!(
            frames_now(&mut peer.io, &mut dec).await,
            vec![Frame::Heartbeat],
            "heartbeat {k} answered at once"
        );
        assert_eq!(lot.parked(), 1, "heartbeat {k}: still parked");
    }
    let spawned = unparked();
    // A message during the pause: held, in a task again.
    peer.conn.send(now(), &[7; 100]).unwrap();
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (200, 2), "held");
    assert_eq!((lot.parked(), unparked()), (0, spawned + 1));
    // The application takes everything: the held message goes out at once.
    budgets.backlog.give(200);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((budgets.backlog.used(), messages(&log)), (100, 3));
    assert!(shared.done().is_none());
    // Its next wake-up that moves no message (the client's heartbeat) parks it again.
    tokio::time::sleep_until(start + H * 7).await;
    peer.io.write_all(&hb).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(
        frames_now(&mut peer.io, &mut dec).await,
        vec![Frame::Heartbeat]
    );
    assert_eq!(lot.parked(), 1, "idle again: parked");
}

/// A parked connection holds none of the server's partial-frame budget (`Driver::freeze`
/// gives back what it held: the frozen decoder keeps no buffer): a frame received in two
/// parts is charged while in part, and nothing is held once the connection is parked again.
#[tokio::test(start_paused = true)]
async fn a_parked_connection_holds_none_of_the_partial_frame_budget() {
    let budgets = Arc::new(Budgets::new(1 << 20, 1 << 20, 1 << 20));
    let (_shared, lot, mut peer, log, _) = server_with(true, Some(&budgets)).await;
    let lot = lot.unwrap();
    assert_eq!(budgets.frames.used(), 0);
    let frame = data_bytes(&[5; 3000]);
    peer.io.write_all(&frame[..1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert!(budgets.frames.used() > 0, "a frame in part is charged");
    assert_eq!(lot.parked(), 0, "a frame in part: in a task");
    peer.io.write_all(&frame[1000..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(messages(&log), 1);
    // Its next wake-up that moves no message (the client's heartbeat) parks it again.
    peer.io.write_all(&heartbeat_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(lot.parked(), 1, "idle again: parked");
    assert_eq!(budgets.frames.used(), 0, "parked: none of the budget held");
    // A wake-up in the lot (the next heartbeat) keeps it so.
    peer.io.write_all(&heartbeat_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((lot.parked(), budgets.frames.used()), (1, 0));
}

/// The lot reads a parked connection 512 B at a time and at most four reads a wake-up: a
/// heartbeat or an ACK is handled there, a stream of messages gets the connection its task
/// back (the lot is not where 64 KiB reads are decoded: every idle connection's heartbeats
/// and deadlines would wait behind them). Every message arrives, in order, and the
/// connection parks again once the stream has stopped.
#[tokio::test(start_paused = true)]
async fn a_stream_of_messages_gets_a_parked_connection_its_task_back() {
    let (shared, lot, mut peer, log, _) = server(true).await;
    let lot = lot.unwrap();
    // One small message: handled in the lot.
    peer.conn.send(now(), b"one").unwrap();
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((messages(&log), lot.parked(), unparked()), (1, 1, 0));
    // 8 KiB at once: more than the lot reads in a wake-up.
    for i in 0..80u8 {
        peer.conn.send(now(), &[i; 100]).unwrap();
    }
    peer.flush().await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(messages(&log), 81);
    assert_eq!(unparked(), 1, "the stream went to a task");
    let inbox: Vec<u8> = shared.lock().inbox.iter().skip(1).map(|m| m[0]).collect();
    assert_eq!(inbox, (0..80u8).collect::<Vec<_>>(), "in order");
    // A task that moved messages stays a task until a wake-up moves none (no churn between
    // bursts): the client's next heartbeat parks it.
    tokio::time::sleep(H / 2).await;
    assert_eq!(lot.parked(), 0, "still in its task");
    peer.io.write_all(&heartbeat_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(lot.parked(), 1, "idle again: parked");
}

/// The client's heartbeats and the server's fallback heartbeat are answered by the quick
/// wake-up (the core's `parked_input` / `parked_timeout`): no full wake-up of the driver
/// (`Driver::poll`), no task, each in the instant it is due.
#[tokio::test(start_paused = true)]
async fn parked_heartbeats_take_the_quick_path() {
    let (server, lot, mut peer, _log, welcomed) = server(true).await;
    let lot = lot.unwrap();
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let (polls, quick) = (server.stats.polls(), lot.quick_wakes());
    let out0 = server.stats.snapshot().heartbeats_out;
    for k in 1..=8u32 {
        tokio::time::sleep_until(welcomed + H * k).await;
        heartbeat_answered_at_once(&mut peer, &mut dec, &hb, k).await;
    }
    assert_eq!(server.stats.polls(), polls, "no full wake-up");
    assert!(
        lot.quick_wakes() >= quick + 8,
        "each heartbeat answered quickly"
    );
    // Silent for h + h/8 after the last heartbeat: the fallback heartbeat, quickly too.
    let last = welcomed + H * 8;
    let fallback = last + H + H / 8;
    let mut got = Vec::new();
    while got.is_empty() {
        tokio::time::sleep(Duration::from_millis(1)).await;
        got = frames_now(&mut peer.io, &mut dec).await;
    }
    assert_eq!(got, vec![Frame::Heartbeat]);
    assert_eq!(tnow(), fallback, "the fallback heartbeat at h + h/8");
    assert_eq!(server.stats.polls(), polls, "no full wake-up");
    let s = server.stats.snapshot();
    assert_eq!(
        (s.heartbeats_in, s.heartbeats_out - out0),
        (8, 9),
        "counted"
    );
    assert_eq!((lot.parked(), unparked()), (1, 0));
}

/// Bytes that are more than heartbeats (a message, a frame cut in two) reach a parked
/// connection's full wake-up with what the quick one read already: every message arrives,
/// whole and in order, and the heartbeats among them are counted.
#[tokio::test(start_paused = true)]
async fn data_after_quick_heartbeats_loses_nothing() {
    let (server, lot, mut peer, log, welcomed) = server(true).await;
    let lot = lot.unwrap();
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    for k in 1..=2u32 {
        tokio::time::sleep_until(welcomed + H * k).await;
        heartbeat_answered_at_once(&mut peer, &mut dec, &hb, k).await;
    }
    let polls = server.stats.polls();
    // A heartbeat, a message, a heartbeat and the first 3 bytes of a second message.
    let second = data_bytes(b"bc");
    let mut burst = hb.to_vec();
    burst.extend_from_slice(&data_bytes(b"a"));
    burst.extend_from_slice(&hb);
    burst.extend_from_slice(&second[..3]);
    peer.io.write_all(&burst).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(messages(&log), 1, "the whole message, not the partial one");
    assert!(
        server.stats.polls() > polls,
        "the full wake-up took the bytes"
    );
    peer.io.write_all(&second[3..]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(messages(&log), 2);
    let inbox: Vec<Bytes> = server.lock().inbox.iter().cloned().collect();
    assert_eq!(
        inbox,
        vec![Bytes::from_static(b"a"), Bytes::from_static(b"bc")]
    );
    let s = server.stats.snapshot();
    assert_eq!((s.heartbeats_in, s.messages_in), (4, 2));
    // A frame cut in two is not quiescent: it got its task back (as without the quick
    // path). The task's next wake-up that moves no message (a heartbeat) parks it again, and
    // the heartbeat after that is quick.
    assert_eq!(unparked(), 1);
    tokio::time::sleep_until(welcomed + H * 3).await;
    peer.io.write_all(&hb).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let _ = frames_now(&mut peer.io, &mut dec).await;
    assert_eq!(lot.parked(), 1, "idle again: parked");
    let polls = server.stats.polls();
    tokio::time::sleep_until(welcomed + H * 4).await;
    heartbeat_answered_at_once(&mut peer, &mut dec, &hb, 4).await;
    assert_eq!(server.stats.polls(), polls, "quick again");
    assert_eq!(server.stats.snapshot().heartbeats_in, 6);
}

/// Dead-after of a connection whose heartbeats took the quick path: the quick wake-up
/// hands the end to the full one, so CLOSE(heartbeat-timeout) goes out at d after the last
/// byte with `silent_for == d`, and the end is reported once, by one task.
#[tokio::test(start_paused = true)]
async fn dead_after_from_the_quick_path_ends_once_at_d() {
    let (server, lot, mut peer, log, welcomed) = server(true).await;
    let lot = lot.unwrap();
    let hb = heartbeat_bytes();
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let polls = server.stats.polls();
    for k in 1..=3u32 {
        tokio::time::sleep_until(welcomed + H * k).await;
        heartbeat_answered_at_once(&mut peer, &mut dec, &hb, k).await;
    }
    let last = tnow();
    assert_eq!(server.stats.polls(), polls, "heartbeats answered quickly");
    let d = server.closed().await;
    assert_eq!(tnow(), last + D, "declared dead at d after the last byte");
    assert_eq!(d.reason, DisconnectReason::HeartbeatTimeout);
    assert_eq!(d.silent_for, D);
    let got = frames_until_eof(&mut peer.io, &mut dec).await;
    assert_eq!(
        got.last().map(|(_, f)| f),
        Some(&Frame::Close {
            code: CloseCode::HEARTBEAT_TIMEOUT,
            text: "nothing received within dead_after".into()
        })
    );
    ended_once(&lot, &log).await;
}

/// A second connection parked in `lot` (a [`server_with`] whose lot is given), established
/// and idle: its shared state and its client.
async fn another_in(lot: &TestLot) -> (Arc<Shared>, Peer) {
    let (io, far) = tokio::io::duplex(64 * 1024);
    let shared = Shared::new(Limits::default());
    let sink = TestSink {
        answer: true,
        ..Default::default()
    };
    let conn = Conn::server(now(), ConnConfig::default());
    let parked = lot.parked();
    tokio::spawn(resume(start(
        io,
        conn,
        shared.clone(),
        sink,
        Some(lot.clone()),
    )));
    let mut peer = Peer::client(far).await;
    assert!(matches!(
        peer.next_event(false).await,
        ConnEvent::Established(_)
    ));
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    assert_eq!(lot.parked(), parked + 1, "idle after the handshake: parked");
    (shared, peer)
}

/// A message queued for a parked connection goes out in the instant it was queued.
async fn sent_at_once(server: &Shared, peer: &mut Peer, msg: &'static [u8]) {
    let mut dec = Decoder::new(codec::DEFAULT_MAX_FRAME_LEN);
    let queued = tnow();
    assert!(server.try_send(Bytes::from_static(msg)));
    let mut got = Vec::new();
    for _ in 0..100 {
        tokio::task::yield_now().await;
        got = frames_now(&mut peer.io, &mut dec).await;
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got, vec![Frame::Data(Bytes::from_static(msg))]);
    assert_eq!(tnow(), queued, "delivered in the instant it was queued");
}

/// An entry's waker is a number (lot, slot, generation), not an allocation: one kept after
/// its connection ended wakes nothing, not the connection parked in its slot since (whose
/// own wakes still work), nor anything once the lot is gone.
#[tokio::test(start_paused = true)]
async fn a_stale_entry_waker_is_harmless() {
    let (first, lot, peer, log, _) = server(true).await;
    let lot = lot.unwrap();
    let stale = first.lock().driver.clone().expect("the entry's waker");
    drop(peer);
    first.closed().await;
    ended_once(&lot, &log).await;
    stale.wake_by_ref();

    // The next connection takes the freed slot, a generation later.
    let (second, mut peer) = another_in(&lot).await;
    let waker = second.lock().driver.clone().expect("the entry's waker");
    assert!(!waker.will_wake(&stale), "a generation later");
    for _ in 0..3 {
        stale.wake_by_ref();
        assert_eq!(lot.ready_len(), 0, "the stale waker queues nothing");
        sent_at_once(&second, &mut peer, b"still woken").await;
    }
    assert_eq!((lot.parked(), unparked()), (1, 1), "written from the lot");

    // The lot goes (its last connection ended, its task with it): a waker of it wakes
    // nothing, and a new lot (perhaps with the old one's id and state) works.
    peer.io.shutdown().await.unwrap();
    second.closed().await;
    let gone = Arc::downgrade(&lot);
    drop(lot);
    while gone.strong_count() > 0 {
        tokio::task::yield_now().await;
    }
    stale.wake_by_ref();
    waker.wake_by_ref();
    let lot = Lot::new(unpark).expect("a lot id");
    let (third, mut peer) = another_in(&lot).await;
    stale.wake_by_ref();
    waker.wake();
    assert_eq!(lot.ready_len(), 0, "the dropped lot's wakers queue nothing");
    sent_at_once(&third, &mut peer, b"a new lot").await;
    assert_eq!(lot.parked(), 1);
}
