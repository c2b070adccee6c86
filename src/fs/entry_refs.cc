#include "pgmap/fs/entry_refs.h"

#include <cstdio>

namespace pgmap::fs {

Errc get_entry_refs(DevPagemap& pg, std::uint64_t pages) noexcept {
  for (std::uint64_t i = 0; i < pages; ++i) {
    if (!pg.tryget_live()) [[unlikely]] {
      put_entry_refs(pg, i);  // ours, taken just now
      return Errc::dead;
    }
  }
  return Errc::ok;
}

void put_entry_refs(DevPagemap& pg, std::uint64_t pages) noexcept {
  for (std::uint64_t i = 0; i < pages; ++i) {
    if (Errc e = pg.put_ref(); e != Errc::ok) [[unlikely]] {
      // A put of a reference get_entry_refs took cannot underflow unless the caller misused the
      // pair; say so instead of dropping it silently.
      std::fprintf(stderr, "pgmap fs: entry reference put failed (%s)\n", errc_name(e));
    }
  }
}

}  // namespace pgmap::fs
