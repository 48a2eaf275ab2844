//! The Lua scripts of the cluster: every write that must be fenced runs in Redis as one
//! atomic script, so a stale node can never interleave with a newer owner.
//!
//! Every script takes the key prefix (`tether:{CLUSTER}`) as `ARGV[1]` and builds its keys
//! from it: the `{CLUSTER}` hash tag keeps them in one slot, but the scripts touch keys they
//! do not declare (other nodes' sets and inboxes), so they run on a standalone Redis (or a
//! primary with replicas), not on Redis Cluster. Times are Redis's own clock (`TIME`), so the
//! nodes' clocks never have to agree.

use redis::Script;

/// The current time in milliseconds on Redis's clock.
const NOW: &str = "local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// `claim(prefix, id, node, mode, remote, session, state, maxlen)`: the newest connection of
/// `id` is on `node`. Takes a new generation from the cluster-wide counter, writes the record,
/// and tells the previous owner (if another node that still claims it) through its inbox that
/// it was replaced. `mode` `re` (a re-claim after lost writes or a partition) yields instead
/// when another node holds the client now: returns `{-1, owner}`. Returns `{gen, ""}`.
pub(crate) fn claim() -> Script {
    Script::new(&format!(
        "{NOW}
local p, id, node, mode = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local prev = redis.call('HGET', p .. ':clients', id)
local pr = nil
if prev then pr = cjson.decode(prev) end
if mode == 're' and pr and pr.node ~= node and pr.state ~= 'offline' then
  return {{-1, pr.node}}
end
local gen = redis.call('INCR', p .. ':gen')
local rec = {{id = id, node = node, gen = gen, state = ARGV[7], since = now, remote = ARGV[5], session = ARGV[6]}}
local j = cjson.encode(rec)
redis.call('HSET', p .. ':clients', id, j)
redis.call('ZREM', p .. ':offline', id)
redis.call('SADD', p .. ':node:' .. node .. ':clients', id)
-- A node that claims is alive now: a claim before its first heartbeat is reaped like any.
if not redis.call('ZSCORE', p .. ':hb', node) then redis.call('ZADD', p .. ':hb', now, node) end
if pr and pr.node ~= node then
  redis.call('SREM', p .. ':node:' .. pr.node .. ':clients', id)
  -- Sends routed to the previous owner and not handled there move with the client (a dead
  -- or cut-off owner would never deliver them): in their order, ahead of anything routed
  -- here from now on. One past its sender's deadline is dropped (see route); the moved copy
  -- carries none (it was added in time).
  local old = p .. ':node:' .. pr.node .. ':inbox'
  for _, e in ipairs(redis.call('XRANGE', old, '-', '+')) do
    local f, kind, who, dl = e[2], nil, nil, nil
    for i = 1, #f, 2 do
      if f[i] == 'k' then kind = f[i + 1] elseif f[i] == 'id' then who = f[i + 1]
      elseif f[i] == 'dl' then dl = tonumber(f[i + 1]) end
    end
    if kind == 'send' and who == id then
      redis.call('XDEL', old, e[1])
      local added = tonumber(string.match(e[1], '^(%d+)'))
      if not dl or added <= dl then
        local keep = {{}}
        for i = 1, #f, 2 do
          if f[i] ~= 'dl' then table.insert(keep, f[i]); table.insert(keep, f[i + 1]) end
        end
        redis.call('XADD', p .. ':node:' .. node .. ':inbox', 'MAXLEN', '~', ARGV[8], '*', unpack(keep))
      end
    end
  end
  if pr.state ~= 'offline' then
    redis.call('XADD', old, 'MAXLEN', '~', ARGV[8], '*',
      'k', 'replaced', 'id', id, 'gen', gen, 'by', node)
  end
end
redis.call('XADD', p .. ':presence', 'MAXLEN', '~', ARGV[8], '*', 'r', j)
return {{gen, ''}}
"
    ))
}

/// `update(prefix, id, node, gen, state, reason, maxlen)`: a transition of a client this node
/// claimed with generation `gen`. Ignored (returns 0) unless the record is still this node's
/// with that generation: a late write never overrides a newer owner. Returns 1 when applied.
pub(crate) fn update() -> Script {
    Script::new(&format!(
        "{NOW}
local p, id, node = ARGV[1], ARGV[2], ARGV[3]
local prev = redis.call('HGET', p .. ':clients', id)
if not prev then return 0 end
local r = cjson.decode(prev)
if r.node ~= node or tostring(r.gen) ~= ARGV[4] then return 0 end
if r.state == ARGV[5] and (r.reason or '') == ARGV[6] then return 1 end
r.state = ARGV[5]
r.since = now
if ARGV[6] ~= '' then r.reason = ARGV[6] else r.reason = nil end
local j = cjson.encode(r)
redis.call('HSET', p .. ':clients', id, j)
if ARGV[5] == 'offline' then
  redis.call('SREM', p .. ':node:' .. node .. ':clients', id)
  redis.call('ZADD', p .. ':offline', now, id)
end
redis.call('XADD', p .. ':presence', 'MAXLEN', '~', ARGV[7], '*', 'r', j)
return 1
"
    ))
}

