#include "fs_oracle.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

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

namespace {
constexpr std::uint64_t kRecordTag = 0xa5;  // top byte; a DIO mark word's top byte is >= 0x80 but
                                            // repeats in every byte, so 0xa5a5... is no record
std::uint64_t record_check(std::uint64_t body) {
  std::uint64_t h = (body ^ 0x9e3779b97f4a7c15ull) * 0x100000001b3ull;
  return (h ^ (h >> 29)) & 0xfff;
}
}  // namespace

// tag 8 bits | gen 8 | ino 24 | page 12 | check 12
std::uint64_t record_word(std::uint64_t gen, std::uint64_t ino, std::uint64_t page) {
  const std::uint64_t body =
      (kRecordTag << 56) | ((gen & 0xff) << 48) | ((ino & 0xffffff) << 24) | ((page & 0xfff) << 12);
  return body | record_check(body);
}

std::byte dio_fill(std::uint64_t ino) {
  return static_cast<std::byte>(0x80u | (ino & 0x7fu));
}

std::optional<std::string> check_page(std::span<const std::byte> page, std::uint64_t ino,
                                      std::uint64_t gen, const Lineage& lineage) {
  const std::set<std::uint64_t> ok = lineage.of(ino);
  auto mark_word = [](std::byte b) {
    return 0x0101010101010101ull * std::to_integer<std::uint64_t>(b);
  };
  for (std::size_t i = 0; i + sizeof(std::uint64_t) <= page.size(); i += sizeof(std::uint64_t)) {
    std::uint64_t w = 0;
    std::memcpy(&w, page.data() + i, sizeof w);
    if (w == 0) continue;
    const bool marked = std::any_of(ok.begin(), ok.end(),
                                    [&](std::uint64_t x) { return w == mark_word(dio_fill(x)); });
    if (marked) continue;
    if (i == 0 && (w >> 56) == kRecordTag) {
      if (record_check(w & ~std::uint64_t{0xfff}) != (w & 0xfff))
        return fmt::format("corrupt record {:#018x}", w);
      const std::uint64_t rgen = (w >> 48) & 0xff;
      const std::uint64_t rino = (w >> 24) & 0xffffff;
      // Inode numbers of one run stay below 2^24, so the stored bits are the whole number.
      if (rgen != (gen & 0xff) || ok.count(rino) == 0)
        return fmt::format("record of gen {} ino {} in gen {} ino {}", rgen, rino, gen, ino);
      continue;
    }
    if ((w & 0xff) >= 0x80 && w == mark_word(static_cast<std::byte>(w & 0xff))) {
      return fmt::format(
          "DIO mark {:#x} of another file in ino {} (a pinned block was handed over)",
          static_cast<unsigned>(w & 0xff), ino);
    }
    return fmt::format("garbage {:#018x} at byte {}", w, i);
  }
  return std::nullopt;
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
