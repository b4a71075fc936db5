"""The writer's Lua scripts: each applies a whole batch in one atomic EVALSHA.

Why Lua for windows and alerts: every write is conditional (a window not stored with
the same data, an alert not yet seen, trimming of the per-robot sets), decided and
applied in one step. Live states are decided in Python instead (``state.writer``:
one read, then MULTI/EXEC), which costs Redis far less per state.

Layouts are fixed here and built by :mod:`state.writer`; key names all come from
:class:`state.keys.Keys` (bucket keys as prefixes in ARGV). Each script returns
``{applied, ignored}``.
"""

from __future__ import annotations

__all__ = ["ALERTS", "BUMP", "INCIDENTS", "WINDOWS"]

# KEYS: 1 summary. ARGV: field, delta, field, delta, ... (a chunk of state writes'
# counter changes, summed). A counter that reaches 0 is deleted so sites that emptied
# do not linger. Sent as source (EVAL), inside the chunk's MULTI: no NOSCRIPT there.
BUMP = """
for i = 1, #ARGV, 2 do
  if redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) == 0 then
    redis.call('HDEL', KEYS[1], ARGV[i])
  end
end
"""

# KEYS: per window: windows hash, window-index zset, robot hash (a retired robot's
# tombstone there, field `gone`, drops the window: it is from before the retirement).
# ARGV: 1 windows kept per robot, 2 n, then per window: name, start µs, WindowStats JSON.
# The name is the start µs, or "<start µs>:<part>" for a window reopened after the
# robot's clock went back (state.keys); it is the hash field and the zset member, the
# start is the score.
WINDOWS = """
local cap, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local applied = 0
for i = 0, n - 1 do
  local wkey, zkey, rkey = KEYS[1 + i * 3], KEYS[2 + i * 3], KEYS[3 + i * 3]
  local name, start, data = ARGV[3 + i * 3], ARGV[4 + i * 3], ARGV[5 + i * 3]
  if redis.call('HEXISTS', rkey, 'gone') == 0 and redis.call('HGET', wkey, name) ~= data then
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
#       robot alert zset, alerts-of-kind stream, robot hash (tombstone: see WINDOWS).
# ARGV: 1 alerts_len, 2 changes_len, 3 alerts kept per robot, 4 n,
#       then per alert: id, event time µs, Alert JSON.
ALERTS = """
local alerts, changes = KEYS[1], KEYS[2]
local alerts_len, changes_len, cap, n = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local added = 0
for i = 0, n - 1 do
  local hkey, zkey, kkey, rkey = KEYS[3 + i * 4], KEYS[4 + i * 4], KEYS[5 + i * 4], KEYS[6 + i * 4]
  local id, at, data = ARGV[5 + i * 3], ARGV[6 + i * 3], ARGV[7 + i * 3]
  local new = redis.call('HEXISTS', hkey, id) == 0 and redis.call('HEXISTS', rkey, 'gone') == 0
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

# KEYS: 1 incidents zset, 2 changes stream, 3 open-incidents zset, then per incident:
#       robot incident hash, robot incident-rank hash, robot incident zset, robot hash
#       (tombstone: see WINDOWS).
# ARGV: 1 incidents kept fleet-wide, 2 changes_len, 3 incidents kept per robot, 4 n, then per
#       incident: id, opened µs, rank (2 x closed + acknowledged), Incident JSON.
# A version is written only if its rank is above the stored one: a replay, or an older
# version arriving late, changes nothing.
INCIDENTS = """
local all, changes, open = KEYS[1], KEYS[2], KEYS[3]
local kept, changes_len, cap, n = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local applied = 0
for i = 0, n - 1 do
  local hkey, vkey, zkey, rkey = KEYS[4 + i * 4], KEYS[5 + i * 4], KEYS[6 + i * 4], KEYS[7 + i * 4]
  local id, opened, rank, data = ARGV[5 + i * 4], ARGV[6 + i * 4], tonumber(ARGV[7 + i * 4]),
    ARGV[8 + i * 4]
  local stored = tonumber(redis.call('HGET', vkey, id) or '-1')
  local new = rank > stored and redis.call('HEXISTS', rkey, 'gone') == 0
  -- A first version older than every kept incident of a full set was trimmed: skip it.
  if new and stored < 0 and redis.call('ZCARD', zkey) >= cap then
    local first = redis.call('ZRANGE', zkey, 0, 0, 'WITHSCORES')
    new = tonumber(opened) > tonumber(first[2])
  end
  if new then
    applied = applied + 1
    redis.call('HSET', hkey, id, data)
    redis.call('HSET', vkey, id, rank)
    redis.call('ZADD', zkey, opened, id)
    if rank < 2 then
      redis.call('ZADD', open, opened, id)
    else
      redis.call('ZREM', open, id)
    end
    local extra = redis.call('ZCARD', zkey) - cap
    if extra > 0 then
      local gone = redis.call('ZRANGE', zkey, 0, extra - 1)
      redis.call('ZREMRANGEBYRANK', zkey, 0, extra - 1)
      redis.call('HDEL', hkey, unpack(gone))
      redis.call('HDEL', vkey, unpack(gone))
      redis.call('ZREM', open, unpack(gone))
    end
    redis.call('ZADD', all, opened, id)
    if redis.call('ZCARD', all) > kept then
      redis.call('ZREMRANGEBYRANK', all, 0, redis.call('ZCARD', all) - kept - 1)
    end
    redis.call('XADD', changes, 'MAXLEN', '~', changes_len, '*',
      'data', '{"type":"incident","incident":' .. data .. '}')
  end
end
return {applied, n - applied}
"""
