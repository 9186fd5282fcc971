-- Leading runs of a chain for one or more replicas, in one call (contract item 1).
-- KEYS: the "held" hash of each replica (block -> expiry ms, "0" = never); in a cluster, one
-- replica per call.
-- ARGV[1]: the chain's 8-byte block keys, concatenated, in order (one argument: packing
-- thousands of arguments costs the client more than this script's work).
-- Returns one integer per replica: how many leading keys it holds, unexpired.
-- Read-only: a lookup never changes recency. HMGET, not ZMSCORE: a sorted set's scores come
-- back as formatted doubles, several times slower per key than a hash's stored strings.
local blob = ARGV[1]
local n = math.floor(#blob / 8)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
-- members are cut from the blob once, and only as far as some replica's run reaches
local ks, cut = {}, 0
local function upto(j)
  while cut < j do
    cut = cut + 1
    ks[cut] = string.sub(blob, cut * 8 - 7, cut * 8)
  end
end
local function alive(v)
  return v and (v == '0' or tonumber(v) > now)
end
local out = {}
for p = 1, #KEYS do
  local held = KEYS[p]
  local run = 0
  upto(math.min(n, 1))
  -- most replicas do not hold a given first block: one cheap probe skips them
  if n > 0 and alive(redis.call('HGET', held, ks[1])) then
    -- gallop: windows of 32, 128, 512, 2000 keys, stopping at the first miss, so the
    -- work follows the matched length, not the prompt's
    local i, step, open = 1, 32, true
    while open and i <= n do
      local j = math.min(i + step - 1, n)
      upto(j)
      local v = redis.call('HMGET', held, unpack(ks, i, j))
      for k = 1, j - i + 1 do
        if not alive(v[k]) then open = false break end
        run = run + 1
      end
      i = j + 1
      step = math.min(step * 4, 2000)
    end
  end
  out[#out + 1] = run
end
return out
