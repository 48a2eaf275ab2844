//! The status page: rendered on the server for the first paint (and for browsers without
//! scripts), then kept fresh by `status.js`, which polls the same JSON API scripts use
//! (`/api/clients` with the page's own query: state filter, cursor, limit).
//!
//! The page, its script and its style are three separate answers so that a strict
//! Content-Security-Policy ([`CSP`]) holds: no inline script or style, nothing loaded from
//! elsewhere, no framing. Client ids are escaped everywhere they appear.
//!
//! Formats match `status.js` exactly (both integer arithmetic): durations as
//! `tether_proto::duration::Human` truncated to the millisecond (`1.25s`, `4m5s`), RTT to
//! the microsecond (`1.234ms`), times of day as `HH:MM:SS` UTC.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use tether_proto::duration::Human;
use tether_proto::presence::PresenceKind;

use super::api::unix_ms;
use super::model::{ClientQuery, ClientRow, Page, DEFAULT_LIMIT};

/// The Content-Security-Policy of the page and its assets.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The page's script (served as `/status.js`).
pub(crate) const SCRIPT: &str = include_str!("status.js");
/// The page's style (served as `/status.css`).
pub(crate) const STYLE: &str = include_str!("status.css");
const TEMPLATE: &str = include_str!("page.html");

/// The hint shown where no RTT was measured yet.
pub(crate) fn rtt_hint(rtt_every: Option<Duration>) -> String {
    match rtt_every {
        Some(p) => format!(
            "measured after the first ping, every 3 heartbeats ({}); — until then",
            Human::ms(p)
        ),
        None => "not measured by this server".to_owned(),
    }
}

/// The whole page for one [`Page`] of clients, asked for with `q`.
pub(crate) fn render(
    page: &Page,
    q: &ClientQuery,
    rtt_every: Option<Duration>,
    wall_now: SystemTime,
) -> String {
    let c = &page.counts;
    let mut summary = String::new();
    for (i, kind) in PresenceKind::ALL.into_iter().enumerate() {
        if i > 0 {
            summary.push_str(" · ");
        }
        let _ = write!(summary, "<b>{}</b> {}", c.get(kind), kind.label());
    }
    let total = c.total();
    let _ = write!(
        summary,
        " — {total} {} — updated {} UTC",
        if total == 1 { "client" } else { "clients" },
        clock(Some(wall_now))
    );

    let mut rows = String::new();
    for r in &page.rows {
        row_html(&mut rows, r);
    }
    if page.rows.is_empty() {
        let text = if total == 0 {
            "no clients yet"
        } else {
            "no clients on this page"
        };
        let _ = writeln!(
            rows,
            "<tr><td class=\"empty\" colspan=\"10\">{text}</td></tr>"
        );
    }

    TEMPLATE
        .replacen("{{SUMMARY}}", &summary, 1)
        .replacen("{{FILTERS}}", &filters(q), 1)
        .replacen("{{ROWS}}", &rows, 1)
        .replacen("{{PAGER}}", &pager(page, q), 1)
        .replacen("{{RTT_HINT}}", &escape(&rtt_hint(rtt_every)), 1)
}

fn row_html(out: &mut String, r: &ClientRow) {
    let state = r.state.label();
    let dash = "<span class=\"none\">—</span>";
    let rtt = match (r.rtt, r.state) {
        (Some(d), _) => rtt_text(d),
        (None, PresenceKind::Online | PresenceKind::Suspect) => {
            "<span class=\"none\" title=\"measured after the first ping\">—</span>".to_owned()
        }
        (None, _) => String::new(),
    };
    let (min, mout) = match r.counters {
        Some(c) => (c.messages_in.to_string(), c.messages_out.to_string()),
        None => (dash.to_owned(), dash.to_owned()),
    };
    let _ = writeln!(
        out,
        "<tr data-id=\"{id}\"><td class=\"id\">{id}</td>\
         <td><span class=\"st st-{state}\">{state}</span></td>\
         <td>{since}</td><td>{remote}</td><td>{seen}</td>\
         <td class=\"num\">{rtt}</td><td class=\"num\">{silent}</td>\
         <td class=\"reason\">{reason}</td>\
         <td class=\"num\">{min}</td><td class=\"num\">{mout}</td></tr>",
        id = escape(&r.id),
        since = match r.state_since {
            Some(_) => format!("{state} since {}", clock(r.state_since)),
            None => String::new(),
        },
        remote = match &r.node {
            Some(n) => format!(
                "{} <span class=\"node\">on {}</span>",
                r.remote.map(|a| a.to_string()).unwrap_or_default(),
                escape(n)
            ),
            None => r.remote.map(|a| a.to_string()).unwrap_or_default(),
        },
        seen = r
            .last_seen_ago
            .map(|d| format!("{} ago", Human::ms(d)))
            .unwrap_or_default(),
        silent = r
            .silent_for
            .map(|d| Human::ms(d).to_string())
            .unwrap_or_default(),
        reason = reason_text(r),
    );
}

