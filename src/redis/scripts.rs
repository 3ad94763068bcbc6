//! The Lua scripts: one round trip per operation, Redis `TIME` the only clock.
//!
//! Loaded through `redis::Script`, which sends `EVALSHA` and, on `NOSCRIPT`
//! (after a `SCRIPT FLUSH` or a failover), loads the script and retries — so
//! a flush never reaches a caller.

use redis::Script;
use std::sync::LazyLock;

/// Reserves a cost on every GCRA cell at once, or nothing.
///
/// KEYS: one cell per dimension, then the budget's generation, then this
/// reservation's marker. ARGV[1]: the longest wait accepted (µs); ARGV[2]:
/// the marker's life (ms); then per cell: µs per unit, burst (units), cost
/// (units), the longest wait this cell accepts (µs; a budget's own
/// `max_wait`).
/// Returns `{1, wait_us, generation}` (reserved: start after `wait_us`),
/// `{0, retry_after_us, ''}` (refused, nothing reserved: the longest any
/// bound is passed by) or `{2, 0, ''}` (its caller gave up before it ran:
/// the marker says `cancelled`; nothing reserved).
///
/// The generation names the cells' state: made when the budget has none
/// (first use, or Redis lost its data), kept as long as the longest-lived
/// cell. A reservation that waited checks it before its start
/// ([`GENERATION`]): if it changed, the state it was made against is gone
/// and it is made again against the new one.
pub(crate) static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));

/// The Lua source of the budget's reserve script (for audits and benchmarks).
pub const RESERVE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 2
local gen_key = KEYS[n + 1]
local mark = KEYS[n + 2]
if redis.call('GET', mark) == 'cancelled' then
  return {2, 0, ''}
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
  return {0, math.ceil(late), ''}
end
local longest = 1000
for i = 1, n do
  local per = tonumber(ARGV[i * 4 - 1])
  local cost = tonumber(ARGV[i * 4 + 1])
  local new = tats[i] + cost * per
  local ttl = math.ceil((new - now) / 1000) + 1000
  if ttl > longest then longest = ttl end
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
end
local gen = redis.call('GET', gen_key)
if not gen then
  gen = string.format('%.0f', now)
  redis.call('SET', gen_key, gen, 'PX', longest)
elseif redis.call('PTTL', gen_key) < longest then
  redis.call('PEXPIRE', gen_key, longest)
end
redis.call('SET', mark, 'reserved', 'PX', tonumber(ARGV[2]))
return {1, math.ceil(wait), gen}
";

/// Whether a budget's state is still the one a reservation was made
/// against. KEYS[1]: the generation. ARGV[1]: the reservation's. Returns 1
/// or 0.
pub(crate) static GENERATION: LazyLock<Script> = LazyLock::new(|| {
    Script::new("if redis.call('GET', KEYS[1]) == ARGV[1] then return 1 end return 0")
});

/// Undoes a reservation whose caller gave up without its reply (a timeout,
/// a dropped connection): if it ran, its cost goes back; if it has not run
/// yet, it never will (the marker says `cancelled`). Idempotent.
///
/// KEYS: the cells, then the marker. ARGV[1]: the marker's life (ms); then
/// per cell: µs per unit, units to give back.
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
      local tat = tonumber(cur)
      local new = tat - units * per
      if new > now then
        redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
      else
        redis.call('DEL', KEYS[i])
      end
    end
  end
  redis.call('SET', mark, 'undone', 'PX', tonumber(ARGV[1]))
elseif not state then
  redis.call('SET', mark, 'cancelled', 'PX', tonumber(ARGV[1]))
end
return 1
",
    )
});

/// Moves cells by a signed number of units: a refund (negative) or a debt.
///
/// KEYS: the cells, then the budget's generation (kept as long as the
/// longest-lived cell). ARGV[1]: the generation the move is for (`''`:
/// any; another one: nothing moves — that state is gone); then per cell:
/// µs per unit, units. A refund never takes a cell below "full now"; an
/// idle (expired) cell has nothing to refund.
pub(crate) static ADJUST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 1
local gen_key = KEYS[n + 1]
if ARGV[1] ~= '' and redis.call('GET', gen_key) ~= ARGV[1] then
  return 0
end
local longest = 0
for i = 1, n do
  local per = tonumber(ARGV[i * 2])
  local units = tonumber(ARGV[i * 2 + 1])
  local cur = redis.call('GET', KEYS[i])
  if cur or units > 0 then
    local tat = tonumber(cur or now)
    if tat < now then tat = now end
    local new = tat + units * per
    if new > now then
      local ttl = math.ceil((new - now) / 1000) + 1000
      if ttl > longest then longest = ttl end
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
if longest > 0 and redis.call('PTTL', gen_key) >= 0 and redis.call('PTTL', gen_key) < longest then
  redis.call('PEXPIRE', gen_key, longest)
end
return 1
",
    )
});

/// Takes a lease in a semaphore (a sorted set of holders scored by expiry).
///
/// KEYS[1]: the set. ARGV: limit, lease (ms), holder id.
/// Returns `{1, 0}` (held, or renewed if it already was) or `{0, ms}` until
/// the earliest lease expires.
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
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
/// holder id. Returns 1, or 0 if the lease was lost (expired and taken).
pub(crate) static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[1])
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease * 2)
return 1
",
    )
});

/// Gives a lease back. KEYS[1]: the set. ARGV[1]: holder id.
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new("return redis.call('ZREM', KEYS[1], ARGV[1])"));

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
