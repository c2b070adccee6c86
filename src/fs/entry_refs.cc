#include "pgmap/fs/entry_refs.h"

#include <cstdio>

namespace pgmap::fs {

Errc get_entry_refs(DevPagemap& pg, std::uint64_t pages) noexcept {
  return pg.tryget_live_many(pages) ? Errc::ok : Errc::dead;
}

void put_entry_refs(DevPagemap& pg, std::uint64_t pages) noexcept {
  if (Errc e = pg.put_refs(pages); e != Errc::ok) [[unlikely]] {
    // A put of references get_entry_refs took cannot underflow unless the caller misused the
    // pair; say so instead of dropping it silently.
    std::fprintf(stderr, "pgmap fs: entry reference put failed (%s)\n", errc_name(e));
  }
}

}  // namespace pgmap::fs
