"use strict";
// The status page's script: polls /api/clients with the page's own query (state, cursor,
// limit) every 2 s and re-renders the table: a client of the server API like any backend. Formats are those of status/html.rs (integer
// arithmetic, so both agree): durations as tether's Human truncated to the millisecond,
// RTT to the microsecond, times of day HH:MM:SS UTC.

const pad = (n, w) => String(n).padStart(w || 2, "0");

// tether_proto::duration::Human of a whole number of milliseconds: "0s", "98ms", "5.143s", "4m5.2s", "1h30m".
function human(ms) {
  if (ms === null || ms === undefined) return "";
  ms = Math.floor(ms);
  if (ms === 0) return "0s";
  if (ms < 1000) return ms + "ms";
  const secs = Math.floor(ms / 1000), frac = ms % 1000;
  const h = Math.floor(secs / 3600), m = Math.floor((secs % 3600) / 60), s = secs % 60;
  let out = "";
  if (h) out += h + "h";
  if (m) out += m + "m";
  if (s || frac) out += s + (frac ? "." + pad(frac, 3).replace(/0+$/, "") : "") + "s";
  return out;
}

// A round-trip time in microseconds: "87us", "1.234ms"; a second or more as human().
function rtt(us) {
  if (us < 1000) return us + "us";
  if (us < 1000000) {
    const f = us % 1000;
    return Math.floor(us / 1000) + (f ? "." + pad(f, 3).replace(/0+$/, "") : "") + "ms";
  }
  return human(Math.floor(us / 1000));
}

function clock(ms) {
  if (ms === null || ms === undefined) return "";
  const s = Math.floor(ms / 1000) % 86400;
  return pad(Math.floor(s / 3600)) + ":" + pad(Math.floor(s / 60) % 60) + ":" + pad(s % 60);
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.textContent = text;
  tr.appendChild(td);
  return td;
}

function dash(td, title) {
  const span = document.createElement("span");
  span.className = "none";
  span.textContent = "—";
  if (title) span.title = title;
  td.replaceChildren(span);
}

function link(href, text, id) {
  const a = document.createElement("a");
  a.href = href;
  a.textContent = text;
  if (id) a.id = id;
  return a;
}

function pageHref(state, cursor, limit) {
  const p = new URLSearchParams();
  if (state) p.set("state", state);
  if (cursor) p.set("cursor", cursor);
  if (limit && limit !== 100) p.set("limit", String(limit));
  const q = p.toString();
  return q ? "/?" + q : "/";
}

function render(d, query) {
  const c = d.counts;
  const total = c.online + c.suspect + c.resuming + c.offline;
  const sum = document.getElementById("summary");
  sum.className = "";
  sum.replaceChildren();
  [["online", c.online], ["suspect", c.suspect], ["resuming", c.resuming], ["offline", c.offline]].forEach(([k, v], i) => {
    if (i) sum.append(" · ");
    const b = document.createElement("b"); b.textContent = v; sum.append(b, " " + k);
  });
  sum.append(" — " + total + (total === 1 ? " client" : " clients") + " — updated " + clock(d.now_unix_ms) + " UTC");

  const rows = [];
  for (const r of d.clients) {
    const tr = document.createElement("tr");
    tr.dataset.id = r.id;
    cell(tr, r.id, "id");
    const st = document.createElement("span");
    st.className = "st st-" + r.state; st.textContent = r.state;
    cell(tr, "").appendChild(st);
    cell(tr, r.state_since_unix_ms === null ? "" : r.state + " since " + clock(r.state_since_unix_ms));
    cell(tr, (r.remote || "") + (r.node ? " on " + r.node : ""));
    cell(tr, r.last_seen_ms_ago === null ? "" : human(r.last_seen_ms_ago) + " ago");
    const connected = r.state === "online" || r.state === "suspect";
    const rt = cell(tr, r.rtt_us === null ? "" : rtt(r.rtt_us), "num");
    if (r.rtt_us === null && connected) dash(rt, "measured after the first ping");
    cell(tr, human(r.silent_for_ms), "num");
    let reason = r.reason_text || "";
    if (r.hold_left_ms !== null) reason += " · held " + human(r.hold_left_ms) + " more";
    cell(tr, reason, "reason");
    for (const k of ["messages_in", "messages_out"]) {
      const td = cell(tr, r.counters ? String(r.counters[k]) : "", "num");
      if (!r.counters) dash(td);
    }
    rows.push(tr);
  }
  if (rows.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(tr, total === 0 ? "no clients yet" : "no clients on this page", "empty");
    td.colSpan = 10;
    rows.push(tr);
  }
  document.getElementById("rows").replaceChildren(...rows);

  const pager = document.getElementById("pager");
  pager.replaceChildren(d.matching + " matching, " + d.clients.length + " on this page");
  if (query.get("cursor")) pager.append(" · ", link(pageHref(query.get("state"), null, d.limit), "first page", "first"));
  if (d.next_cursor !== null) {
    pager.append(" · ", link(pageHref(query.get("state"), d.next_cursor, d.limit), "next " + d.limit + " →", "next"));
  }
  document.getElementById("clients").dataset.updated = d.now_unix_ms;
}

// The API token, when the server has one (--http-token-file; a browser that logged in with HTTP Basic needs none): given once as /#token=…, kept
// for this tab only, sent as a bearer token like any backend's. The fragment never leaves
// the browser and is removed from the address bar.
function apiToken() {
  const m = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem("tether-api-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("tether-api-token");
}

async function refresh() {
  const query = new URLSearchParams(location.search);
  const api = new URLSearchParams();
  for (const k of ["state", "cursor", "limit"]) if (query.get(k)) api.set(k, query.get(k));
  const token = apiToken();
  try {
    const r = await fetch("/api/clients?" + api.toString(), {
      cache: "no-store",
      headers: token ? { Authorization: "Bearer " + token } : {},
    });
    if (r.status === 401 || r.status === 403) {
      throw new Error("HTTP " + r.status + ": the API needs its token; open this page as /#token=<token>");
    }
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json(), query);
  } catch (e) {
    const sum = document.getElementById("summary");
    sum.className = "stale";
    sum.textContent = "status server unreachable (" + e.message + "); showing the last known state";
  }
}

refresh();
setInterval(refresh, 2000);
