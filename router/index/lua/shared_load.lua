-- Publish one router's in-flight counts per backend and read everyone else's, in one call.
-- KEYS[1]: the shared-load hash (router/index/keys.py), field "router|backend" -> "count|expiry_ms".
-- ARGV[1]: this router's id (no '|'); ARGV[2]: ttl in ms; ARGV[3..]: backend, count, backend, count...
-- Returns backend, summed count of the OTHER live routers, ... Expired fields (a router that
-- died without saying goodbye) are deleted here, so its counts fade within the ttl.
local key, me, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mine = {}
for i = 3, #ARGV, 2 do
  mine[#mine + 1] = me .. '|' .. ARGV[i]
  mine[#mine + 1] = ARGV[i + 1] .. '|' .. (now + ttl)
end
if #mine > 0 then redis.call('HSET', key, unpack(mine)) end
local all = redis.call('HGETALL', key)
local sums, dead = {}, {}
for i = 1, #all, 2 do
  local field, value = all[i], all[i + 1]
  local sep = string.find(value, '|', 1, true)
  local expiry = sep and tonumber(string.sub(value, sep + 1)) or 0
  if expiry <= now then
    dead[#dead + 1] = field
  else
    local p = string.find(field, '|', 1, true)
    if p and string.sub(field, 1, p - 1) ~= me then
      local backend = string.sub(field, p + 1)
      sums[backend] = (sums[backend] or 0) + tonumber(string.sub(value, 1, sep - 1))
    end
  end
end
if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
-- if every router is gone, the whole hash goes too
redis.call('PEXPIRE', key, ttl * 10)
local out = {}
for backend, n in pairs(sums) do
  out[#out + 1] = backend
  out[#out + 1] = n
end
return out
