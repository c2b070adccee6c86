# One helper per target kind, in the manner of abseil's absl_cc_library(): every library, test,
# benchmark and binary of the project is declared through these, so flags live in one place.

set(PGMAP_COMMON_WARNINGS -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wold-style-cast
    -Wcast-align -Wunused -Woverloaded-virtual -Wconversion -Wsign-conversion -Wnull-dereference
    -Wdouble-promotion -Wformat=2 -Wimplicit-fallthrough)

function(_pgmap_apply_common target)
  target_compile_options(${target} PRIVATE ${PGMAP_COMMON_WARNINGS})
  if(PGMAP_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
  if(PGMAP_DEBUG_INVARIANTS)
    target_compile_definitions(${target} PRIVATE PGMAP_DEBUG_INVARIANTS=1)
  endif()
  if(PGMAP_SANITIZE STREQUAL "address")
    target_compile_options(${target} PRIVATE -fsanitize=address,undefined -fno-omit-frame-pointer
                                             -fno-sanitize-recover=undefined)
    target_link_options(${target} PRIVATE -fsanitize=address,undefined)
  elseif(PGMAP_SANITIZE STREQUAL "thread")
    target_compile_options(${target} PRIVATE -fsanitize=thread -fno-omit-frame-pointer)
    target_link_options(${target} PRIVATE -fsanitize=thread)
  elseif(NOT PGMAP_SANITIZE STREQUAL "")
    message(FATAL_ERROR "PGMAP_SANITIZE must be '', 'address' or 'thread'")
  endif()
endfunction()

# Compile definitions that change what the public headers declare or inline: every target that
# includes them, in-tree or installed, must see the same set.
set(PGMAP_PUBLIC_DEFINITIONS)
if(PGMAP_DEBUG_INVARIANTS)
  list(APPEND PGMAP_PUBLIC_DEFINITIONS PGMAP_DEBUG_INVARIANTS=1)
endif()
if(PGMAP_YIELD_POINTS)
  list(APPEND PGMAP_PUBLIC_DEFINITIONS PGMAP_YIELD_POINTS=1)
endif()
if(NOT PGMAP_PERCPU_RSEQ)
  list(APPEND PGMAP_PUBLIC_DEFINITIONS PGMAP_PERCPU_NO_RSEQ=1)
endif()
if(PGMAP_SANITIZE STREQUAL "address")
  list(APPEND PGMAP_PUBLIC_DEFINITIONS PGMAP_ASAN=1)
elseif(PGMAP_SANITIZE STREQUAL "thread")
  list(APPEND PGMAP_PUBLIC_DEFINITIONS PGMAP_TSAN=1)
endif()

# pgmap::internal: the private headers under src/ (core/heavy_barrier.h, memory/testing/..., the
# mm page table) for the in-tree tests, benchmarks and tools. Never installed or exported: src/
# is not an include directory of any exported target. pgmap_cc_test, pgmap_cc_benchmark and
# pgmap_cc_binary link it.
add_library(pgmap_internal INTERFACE)
add_library(pgmap::internal ALIAS pgmap_internal)
target_include_directories(pgmap_internal INTERFACE ${PROJECT_SOURCE_DIR}/src)

# pgmap_cc_library(NAME core SRCS a.cc b.cc DEPS pgmap::core fmt::fmt)
# Compiles the sources once, into object library pgmap_<NAME>_objects, and makes from them:
#  - static library pgmap_<NAME> (alias pgmap::<NAME>), what in-tree tests, benchmarks and
#    pgmap-bench link (with liburcu's static archives when present: local-exec TLS, see the
#    top-level CMakeLists.txt);
#  - its share of the installed libpgmap.so and libpgmap.a (cmake/PgmapInstall.cmake collects
#    every layer's objects through the global property PGMAP_OBJECT_LIBRARIES).
# The objects are position-independent and use the initial-exec TLS model, so the shared library
# reaches detail::t_counters and its other thread_locals without __tls_get_addr (in a static link
# the linker relaxes initial-exec to local-exec, as before). src/ is a PRIVATE include directory.
function(pgmap_cc_library)
  cmake_parse_arguments(ARG "" "NAME" "SRCS;DEPS;PRIVATE_DEPS" ${ARGN})
  set(target pgmap_${ARG_NAME})
  set(objects pgmap_${ARG_NAME}_objects)
  add_library(${objects} OBJECT ${ARG_SRCS})
  target_include_directories(${objects}
      PUBLIC $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
      PRIVATE ${PROJECT_SOURCE_DIR}/src)
  target_compile_definitions(${objects} PUBLIC ${PGMAP_PUBLIC_DEFINITIONS})
  target_compile_options(${objects} PRIVATE -ftls-model=initial-exec)
  target_link_libraries(${objects} PUBLIC ${ARG_DEPS} PRIVATE ${ARG_PRIVATE_DEPS})
  _pgmap_apply_common(${objects})
  add_library(${target} STATIC)
  add_library(pgmap::${ARG_NAME} ALIAS ${target})
  target_link_libraries(${target} PUBLIC ${objects})
  set_property(GLOBAL APPEND PROPERTY PGMAP_LIBRARIES ${target})
  set_property(GLOBAL APPEND PROPERTY PGMAP_OBJECT_LIBRARIES ${objects})
endfunction()

# pgmap_cc_test(NAME percpu_ref_test SRCS percpu_ref_test.cc DEPS pgmap::core LABELS unit
#               [TIMEOUT 120])
# Labels used: unit, concurrency, property, stress. The sanitizer targets run unit+concurrency.
function(pgmap_cc_test)
  cmake_parse_arguments(ARG "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS;ARGS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} pgmap::internal GTest::gtest
                                            GTest::gtest_main GTest::gmock)
  _pgmap_apply_common(${ARG_NAME})
  add_test(NAME ${ARG_NAME} COMMAND ${ARG_NAME} ${ARG_ARGS})
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  set_tests_properties(${ARG_NAME} PROPERTIES LABELS "${ARG_LABELS}" TIMEOUT ${ARG_TIMEOUT}
      ENVIRONMENT "ASAN_OPTIONS=halt_on_error=1:abort_on_error=1:detect_leaks=1;UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1;TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1;MALLOC_PERTURB_=64")
endfunction()

# pgmap_cc_benchmark(NAME percpu_ref_benchmark SRCS ... DEPS ...): Google Benchmark binary.
function(pgmap_cc_benchmark)
  cmake_parse_arguments(ARG "" "NAME" "SRCS;DEPS" ${ARGN})
  if(NOT PGMAP_BUILD_BENCHMARKS)
    return()
  endif()
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} pgmap::internal benchmark::benchmark
                                            benchmark::benchmark_main)
  _pgmap_apply_common(${ARG_NAME})
endfunction()

# pgmap_cc_binary(NAME pgmap-bench SRCS ... DEPS ... [INSTALL])
function(pgmap_cc_binary)
  cmake_parse_arguments(ARG "INSTALL" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${ARG_NAME} ${ARG_SRCS})
  target_link_libraries(${ARG_NAME} PRIVATE ${ARG_DEPS} pgmap::internal)
  _pgmap_apply_common(${ARG_NAME})
  if(ARG_INSTALL)
    install(TARGETS ${ARG_NAME} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
  endif()
endfunction()