/// `route(prefix, id, maxlen, deadline, record, field, value, …)`: adds the entry to the
/// inbox of the node that holds `id` **now** (the record, not the caller's mirror, which may
/// lag a claim by a moment), unless the record is offline or absent, or Redis's clock is past
/// `deadline` (ms; empty: none) — the caller gave up waiting for this answer and reported
/// a failure. `record` (a key; empty: none) keeps the node for a minute, in the same step:
/// a retry with the same `record` is answered with that node and adds nothing (a backend's
/// `Idempotency-Key`: the first one's answer may have been lost on its way back). Returns the
/// node, or `''` when nothing was added.
pub(crate) fn route() -> Script {
    Script::new(&format!(
        "{NOW}
local p, id, maxlen, dl, rec = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
if dl ~= '' and now > tonumber(dl) then return '' end
if rec ~= '' then
  local done = redis.call('GET', rec)
  if done then return done end
end
local prev = redis.call('HGET', p .. ':clients', id)
if not prev then return '' end
local r = cjson.decode(prev)
if r.state == 'offline' then return '' end
local args = {{p .. ':node:' .. r.node .. ':inbox', 'MAXLEN', '~', maxlen, '*'}}
for i = 6, #ARGV do table.insert(args, ARGV[i]) end
redis.call('XADD', unpack(args))
if rec ~= '' then redis.call('SET', rec, r.node, 'PX', 60000) end
return r.node
"
    ))
}

/// `heartbeat(prefix, node, dead_after_ms)`: this node is alive now. Returns
/// `{fresh, now}`: `fresh` is 0 when the node had no heartbeat or one older than the bound
/// (it was, or could have been, declared dead: its claims must be re-made).
pub(crate) fn heartbeat() -> Script {
    Script::new(&format!(
        "{NOW}
local p, node, dead = ARGV[1], ARGV[2], tonumber(ARGV[3])
local last = redis.call('ZSCORE', p .. ':hb', node)
redis.call('ZADD', p .. ':hb', now, node)
local fresh = 0
if last and now - tonumber(last) <= dead then fresh = 1 end
return {{fresh, now}}
"
    ))
}

/// `reap(prefix, dead_after_ms, maxlen, retention_ms, also, also_reason, also_leaves)`:
/// declares dead every node whose last heartbeat is older than the bound (and the node `also`,
/// when not empty: a node that starts clears what its previous run claimed, a node that stops
/// releases what it still claims), marks each client such a node still claims `offline` with
/// reason `node-lost` (`also_reason` for `also`), and forgets offline records older than the retention
/// (1000 a run at most). Runs on every node; the first to run it does the work (atomic).
/// Returns `{node, lost, node, lost, …}` and the live nodes' count as the last element.
pub(crate) fn reap() -> Script {
    Script::new(&format!(
        "{NOW}
local p, dead, maxlen, keep, also = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]), ARGV[5]
local also_reason, also_leaves = ARGV[6], ARGV[7] == '1'
local nodes = redis.call('ZRANGEBYSCORE', p .. ':hb', '-inf', now - dead - 1)
if also ~= '' then table.insert(nodes, also) end
local out = {{}}
for _, n in ipairs(nodes) do
  if n ~= also or also_leaves then redis.call('ZREM', p .. ':hb', n) end
  local why = 'node-lost'
  if n == also then why = also_reason end
  local set = p .. ':node:' .. n .. ':clients'
  local lost = 0
  for _, id in ipairs(redis.call('SMEMBERS', set)) do
    local prev = redis.call('HGET', p .. ':clients', id)
    if prev then
      local r = cjson.decode(prev)
      if r.node == n and r.state ~= 'offline' then
        r.state = 'offline'
        r.reason = why
        r.since = now
        local j = cjson.encode(r)
        redis.call('HSET', p .. ':clients', id, j)
        redis.call('ZADD', p .. ':offline', now, id)
        redis.call('XADD', p .. ':presence', 'MAXLEN', '~', maxlen, '*', 'r', j)
        lost = lost + 1
      end
    end
  end
  redis.call('DEL', set)
  -- Its inbox stays (for the retention): a node that was only cut off reads on where it
  -- stopped, and a claim elsewhere moves a client's sends out of it.
  if n ~= also then redis.call('PEXPIRE', p .. ':node:' .. n .. ':inbox', keep) end
  table.insert(out, n)
  table.insert(out, tostring(lost))
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', p .. ':offline', '-inf', now - keep, 'LIMIT', 0, 1000)) do
  local prev = redis.call('HGET', p .. ':clients', id)
  redis.call('ZREM', p .. ':offline', id)
  if prev and cjson.decode(prev).state == 'offline' then
    redis.call('HDEL', p .. ':clients', id)
    redis.call('XADD', p .. ':presence', 'MAXLEN', '~', maxlen, '*', 'r', cjson.encode({{id = id, state = 'gone'}}))
  end
end
table.insert(out, tostring(redis.call('ZCARD', p .. ':hb')))
return out
"
    ))
}
