# Install: headers, libpgmap.so (with a SONAME) and libpgmap.a made from every layer's objects,
# an exported CMake package (find_package(pgmap) -> pgmap::pgmap, the shared library, and
# pgmap::pgmap_static) and a pkg-config file (pkg-config --cflags --libs [--static] pgmap).
#
# In-tree targets do not link these: tests, benchmarks and pgmap-bench link the per-layer static
# libraries (pgmap::core ... pgmap::pgmap) with liburcu's static archives. The installed
# libraries link liburcu the ordinary way (Debian's liburcu .a is not position-independent: its
# objects use local-exec TLS and cannot go into a shared object), so an RCU read section called
# through libpgmap.so reaches liburcu's thread-local state through __tls_get_addr (~19 ns per read
# section here instead of ~8 ns). pgmap's own thread_locals use initial-exec TLS in both forms.
# README.md "Performance" and docs/architecture.md "Build" describe the trade-off.
include(CMakePackageConfigHelpers)

get_property(_pgmap_objects GLOBAL PROPERTY PGMAP_OBJECT_LIBRARIES)
set(_pgmap_object_files)
foreach(_o IN LISTS _pgmap_objects)
  list(APPEND _pgmap_object_files $<TARGET_OBJECTS:${_o}>)
endforeach()

# Usage requirements shared by both installed forms.
function(_pgmap_installed_interface target)
  target_include_directories(${target} INTERFACE
      $<BUILD_INTERFACE:${PROJECT_SOURCE_DIR}/include>
      $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
  target_compile_features(${target} INTERFACE cxx_std_20)
  target_compile_definitions(${target} INTERFACE ${PGMAP_PUBLIC_DEFINITIONS})
endfunction()

set(_pgmap_installed pgmap_static)
add_library(pgmap_static STATIC ${_pgmap_object_files})
set_target_properties(pgmap_static PROPERTIES OUTPUT_NAME pgmap EXPORT_NAME pgmap_static)
_pgmap_installed_interface(pgmap_static)
target_link_libraries(pgmap_static INTERFACE fmt::fmt PkgConfig::URCU Threads::Threads)

if(PGMAP_BUILD_SHARED)
  add_library(pgmap_shared SHARED ${_pgmap_object_files})
  # 0.x: every minor version may change the ABI, so the SONAME carries major.minor.
  set_target_properties(pgmap_shared PROPERTIES OUTPUT_NAME pgmap EXPORT_NAME pgmap
      VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}.${PROJECT_VERSION_MINOR})
  _pgmap_installed_interface(pgmap_shared)
  target_link_libraries(pgmap_shared PRIVATE fmt::fmt PkgConfig::URCU PUBLIC Threads::Threads)
  # Every symbol the library uses is resolved at its own link: no hidden dependency on the
  # consumer linking fmt or liburcu.
  target_link_options(pgmap_shared PRIVATE -Wl,-z,defs)
  list(APPEND _pgmap_installed pgmap_shared)
  set(PGMAP_PC_LIBS_PRIVATE "")
else()
  # Only the archive is installed: the plain pkg-config form must name the dependencies too.
  set_target_properties(pgmap_static PROPERTIES EXPORT_NAME pgmap)
endif()

install(TARGETS ${_pgmap_installed} EXPORT pgmapTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(DIRECTORY include/pgmap DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT pgmapTargets NAMESPACE pgmap:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pgmap)

configure_package_config_file(cmake/pgmapConfig.cmake.in
    ${CMAKE_CURRENT_BINARY_DIR}/pgmapConfig.cmake
    INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pgmap)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/pgmapConfigVersion.cmake
    VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pgmapConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/pgmapConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pgmap)

# The .pc file locates the prefix relative to itself, so an installed tree can be moved.
file(RELATIVE_PATH PGMAP_PC_PREFIX_FROM_PCDIR "${CMAKE_INSTALL_FULL_LIBDIR}/pkgconfig"
     "${CMAKE_INSTALL_PREFIX}")
string(JOIN " " PGMAP_PC_CFLAGS_DEFINES ${PGMAP_PUBLIC_DEFINITIONS})
if(PGMAP_PC_CFLAGS_DEFINES)
  string(REGEX REPLACE "([^ ]+)" "-D\\1" PGMAP_PC_CFLAGS_DEFINES "${PGMAP_PC_CFLAGS_DEFINES}")
endif()
if(PGMAP_BUILD_SHARED)
  set(PGMAP_PC_REQUIRES "")
  set(PGMAP_PC_REQUIRES_PRIVATE "liburcu-memb fmt")
else()
  set(PGMAP_PC_REQUIRES "liburcu-memb fmt")
  set(PGMAP_PC_REQUIRES_PRIVATE "")
endif()
configure_file(cmake/pgmap.pc.in ${CMAKE_CURRENT_BINARY_DIR}/pgmap.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pgmap.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
