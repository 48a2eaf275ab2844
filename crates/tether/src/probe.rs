//! `tether probe`: measuring a path's idle timeout. The responder half runs inside
//! [`Server`](crate::Server) for connections whose first frame is PROBE.
//!
//! (The probe exchange is being written; until it lands the responder answers every probe
//! request with a REFUSE frame, so a probe client gets a clear answer instead of a hang.)

use bytes::{Bytes, BytesMut};
use tether_proto::codec::{self, Frame};
use tether_proto::CloseCode;
use tokio::io::AsyncWriteExt;

use crate::driver::Transport;

/// Answers one probe connection (its PROBE frame's body is `request`).
pub async fn respond<T: Transport>(mut io: T, request: Bytes) {
    let _ = request;
    let mut out = BytesMut::new();
    codec::encode_preamble(&mut out);
    codec::encode(
        &Frame::Refuse {
            code: CloseCode::REFUSED,
            text: "probe exchange not supported by this server".into(),
        },
        &mut out,
    );
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
}
