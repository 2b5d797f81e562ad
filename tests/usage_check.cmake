# SPDX-License-Identifier: MIT
# What a program does with a bad command line, from outside (included by
# server_usage.cmake and dummy_usage.cmake).
#
# usage_refuses(NAME EXE CASES...): each case is the arguments separated by
# commas, then | and what stderr must say; EXE must exit 2 and print that
# and the usage on stderr.
function(usage_refuses name exe)
  foreach(case ${ARGN})
    string(FIND "${case}" "|" bar)
    string(SUBSTRING "${case}" 0 ${bar} argstr)
    math(EXPR from "${bar} + 1")
    string(SUBSTRING "${case}" ${from} -1 want)
    string(REPLACE "," ";" args "${argstr}")
    execute_process(COMMAND ${exe} ${args} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                    TIMEOUT 10)
    if(NOT rc EQUAL 2)
      message(FATAL_ERROR "${name} ${args}: exit ${rc}, expected 2")
    endif()
    string(FIND "${err}" "${want}" at)
    string(FIND "${err}" "usage:" usage_at)
    if(at EQUAL -1 OR usage_at EQUAL -1)
      message(FATAL_ERROR "${name} ${args}: stderr lacks '${want}' or the usage:\n${err}")
    endif()
  endforeach()
endfunction()

# usage_describes(NAME EXE OPTIONS...): EXE --help exits 0 and names each.
function(usage_describes name exe)
  execute_process(COMMAND ${exe} --help RESULT_VARIABLE rc OUTPUT_VARIABLE out TIMEOUT 10)
  foreach(opt ${ARGN})
    string(FIND "${out}" "${opt}" at)
    if(NOT rc EQUAL 0 OR at EQUAL -1)
      message(FATAL_ERROR "${name} --help: exit ${rc}, '${opt}' not described:\n${out}")
    endif()
  endforeach()
endfunction()
