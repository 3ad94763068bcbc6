//! The Lua scripts: one round trip per operation, Redis `TIME` the only clock.
//!
//! Loaded through `redis::Script`, which sends `EVALSHA` and, on `NOSCRIPT`
//! (after a `SCRIPT FLUSH` or a failover), loads the script and retries — so
//! a flush never reaches a caller.

use redis::Script;
use std::sync::LazyLock;

/// Reserves a cost on every GCRA cell at once, or nothing.
///
/// KEYS: one cell per dimension, then this reservation's marker. ARGV[1]:
/// the longest wait accepted (µs); ARGV[2]: how long the marker outlives
/// the reservation's start (ms); then per cell: µs per unit, burst (units),
/// cost (units), the longest wait this cell accepts (µs; a budget's own
/// `max_wait`).
/// Returns `{1, wait_us}` (reserved: start after `wait_us`), `{0,
/// retry_after_us}` (refused, nothing reserved: the longest any bound is
/// passed by) or `{2, 0}` (its caller gave up before it ran: the marker says
/// `cancelled`; nothing reserved).
///
/// The marker (`reserved`) is written with the cells, in the same script:
/// a Redis that has it has the reservation. A call that waited checks it
/// before its start ([`MARKER`]): gone means the state the reservation was
/// made in is gone (a flush, an empty restart, a replica promoted without
/// the write), and the reservation is made again. Refunds and undos go
/// through it too ([`UNDO`]), so each applies once, and only to the state
/// it was made in.
pub(crate) static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));

/// The Lua source of the budget's reserve script (for audits and benchmarks).
///
/// Called with `KEYS` = the `n` cells, then the reservation's marker; `ARGV[1]`
/// = the call's longest wait (µs), `ARGV[2]` = how long the marker outlives
/// the wait (ms), then four per cell `i` (from `ARGV[4i − 1]`): microseconds
/// per unit, burst (units), cost (units), the cell's own longest wait (µs).
/// Answers `{1, wait}` (reserved, start in `wait` µs), `{0, late}` (refused:
/// `late` µs beyond a longest wait) or `{2, 0}` (the marker says the
/// reservation was cancelled before it ran). Times are Redis's `TIME`.
pub const RESERVE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 1
local mark = KEYS[n + 1]
if redis.call('GET', mark) == 'cancelled' then
  return {2, 0}
end
local max_wait = tonumber(ARGV[1])
local start = now
local late = 0
local tats = {}
for i = 1, n do
  local per = tonumber(ARGV[i * 4 - 1])
  local burst = tonumber(ARGV[i * 4])
  local cost = tonumber(ARGV[i * 4 + 1])
  local cell_max = tonumber(ARGV[i * 4 + 2])
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then tat = now end
  tats[i] = tat
  local s = tat + (cost - burst) * per
  if s > start then start = s end
  if s - now - cell_max > late then late = s - now - cell_max end
end
local wait = start - now
if wait - max_wait > late then late = wait - max_wait end
if late > 0 then
  return {0, math.ceil(late)}
end
for i = 1, n do
  local per = tonumber(ARGV[i * 4 - 1])
  local cost = tonumber(ARGV[i * 4 + 1])
  local new = tats[i] + cost * per
  local ttl = math.ceil((new - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
end
redis.call('SET', mark, 'reserved', 'PX', math.ceil(wait / 1000) + tonumber(ARGV[2]))
return {1, math.ceil(wait)}
";

/// Whether a reservation still stands: its marker says `reserved`.
/// KEYS[1]: the marker. Returns 1 or 0.
pub(crate) static MARKER: LazyLock<Script> = LazyLock::new(|| {
    Script::new("if redis.call('GET', KEYS[1]) == 'reserved' then return 1 end return 0")
});

/// Gives a reservation back once: if it ran and still stands, its cost goes
/// back to the cells (a dropped caller's refund, or the undo of a reserve
/// whose reply was lost); if it has not run yet, it never will (the marker
/// says `cancelled`); if it was already given back, or its state is gone,
/// nothing moves. Idempotent.
///
/// KEYS: the cells, then the marker. ARGV[1]: how long a `cancelled`
/// marker lives (ms); then per cell: µs per unit, units to give back.
pub(crate) static UNDO: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 1
local mark = KEYS[n + 1]
local state = redis.call('GET', mark)
if state == 'reserved' then
  for i = 1, n do
    local per = tonumber(ARGV[i * 2])
    local units = tonumber(ARGV[i * 2 + 1])
    local cur = redis.call('GET', KEYS[i])
    if cur then
      local new = tonumber(cur) - units * per
      if new > now then
        redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
      else
        redis.call('DEL', KEYS[i])
      end
    end
  end
  redis.call('SET', mark, 'undone', 'KEEPTTL')
elseif not state then
  redis.call('SET', mark, 'cancelled', 'PX', tonumber(ARGV[1]))
end
return 1
",
    )
});

/// Moves cells by a signed number of units: a refund (negative) or a debt.
///
/// KEYS: the cells. ARGV per cell: µs per unit, units. A refund never
/// takes a cell below "full now"; an idle (expired) cell has nothing to
/// refund.
pub(crate) static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local per = tonumber(ARGV[i * 2 - 1])
  local units = tonumber(ARGV[i * 2])
  local cur = redis.call('GET', KEYS[i])
  if cur or units > 0 then
    local tat = tonumber(cur or now)
    if tat < now then tat = now end
    local new = tat + units * per
    if new > now then
      local ttl = math.ceil((new - now) / 1000) + 1000
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 1
",
    )
});

/// Takes a lease in a semaphore (a sorted set of holders scored by expiry).
///
/// KEYS[1]: the set; KEYS[2]: the holder's tombstone (left by a release
/// that found nothing to release: this acquire's caller gave up before it
/// ran). ARGV: limit, lease (ms), holder id.
/// Returns `{1, 0}` (held, or renewed if it already was), `{0, ms}` until
/// the earliest lease expires, or `{2, 0}` (released before it ran:
/// nothing taken).
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {2, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) or redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return {1, 0}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(1, tonumber(first[2]) - now)}
",
    )
});

/// Extends a lease that is still held. KEYS[1]: the set. ARGV: lease (ms),
/// holder id, limit. Returns 1 (renewed), 2 (it was gone — run out, or
/// Redis lost its state — and there was room: taken again) or 0 (gone and
/// no room: lost).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) <= now then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
    return 0
  end
  redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  return 2
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
",
    )
});

/// Gives a lease back. KEYS[1]: the set; KEYS[2]: the holder's tombstone.
/// ARGV: holder id, lease (ms). When there is nothing to release (the
/// acquire has not run yet, or never will), a tombstone stops a late
/// acquire from taking the slot for nobody. Idempotent.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  redis.call('SET', KEYS[2], 1, 'PX', tonumber(ARGV[2]))
end
return 1
",
    )
});

/// Live leases. KEYS[1]: the set. Returns how many have not expired.
pub(crate) static COUNT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
",
    )
});
