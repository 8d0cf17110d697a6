-- laneguard: GCRA buckets in Redis, one request's buckets of ONE hash slot per call.
--
-- The twin of this script is `store::decide` (laneguard_core::gcra) in the service. The
-- service recomputes the decision from the old states this script returns and logs any
-- disagreement; the contract suite (service/tests/store_contract.rs) runs the same cases,
-- and a long randomised sequence, over both.
--
-- WHY THIS IS ATOMIC. Redis executes a script to completion before it serves any other
-- command on that server: no other client's command runs between the GETs, the decision
-- and the SETs below, so "check every bucket, then charge all of them or none" is one
-- indivisible step. In Redis Cluster a script may only touch keys of one hash slot, and
-- that slot lives on one shard, so the same holds there. The service calls the script with
-- the keys of one slot only: a tenant's keys all carry the tenant as a hash tag
-- (`lg1:<domain>:tenant={acme}:...`, laneguard_core::key), so they share a slot, and a
-- request confined to one tenant is one call. Only a bucket without a tenant (a model's
-- `model_total`) can sit in another slot; the service handles that group with a second call
-- and a compensating "refund" call (docs/storage.md).
--
-- TIME comes from the service (ARGV), never from Redis TIME: every replica and the
-- contract tests control it, and the script stays deterministic.
--
-- NUMBERS. Lua numbers are doubles, exact for integers up to 2^53 (about 9.0e15), and an
-- absolute nanosecond timestamp (about 1.7e18) is not. So a bucket's state, its TAT
-- (theoretical arrival time), is stored as a decimal string of nanoseconds since the Unix
-- epoch (the same value the memory store keeps), and all arithmetic here is on the debt,
-- TAT - now, in nanoseconds relative to now. That is exact while a bucket's capacity
-- (burst x interval) stays under 2^53 ns, about 104 days.
--
-- CALL
--   KEYS  the distinct bucket keys of the group, in first-mention order
--   ARGV  mode ("charge" | "report" | "refund"), now_s, now_ns (now = now_s * 1e9 + now_ns),
--         ttl margin ms
--   charge: then lease (units asked, 0 = none), then per mention of a key in request order:
--           key index (1-based into KEYS), interval_ns, burst, cost, age_ns (ignored here)
--           returns {admitted 1|0, granted units, old TAT of KEYS[1], ..., KEYS[n]}
--           (an absent key, a full bucket, reads "0")
--           SLOTS: when KEYS holds twice as many keys as the mentions name, KEYS[n+k] is
--           bucket k's slot key (its slot tail, stored like a TAT). An admitted lease ask
--           then gives every bucket it left saturated a slot (laneguard_core::engine::
--           ask_slot), and the reply goes on with the old tail of each slot key and each
--           bucket's hold in ns (0: no slot)
--   report: the same arguments (the lease is ignored), but every cost is charged
--           unconditionally (hits already admitted elsewhere), even into debt beyond the
--           burst, as if onto a bucket that was empty age_ns ago: TAT = max(TAT, now) +
--           min(spent, max(0, spent + burst * interval - age)), spent = cost * interval
--           (laneguard_core::engine::charge_reported); returns {1, 0, old TATs...}
--   refund: then one amount in ns per key: move each TAT back by it (undo a charge)
--           returns the number of keys
--
-- TTL. Each written key expires when its bucket is full again, plus a margin: an idle
-- bucket holds no information (an absent key reads as full), so it simply vanishes.

local E9 = 1000000000
local mode = ARGV[1]
local now_s = tonumber(ARGV[2])
local now_n = tonumber(ARGV[3])
local margin_ms = tonumber(ARGV[4])

-- floor(a / b) for integers, exact even where the double quotient rounds up to an integer
-- (a = q*b - 1 with a large b).
local function whole(a, b)
  local q = math.floor(a / b)
  if q * b > a then
    q = q - 1
  elseif (q + 1) * b <= a then
    q = q + 1
  end
  return q
end

-- The debt (ns, >= 0) of a stored TAT at now, or nil if the value is not a TAT.
local function debt_of(raw)
  if not raw then
    return 0
  end
  if #raw > 20 or not string.match(raw, '^%d+$') then
    return nil
  end
  local s, n = 0, tonumber(raw)
  if #raw > 9 then
    s = tonumber(string.sub(raw, 1, -10))
    n = tonumber(string.sub(raw, -9))
  end
  local d = (s - now_s) * E9 + (n - now_n)
  if d < 0 then
    return 0
  end
  return d
end

