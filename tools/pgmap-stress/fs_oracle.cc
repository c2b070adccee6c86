#include "fs_oracle.h"

#include <fmt/format.h>

#include <algorithm>

#include "pgmap/fs/dax_fs.h"
#include "pgmap/fs/inode.h"
#include "pgmap/memory/dev_pagemap.h"

namespace pgmap::stress {

void Lineage::reflinked(std::uint64_t src, std::uint64_t dst) {
  std::set<std::uint64_t> s = of(src);
  from_[dst].insert(s.begin(), s.end());
}

std::set<std::uint64_t> Lineage::of(std::uint64_t ino) const {
  std::set<std::uint64_t> s;
  if (auto it = from_.find(ino); it != from_.end()) s = it->second;
  s.insert(ino);
  return s;
}

bool Lineage::may_share(std::uint64_t a, std::uint64_t b) const {
  const std::set<std::uint64_t> la = of(a);
  const std::set<std::uint64_t> lb = of(b);
  return std::any_of(la.begin(), la.end(), [&](std::uint64_t x) { return lb.count(x) != 0; });
}

std::vector<std::string> handed_over(const DevPagemap& pgmap, const fs::DaxFs& fs,
                                     std::span<const HeldPage> held, const Lineage& lineage) {
  const Pfn base = pgmap.range(0).start;
  std::map<std::uint64_t, std::set<std::uint64_t>> owners;  // block -> inos
  for (const auto& inode : fs.inodes()) {
    for (const auto& [page, block] : inode->snapshot().blocks)
      owners[block].insert(inode->ino());
  }
  std::vector<std::string> out;
  for (const HeldPage& h : held) {
    if (!pgmap.contains(h.pfn)) continue;  // the zero page
    auto it = owners.find(h.pfn - base);
    if (it == owners.end()) continue;  // free: nobody else can read it
    for (std::uint64_t o : it->second) {
      if (!lineage.may_share(h.ino, o)) {
        out.push_back(fmt::format("block {} held by a {} of ino {} belongs to ino {}", h.pfn - base,
                                  h.holder, h.ino, o));
      }
    }
  }
  return out;
}

}  // namespace pgmap::stress
