# Thin wrappers over the CMake presets. One target per job; add new ones (model, fuzz, stress...)
# as their own block and to .PHONY. `make run` and `make test` install the Debian packages
# first (scripts/install-deps.sh is idempotent and fast when everything is present).
JOBS ?= 2
BENCH_ARGS ?=

.PHONY: all deps build run test bench profile asan tsan debug stress install-test format clean

all: build

deps:
	@./scripts/install-deps.sh

build: deps
	cmake --preset release >/dev/null
	cmake --build --preset release -j $(JOBS)

run: build
	./build/release/tools/pgmap-bench/pgmap-bench --out out $(BENCH_ARGS)

test: build
	ctest --preset release -j $(JOBS) --label-exclude long

bench: build
	./build/release/tools/pgmap-bench/pgmap-bench --out out --full $(BENCH_ARGS)
	@for b in build/release/src/*/*_benchmark; do echo "== $$b"; $$b --benchmark_min_time=0.2 \
	  --benchmark_repetitions=5 --benchmark_report_aggregates_only=true || exit 1; done

# perf profiles of the page cycle, fault and GUP workloads per strategy; shares of liveness work
# (docs/profiles.md). Installs linux-perf on first use (not part of install-deps.sh).
profile: build
	./scripts/profile.sh build/release out/profile

debug: deps
	cmake --preset debug >/dev/null
	cmake --build --preset debug -j $(JOBS)
	ctest --preset debug -j $(JOBS) --label-exclude long

asan: deps
	cmake --preset asan >/dev/null
	cmake --build --preset asan -j $(JOBS)
	ctest --preset asan -j $(JOBS) --label-exclude long

tsan: deps
	cmake --preset tsan >/dev/null
	cmake --build --preset tsan -j $(JOBS)
	ctest --preset tsan -j $(JOBS) --label-exclude long

# Longer stress runs, outside `make test` (which runs a bounded version of each).
# `make stress DURATION=600` runs pgmap-stress for that many seconds over every strategy (pass
# SEED=... to replay a run, STRESS_PRESET=asan|tsan|debug for a build with yield points, after
# `make asan` / `make tsan` / `make debug` built it).
DURATION ?= 120
STRESS_THREADS ?= 3
STRESS_PRESET ?= release
SEED ?= 0
stress: build
	./build/$(STRESS_PRESET)/tools/pgmap-stress/pgmap-stress --duration $(DURATION) \
	  --threads $(STRESS_THREADS) --seed $(SEED)
	PGMAP_STRESS_SECONDS=60 ctest --preset release -L 'property|long' --output-on-failure

install-test: build
	./tests/install/run.sh build/release

# The spin models (docs/model.md): every model passes, every mutant is refuted.
.PHONY: model
model: deps
	./model/check.sh -j $(JOBS)

format:
	find include src tools tests -name '*.h' -o -name '*.cc' | xargs clang-format -i

clean:
	rm -rf build out

# The API-sequence fuzzer (fuzz/, clang + libFuzzer + ASan/UBSan). Runs FUZZ_SECONDS on a working
# corpus under build/fuzz/corpus seeded from fuzz/corpus/; crashes land in build/fuzz/artifacts/.
FUZZ_SECONDS ?= 60
.PHONY: fuzz
fuzz: deps
	cmake --preset fuzz >/dev/null
	cmake --build --preset fuzz -j $(JOBS) --target pgmap_api_fuzzer
	mkdir -p build/fuzz/corpus build/fuzz/artifacts
	./build/fuzz/fuzz/pgmap_api_fuzzer -max_total_time=$(FUZZ_SECONDS) -timeout=60 \
	  -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix=build/fuzz/artifacts/ \
	  build/fuzz/corpus fuzz/corpus
