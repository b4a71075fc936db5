"""The writer's Lua scripts: each applies a whole batch in one atomic EVALSHA.

Why Lua: every write is conditional (newer ``(boot, seq)``, alert not yet seen), and
the summary counters and indexes must move in the same step as the state, so a
crash or a replay can never double-count. One script call per batch carrying many
robots was measured at ~170k conditional upserts/s, twice per-command pipelining.

Layouts are fixed here and built by :mod:`state.writer`; key names all come from
:class:`state.keys.Keys` (bucket keys as prefixes in ARGV). Each script returns
``{applied, ignored}``.
"""

from __future__ import annotations

__all__ = ["ALERTS", "STATES", "STATE_FIELDS", "WINDOWS"]

# Values per robot in the STATES script's ARGV, in this order.
STATE_FIELDS = 12

# KEYS: 1 summary, 2 idx:all, 3 idx:online, 4 idx:offline, 5 idx:battery, 6 changes,
#       then per state: robot hash, history list.
# ARGV: 1 status-index prefix, 2 site-index prefix, 3 history_len, 4 changes_len, 5 n,
#       then per state: id, gen, boot, seq, t, online, status, site, battery, low, state,
#       history (12 values: STATE_FIELDS).
# A state applies iff its version (gen, boot, seq, t) is greater than the stored one:
# gen = operator order resets, (boot, seq) the report's order, t the arrival-clock ms of
# the change (offline, back online and stale counts change the state at an equal
# order, each later than the last). The dataflow computes the same versions when it
# replays, so a replayed batch changes nothing. A robot stored before versions had
# gen/t reads as gen 0, t -1.
# history: the reports applied since the last write, oldest first, one per line as
# "gen boot seq json" (JSON never holds a raw newline); those whose (gen, boot, seq) is
# newer than the stored one enter the history list, so a replayed batch adds nothing.
STATES = """
local summary, all_idx, on_idx, off_idx, bat_idx, changes =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local status_pfx, site_pfx = ARGV[1], ARGV[2]
local hist_last = tonumber(ARGV[3]) - 1
local changes_len = ARGV[4]
local n = tonumber(ARGV[5])

-- A counter that reaches 0 is deleted so sites that emptied do not linger.
local function bump(field, by)
  if redis.call('HINCRBY', summary, field, by) == 0 then
    redis.call('HDEL', summary, field)
  end
end

-- (a1, a2, a3, a4) > (b1, b2, b3, b4), compared left to right.
local function after(a1, a2, a3, a4, b1, b2, b3, b4)
  if a1 ~= b1 then return a1 > b1 end
  if a2 ~= b2 then return a2 > b2 end
  if a3 ~= b3 then return a3 > b3 end
  return a4 > b4
end

local applied = 0
for i = 0, n - 1 do
  local a = 6 + i * @FIELDS@
  local rid = ARGV[a]
  local gen, boot, seq, t =
    tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local online, status, site = ARGV[a + 5], ARGV[a + 6], ARGV[a + 7]
  local battery, low, state, history = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10], ARGV[a + 11]
  local rkey, hkey = KEYS[7 + i * 2], KEYS[8 + i * 2]
  local old = redis.call('HMGET', rkey,
    'gen', 'boot', 'seq', 't', 'online', 'status', 'site', 'low')
  local oonline, ostatus, osite, olow = old[5], old[6], old[7], old[8]
  local og, ob, os, ot = 0, -1, -1, -1
  if old[2] then
    og, ob, os = tonumber(old[1]) or 0, tonumber(old[2]), tonumber(old[3])
    ot = tonumber(old[4]) or -1
  end
  if after(gen, boot, seq, t, og, ob, os, ot) then
    applied = applied + 1
    redis.call('HSET', rkey, 'gen', ARGV[a + 1], 'boot', ARGV[a + 2], 'seq', ARGV[a + 3],
      't', ARGV[a + 4], 'online', online, 'status', status, 'site', site, 'battery', battery,
      'low', low, 'state', state)
    if not old[2] then
      redis.call('ZADD', all_idx, 0, rid)
      bump('total', 1)
    end
    if ostatus ~= status then
      if ostatus then
        redis.call('ZREM', status_pfx .. ostatus, rid)
        bump('status:' .. ostatus, -1)
      end
      redis.call('ZADD', status_pfx .. status, 0, rid)
      bump('status:' .. status, 1)
    end
    if osite ~= site then
      if osite and osite ~= '' then
        redis.call('ZREM', site_pfx .. osite, rid)
        bump('site:' .. osite, -1)
      end
      if site ~= '' then
        redis.call('ZADD', site_pfx .. site, 0, rid)
        bump('site:' .. site, 1)
      end
    end
    if (ostatus ~= status or osite ~= site) then
      if osite and osite ~= '' then bump('site_status:' .. ostatus .. ':' .. osite, -1) end
      if site ~= '' then bump('site_status:' .. status .. ':' .. site, 1) end
    end
    if oonline ~= online then
      if oonline == '1' then
        redis.call('ZREM', on_idx, rid)
        bump('online', -1)
      elseif oonline == '0' then
        redis.call('ZREM', off_idx, rid)
      end
      if online == '1' then
        redis.call('ZADD', on_idx, 0, rid)
        bump('online', 1)
      else
        redis.call('ZADD', off_idx, 0, rid)
      end
    end
    if olow ~= low then
      if olow == '1' then bump('low', -1) end
      if low == '1' then bump('low', 1) end
    end
    redis.call('ZADD', bat_idx, battery, rid)
    -- Only reports newer than the stored order enter the history; replays never do.
    local pushed = false
    for line in string.gmatch(history, '[^\\n]+') do
      local hg, hb, hs, json = string.match(line, '^(%d+) (%d+) (%d+) (.*)$')
      hg, hb, hs = tonumber(hg), tonumber(hb), tonumber(hs)
      if after(hg, hb, hs, 0, og, ob, os, 0) then
        redis.call('LPUSH', hkey, json)
        pushed = true
      end
    end
    if pushed then redis.call('LTRIM', hkey, 0, hist_last) end
    redis.call('XADD', changes, 'MAXLEN', '~', changes_len, '*',
      'data', '{"type":"state","state":' .. state .. '}')
  end
end
return {applied, n - applied}
""".replace("@FIELDS@", str(STATE_FIELDS))

