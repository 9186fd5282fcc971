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
-- expiries are stored as plain digit strings: comparing strings (length first) spares a
-- tonumber() per entry
local now = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local nlen = #now
-- members are cut from the blob once (struct.unpack: half the cost of string.sub), and only
-- as far as some replica's run reaches
local ks, cut = {}, 0
local function upto(j)
  while cut < j do
    local m = math.min(j - cut, 2000)
    local got = {struct.unpack(string.rep('c8', m), blob, cut * 8 + 1)}
    for k = 1, m do ks[cut + k] = got[k] end
    cut = cut + m
  end
end
local out = {}
for p = 1, #KEYS do
  local held = KEYS[p]
  local run = 0
  upto(math.min(n, 1))
  local x = n > 0 and redis.call('HGET', held, ks[1])
  -- most replicas do not hold a given first block: one cheap probe skips them
  if x and (x == '0' or #x > nlen or (#x == nlen and x > now)) then
    -- gallop: windows of 32, 128, 512, 2000 keys, stopping at the first miss, so the
    -- work follows the matched length, not the prompt's
    local i, step, open = 1, 32, true
    while open and i <= n do
      local j = math.min(i + step - 1, n)
      upto(j)
      local v = redis.call('HMGET', held, unpack(ks, i, j))
      local m = j - i + 1
      for k = 1, m do
        x = v[k]
        if not x or (x ~= '0' and (#x < nlen or (#x == nlen and x <= now))) then
          m = k - 1
          open = false
          break
        end
      end
      run = run + m
      i = j + 1
      step = math.min(step * 4, 2000)
    end
  end
  out[#out + 1] = run
end
return out
