//! The Lua scripts: one round trip per operation, Redis `TIME` the only clock.
//!
//! Loaded through `redis::Script`, which sends `EVALSHA` and, on `NOSCRIPT`
//! (after a `SCRIPT FLUSH` or a failover), loads the script and retries — so
//! a flush never reaches a caller.

use redis::Script;
use std::sync::LazyLock;

/// Reserves a cost on every GCRA cell at once, or nothing.
///
/// KEYS: one cell per dimension, then this reservation's marker, then
/// (optional) the budget's or key's pause ([`PAUSE`]: no start before it).
/// ARGV[1]:
/// the longest wait accepted (µs); ARGV[2]: how long the marker outlives
/// the reservation's start (ms); then per cell: µs per unit, burst (units),
/// cost (units), the longest wait this cell accepts (µs; a budget's own
/// `max_wait`).
/// Returns `{1, wait_us}` (reserved: start after `wait_us`), `{0,
/// retry_after_us}` (refused, nothing reserved: the longest any bound is
/// passed by) or `{2, 0}` (its caller gave up before it ran: the marker says
/// `cancelled`; nothing reserved).
///
/// The marker (`reserved`, then each cell's `tat` after the reservation,
/// which [`UNDO`] needs) is written with the cells, in the same script: a
/// Redis that has it has the reservation. A call that waited checks it
/// before its start ([`MARKER`]): gone means the state the reservation was
/// made in is gone (a flush, an empty restart, a replica promoted without
/// the write), and the reservation is made again. Refunds and undos go
/// through it too ([`UNDO`]), so each applies once, and only to the state
/// it was made in.
pub(crate) static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(RESERVE_LUA));

/// The Lua source of the budget's reserve script (for audits and benchmarks).
///
/// Called with `KEYS` = the `n` cells, then the reservation's marker, then
/// optionally a pause key (its value: the instant, in µs of Redis `TIME`,
/// before which no reservation starts; see `Budget::pause`); `ARGV[1]`
/// = the call's longest wait (µs), `ARGV[2]` = how long the marker outlives
/// the wait (ms), then four per cell `i` (from `ARGV[4i − 1]`): microseconds
/// per unit, burst (units), cost (units), the cell's own longest wait (µs).
/// Answers `{1, wait}` (reserved, start in `wait` µs), `{0, late}` (refused:
/// `late` µs beyond a longest wait) or `{2, 0}` (the marker says the
/// reservation was cancelled before it ran). A reservation writes its marker
/// as `reserved` followed by each cell's `tat` (µs) right after it, space
/// separated. Every cell is charged from the reservation's start, the
/// latest of what each cell and the pause allow (GCRA's `tat ← max(tat,
/// start) + cost · per`, as the local pacer): a call held back by one cell
/// (or by a pause) is not counted by the others as if it had gone at once,
/// which let another call through them at the same start over their burst.
/// The cells are not emptied by a wait, they refill through it. Times are
/// Redis's `TIME`. A `tat` is stored in whole microseconds, rounded up (here,
/// in the give-back and refund scripts): a fractional `per` (60.4 µs) rounded to
/// the nearest let every call through 0.4 µs early — 0.7 % over the limit —
/// where rounding up keeps it under, by at most 1 µs a call.
pub const RESERVE_LUA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = (#ARGV - 2) / 4
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
local paused = 0
if KEYS[n + 2] then
  paused = tonumber(redis.call('GET', KEYS[n + 2]) or 0)
  if paused > start then start = paused end
end
local wait = start - now
if wait - max_wait > late then late = wait - max_wait end
if late > 0 then
  return {0, math.ceil(late)}
end
local m = 'reserved'
for i = 1, n do
  local per = tonumber(ARGV[i * 4 - 1])
  local cost = tonumber(ARGV[i * 4 + 1])
  local new = math.ceil(math.max(tats[i], start) + cost * per)
  local ttl = math.ceil((new - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', ttl)
  m = m .. ' ' .. string.format('%.0f', new)
end
redis.call('SET', mark, m, 'PX', math.ceil(wait / 1000) + tonumber(ARGV[2]))
return {1, math.ceil(wait)}
";

/// Pauses a budget (or one key of it): no reservation starts before `now +
/// pause` — a later pause already set stays. KEYS[1]: the pause key.
/// ARGV[1]: the pause (µs). Returns 1.
pub(crate) static PAUSE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local pause = tonumber(ARGV[1])
local til = now + pause
local cur = tonumber(redis.call('GET', KEYS[1]) or 0)
if til > cur then
  redis.call('SET', KEYS[1], string.format('%.0f', til), 'PX', math.ceil(pause / 1000) + 1000)
end
return 1
",
    )
});