/// Links to each state filter, the current one marked.
fn filters(q: &ClientQuery) -> String {
    let mut out = String::new();
    let current = q.state.map_or("all", PresenceKind::label);
    let all = std::iter::once("all").chain(PresenceKind::ALL.into_iter().map(PresenceKind::label));
    for (i, s) in all.enumerate() {
        if i > 0 {
            out.push_str(" · ");
        }
        let href = href(Some(s).filter(|s| *s != "all"), None, q.limit);
        if s == current {
            let _ = write!(out, "<a href=\"{href}\" class=\"current\">{s}</a>");
        } else {
            let _ = write!(out, "<a href=\"{href}\">{s}</a>");
        }
    }
    out
}

/// "first page" and "next page" links.
fn pager(page: &Page, q: &ClientQuery) -> String {
    let state = q.state.map(PresenceKind::label);
    let mut out = format!(
        "{} matching, {} on this page",
        page.matching,
        page.rows.len()
    );
    if q.cursor.is_some() {
        let _ = write!(
            out,
            " · <a href=\"{}\" id=\"first\">first page</a>",
            href(state, None, q.limit)
        );
    }
    if let Some(next) = &page.next_cursor {
        let _ = write!(
            out,
            " · <a href=\"{}\" id=\"next\">next {} →</a>",
            href(state, Some(next), q.limit),
            q.limit
        );
    }
    out
}

/// `/?state=…&cursor=…&limit=…`, escaped for an attribute.
fn href(state: Option<&str>, cursor: Option<&str>, limit: usize) -> String {
    let mut params: Vec<(&str, String)> = Vec::new();
    if let Some(s) = state {
        params.push(("state", s.to_owned()));
    }
    if let Some(c) = cursor {
        params.push(("cursor", c.to_owned()));
    }
    if limit != DEFAULT_LIMIT {
        params.push(("limit", limit.to_string()));
    }
    // Encoding a list of string pairs cannot fail.
    let query = serde_urlencoded::to_string(&params).unwrap_or_default();
    if query.is_empty() {
        "/".to_owned()
    } else {
        escape(&format!("/?{query}"))
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The reason cell: the reason, and for a held session how long it is still held.
fn reason_text(r: &ClientRow) -> String {
    let mut text = r
        .reason
        .as_ref()
        .map(|x| escape(&x.to_string()))
        .or_else(|| r.reason_label.as_deref().map(escape))
        .unwrap_or_default();
    if let Some(left) = r.hold_left {
        let _ = write!(text, " · held {} more", Human::ms(left));
    }
    text
}

/// A round-trip time: to the microsecond below a second.
pub(crate) fn rtt_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        Human::us(d).to_string()
    } else {
        Human::ms(d).to_string()
    }
}

