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
  "--mode,chat,--bus,nats://127.0.0.1:4222,--room,a.b|bad --room"
  "--max-per-ip,-1|bad --max-per-ip"
  "--accept-rate-per-ip,x|bad --accept-rate-per-ip"
  "--accept-rate,1k|bad --accept-rate"
  "--proxy-protocol|--proxy-protocol and --proxy-trusted go together"
  "--proxy-trusted,127.0.0.1/32|--proxy-protocol and --proxy-trusted go together"
  "--proxy-protocol,--proxy-trusted,10.0.0.1/8|bad --proxy-trusted"
  "--proxy-protocol,--proxy-trusted,::1/129|bad --proxy-trusted"
  "--proxy-protocol,--proxy-trusted,localhost|bad --proxy-trusted"
  "--metrics,7070|bad --metrics"
  "--metrics,::1:7070|bad --metrics"
  "--metrics,127.0.0.1:99999|bad --metrics"
  "--mode,packet,--route-rate,7|bad --route-rate"
  "--mode,packet,--route-rate,7:0|bad --route-rate"
  "--mode,packet,--route-rate,70000:5|bad --route-rate"
  "--mode,packet,--route-rate,7:5:x|bad --route-rate"
  "--mode,packet,--route-rate,7:5,--route-rate,7:6|given twice"
  "--mode,echo,--route-rate,7:5|not in echo mode"
  "--mode,packet,--flood,x|bad --flood"
  "--mode,packet,--flood,1000|--flood needs a rate limit"
  "--fanout-pause,0|bad --fanout-pause"
  "--fanout-pause,101|bad --fanout-pause"
  "--fanout-pause,on|bad --fanout-pause")
include(${CMAKE_CURRENT_LIST_DIR}/usage_check.cmake)
usage_refuses(cport-server ${EXE} ${bad})
usage_describes(cport-server ${EXE} "--rate-limit N")
usage_describes(cport-server ${EXE} "--proxy-trusted CIDR")
usage_describes(cport-server ${EXE} "--fanout-pause PCT")
usage_describes(cport-server ${EXE} "--metrics HOST:PORT")
usage_describes(cport-server ${EXE} "--route-rate ID:RATE")
usage_describes(cport-server ${EXE} "--flood MS")
