//! One server connection's share of the budget for partially received frames.
//!
//! The rule, which keeps both the bound and progress: a frame whose length header has
//! arrived is *admitted* before more of it is read — charged its worst case, twice its length
//! (the decoder's buffer grows by doubling) plus one read for the next frame's start. An
//! admitted frame never needs more room to complete, so frames never wait on each other in a
//! cycle; a frame that cannot be admitted waits (its connection pauses reading) holding only
//! the bytes already read. Before a header is known, a read reserves what it may add
//! (the buffer may double, plus the read) and the connection is charged what its decoder
//! holds.
//!
//! 1,000 connections each sending a frame one byte short of the maximum therefore hold at
//! most the budget: as many frames as fit are admitted, the others wait.

use std::task::Context;

use tether_proto::conn::PartialFrame;

use super::budget::Budget;
use super::READ_CHUNK;

/// What one connection holds of the budget.
#[derive(Debug, Default)]
pub(super) struct FrameRoom {
    charged: usize,
}

/// What a connection must hold before it reads once more.
fn want(p: PartialFrame) -> usize {
    match p.total {
        Some(t) => 2 * t + READ_CHUNK,
        None => 2 * p.capacity + READ_CHUNK,
    }
}

impl FrameRoom {
    /// Before a read: takes what the connection lacks. `None` when the budget has no room
    /// (the task is woken when it has).
    pub(super) fn reserve(
        &mut self,
        p: PartialFrame,
        budget: &Budget,
        cx: &mut Context<'_>,
    ) -> Option<usize> {
        let extra = want(p).saturating_sub(self.charged);
        if extra == 0 || budget.try_take(extra) {
            return Some(extra);
        }
        budget.wait(cx.waker());
        // Re-check after registering: room freed in between woke nobody.
        budget.try_take(extra).then_some(extra)
    }

    /// Before a read by a connection that holds nothing of the budget (a frozen one:
    /// `Driver::freeze` gave its share back): what [`reserve`](Self::reserve) would take,
    /// taken when the budget has it, without waiting. `None`: no room; the caller goes the
    /// way that waits. Given back with `Budget::give` when the read leaves nothing held.
    pub(super) fn reserve_idle(budget: &Budget) -> Option<usize> {
        let n = want(PartialFrame::default());
        budget.try_take(n).then_some(n)
    }

    /// After the read: an admitted frame keeps its worst case while it is in progress;
    /// otherwise the connection keeps what its decoder holds.
    pub(super) fn settle(&mut self, p: PartialFrame, budget: &Budget, reserved: usize) {
        let held = self.charged + reserved;
        let keep = match p.total {
            Some(_) if want(p) <= held => want(p),
            _ => p.capacity,
        };
        budget.adjust(held, keep);
        self.charged = keep;
    }

    /// The connection ended: everything goes back.
    pub(super) fn release(&mut self, budget: &Budget) {
        budget.give(std::mem::take(&mut self.charged));
    }
}