-- The largest TAT, u64::MAX ns: the Rust core saturates there (gcra's saturating_add), and
-- so does this script, so an absurd report closes a bucket instead of corrupting it.
local MAX_S, MAX_N, MAX_TAT = 18446744073, 709551615, '18446744073709551615'

-- Store now + debt as a decimal string of nanoseconds, expiring when the bucket is full.
local function store(key, debt)
  local n = now_n + debt
  local carry = whole(n, E9)
  local sec, nsec = now_s + carry, n - carry * E9
  local tat
  if sec > MAX_S or (sec == MAX_S and nsec > MAX_N) then
    tat = MAX_TAT
  else
    tat = string.format('%d%09d', sec, nsec)
  end
  local ttl = string.format('%d', math.ceil(debt / 1000000) + margin_ms)
  redis.call('SET', key, tat, 'PX', ttl)
end

local function load_key(key)
  local raw = redis.call('GET', key)
  local debt = debt_of(raw)
  if debt == nil then
    return nil, redis.error_reply('LGCORRUPT ' .. key .. ' does not hold a TAT in nanoseconds')
  end
  return raw or '0', debt
end

if mode == 'refund' then
  for k = 1, #KEYS do
    local raw, debt = load_key(KEYS[k])
    if raw == nil then
      return debt
    end
    if raw ~= '0' then
      local left = debt - tonumber(ARGV[4 + k])
      if left > 0 then
        store(KEYS[k], left)
      else
        redis.call('DEL', KEYS[k])
      end
    end
  end
  return #KEYS
end

if mode ~= 'charge' and mode ~= 'report' then
  return redis.error_reply('LGMODE unknown mode ' .. tostring(mode))
end
local force = mode == 'report'

local lease = tonumber(ARGV[5])
-- The bucket keys are the ones the mentions name; any beyond them are their slot keys.
local nb = 0
for i = 6, #ARGV, 5 do
  nb = math.max(nb, tonumber(ARGV[i]))
end
local slots = #KEYS == 2 * nb and nb > 0
if not slots and #KEYS ~= nb then
  return redis.error_reply('LGKEYS ' .. #KEYS .. ' keys for ' .. nb .. ' buckets')
end
local old, debt = {}, {}
for k = 1, nb do
  local raw, d = load_key(KEYS[k])
  if raw == nil then
    return d
  end
  old[k] = raw
  debt[k] = d
end

-- Check every mention against the debt so far (a key named twice is charged twice), exactly
-- as gcra::check does: admit iff max(tat, now) + cost*T - now <= burst*T. A report skips
-- the check and charges its hits as if onto a bucket that was empty when the first of them
-- was admitted (laneguard_core::engine::charge_reported).
local admitted = 1
local first_t, first_cap, first_burst, costs = {}, {}, {}, {}
for i = 6, #ARGV, 5 do
  local k = tonumber(ARGV[i])
  local t = tonumber(ARGV[i + 1])
  local cap = t * tonumber(ARGV[i + 2])
  local cost = tonumber(ARGV[i + 3])
  if first_t[k] == nil then
    first_t[k], first_cap[k], first_burst[k], costs[k] = t, cap, tonumber(ARGV[i + 2]), 0
  end
  costs[k] = costs[k] + cost
  if force then
    local spent = cost * t
    local charge = spent + cap - tonumber(ARGV[i + 4])
    if charge < 0 then
      charge = 0
    end
    if charge > spent then
      charge = spent
    end
    debt[k] = debt[k] + charge
  else
    local after = debt[k] + cost * t
    if after <= cap then
      debt[k] = after
    else
      admitted = 0
      break
    end
  end
end

local out = {admitted, 0}
for k = 1, nb do
  out[2 + k] = old[k]
end
if admitted == 0 then
  -- All or nothing: nothing is written.
  return out
end

-- The lease (store::lease_size, laneguard_core::engine::lease_grant): each bucket gives all
-- of its room left after the request, up to half its burst (at least 1 while it has room);
-- the grant is the smallest of those, at most what was asked; charged once to every bucket
-- at the rate of its first mention.
local grant = 0
if lease > 0 and not force then
  local most = nil
  for k = 1, nb do
    local r = whole(first_cap[k] - debt[k], first_t[k])
    if r < 0 then
      r = 0
    end
    if r > 0 then
      r = math.min(r, math.max(1, math.floor(first_burst[k] / 2)))
    end
    if most == nil or r < most then
      most = r
    end
  end
  if most ~= nil then
    grant = most
  end
  if grant > lease then
    grant = lease
  end
  for k = 1, nb do
    debt[k] = debt[k] + grant * first_t[k]
  end
end
out[2] = grant

for k = 1, nb do
  if debt[k] > 0 then
    store(KEYS[k], debt[k])
  end
end

-- Slots (laneguard_core::engine::ask_slot; store::decide_slotted checks every hold given
-- here). A lease ask that leaves a bucket saturated, with less room than half its fill time
-- or 50 ms of its schedule (engine::saturated), is put at the back of the bucket's line:
-- one step after the latest slot given (or after now, if that has passed), at most 500 ms
-- from now (engine::MAX_SLOT_HOLD_NS). The step is the gap (seven eighths of one grant's
-- refill, engine::ask_gap_ns), or twice the refill of what this request took, if less.
if slots and lease > 0 and not force then
  local tails, holds = {}, {}
  for k = 1, nb do
    local raw = redis.call('GET', KEYS[nb + k])
    local tail = debt_of(raw)
    if tail == nil then
      -- Not a tail: start the line afresh (a slot only spaces asks, it admits nothing).
      tail = 0
      raw = '0'
    end
    tails[k] = raw or '0'
    holds[k] = 0
    local t, cap = first_t[k], first_cap[k]
    local room = cap - debt[k]
    if room < 0 then
      room = 0
    end
    if room < math.min(whole(cap, 2), 50000000) then
      local g = t * math.max(1, math.floor(first_burst[k] / 2))
      g = g - whole(g, 8)
      if g < 1 then
        g = 1
      end
      local step = math.min(g, t * (costs[k] + grant) * 2)
      local hold = math.min(tail + step, 500000000)
      holds[k] = hold
      store(KEYS[nb + k], hold)
    end
  end
  for k = 1, nb do
    out[2 + nb + k] = tails[k]
  end
  for k = 1, nb do
    out[2 + 2 * nb + k] = holds[k]
  end
end
return out