/// Whether a reservation still stands: its marker says `reserved`.
/// KEYS[1]: the marker. Returns 1 or 0.
pub(crate) static MARKER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        "local v = redis.call('GET', KEYS[1]) \
         if v and string.sub(v, 1, 8) == 'reserved' then return 1 end return 0",
    )
});

/// Gives a reservation back once: if it ran and still stands, its cost goes
/// back to the cells (a dropped caller's refund, or the undo of a reserve
/// whose reply was lost); if it has not run yet, it never will (the marker
/// says `cancelled`); if it was already given back, or its state is gone,
/// nothing moves. Idempotent.
///
/// What goes back to a cell is `min(cost, after − now)`, with `after` the
/// cell's `tat` right after the reservation (recorded in the marker). A
/// reservation that found the cell full started from `now`, not from the
/// cell's `tat`; giving its whole cost back would also give back the refill
/// of the time the cell has stayed full since. GCRA (ITU-T I.371) moves a
/// cell by `tat ← max(tat, tᵢ) + cᵢ`, so after later reservations the cell
/// holds `min(cost, minᵢ max(0, tatᵢ − tᵢ))` more than it would without
/// this one; with no give-back between, every `tatᵢ ≥ after` and `tᵢ ≤ now`,
/// and `min(cost, after − now)` is owed. A reservation still waiting for its
/// start is given back whole (`after ≥ now + burst`). When a give-back of an
/// older reservation came between this reservation and its undo, the cell
/// can end up emptier (more permissive) than exact by up to that give-back
/// (telling older from newer give-backs would need a log per cell; counting
/// them all would keep back the give-backs of waiting reservations — left
/// as is). A marker without the record (made by an older version) gives the
/// whole cost back.
///
/// KEYS: the cells, then the marker. ARGV[1]: how long a `cancelled` marker
/// lives (ms); then per cell: µs per unit, units to give back.
pub(crate) static UNDO: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS - 1
local mark = KEYS[n + 1]
local state = redis.call('GET', mark)
if state and string.sub(state, 1, 8) == 'reserved' then
  local rec = {}
  for w in string.gmatch(state, '%S+') do rec[#rec + 1] = w end
  for i = 1, n do
    local per = tonumber(ARGV[i * 2])
    local units = tonumber(ARGV[i * 2 + 1])
    local cur = redis.call('GET', KEYS[i])
    if cur then
      local back = units * per
      local after = tonumber(rec[i + 1])
      if after then
        back = math.min(back, math.max(0, after - now))
      end
      if back > 0 then
        local new = math.ceil(tonumber(cur) - back)
        if new > now then
          redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
        else
          redis.call('DEL', KEYS[i])
        end
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
    local new = math.ceil(tat + units * per)
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

#[cfg(test)]
mod tests {
    //! The scripts against a throwaway `redis-server`: a give-back never
    //! leaves a cell emptier than it would be had the reservation never been
    //! made (the fault of an undo that gave the whole cost back), and gives
    //! a reservation still waiting for its start back whole.
    use super::*;
    use crate::test_redis_server as redis_server;
    use redis::aio::MultiplexedConnection;

    const CELL: &str = "t:{undo}:cell";
    /// 10 units a second (100,000 µs each), a burst of 5.
    const PER: i64 = 100_000;

    /// A throwaway server and a connection to it (`None`: skipped).
    async fn start() -> Option<(redis_server::RedisServer, MultiplexedConnection)> {
        let server = redis_server::RedisServer::start()?;
        let conn = server.connection().await;
        Some((server, conn))
    }

    async fn now_us(conn: &mut MultiplexedConnection) -> i64 {
        let (s, us): (i64, i64) = redis::cmd("TIME").query_async(conn).await.unwrap();
        s * 1_000_000 + us
    }

    async fn tat(conn: &mut MultiplexedConnection) -> i64 {
        let v: Option<String> = redis::cmd("GET").arg(CELL).query_async(conn).await.unwrap();
        v.map_or(0, |v| v.parse().unwrap())
    }

    /// One unit, at once (the burst is 5) or after `wait_us`.
    async fn reserve(conn: &mut MultiplexedConnection, marker: &str) -> i64 {
        let (ok, wait): (i64, i64) = RESERVE
            .key(CELL)
            .key(marker)
            .arg("1e18")
            .arg(10_000)
            .arg(PER)
            .arg(5)
            .arg(1)
            .arg("1e18")
            .invoke_async(conn)
            .await
            .unwrap();
        assert_eq!(ok, 1, "{marker}: reserved");
        wait
    }

    async fn undo(conn: &mut MultiplexedConnection, marker: &str) {
        let _: i64 = UNDO
            .key(CELL)
            .key(marker)
            .arg(10_000)
            .arg(PER)
            .arg(1)
            .invoke_async(conn)
            .await
            .unwrap();
    }

    /// X finds the cell full; Y comes 30 ms later; X is given back. Had X
    /// never come, the cell would hold only Y (`tat = t_Y + 100 ms`): it
    /// must not be emptier than that. Giving the whole cost back left it
    /// 30 ms emptier (the refill of the time the cell was full given twice).
    #[tokio::test]
    async fn a_give_back_never_leaves_the_cell_emptier_than_without_the_reservation() {
        let Some((_server, mut conn)) = start().await else {
            return;
        };
        reserve(&mut conn, "t:{undo}:x").await;
        let after_x = tat(&mut conn).await;
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        // Redis's clock before Y: Y came at or after it.
        let t_y = now_us(&mut conn).await;
        reserve(&mut conn, "t:{undo}:y").await;
        undo(&mut conn, "t:{undo}:x").await;
        let cell = tat(&mut conn).await;
        assert!(
            cell >= t_y + PER && cell <= now_us(&mut conn).await + PER,
            "after X's give-back: cell {cell}, Y alone at least {}",
            t_y + PER
        );
        assert!(
            cell > after_x,
            "X found the cell full: not all of it is owed back"
        );
        // Given back once: a second undo moves nothing.
        undo(&mut conn, "t:{undo}:x").await;
        assert_eq!(tat(&mut conn).await, cell);
    }

    /// One-unit calls at 60.4 µs a unit (a fractional `per`) on a cell
    /// that owes ten seconds, a burst no call reaches: each moves the cell by at least 60.4 µs — the rounding
    /// to whole microseconds never charges less (to the nearest, each call
    /// moved it by 60: 0.7 % over the limit) — and by at most 61.
    #[tokio::test]
    async fn a_fractional_per_is_never_charged_less() {
        let Some((_server, mut conn)) = start().await else {
            return;
        };
        let cell = "t:{frac}:cell";
        // Ten seconds ahead of now: every call moves the cell from its
        // `tat`, not from now.
        let ahead = now_us(&mut conn).await + 10_000_000;
        let _: () = redis::cmd("SET")
            .arg(cell)
            .arg(ahead)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut tats = vec![ahead];
        for k in 0..200 {
            let (ok, _): (i64, i64) = RESERVE
                .key(cell)
                .key(format!("t:{{frac}}:m{k}"))
                .arg("1e18")
                .arg(10_000)
                .arg("60.4")
                .arg(1_000_000_000)
                .arg(1)
                .arg("1e18")
                .invoke_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(ok, 1);
            let v: String = redis::cmd("GET")
                .arg(cell)
                .query_async(&mut conn)
                .await
                .unwrap();
            tats.push(v.parse::<i64>().unwrap());
        }
        let moved = tats[200] - tats[0];
        assert!(
            moved as f64 >= 200.0 * 60.4 && moved <= 200 * 61,
            "200 calls moved the cell by {moved} µs, 200 × 60.4 = 12,080"
        );
    }

    /// Two calls that share a token cell, each held back by a requests
    /// cell of its own (another key's) until the same instant `T`: the
    /// second must start a token's time after the first — at `T` too (the
    /// fault: the first was counted on the token cell as if it had gone at
    /// once), two tokens would go at `T` through a burst of one.
    #[tokio::test]
    async fn a_call_held_back_by_one_cell_is_counted_by_the_others_from_its_start() {
        let Some((_server, mut conn)) = start().await else {
            return;
        };
        // Tokens: 100 ms a token, a burst of one, free now.
        let tokens = "t:{held}:tokens";
        let t0 = now_us(&mut conn).await;
        let until = t0 + 1_000_000;
        for cell in ["t:{held}:a", "t:{held}:b"] {
            let _: () = redis::cmd("SET")
                .arg(cell)
                .arg(until)
                .arg("PX")
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        let mut waits = Vec::new();
        for (requests, marker) in [("t:{held}:a", "t:{held}:m1"), ("t:{held}:b", "t:{held}:m2")] {
            let (ok, wait): (i64, i64) = RESERVE
                .key(tokens)
                .key(requests)
                .key(marker)
                .arg("1e18")
                .arg(10_000)
                .arg(PER)
                .arg(1)
                .arg(1)
                .arg("1e18")
                .arg(1)
                .arg(1)
                .arg(1)
                .arg("1e18")
                .invoke_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(ok, 1, "{marker}: reserved");
            waits.push(wait);
        }
        let t1 = now_us(&mut conn).await;
        // Each start is Redis's clock at the call (between t0 and t1) plus
        // its wait. The first goes at `until`; the second a token later.
        assert!(
            t0 + waits[0] <= until && t1 + waits[0] >= until,
            "first: wait {} from [{t0}, {t1}], until {until}",
            waits[0]
        );
        assert!(
            t1 + waits[1] >= until + PER,
            "second: wait {} from at most {t1} starts before {}: two tokens at once through a burst of one",
            waits[1],
            until + PER
        );
        let cell: String = redis::cmd("GET")
            .arg(tokens)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            cell.parse::<i64>().unwrap(),
            until + 2 * PER,
            "the token cell after both"
        );
    }

    /// Reservations waiting for their start (the burst spent), given back
    /// in any order, are given back whole: the cell returns to where it was
    /// before them.
    #[tokio::test]
    async fn waiting_reservations_are_given_back_whole_in_any_order() {
        let Some((_server, mut conn)) = start().await else {
            return;
        };
        for i in 0..5 {
            reserve(&mut conn, &format!("t:{{undo}}:burst{i}")).await;
        }
        let before = tat(&mut conn).await;
        let markers: Vec<String> = (0..4).map(|i| format!("t:{{undo}}:w{i}")).collect();
        for m in &markers {
            assert!(reserve(&mut conn, m).await > 0, "{m} waits");
        }
        for m in [&markers[3], &markers[0], &markers[2], &markers[1]] {
            undo(&mut conn, m).await;
        }
        assert_eq!(tat(&mut conn).await, before, "all four back");
    }
}
