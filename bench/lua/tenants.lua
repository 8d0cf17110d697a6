-- make bench: many tenants. Request i carries x-laneguard-tenant: <prefix><i mod N>, so a run
-- cycles through N distinct tenants in order (every tenant once per cycle).
--   wrk ... -s tenants.lua <url> -- N [prefix] [principal]
-- With N = 0 the tenants never repeat (tenant i for request i): a churn of fresh tenants.
-- Each wrk thread starts at a different offset. done() is the same as report.lua's.

local n, prefix, principal = 1, "t", "bench"
local i = 0
local thread_count = 0

function setup(thread)
  thread:set("offset", thread_count * 1000003)
  thread_count = thread_count + 1
end

function init(args)
  n = tonumber(args[1]) or 1
  prefix = args[2] or "t"
  principal = args[3] or "bench"
  i = tonumber(offset) or 0
end

function request()
  local t
  if n > 0 then t = i % n else t = i end
  i = i + 1
  return wrk.format("GET", "/orders/1", {
    ["x-laneguard-tenant"] = prefix .. t,
    ["x-laneguard-principal"] = principal,
  })
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