# KEYS: per window: windows hash, window-index zset.
# ARGV: 1 windows kept per robot, 2 n, then per window: name, start µs, WindowStats JSON.
# The name is the start µs, or "<start µs>:<part>" for a window reopened after the
# robot's clock went back (state.keys); it is the hash field and the zset member, the
# start is the score.
WINDOWS = """
local cap, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local applied = 0
for i = 0, n - 1 do
  local wkey, zkey = KEYS[1 + i * 2], KEYS[2 + i * 2]
  local name, start, data = ARGV[3 + i * 3], ARGV[4 + i * 3], ARGV[5 + i * 3]
  if redis.call('HGET', wkey, name) ~= data then
    -- A window older than every kept one of a full set would be trimmed at once;
    -- skipping it keeps a replay after trimming a no-op.
    local keep = true
    if redis.call('ZSCORE', zkey, name) == false and redis.call('ZCARD', zkey) >= cap then
      local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
      keep = tonumber(start) > tonumber(first[2])
    end
    if keep then
      applied = applied + 1
      redis.call('HSET', wkey, name, data)
      redis.call('ZADD', zkey, start, name)
      local extra = redis.call('ZCARD', zkey) - cap
      if extra > 0 then
        local gone = redis.call('ZRANGE', zkey, 0, extra - 1)
        redis.call('ZREMRANGEBYRANK', zkey, 0, extra - 1)
        redis.call('HDEL', wkey, unpack(gone))
      end
    end
  end
end
return {applied, n - applied}
"""

# KEYS: 1 alerts stream, 2 changes stream, then per alert: robot alert hash,
#       robot alert zset, alerts-of-kind stream.
# ARGV: 1 alerts_len, 2 changes_len, 3 alerts kept per robot, 4 n,
#       then per alert: id, event time µs, Alert JSON.
ALERTS = """
local alerts, changes = KEYS[1], KEYS[2]
local alerts_len, changes_len, cap, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local added = 0
for i = 0, n - 1 do
  local hkey, zkey, kkey = KEYS[3 + i * 3], KEYS[4 + i * 3], KEYS[5 + i * 3]
  local id, at, data = ARGV[5 + i * 3], ARGV[6 + i * 3], ARGV[7 + i * 3]
  local new = redis.call('HEXISTS', hkey, id) == 0
  -- Older than every kept alert of a full set: it was seen and trimmed (or would be
  -- at once), so a replay must not raise it again.
  if new and redis.call('ZCARD', zkey) >= cap then
    local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
    new = tonumber(at) > tonumber(first[2])
  end
  if new then
    added = added + 1
    redis.call('HSET', hkey, id, data)
    redis.call('ZADD', zkey, at, id)
    local extra = redis.call('ZCARD', zkey) - cap
    if extra > 0 then
      local gone = redis.call('ZRANGE', zkey, 0, extra - 1)
      redis.call('ZREMRANGEBYRANK', zkey, 0, extra - 1)
      redis.call('HDEL', hkey, unpack(gone))
    end
    redis.call('XADD', alerts, 'MAXLEN', '~', alerts_len, '*', 'data', data)
    redis.call('XADD', kkey, 'MAXLEN', '~', alerts_len, '*', 'data', data)
    redis.call('XADD', changes, 'MAXLEN', '~', changes_len, '*',
      'data', '{"type":"alert","alert":' .. data .. '}')
  end
end
return {added, n - added}
"""