/// `HH:MM:SS` of the UTC day, or empty.
pub(crate) fn clock(t: Option<SystemTime>) -> String {
    match unix_ms(t) {
        Some(ms) => {
            let s = (ms / 1_000) % 86_400;
            format!("{:02}:{:02}:{:02}", s / 3_600, (s / 60) % 60, s % 60)
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::model::tests::{row, wall};
    use crate::status::model::{self, Counters};
    use tether_proto::DisconnectReason;

    fn fixture() -> Vec<ClientRow> {
        let mut rows = vec![
            row("<script>alert(1)</script>", PresenceKind::Offline),
            row("phone-1", PresenceKind::Online),
            row("phone-2", PresenceKind::Suspect),
            ClientRow {
                hold_left: Some(Duration::from_millis(20_500)),
                reason: Some(DisconnectReason::PeerReset),
                ..row("tablet-3", PresenceKind::Resuming)
            },
        ];
        rows[2].rtt = None; // not measured yet
        rows
    }

    fn page_of(rows: Vec<ClientRow>, q: &ClientQuery) -> String {
        let p = model::page(rows, q);
        render(&p, q, Some(Duration::from_secs(30)), wall(86_400 + 7_384))
    }

    #[test]
    fn lists_every_row_escaped_with_summary_and_no_inline_code() {
        let html = page_of(fixture(), &ClientQuery::default());
        assert!(html.contains("<table id=\"clients\">"));
        assert!(html.contains(
            "<b>1</b> online · <b>1</b> suspect · <b>1</b> resuming · <b>1</b> offline \
             — 4 clients — updated 02:03:04 UTC"
        ));
        assert!(html.contains("<td class=\"id\">phone-1</td>"));
        assert!(html.contains("<span class=\"st st-suspect\">suspect</span>"));
        assert!(html
            .contains("<td>online since 23:15:23</td><td>10.0.0.2:40000</td><td>1.25s ago</td>"));
        assert!(html.contains("<td class=\"num\">1.234ms</td>"));
        assert!(html.contains("<td>offline since 23:16:40</td>"), "{html}");
        assert!(
            html.contains("<td class=\"num\">9.1s</td><td class=\"reason\">heartbeat-timeout</td>")
        );
        assert!(html.contains("<td class=\"num\">12</td><td class=\"num\">34</td>"));
        // The hostile id is escaped, in the cell and in the attribute.
        assert!(!html.contains("<script>alert"));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(!html.contains("{{"), "every placeholder replaced");
        // The script and style are separate answers (CSP without 'unsafe-inline').
        assert!(html.contains("<script src=\"/status.js\" defer></script>"));
        assert!(html.contains("<link rel=\"stylesheet\" href=\"/status.css\">"));
        assert!(!html.contains("<style") && !html.contains("<script>"));
        assert!(html.contains("http-equiv=\"refresh\" content=\"2\""));
    }

    #[test]
    fn unknown_counters_and_rtt_are_dashes_with_a_hint() {
        let html = page_of(fixture(), &ClientQuery::default());
        // Offline without counters from the library: dashes, not zeros.
        let off = html
            .lines()
            .find(|l| l.contains("data-id=\"&lt;script"))
            .unwrap();
        assert!(off.ends_with("<td class=\"num\"><span class=\"none\">—</span></td><td class=\"num\"><span class=\"none\">—</span></td></tr>"), "{off}");
        // Online without an RTT yet: a dash with a hint, and the note says when it comes.
        let sus = html
            .lines()
            .find(|l| l.contains("data-id=\"phone-2\""))
            .unwrap();
        assert!(
            sus.contains("title=\"measured after the first ping\">—"),
            "{sus}"
        );
        assert!(html.contains("measured after the first ping, every 3 heartbeats (30s)"));
        // Counters the library kept for an offline client are shown.
        let mut rows = fixture();
        rows[0].counters = Some(Counters {
            messages_in: 5,
            ..Counters::default()
        });
        let html = page_of(rows, &ClientQuery::default());
        let off = html
            .lines()
            .find(|l| l.contains("data-id=\"&lt;script"))
            .unwrap();
        assert!(
            off.contains("<td class=\"num\">5</td><td class=\"num\">0</td>"),
            "{off}"
        );
    }

    #[test]
    fn shows_how_long_a_session_is_held() {
        let html = page_of(fixture(), &ClientQuery::default());
        assert!(html.contains("<td class=\"reason\">peer-reset · held 20.5s more</td>"));
    }

    #[test]
    fn pager_and_filters_link_with_the_cursor() {
        let rows: Vec<ClientRow> = (0..5)
            .map(|i| row(&format!("a b&{i}"), PresenceKind::Online))
            .collect();
        let q = ClientQuery {
            limit: 2,
            ..ClientQuery::default()
        };
        let html = page_of(rows.clone(), &q);
        assert!(html.contains("5 matching, 2 on this page"), "{html}");
        assert!(
            html.contains("<a href=\"/?cursor=a+b%261&amp;limit=2\" id=\"next\">next 2 →</a>"),
            "{html}"
        );
        assert!(!html.contains("id=\"first\""));
        let q = ClientQuery {
            limit: 2,
            cursor: Some("a b&3".into()),
            state: Some(PresenceKind::Online),
        };
        let html = page_of(rows, &q);
        assert!(html.contains("id=\"first\""), "{html}");
        assert!(!html.contains("id=\"next\""), "{html}");
        assert!(
            html.contains("<a href=\"/?state=online&amp;limit=2\" class=\"current\">online</a>"),
            "{html}"
        );
    }

    #[test]
    fn without_clients_says_so() {
        let html = page_of(Vec::new(), &ClientQuery::default());
        assert!(html.contains("no clients yet"));
        assert!(html.contains("— 0 clients —"));
    }

    #[test]
    fn formats() {
        assert_eq!(rtt_text(Duration::from_micros(1_234)), "1.234ms");
        assert_eq!(rtt_text(Duration::from_micros(80)), "80us");
        assert_eq!(rtt_text(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(clock(Some(wall(86_400 * 3 + 3_723))), "01:02:03");
        assert_eq!(clock(None), "");
    }
}
