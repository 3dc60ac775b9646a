"""The Lua scripts ``RedisStore`` runs on the server, one per change of a user's state,
so each change is atomic (Redis runs a script without interleaving another command).

``MERGE`` is ``base.merge_recent``'s rule over the stored list, shared by both scripts.
An entry is ``{timestamp or false, item, text}``, ``false`` standing for NaN so that it
compares as NaN does there: two entries without a timestamp are equal, an event without
one goes first, and an entry without one is where an event's way down the list stops.
Timestamps are compared as numbers (``tonumber`` of Python's ``repr``: the same float).
"""

MERGE = """
local function parse(text)
  local bar = string.find(text, '|', 1, true)
  return {tonumber(string.sub(text, 1, bar - 1)) or false, string.sub(text, bar + 1), text}
end
local function entries_of(key)
  local entries = {}
  for _, text in ipairs(redis.call('LRANGE', key, 0, -1)) do
    entries[#entries + 1] = parse(text)
  end
  return entries
end
local function merge(entries, entry)
  for _, kept in ipairs(entries) do
    if kept[2] == entry[2] and kept[1] == entry[1] then return end
  end
  local place = 1
  if entry[1] then
    while place <= #entries and entries[place][1] and entries[place][1] > entry[1] do
      place = place + 1
    end
  end
  table.insert(entries, place, entry)
end
-- values[first..last] as arguments of command, a thousand at a time (Lua's stack)
local function push(command, key, values, first, last)
  for start = first, last, 1000 do
    redis.call(command, key, unpack(values, start, math.min(start + 999, last)))
  end
end
local function store(key, entries, width)
  local texts = {}
  for i = 1, math.min(#entries, width) do texts[i] = entries[i][3] end
  redis.call('DEL', key)
  push('RPUSH', key, texts, 1, #texts)
end
"""

# KEYS: recent, seen. ARGV: width, then the events' entries in the order they arrived.
APPEND = (
    MERGE
    + """
local entries = entries_of(KEYS[1])
local items = {}
for a = 2, #ARGV do
  local entry = parse(ARGV[a])
  merge(entries, entry)
  items[#items + 1] = entry[2]
end
store(KEYS[1], entries, tonumber(ARGV[1]))
push('SADD', KEYS[2], items, 1, #items)
"""
)

# KEYS: features, recent, seen, meta. ARGV: fingerprint, width, 2 x columns, entries,
# then the column/value pairs, the recent entries (most recent first), the seen items.
LOAD = (
    MERGE
    + """
if redis.call('HGET', KEYS[4], 'fingerprint') == ARGV[1] then return 0 end
local pairs_end = 4 + tonumber(ARGV[3])
local recent_end = pairs_end + tonumber(ARGV[4])
redis.call('DEL', KEYS[1])
push('HSET', KEYS[1], ARGV, 5, pairs_end)
if redis.call('EXISTS', KEYS[2]) == 0 then
  push('RPUSH', KEYS[2], ARGV, pairs_end + 1, recent_end)
else
  local entries = entries_of(KEYS[2])
  for a = recent_end, pairs_end + 1, -1 do  -- oldest first: ties keep the artifact's order
    merge(entries, parse(ARGV[a]))
  end
  store(KEYS[2], entries, tonumber(ARGV[2]))
end
push('SADD', KEYS[3], ARGV, recent_end + 1, #ARGV)
redis.call('HSET', KEYS[4], 'fingerprint', ARGV[1])
return 1
"""
)
