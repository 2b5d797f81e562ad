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
foreach(case ${bad})
  string(FIND "${case}" "|" bar)
  string(SUBSTRING "${case}" 0 ${bar} argstr)
  math(EXPR from "${bar} + 1")
  string(SUBSTRING "${case}" ${from} -1 want)
  string(REPLACE "," ";" args "${argstr}")
  execute_process(COMMAND ${EXE} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  TIMEOUT 10)
  if(NOT rc EQUAL 2)
    message(FATAL_ERROR "cport-dummy ${args}: exit ${rc}, expected 2")
  endif()
  string(FIND "${err}" "${want}" at)
  string(FIND "${err}" "usage:" usage_at)
  if(at EQUAL -1 OR usage_at EQUAL -1)
    message(FATAL_ERROR "cport-dummy ${args}: stderr lacks '${want}' or the usage:\n${err}")
  endif()
endforeach()
execute_process(COMMAND ${EXE} --help RESULT_VARIABLE rc OUTPUT_VARIABLE out TIMEOUT 10)
foreach(opt "--room-size T" "--first-index F" "--start-at MS")
  string(FIND "${out}" "${opt}" at)
  if(NOT rc EQUAL 0 OR at EQUAL -1)
    message(FATAL_ERROR "cport-dummy --help: exit ${rc}, '${opt}' not described:\n${out}")
  endif()
endforeach()
