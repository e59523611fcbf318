-- bench.serve's wrk script: POST /recommend with the JSON bodies of the file in $SIDREC_BODIES (one
-- per line), cycled; on exit, one JSON line on stderr with the counts and latency percentiles (us).
local bodies = {}
for line in io.lines(os.getenv("SIDREC_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
local headers = {["Content-Type"] = "application/json"}

request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "/recommend", headers, bodies[i])
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.stderr:write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "timeouts": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p95_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99)))
end
