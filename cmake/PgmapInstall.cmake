# Install: headers, the static libraries, an exported CMake package (find_package(pgmap) ->
# pgmap::pgmap) and a pkg-config file (pkg-config --cflags --libs pgmap).
include(CMakePackageConfigHelpers)

get_property(_pgmap_libs GLOBAL PROPERTY PGMAP_LIBRARIES)
install(TARGETS ${_pgmap_libs} EXPORT pgmapTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY include/pgmap DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT pgmapTargets NAMESPACE pgmap:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pgmap)

configure_package_config_file(cmake/pgmapConfig.cmake.in
    ${CMAKE_CURRENT_BINARY_DIR}/pgmapConfig.cmake
    INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pgmap)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/pgmapConfigVersion.cmake
    VERSION ${PROJECT_VERSION} COMPATIBILITY SameMajorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pgmapConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/pgmapConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pgmap)

# The .pc file locates the prefix relative to itself, so an installed tree can be moved.
file(RELATIVE_PATH PGMAP_PC_PREFIX_FROM_PCDIR "${CMAKE_INSTALL_FULL_LIBDIR}/pkgconfig"
     "${CMAKE_INSTALL_PREFIX}")
configure_file(cmake/pgmap.pc.in ${CMAKE_CURRENT_BINARY_DIR}/pgmap.pc @ONLY)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/pgmap.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
