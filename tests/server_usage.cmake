# SPDX-License-Identifier: MIT
# cport-server's arguments, from outside: a bad one prints why and the usage
# on stderr and exits 2; --help exits 0. Run by CTest as
#   cmake -DEXE=<cport-server> -P server_usage.cmake
# Each case: the arguments separated by commas, then | and what stderr must say.
set(bad
  "--rate-limit,x|bad --rate-limit"
  "--rate-limit,-1|bad --rate-limit"
  "--mode,echo,--rate-limit,10|--rate-limit counts packets"
  "--send-queue-limit,0|bad --send-queue-limit"
  "--port,70000|bad --port"
  "--mode,nope|bad --mode"
  "--bogus|unknown option"
  "--port|needs a value"
  "--mode,chat,--bus,tcp://x:1|bad --bus"
  "--mode,echo,--bus,nats://127.0.0.1:4222|only with --mode chat"
  "--mode,chat,--bus,nats://127.0.0.1:4222,--room,a.b|bad --room")
foreach(case ${bad})
  string(FIND "${case}" "|" bar)
  string(SUBSTRING "${case}" 0 ${bar} argstr)
  math(EXPR from "${bar} + 1")
  string(SUBSTRING "${case}" ${from} -1 want)
  string(REPLACE "," ";" args "${argstr}")
  execute_process(COMMAND ${EXE} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  TIMEOUT 10)
  if(NOT rc EQUAL 2)
    message(FATAL_ERROR "cport-server ${args}: exit ${rc}, expected 2")
  endif()
  string(FIND "${err}" "${want}" at)
  string(FIND "${err}" "usage:" usage_at)
  if(at EQUAL -1 OR usage_at EQUAL -1)
    message(FATAL_ERROR "cport-server ${args}: stderr lacks '${want}' or the usage:\n${err}")
  endif()
endforeach()
execute_process(COMMAND ${EXE} --help RESULT_VARIABLE rc OUTPUT_VARIABLE out TIMEOUT 10)
string(FIND "${out}" "--rate-limit N" at)
if(NOT rc EQUAL 0 OR at EQUAL -1)
  message(FATAL_ERROR "cport-server --help: exit ${rc}, --rate-limit not described:\n${out}")
endif()
