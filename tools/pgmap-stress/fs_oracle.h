// What the fs stress (fs_stress.cc) knows about which files may legitimately meet on a block:
// the reflink lineage of every file, and the generic/503 check built on it — no block held by a
// pipe or a DIO pin is handed to a file outside the holder's lineage.
//
// A reflink makes the destination share the source's blocks, so the destination's pages may hold
// the source's bytes (and those of every file the source got blocks from): Lineage::of(dst) grows
// by of(src). Two files can both own one block only if that block came, through reflinks, from a
// file both lineages contain: the file that allocated it. So a held block whose owner's lineage
// does not meet the holder's was freed and allocated again while it was held: that is the
// hand-over generic/503 guards against. A block freed and reallocated to a related file is not
// caught here (the data oracle may still see its bytes).
//
// Not thread-safe (the stress guards it with its own mutex).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "pgmap/memory/pfn.h"

namespace pgmap {
class DevPagemap;
namespace fs {
class DaxFs;
}
}  // namespace pgmap

namespace pgmap::stress {

class Lineage {
 public:
  // Before reflink(src, dst) is tried: from then on dst's pages may hold src's bytes (whether the
  // reflink succeeds or not; a lineage only ever widens the oracle).
  void reflinked(std::uint64_t src, std::uint64_t dst);
  // `ino` and every file whose bytes its pages may hold.
  std::set<std::uint64_t> of(std::uint64_t ino) const;
  // Whether a and b may both own one block: their lineages meet.
  bool may_share(std::uint64_t a, std::uint64_t b) const;
  void clear() { from_.clear(); }

 private:
  std::map<std::uint64_t, std::set<std::uint64_t>> from_;  // ino -> inos reflinked into it
};

// The bytes a worker writes at the start of a page: one aligned 8-byte word naming the device
// generation, the file (inode) written through and the file page, with a check. Shared memory
// moves in whole aligned words (memory/device_bytes.h), so a read racing a write sees the whole
// record or none of it; a page is only ever written in whole words (records, the DIO fill, the
// fs's zeroing), so a racing read can mix words of two writes but never tear one.
std::uint64_t record_word(std::uint64_t gen, std::uint64_t ino, std::uint64_t page);
// What a DIO completion fills its pinned page with: the pinning file's mark.
std::byte dio_fill(std::uint64_t ino);

// The data oracle for one page of file `ino` (4 KiB), word by word: every word is zero, or the
// DIO mark of a file in the lineage of `ino`, or (the first word) a record of generation `gen`
// written through a file of that lineage. A page may mix them (a read racing a write). Returns
// what is wrong, or nothing.
std::optional<std::string> check_page(std::span<const std::byte> page, std::uint64_t ino,
                                      std::uint64_t gen, const Lineage& lineage);

// A page held by a pipe (a reference) or a DIO request (a pin), with the file it came from.
struct HeldPage {
  Pfn pfn = 0;
  std::uint64_t ino = 0;
  const char* holder = "";  // "pipe", "DIO pin"
};

// One line per held block that some file of `fs` owns although that file's lineage does not meet
// the holder's. Pages outside the pagemap (the zero page) are skipped. `pgmap` must be alive.
std::vector<std::string> handed_over(const DevPagemap& pgmap, const fs::DaxFs& fs,
                                     std::span<const HeldPage> held, const Lineage& lineage);

}  // namespace pgmap::stress
