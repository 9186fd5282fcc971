-- Every write to ONE replica's entries, atomically (contract items 2-6).
-- KEYS: lru, exp, meta, held (router/index/keys.py: one hash tag, so one slot in a cluster).
--   held  hash  block -> expiry ms, "0" = confirmed (never expires): what lookups read
--   lru   zset  block -> recency counter: what capacity trimming reads
--   exp   zset  block -> expiry ms, TTL'd entries only: what purge reads
-- ARGV[1]: the operation; the rest depends on it:
--   record  ttl_ms|-1  keys     add/refresh keys (oldest first), then trim to capacity
--   remove  keys                drop keys
--   clear                       drop every entry, return how many
--   cap     blocks|-1           set (or unset) the capacity, trim at once
--   purge                       drop expired entries; return {dropped, left}
-- Block keys are 8-byte big-endian strings (Lua numbers are doubles and would round 64-bit
-- keys), sent concatenated in ONE argument: packing thousands of arguments costs the client
-- far more than the script's work.
-- Times are the Redis server's clock, so every router replica agrees on expiry.
local lru, exp, meta, held = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = ARGV[1]
-- unpack() is bounded by Lua's C stack (LUAI_MAXCSTACK = 8000): go in chunks.
local CHUNK = 2000

local function split(blob)
  -- struct.unpack: half the cost of a string.sub per key
  local out, n = {}, math.floor(#blob / 8)
  for first = 0, n - 1, CHUNK do
    local m = math.min(n - first, CHUNK)
    local got = {struct.unpack(string.rep('c8', m), blob, first * 8 + 1)}
    for k = 1, m do out[first + k] = got[k] end
  end
  return out
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function drop(first, last, src)
  for i = first, last, CHUNK do
    local j = math.min(i + CHUNK - 1, last)
    redis.call('ZREM', lru, unpack(src, i, j))
    redis.call('ZREM', exp, unpack(src, i, j))
    redis.call('HDEL', held, unpack(src, i, j))
  end
end

local function trim()
  local cap = tonumber(redis.call('HGET', meta, 'cap'))
  if not cap then return end
  local over = redis.call('ZCARD', lru) - cap
  while over > 0 do
    local victims = redis.call('ZRANGE', lru, 0, math.min(over, CHUNK) - 1)
    drop(1, #victims, victims)
    over = over - #victims
  end
end

if op == 'record' then
  local ttl = tonumber(ARGV[2])
  local ks = split(ARGV[3])
  local n = #ks
  if n <= 0 then return 0 end
  local base = redis.call('HINCRBY', meta, 'seq', n) - n
  local expiry = ttl >= 0 and now_ms() + ttl or 0
  for i = 1, n, CHUNK do
    local j = math.min(i + CHUNK - 1, n)
    local set, timed = {}, {}
    if ttl < 0 then
      -- confirmed by the engine: no expiry, whatever it had
      redis.call('ZREM', exp, unpack(ks, i, j))
      for k = i, j do
        set[#set + 1] = ks[k]
        set[#set + 1] = '0'
      end
    else
      local old = redis.call('HMGET', held, unpack(ks, i, j))
      for k = i, j do
        local o = old[k - i + 1]
        -- an expiry only extends; a confirmed entry ("0") stays confirmed
        if not o or (o ~= '0' and tonumber(o) < expiry) then
          set[#set + 1] = ks[k]
          set[#set + 1] = expiry
          timed[#timed + 1] = expiry
          timed[#timed + 1] = ks[k]
        end
      end
    end
    if #set > 0 then redis.call('HSET', held, unpack(set)) end
    if #timed > 0 then redis.call('ZADD', exp, unpack(timed)) end
    local recency = {}
    for k = i, j do
      -- later in the chain = more recent, so an LRU trim drops a chain's tail first
      recency[#recency + 1] = base + k
      recency[#recency + 1] = ks[k]
    end
    redis.call('ZADD', lru, unpack(recency))
  end
  trim()
  return n
elseif op == 'remove' then
  local ks = split(ARGV[2])
  drop(1, #ks, ks)
  return 0
elseif op == 'clear' then
  local n = redis.call('ZCARD', lru)
  -- UNLINK frees in the background: proportional to this replica's entries, never a scan
  redis.call('UNLINK', lru, exp, held)
  return n
elseif op == 'cap' then
  local cap = tonumber(ARGV[2])
  if cap < 0 then redis.call('HDEL', meta, 'cap') else redis.call('HSET', meta, 'cap', cap) end
  trim()
  return 0
elseif op == 'purge' then
  local dead = redis.call('ZRANGEBYSCORE', exp, '-inf', now_ms())
  drop(1, #dead, dead)
  return {#dead, redis.call('ZCARD', lru)}
end
return redis.error_reply('unknown op ' .. tostring(op))
