-- make bench: wrk reporting hook. Headers come from wrk's -H flags (a static request, the
-- cheapest thing wrk can send), and done() prints one machine-readable line:
--   WRK_JSON {"requests":..., "p50_us":..., "p99_us":..., "p999_us":..., ...}
-- status_errors counts responses that are not 2xx or 3xx (the 429s of a binding limit).

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
