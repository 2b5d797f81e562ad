# SPDX-License-Identifier: MIT
# The layers' include rules (docs/design.md, "Layers"), checked over the
# sources: each directory may include only the headers listed for it. With
# the declarations split per layer, a file that cannot include a layer's
# header cannot name what that layer declares: the compiler enforces the rest
# (undeclared functions are errors, see CMakeLists.txt).
#   cmake -DROOT=<source dir> -P tests/layers.cmake
cmake_policy(SET CMP0057 NEW) # if(IN_LIST)
set(allowed_base "cport.h;sys.h;queue.h;base.h")
set(allowed_mem "${allowed_base};mem/mem.h")
set(allowed_port "${allowed_mem};port/backend.h;port/port.h")
set(allowed_buf "${allowed_mem};buf/sendbuf.h")
set(allowed_net "${allowed_port};buf/sendbuf.h;net/net.h")
set(allowed_bus "${allowed_net};bus/bus.h;bus/nats_wire.h")
set(allowed_tls "${allowed_net}")
set(allowed_ws "${allowed_net};ws/ws_digest.h")

set(rules
  "src/core.c=base" "src/sys.c=base" "src/sys.h=base" "src/queue.h=base" "src/base.h=base"
  "src/mem=mem" "src/port=port" "src/buf=buf" "src/net=net" "src/bus=bus" "src/tls=tls" "src/ws=ws")

set(bad 0)
foreach(rule ${rules})
  string(REPLACE "=" ";" parts "${rule}")
  list(GET parts 0 where)
  list(GET parts 1 layer)
  if(IS_DIRECTORY "${ROOT}/${where}")
    file(GLOB files "${ROOT}/${where}/*.c" "${ROOT}/${where}/*.h")
  else()
    set(files "${ROOT}/${where}")
  endif()
  foreach(f ${files})
    file(STRINGS "${f}" includes REGEX "^[ \t]*#[ \t]*include[ \t]*\"")
    foreach(line ${includes})
      string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*\"([^\"]+)\".*" "\\1" h "${line}")
      if(NOT h IN_LIST allowed_${layer})
        file(RELATIVE_PATH rel "${ROOT}" "${f}")
        message(SEND_ERROR "${rel} (layer ${layer}) includes \"${h}\": not below it")
        set(bad 1)
      endif()
    endforeach()
  endforeach()
endforeach()
if(bad)
  message(FATAL_ERROR "layer check failed")
endif()
message(STATUS "layers: every include goes down")
