-- Leading runs of a chain for one or more replicas, in one call (contract item 1).
-- KEYS: lru1, exp1, lru2, exp2, ... (a pair per replica; in a cluster, one replica per call)
-- ARGV: the chain's 8-byte block keys, in order.
-- Returns one integer per pair: how many leading keys that replica holds, unexpired.
-- Read-only: a lookup never changes recency.
local n = #ARGV
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for p = 1, #KEYS, 2 do
  local lru, exp = KEYS[p], KEYS[p + 1]
  local run = 0
  -- most replicas do not hold a given first block: one cheap probe skips them
  if n > 0 and redis.call('ZSCORE', lru, ARGV[1]) then
    -- gallop: windows of 32, 128, 512, 2000 keys, stopping at the first miss, so the
    -- work follows the matched length, not the prompt's
    local i, step, open = 1, 32, true
    while open and i <= n do
      local j = math.min(i + step - 1, n)
      local s = redis.call('ZMSCORE', lru, unpack(ARGV, i, j))
      for k = 1, j - i + 1 do
        if not s[k] then open = false break end
        run = run + 1
      end
      i = j + 1
      step = math.min(step * 4, 2000)
    end
    if run > 0 and redis.call('ZCARD', exp) > 0 then
      -- some entries have a TTL: the run ends at the first expired one
      i = 1
      while i <= run do
        local j = math.min(i + 1999, run)
        local e = redis.call('ZMSCORE', exp, unpack(ARGV, i, j))
        for k = 1, j - i + 1 do
          if e[k] and tonumber(e[k]) <= now then run = i + k - 2 break end
        end
        i = j + 1
      end
    end
  end
  out[#out + 1] = run
end
return out
