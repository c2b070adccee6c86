#include "pgmap/core/error.h"

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace pgmap {
namespace {

class Category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "pgmap"; }
  std::string message(int ev) const override { return errc_name(static_cast<Errc>(ev)); }
  std::error_condition default_error_condition(int ev) const noexcept override {
    switch (static_cast<Errc>(ev)) {
      case Errc::ok:
        return {};
      case Errc::invalid_argument:
      case Errc::unaligned:
      case Errc::already_dead:
      case Errc::not_dead:
      case Errc::underflow:
        return std::errc::invalid_argument;
      case Errc::out_of_range:
        return std::errc::result_out_of_range;
      case Errc::overlap:
        return std::errc::file_exists;
      case Errc::busy:
        return std::errc::device_or_resource_busy;
      case Errc::timed_out:
        return std::errc::timed_out;
      case Errc::dead:
      case Errc::released:
      case Errc::use_after_teardown:
        return std::errc::no_such_device_or_address;
      case Errc::not_supported:
        return std::errc::operation_not_supported;
      case Errc::poisoned:
        return std::errc::io_error;
      case Errc::no_memory:
        return std::errc::not_enough_memory;
      case Errc::not_found:
        return std::errc::no_such_file_or_directory;
      case Errc::system_error:
        return std::errc::io_error;
      case Errc::interrupted:
        return std::errc::interrupted;
    }
    return {ev, *this};
  }
};

std::atomic<MisuseHandler> g_handler{nullptr};
std::atomic<std::uint64_t> g_misuse_count{0};

}  // namespace

const std::error_category& error_category() noexcept {
  static const Category category;
  return category;
}

std::error_code make_error_code(Errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

const char* errc_name(Errc e) noexcept {
  switch (e) {
    case Errc::ok:
      return "ok";
    case Errc::invalid_argument:
      return "invalid argument";
    case Errc::out_of_range:
      return "out of range";
    case Errc::unaligned:
      return "unaligned";
    case Errc::overlap:
      return "overlaps an existing range";
    case Errc::busy:
      return "busy";
    case Errc::timed_out:
      return "timed out";
    case Errc::dead:
      return "dead";
    case Errc::already_dead:
      return "already dead";
    case Errc::not_dead:
      return "not dead";
    case Errc::underflow:
      return "put below zero";
    case Errc::released:
      return "already released";
    case Errc::not_supported:
      return "not supported";
    case Errc::poisoned:
      return "poisoned";
    case Errc::no_memory:
      return "out of memory";
    case Errc::not_found:
      return "not found";
    case Errc::system_error:
      return "system error";
    case Errc::use_after_teardown:
      return "use after teardown";
    case Errc::interrupted:
      return "interrupted";
  }
  return "unknown pgmap error";
}

std::string Error::to_string() const {
  std::string s = errc_name(code_);
  if (!message_.empty()) {
    s += ": ";
    s += message_;
  }
  if (sys_errno_ != 0) {
    s += " (";
    s += std::strerror(sys_errno_);
    s += ")";
  }
  return s;
}

void report_misuse(Errc code, const char* what) noexcept {
  g_misuse_count.fetch_add(1, std::memory_order_relaxed);
  if (MisuseHandler h = g_handler.load(std::memory_order_acquire)) {
    h(code, what);
    return;
  }
#ifdef PGMAP_DEBUG_INVARIANTS
  std::fprintf(stderr, "pgmap: API misuse (%s): %s\n", errc_name(code), what);
  std::abort();
#endif
}

MisuseHandler set_misuse_handler(MisuseHandler h) noexcept {
  return g_handler.exchange(h, std::memory_order_acq_rel);
}

std::uint64_t misuse_count() noexcept {
  return g_misuse_count.load(std::memory_order_relaxed);
}

}  // namespace pgmap
