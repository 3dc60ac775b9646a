-- Open-loop load for wrk: each connection sends on a fixed schedule, whatever the
-- service answers, and a request's latency counts from when it was due.
--
--   OPENLOOP_OUT=summary.json wrk -t C -c C -d 10s -s openloop.lua URL -- RATE BODIES C
--
-- One connection per wrk thread (-t = -c = C), so a thread's requests and answers
-- alternate and each is matched to its due time. RATE is requests/s over all C
-- connections; BODIES a file of JSON bodies, one per line, POSTed to URL in turn
-- (each connection starting at its own place). At the end the JSON summary goes to
-- OPENLOOP_OUT: latency percentiles, sent, answered, non-2xx and socket errors.
--
-- Due times: connection i's first request is due at a random phase of its
-- interval C / RATE, each next one an interval later. When a request is due before
-- the previous answer arrived (the service is behind), it is sent at once and its
-- latency counts from its due time: the waiting the service caused is not hidden
-- (no coordinated omission). When it is due later, wrk's timer (whole
-- milliseconds) sends it at or just after that time and its latency counts from
-- the moment it was sent, so the timer's rounding is not counted as the service's.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } openloop_timespec;
int clock_gettime(int clock, openloop_timespec *out);
]])
local CLOCK_MONOTONIC = 1
local clock_buffer = ffi.new("openloop_timespec")

local function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, clock_buffer)
  return tonumber(clock_buffer.tv_sec) * 1e6 + tonumber(clock_buffer.tv_nsec) / 1e3
end

-- main thread: one entry per wrk thread
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

-- each wrk thread (its own Lua state)
local interval_us, due, start, behind
local bodies, next_body, path
latencies, sent, answered, failed = {}, 0, 0, 0

function init(args)
  local rate, connections = tonumber(args[1]), tonumber(args[3])
  interval_us = 1e6 * connections / rate
  bodies = {}
  for line in io.lines(args[2]) do
    bodies[#bodies + 1] = line
  end
  math.randomseed(1000 + id)
  next_body = 1 + (id * 97) % #bodies
  due = now_us() + math.random() * interval_us
  path = wrk.path
end

function delay()
  local wait_us = due - now_us()
  behind = wait_us <= 0
  if behind then
    return 0
  end
  return math.floor(wait_us / 1000)
end

function request()
  local body = bodies[next_body]
  next_body = next_body % #bodies + 1
  local now = now_us()
  start = behind and due or now
  due = due + interval_us
  sent = sent + 1
  return wrk.format("POST", path, { ["Content-Type"] = "application/json" }, body)
end

function response(status, headers, body)
  latencies[#latencies + 1] = now_us() - start
  answered = answered + 1
  if status < 200 or status > 299 then
    failed = failed + 1
  end
end

function done(summary, latency, requests)
  local all, totals = {}, { sent = 0, answered = 0, non_2xx = 0 }
  for _, thread in ipairs(threads) do
    for _, value in ipairs(thread:get("latencies")) do
      all[#all + 1] = value
    end
    totals.sent = totals.sent + thread:get("sent")
    totals.answered = totals.answered + thread:get("answered")
    totals.non_2xx = totals.non_2xx + thread:get("failed")
  end
  table.sort(all)
  local function percentile(p)
    if #all == 0 then
      return -1
    end
    return all[math.max(1, math.ceil(p * #all))] / 1000
  end
  local errors = summary.errors
  local socket = errors.connect + errors.read + errors.write + errors.timeout
  local file = assert(io.open(os.getenv("OPENLOOP_OUT"), "w"))
  file:write(string.format(
    '{"sent": %d, "answered": %d, "non_2xx": %d, "socket_errors": %d, ' ..
      '"elapsed_s": %.3f, "p50_ms": %.3f, "p90_ms": %.3f, "p99_ms": %.3f, ' ..
      '"p999_ms": %.3f, "max_ms": %.3f}\n',
    totals.sent, totals.answered, totals.non_2xx, socket, summary.duration / 1e6,
    percentile(0.5), percentile(0.9), percentile(0.99), percentile(0.999),
    percentile(1.0)))
  file:close()
end
