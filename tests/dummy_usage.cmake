# SPDX-License-Identifier: MIT
# cport-dummy's room options (one chat room over several dummies), from
# outside: a bad one prints why and the usage on stderr and exits 2; --help
# exits 0 and describes them. Run by CTest as
#   cmake -DEXE=<cport-dummy> -P dummy_usage.cmake
# Each case: the arguments separated by commas, then | and what stderr must
# say. Every case fails in the argument checks, before any connect.
string(TIMESTAMP now_s "%s" UTC)
math(EXPR past_ms "(${now_s} - 60) * 1000")
math(EXPR far_ms "(${now_s} + 7200) * 1000")
math(EXPR soon_ms "(${now_s} + 60) * 1000")
set(bad
  "--mode,chat,--room-size,0|bad --room-size"
  "--mode,chat,--room-size,10001|bad --room-size"
  "--mode,chat,--room-size,x|bad --room-size"
  "--mode,chat,--first-index,-1|bad --first-index"
  "--mode,chat,--first-index,10000|bad --first-index"
  "--mode,chat,--start-at,soon|bad --start-at"
  "--mode,chat,--start-at,0|bad --start-at"
  "--room-size|needs a value"
  "--mode,echo,--room-size,10|for --mode chat"
  "--mode,packet,--first-index,1|for --mode chat"
  "--mode,echo,--start-at,${soon_ms}|for --mode chat"
  "--mode,chat,--sessions,10,--room-size,5|outside the room"
  "--mode,chat,--sessions,10,--first-index,1|outside the room"
  "--mode,chat,--sessions,10,--room-size,20,--first-index,11,--start-at,${soon_ms}|outside the room"
  "--mode,chat,--sessions,10,--room-size,20|needs --start-at"
  "--mode,chat,--start-at,${past_ms}|in the past"
  "--mode,chat,--start-at,${now_s}|in the past"
  "--mode,chat,--start-at,${far_ms}|more than an hour ahead")
include(${CMAKE_CURRENT_LIST_DIR}/usage_check.cmake)
usage_refuses(cport-dummy ${EXE} ${bad})
usage_describes(cport-dummy ${EXE} "--room-size T" "--first-index F" "--start-at MS")
