-- Every write to ONE replica's entries, atomically (contract items 2-6).
-- KEYS: lru, exp, meta (router/index/keys.py: one hash tag, so one slot in a cluster).
-- ARGV[1]: the operation; the rest depends on it:
--   record  ttl_ms|-1  key...   add/refresh keys (oldest first), then trim to capacity
--   remove  key...              drop keys
--   clear                       drop every entry, return how many
--   cap     blocks|-1           set (or unset) the capacity, trim at once
--   purge                       drop expired entries, return how many
-- Keys are 8-byte binary strings (Lua numbers are doubles and would round 64-bit keys).
-- Times are the Redis server's clock, so every router replica agrees on expiry.
local lru, exp, meta = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
-- unpack() is bounded by Lua's C stack (LUAI_MAXCSTACK = 8000): go in chunks.
local CHUNK = 2000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function drop(first, last, src)
  for i = first, last, CHUNK do
    local j = math.min(i + CHUNK - 1, last)
    redis.call('ZREM', lru, unpack(src, i, j))
    redis.call('ZREM', exp, unpack(src, i, j))
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
  local n = #ARGV - 2
  if n <= 0 then return 0 end
  local base = redis.call('HINCRBY', meta, 'seq', n) - n
  for i = 3, #ARGV, CHUNK do
    local j = math.min(i + CHUNK - 1, #ARGV)
    if ttl < 0 then
      -- confirmed by the engine: no expiry, whatever it had
      redis.call('ZREM', exp, unpack(ARGV, i, j))
    else
      local expiry = now_ms() + ttl
      local held = redis.call('ZMSCORE', lru, unpack(ARGV, i, j))
      local old, new = {}, {}
      for k = i, j do
        local t = held[k - i + 1] and old or new
        t[#t + 1] = expiry
        t[#t + 1] = ARGV[k]
      end
      -- an existing entry's expiry only extends (GT); a confirmed one (absent from exp) stays so (XX)
      if #old > 0 then redis.call('ZADD', exp, 'XX', 'GT', unpack(old)) end
      if #new > 0 then redis.call('ZADD', exp, 'GT', unpack(new)) end
    end
    local pairs_ = {}
    for k = i, j do
      -- later in the chain = more recent, so an LRU trim drops a chain's tail first
      pairs_[#pairs_ + 1] = base + k - 2
      pairs_[#pairs_ + 1] = ARGV[k]
    end
    redis.call('ZADD', lru, unpack(pairs_))
  end
  trim()
  return n
elseif op == 'remove' then
  drop(2, #ARGV, ARGV)
  return 0
elseif op == 'clear' then
  local n = redis.call('ZCARD', lru)
  -- UNLINK frees in the background: proportional to this replica's entries, never a scan
  redis.call('UNLINK', lru, exp)
  return n
elseif op == 'cap' then
  local cap = tonumber(ARGV[2])
  if cap < 0 then redis.call('HDEL', meta, 'cap') else redis.call('HSET', meta, 'cap', cap) end
  trim()
  return 0
elseif op == 'purge' then
  local dead = redis.call('ZRANGEBYSCORE', exp, '-inf', now_ms())
  drop(1, #dead, dead)
  return #dead
end
return redis.error_reply('unknown op ' .. tostring(op))
