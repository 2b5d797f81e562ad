# SPDX-License-Identifier: MIT
# Thin wrapper around CMake. On a fresh Debian 12 machine these two do it all:
#   make run    the main job: a chat server and 500 dummy sessions for ~10 s
#   make test   build and run the test suite
# Also: make run-cluster [BUS=redis] (one chat room over 3 servers and a
# broker), make check (tests under ASan+UBSan), make bench, make install,
# make lint (clang-tidy and cppcheck), make format / make format-check
# (clang-format).

BUILD     ?= build
PREFIX    ?=
ASAN_BUILD ?= build-asan
TSAN_BUILD ?= build-tsan
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
CMAKE_FLAGS ?=
DEB_PKGS  := cmake gcc make pkg-config libcriterion-dev liburing-dev libhiredis-dev libssl-dev node-llhttp openssl nodejs nats-server redis-server
MISSING    = $(shell for p in $(DEB_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done)

.PHONY: all deps node-deps test-deps build test check check-tsan run run-cluster bench bench-quick bench-deps install clean fuzz soak test-windows lint format format-check

# make fuzz: libFuzzer targets (tests/fuzz/), FUZZ_SECONDS each, on a scratch
# copy of the seed corpus; non-zero exit on a finding (artifacts in FUZZ_BUILD).
FUZZ_BUILD   ?= build-fuzz
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= fuzz_framer fuzz_session fuzz_nats fuzz_redis fuzz_tls fuzz_ws_frames fuzz_ws_upgrade
FUZZ_BACKEND ?=
# make soak: tools/cport-soak under ASan+UBSan+LSan, SOAK_SECONDS per backend.
SOAK_SECONDS ?= 60
SOAK_CLIENTS ?= 200
SOAK_BACKENDS ?= epoll uring

all: build

deps:
	@missing="$(MISSING)"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else \
	    echo "missing Debian packages; run:"; \
	    echo "  sudo apt-get install -y --no-install-recommends $$missing"; exit 1; \
	  fi; \
	fi

# What only the tests use, so that make run and make install do without it:
# iproute2 (ip netns: the dead-peer tests' namespaces), Debian's chromium,
# the headless browser of the WebSocket tests
# (tests/ws_browser.js), and the npm package ws of their Node.js peers
# (tests/ws_peer.js, tests/ws_probe.js), pinned in tests/node/package-lock.json
# and installed there by npm ci, again only when the lock changes.
TEST_PKGS := chromium iproute2 haproxy prometheus
test-deps: deps
	@$(MAKE) --no-print-directory deps DEB_PKGS="$(TEST_PKGS)"
	@$(MAKE) --no-print-directory -s node-deps

# Debian's nodejs has no npm: its own package brings it. A nodejs that bundles
# npm (NodeSource's) provides and conflicts with that package, so it is asked
# for only when npm is missing.
NODE_MODULES = tests/node/node_modules/.package-lock.json
node-deps: $(NODE_MODULES)
$(NODE_MODULES): tests/node/package.json tests/node/package-lock.json
	@command -v npm >/dev/null || $(MAKE) --no-print-directory deps DEB_PKGS=npm
	@echo "npm ci --prefix tests/node"
	@npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

CONFIGURE = cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

$(BUILD)/CMakeCache.txt: | deps
	$(CONFIGURE)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j$(JOBS)

test: build test-deps
	cd $(BUILD) && ctest --output-on-failure -j$(JOBS)

check: deps test-deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCP_SANITIZE=ON -DCP_BENCH=OFF $(CMAKE_FLAGS)
	cmake --build $(ASAN_BUILD) -j$(JOBS)
	cd $(ASAN_BUILD) && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  ctest --output-on-failure -j$(JOBS)

# The whole suite and the stress program under ThreadSanitizer, on every
# backend. The test programs use the Criterion shim (tests/win/criterion);
# tests/CMakeLists.txt gives every test TSAN_OPTIONS=halt_on_error=1, so any
# report fails its test.
check-tsan: deps test-deps
	cmake -S . -B $(TSAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCP_TSAN=ON -DCP_BENCH=OFF $(CMAKE_FLAGS)
	cmake --build $(TSAN_BUILD) -j$(JOBS)
	cd $(TSAN_BUILD) && ctest --output-on-failure -j$(JOBS)

# make run builds only the two programs it runs (not the tests or the
# benchmark peers) and keeps the configure and build output in RUN_LOG, shown
# only if a step fails, so the run's own lines come first. cmake --build runs
# without this make's MAKELEVEL/MAKEFLAGS: as a sub-make the generated
# Makefiles would print "make[1]: Entering directory" at every level.
RUN_LOG = $(BUILD)/make-run.log
# $(call build_run_programs,NAME): that build, as the first step of target NAME.
define build_run_programs
@echo "$(1): building cport-server and cport-dummy in $(BUILD)/"
@mkdir -p $(BUILD); \
{ [ -f $(BUILD)/CMakeCache.txt ] || $(CONFIGURE); } >$(RUN_LOG) 2>&1 && \
env -u MAKELEVEL -u MAKEFLAGS -u MFLAGS \
  cmake --build $(BUILD) -j$(JOBS) --target cport-server cport-dummy >>$(RUN_LOG) 2>&1 || \
  { tail -n 40 $(RUN_LOG); echo "$(1): the build failed; the whole log is $(RUN_LOG)"; exit 1; }
endef
run: deps
	$(call build_run_programs,run)
	@tools/run-main.sh $(BUILD)

# make run-cluster [BUS=redis]: one chat room over 3 cport-server processes
# joined by a local broker (nats-server, or redis-server with BUS=redis; make
# deps installs both), 150 dummy sessions spread over them; see
# tools/run-cluster.sh. About 15 s; loopback only.
BUS ?= nats
run-cluster: deps
	$(call build_run_programs,run-cluster)
	@tools/run-cluster.sh $(BUILD) $(BUS)

# The IOCP backend: cross-build with mingw-w64 (cmake/mingw-w64-x86_64.cmake)
# and run the suite under Wine, headless. Installs mingw-w64 and Wine as root.
WIN_BUILD ?= build-win
test-windows:
	BUILD_WIN=$(WIN_BUILD) tools/test-windows.sh

# The peers (libuv, Asio, libwebsockets) and the chart need more Debian packages: bench/run.sh --deps
# installs them (as root) or prints the command; CMake then re-runs to find them.
bench-deps: deps
	@bench/run.sh --deps
	@if [ -f $(BUILD)/CMakeCache.txt ]; then cmake -S . -B $(BUILD) >/dev/null; fi

bench: bench-deps
	@$(MAKE) --no-print-directory build
	bench/run.sh $(BUILD) full

bench-quick: bench-deps
	@$(MAKE) --no-print-directory build
	bench/run.sh $(BUILD) quick

# make install [PREFIX=DIR]: builds what is installed (the libraries and the
# two programs, not the tests) and installs it under DIR (CMake's
# CMAKE_INSTALL_PREFIX, given at install time: the installed files locate
# themselves relative to where they land); without PREFIX, /usr/local.
install: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j$(JOBS) --target cport cport_static cport-server cport-dummy
	cmake --install $(BUILD) $(if $(PREFIX),--prefix "$(PREFIX)")

clean:
	rm -rf $(BUILD) $(ASAN_BUILD) $(TSAN_BUILD) $(LINT_BUILD)

# make lint: clang-tidy (.clang-tidy) and cppcheck over src/ tools/ examples/,
# and clang-format --dry-run over every C source (make format-check);
# any finding fails. A false positive is suppressed at its line, with the
# reason (NOLINT / cppcheck-suppress). clang-tidy reads the compile commands
# of a configure-only Linux build in LINT_BUILD, so it sees the Linux code
# (iocp.c has none there); cppcheck also checks the Windows side (_WIN32).
LINT_BUILD ?= build-lint
LINT_SRCS   = $(filter-out src/port/iocp.c,$(wildcard src/*.c src/*/*.c)) $(wildcard tools/*.c examples/*.c)
CPPCHECK    = cppcheck --enable=warning,performance,portability --inline-suppr --error-exitcode=1 \
              --std=c11 -q -j$(JOBS)
CPPCHECK_WIN = --platform=win64 -D_WIN32 -D_WIN64 -D_WIN32_WINNT=0x0A00 -DWIN32_LEAN_AND_MEAN -Iinclude -Isrc
# bash with pipefail, so that clang-tidy's failure survives the filter that
# drops its "N warnings generated." lines (the suppressed ones, counted).
lint: SHELL := /bin/bash
lint: .SHELLFLAGS := -o pipefail -c
lint:
	@$(MAKE) --no-print-directory deps DEB_PKGS="cmake gcc make pkg-config liburing-dev libhiredis-dev libssl-dev node-llhttp clang-tidy cppcheck clang-format"
	cmake -S . -B $(LINT_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCMAKE_EXPORT_COMPILE_COMMANDS=ON \
	  -DCP_TESTS=OFF -DCP_BENCH=OFF $(CMAKE_FLAGS) >/dev/null
	@echo "clang-tidy: $(words $(LINT_SRCS)) files"
	@printf '%s\n' $(LINT_SRCS) | xargs -P$(JOBS) -n1 clang-tidy -p $(LINT_BUILD) --quiet --warnings-as-errors='*' 2>&1 \
	  | sed '/ warnings\{0,1\} generated\.$$/d'
	$(CPPCHECK) --project=$(LINT_BUILD)/compile_commands.json --platform=unix64
	$(CPPCHECK) $(CPPCHECK_WIN) src tools/cport-dummy.c tools/cport-server.c examples
	@$(MAKE) --no-print-directory format-check
	@echo "lint: clean"

fuzz:
	@$(MAKE) --no-print-directory deps DEB_PKGS="clang libclang-rt-14-dev pkg-config liburing-dev libhiredis-dev libssl-dev node-llhttp"
	tests/fuzz/build.sh $(FUZZ_BUILD) $(FUZZ_TARGETS)
	@set -e; for t in $(FUZZ_TARGETS); do \
	  rm -rf $(FUZZ_BUILD)/corpus-$$t; mkdir -p $(FUZZ_BUILD)/corpus-$$t $(FUZZ_BUILD)/artifacts-$$t; \
	  cp tests/fuzz/corpus/$$t/* $(FUZZ_BUILD)/corpus-$$t/; \
	  echo "== $$t: $(FUZZ_SECONDS) s"; \
	  $(if $(FUZZ_BACKEND),CP_BACKEND=$(FUZZ_BACKEND)) ASAN_OPTIONS=detect_leaks=0 $(FUZZ_BUILD)/$$t -max_total_time=$(FUZZ_SECONDS) -max_len=70000 \
	    -timeout=30 -print_final_stats=1 -artifact_prefix=$(FUZZ_BUILD)/artifacts-$$t/ \
	    $(FUZZ_BUILD)/corpus-$$t 2>$(FUZZ_BUILD)/$$t.log || { tail -60 $(FUZZ_BUILD)/$$t.log; \
	    echo "$$t: FINDING, see $(FUZZ_BUILD)/artifacts-$$t/"; exit 1; }; \
	  grep -E '^(Done|stat::)' $(FUZZ_BUILD)/$$t.log; \
	  echo "$$t: corpus $$(ls $(FUZZ_BUILD)/corpus-$$t | wc -l) files, no finding"; \
	done

soak: deps
	cmake -S . -B $(ASAN_BUILD) -DCMAKE_BUILD_TYPE=Debug -DCP_SANITIZE=ON -DCP_BENCH=OFF $(CMAKE_FLAGS)
	cmake --build $(ASAN_BUILD) -j$(JOBS) --target cport-soak
	@fail=; for b in $(SOAK_BACKENDS); do \
	  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	    $(ASAN_BUILD)/cport-soak --duration $(SOAK_SECONDS) --clients $(SOAK_CLIENTS) --backend $$b \
	    || fail="$$fail $$b"; \
	done; \
	if [ -n "$$fail" ]; then echo "soak FAILED on:$$fail"; exit 1; fi; echo "soak passed on: $(SOAK_BACKENDS)"

# make format applies .clang-format to every C file; make format-check only
# reports what it would change and fails if anything would.
FORMAT_SRCS = $(shell find src include tests tools bench examples -name '*.[ch]' | sort)
format:
	@$(MAKE) --no-print-directory deps DEB_PKGS=clang-format
	clang-format -i $(FORMAT_SRCS)

format-check:
	@$(MAKE) --no-print-directory deps DEB_PKGS=clang-format
	clang-format --dry-run --Werror $(FORMAT_SRCS)
