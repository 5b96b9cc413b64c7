"""The Lua scripts of the redis:// backend (`eventwire.backends.redis`): what must happen in
one step inside Redis (store with deduplication, fetch with filtering and redelivery, count,
delete). Each is run by EVALSHA through `eventwire.backends.redis_wire.Script`."""

from __future__ import annotations

# Topic rules of eventwire.topics, for filtering inside Redis. A missing or invalid topic
# (a foreign producer's entry) matches every pattern: each consumer gets it and its bus
# dead-letters it, rather than nobody seeing it.
LUA_TOPICS = r"""
local function split(s)
  local out, start = {}, 1
  while true do
    local i = string.find(s, '.', start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

local function valid_topic(tokens)
  for _, token in ipairs(tokens) do
    if not string.find(token, '^[%w_%-]+$') then return false end
  end
  return true
end

local function matches(pattern, topic)
  if not topic then return true end
  local t = split(topic)
  if not valid_topic(t) then return true end
  local p = split(pattern)
  if string.sub(topic, 1, 1) == '_' and string.sub(p[1], 1, 1) ~= '_' then return false end
  for i = 1, #p do
    if p[i] == '>' then return #t >= i end
    if i > #t then return false end
    if p[i] ~= '*' and p[i] ~= t[i] then return false end
  end
  return #p == #t
end

-- The `topic` header of a FastStream message (its binary format: magic, version, where the
-- headers start, then length-prefixed names and values), or nil.
local function faststream_topic(data)
  if string.sub(data, 1, 8) ~= '\137BIN\r\n\26\n' then return nil end
  local ok, found = pcall(function()
    local _, at = struct.unpack('>H', data, 9)
    local headers_at = struct.unpack('>I4', data, at)
    local count, pos = struct.unpack('>H', data, headers_at + 1)
    for _ = 1, count do
      local size, name, value
      size, pos = struct.unpack('>H', data, pos)
      name, pos = string.sub(data, pos, pos + size - 1), pos + size
      size, pos = struct.unpack('>H', data, pos)
      value, pos = string.sub(data, pos, pos + size - 1), pos + size
      if name == 'topic' then return value end
    end
    return nil
  end)
  if ok then return found end
  return nil
end

-- An entry's topic: its `topic` field, else the `topic` header of a FastStream message.
local function topic_of(fields)
  if not fields then return nil end
  local framed = nil
  for i = 1, #fields - 1, 2 do
    if fields[i] == 'topic' then return fields[i + 1] end
    if fields[i] == '__data__' then framed = fields[i + 1] end
  end
  if framed then return faststream_topic(framed) end
  return nil
end

-- Whether stream entry id `a` comes after `b` (true when either is no entry id).
local function after(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not (am and bm) then return true end
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: stream, then with deduplication one marker key per message. ARGV: maxlen (0: none),
# dedup window in s (0: off), then five per message: event id, topic, key ('' for none, else
# '=' and the key), body and trace context ('' for none, else the traceparent, with a line
# feed and the tracestate after it if there is one), each its own argument: Redis reads them
# natively, with no unpacking in Lua.
# Returns how many were stored (not duplicates).
PUBLISH = r"""
local stream, maxlen, window = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local m, stored = 1, 0
for a = 3, #ARGV, 5 do
  local id, topic, key, body, trace = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  m = m + 1
  if window == 0 or redis.call('SET', KEYS[m], '1', 'NX', 'EX', window) then
    if key == '' and trace == '' then
      if maxlen > 0 then
        redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'id', id, 'topic', topic,
          'body', body)
      else
        redis.call('XADD', stream, '*', 'id', id, 'topic', topic, 'body', body)
      end
    else
      local args = {stream}
      if maxlen > 0 then
        args[2], args[3], args[4] = 'MAXLEN', '~', maxlen
      end
      for _, v in ipairs({'*', 'id', id, 'topic', topic}) do args[#args + 1] = v end
      if key ~= '' then
        args[#args + 1], args[#args + 2] = 'key', string.sub(key, 2)
      end
      args[#args + 1], args[#args + 2] = 'body', body
      if trace ~= '' then
        local cut = string.find(trace, '\n', 1, true)
        if cut then
          args[#args + 1], args[#args + 2] = 'traceparent', string.sub(trace, 1, cut - 1)
          args[#args + 1], args[#args + 2] = 'tracestate', string.sub(trace, cut + 1)
        else
          args[#args + 1], args[#args + 2] = 'traceparent', trace
        end
      end
      redis.call('XADD', unpack(args))
    end
    stored = stored + 1
  end
end
return stored
"""

# KEYS: stream. ARGV: first entry id to read ('': the server's now minus ARGV[2] ms), ms,
# most entries to read, then event ids. Returns {where to go on ('': the end was reached),
# the event ids found in the `id` field of the entries read}.
SEEN = r"""
local start, budget = ARGV[1], tonumber(ARGV[3])
if start == '' then
  local t = redis.call('TIME')
  local from = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - tonumber(ARGV[2])
  start = string.format('%d-0', math.max(from, 0))
end
local wanted = {}
for i = 4, #ARGV do wanted[ARGV[i]] = true end
local found, scanned = {}, 0
while scanned < budget do
  local r = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 500)
  for _, e in ipairs(r) do
    local f = e[2] or {}
    for i = 1, #f - 1, 2 do
      if f[i] == 'id' then
        if wanted[f[i + 1]] then found[#found + 1] = f[i + 1] end
        break
      end
    end
  end
  if #r < 500 then return {'', found} end
  start = '(' .. r[#r][1]
  scanned = scanned + #r
end
return {start, found}
"""

# KEYS: stream, registry, kinds. ARGV: name, group, pattern, start id, kind ('group' or
# 'own': a group's consumer or one subscription's).
# Returns {1, 'created'|'exists'} or {0, existing pattern, existing kind or false}.
CREATE = r"""
local existing = redis.call('HGET', KEYS[2], ARGV[1])
local kind = redis.call('HGET', KEYS[3], ARGV[1])
if existing and (existing ~= ARGV[3] or (kind and kind ~= ARGV[5])) then
  return {0, existing, kind}
end
local made = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[2], ARGV[4], 'MKSTREAM')
local state = 'created'
if type(made) == 'table' and made.err then
  if not string.find(made.err, 'BUSYGROUP', 1, true) then return redis.error_reply(made.err) end
  state = 'exists'
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
return {1, state}
"""

# KEYS: stream, delayed, wake. ARGV: group, consumer, limit, pattern, reclaim (0/1),
# min idle ms, autoclaim cursor, scan budget, then the waker's hint (since, before; '' for
# none: see 3a).
# Returns {deliveries, redelivered, next cursor, more (1: the scan budget ran out),
# next due ms of a delayed entry or -1, now ms}.
# `deliveries` holds one `_ENTRY` record (a string) per delivery, oldest first except for the
# first `redelivered` ones (nak'ed or taken over: older than the rest, in no particular order).
FETCH = (
    LUA_TOPICS
    + r"""
local stream, delayed, wake = KEYS[1], KEYS[2], KEYS[3]
local group, me, limit, pattern = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local cursor, budget = ARGV[7], tonumber(ARGV[8])
local now = now_ms()
local parts, count = {}, 0

-- The first `topic` field of an entry, and its body: the `body` field of one eventwire wrote
-- (`id` first), else every field packed after a marker (redis.pack_fields): all of another
-- producer's entry goes to the decoder or the dead letter.
local function topic_body(fields)
  local topic, body = nil, nil
  if fields then
    for i = 1, #fields - 1, 2 do
      local k = fields[i]
      if k == 'topic' then
        if not topic then topic = fields[i + 1] end
      elseif k == 'body' then
        if not body then body = fields[i + 1] end
      end
    end
  end
  if not body or not fields or fields[1] ~= 'id' then
    topic = topic or topic_of(fields)
    local packed = {'\0eventwire-fields\0'}
    for i = 1, #(fields or {}) do
      packed[i + 1] = struct.pack('>I4', #fields[i]) .. fields[i]
    end
    body = table.concat(packed)
  end
  return topic, body
end

local function emit(id, attempt, topic, body)
  topic, body = topic or '', body or ''
  count = count + 1
  parts[count] = struct.pack('>I4I4I4I4', attempt, #id, #topic, #body) .. id .. topic .. body
end

-- 1. nak'ed entries whose delay is over: back into the pending list, owned by us.
local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, limit)
for _, member in ipairs(due) do
  redis.call('ZREM', delayed, member)
  local sep = string.find(member, ' ', 1, true)
  local id, n = string.sub(member, 1, sep - 1), tonumber(string.sub(member, sep + 1))
  local got = redis.call('XCLAIM', stream, group, me, 0, id, 'FORCE', 'RETRYCOUNT', n + 1)
  -- Nothing comes back when the entry was trimmed from the stream meanwhile.
  if got[1] and got[1][2] then
    local topic, body = topic_body(got[1][2])
    emit(got[1][1], n + 1, topic, body)
  end
end

-- 2. entries another consumer held longer than ack_wait (its process died or stalled).
if ARGV[5] == '1' and count < limit then
  local r = redis.call('XAUTOCLAIM', stream, group, me, ARGV[6], cursor, 'COUNT', limit - count)
  cursor = r[1]
  for _, e in ipairs(r[2]) do
    if e and e[2] then
      local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
      local topic, body = topic_body(e[2])
      emit(e[1], p[1][4], topic, body)
    end
  end
end
local redelivered = count

-- 3. new entries; those for other topics are acknowledged here and never delivered.
local scanned, more = 0, 0
local function take(entries)
  scanned = scanned + #entries
  local skip = {}
  for _, e in ipairs(entries) do
    local topic, body = topic_body(e[2])
    if topic == pattern or matches(pattern, topic) then
      emit(e[1], 1, topic, body)
    else
      skip[#skip + 1] = e[1]
    end
  end
  if #skip > 0 then redis.call('XACK', stream, group, unpack(skip)) end
end

-- 3a. With a hint from the process's waker: every entry after `since` up to `before` is for
-- other topics (the waker read them all while the group waited). When the group's next
-- entry is among them, the group's position moves to `before` at once, instead of reading
-- and acknowledging each of them.
local since, before = ARGV[9], ARGV[10]
if before and before ~= '' and count < limit then
  local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', 1, 'STREAMS', stream, '>')
  if r then
    local e = r[1][2][1]
    if after(e[1], since) and not after(e[1], before) then
      redis.call('XACK', stream, group, e[1])
      if e[1] ~= before then redis.call('XGROUP', 'SETID', stream, group, before) end
    else
      take(r[1][2])
    end
  end
end

while count < limit do
  if scanned >= budget then more = 1; break end
  local want = math.min(limit - count, budget - scanned)
  local r = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', want, 'STREAMS', stream, '>')
  if not r then break end
  take(r[1][2])
  if #r[1][2] < want then break end
end

local next_due = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
local due_ms = -1
if next_due[2] then due_ms = math.floor(tonumber(next_due[2])) end
return {parts, redelivered, cursor, more, due_ms, now}
"""
)

# KEYS: stream, delayed, wake, wakes. ARGV: group, consumer, entry id, delay ms.
# Only the consumer that holds the entry may give it back (another may have taken it over).
# The namespace's wakes stream names the group, for the processes' wakers (fetchers waiting
# on one shared connection).
NAK = r"""
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if not p[1] or p[1][2] ~= ARGV[2] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[3] .. ' ' .. p[1][4])
redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'w', '1')
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '1000', '*', 'g', ARGV[1])
return 1
"""

# KEYS: stream. ARGV: group, consumer, entry ids... Resets the idle time of the entries the
# consumer still holds (XCLAIM JUSTID does not count a delivery).
EXTEND = r"""
local cmd = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then cmd[#cmd + 1] = ARGV[i] end
end
if #cmd == 5 then return 0 end
cmd[#cmd + 1] = 'JUSTID'
return #redis.call(unpack(cmd))
"""

# KEYS: stream, delayed, wake, wakes. ARGV: group, consumer.
# Hands everything the consumer holds back (due now) and removes the consumer from the group.
RELEASE = r"""
local now = nil
local moved = 0
while true do
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', 100, ARGV[2])
  if type(p) == 'table' and p.err then return 0 end
  if #p == 0 then break end
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  for _, e in ipairs(p) do
    redis.call('XACK', KEYS[1], ARGV[1], e[1])
    redis.call('ZADD', KEYS[2], now, e[1] .. ' ' .. e[4])
    moved = moved + 1
  end
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
if moved > 0 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '1', '*', 'w', '1')
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', '1000', '*', 'g', ARGV[1])
end
return moved
"""

# KEYS: stream, then the delayed key of each group. ARGV: group and min idle ms per group.
# Returns the (1-based) numbers of the groups that have a fetch script call due: a delayed
# entry due, an entry pending longer than the min idle time (its holder died or stalled), or
# no group any more (its fetch says so).
DUE = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for k = 2, #KEYS do
  local group, idle = ARGV[2 * k - 3], ARGV[2 * k - 2]
  local due = redis.call('ZRANGEBYSCORE', KEYS[k], '-inf', now, 'LIMIT', 0, 1)
  if #due > 0 then
    out[#out + 1] = k - 1
  else
    local p = redis.pcall('XPENDING', KEYS[1], group, 'IDLE', idle, '-', '+', 1)
    if type(p) ~= 'table' or p.err or #p > 0 then out[#out + 1] = k - 1 end
  end
end
return out
"""

# KEYS: stream. ARGV: group, consumer to keep, idle ms.
# Removes consumers of dead processes: nothing pending (checked atomically) and idle long.
PRUNE = r"""
local info = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if type(info) == 'table' and info.err then return 0 end
local removed = 0
for _, c in ipairs(info) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['name'] ~= ARGV[2] and f['pending'] == 0 and f['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    removed = removed + 1
  end
end
return removed
"""

# KEYS: stream, then delayed and tally keys per group. ARGV: scan limit, then group, pattern
# per group. Returns per group the outstanding count (pending + delayed + unread entries that
# match) and 1 if it is exact, 0 if it is an upper bound (more unread entries than `limit`
# were left to look at: asking again goes on from there).
#
# Unread entries are counted from the group's position on, at most `limit` per call; a tally
# key keeps how far the count went (while the position stays: the dead-letter consumer's
# never moves between two `eventwire dlq` reads) so that the next call only looks at what
# came since. Entries deleted or trimmed since the tally began start it again.
STATS = (
    LUA_TOPICS
    + r"""
local limit = tonumber(ARGV[1])
local deleted = nil
local stream = redis.pcall('XINFO', 'STREAM', KEYS[1])
if not (type(stream) == 'table' and stream.err) then
  for i = 1, #stream, 2 do
    if stream[i] == 'max-deleted-entry-id' then deleted = stream[i + 1] end
  end
end
local groups = {}
local info = redis.pcall('XINFO', 'GROUPS', KEYS[1])
if not (type(info) == 'table' and info.err) then
  for _, g in ipairs(info) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    groups[f['name']] = f
  end
end
local out = {}
for k = 1, (#KEYS - 1) / 2 do
  local delayed, tally = KEYS[2 * k], KEYS[2 * k + 1]
  local group, pattern = ARGV[2 * k], ARGV[2 * k + 1]
  local n, exact = redis.call('ZCARD', delayed), 1
  local f = groups[group]
  if f and f['lag'] ~= 0 then
    n = n + f['pending']
    local position = f['last-delivered-id']
    local from, seen, matched = position, 0, 0
    local t = redis.call('HMGET', tally, 'position', 'pattern', 'to', 'seen', 'matched')
    if t[1] == position and t[2] == pattern and not (deleted and after(deleted, position)) then
      from, seen, matched = t[3], tonumber(t[4]), tonumber(t[5])
    end
    local rest = redis.call('XRANGE', KEYS[1], '(' .. from, '+', 'COUNT', limit)
    for _, e in ipairs(rest) do
      if matches(pattern, topic_of(e[2])) then matched = matched + 1 end
    end
    seen = seen + #rest
    if #rest > 0 then from = rest[#rest][1] end
    n = n + matched
    if #rest == limit then
      exact = 0  -- past what was counted: count the rest as matching (never 0)
      if f['lag'] then n = n + math.max(f['lag'] - seen, 1) else n = n + 1 end
    end
    if seen >= limit then
      -- Worth keeping: counting it again would take at least one more call.
      redis.call('HSET', tally, 'position', position, 'pattern', pattern, 'to', from,
        'seen', seen, 'matched', matched)
    elseif t[1] then
      redis.call('DEL', tally)
    end
  elseif f then
    n = n + f['pending']
  end
  out[#out + 1] = {n, exact}
end
return out
"""
)

# KEYS: stream, registry, delayed, handled, wake, tally, kinds. ARGV: name, group.
DELETE = r"""
redis.pcall('XGROUP', 'DESTROY', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if KEYS[8] then redis.call('DEL', KEYS[8]) end
return 1
"""


# KEYS: a partitioned consumer's table (hash: ``m:<process>`` -> until ms, ``l:<slot>`` ->
# ``<holder> <until ms>``). ARGV: process, ttl ms, then the slots it wants.
# The process is a member for ttl more; it keeps (renews) the wanted slots it holds, takes the
# wanted ones that are free or ran out, and lets go of the others it holds. Dead members and
# run-out leases are removed. Returns {live members, slots the process holds}.
SYNC_GROUP = r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl = ARGV[1], tonumber(ARGV[2])
local until_ms = now + ttl
local want = {}
for i = 3, #ARGV do want[ARGV[i]] = true end
redis.call('HSET', KEYS[1], 'm:' .. me, until_ms)
local all = redis.call('HGETALL', KEYS[1])
local members, held = {}, {}
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local name = string.sub(field, 3)
  if string.sub(field, 1, 2) == 'm:' then
    if tonumber(value) > now then
      members[#members + 1] = name
    else
      redis.call('HDEL', KEYS[1], field)
    end
  else
    local sep = string.find(value, ' ', 1, true)
    local holder, ends = string.sub(value, 1, sep - 1), tonumber(string.sub(value, sep + 1))
    if holder == me then
      if want[name] then
        redis.call('HSET', KEYS[1], field, me .. ' ' .. until_ms)
        held[#held + 1] = name
      else
        redis.call('HDEL', KEYS[1], field)
      end
      want[name] = nil
    elseif ends <= now then
      redis.call('HDEL', KEYS[1], field)
    else
      want[name] = nil
    end
  end
end
for name, _ in pairs(want) do
  redis.call('HSET', KEYS[1], 'l:' .. name, me .. ' ' .. until_ms)
  held[#held + 1] = name
end
redis.call('PEXPIRE', KEYS[1], ttl * 20)
return {members, held}
"""

# KEYS: a partitioned consumer's table. ARGV: process. Its member entry and leases go.
LEAVE_GROUP = r"""
local all = redis.call('HGETALL', KEYS[1])
local me = ARGV[1]
redis.call('HDEL', KEYS[1], 'm:' .. me)
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  if string.sub(field, 1, 2) == 'l:' and string.sub(value, 1, #me + 1) == me .. ' ' then
    redis.call('HDEL', KEYS[1], field)
  end
end
return 1
"""

SCRIPTS = (
    SYNC_GROUP,
    LEAVE_GROUP,
    PUBLISH,
    SEEN,
    CREATE,
    FETCH,
    NAK,
    EXTEND,
    RELEASE,
    PRUNE,
    STATS,
    DELETE,
    DUE,
)
