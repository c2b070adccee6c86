// pgmap's error type.
//
// Every fallible operation returns either an `Errc` (hot paths: a trivially copyable enum, zero
// cost on success) or a `Result<T>` / `Status` (cold paths: carries a message and, for teardown
// failures, the report of who still holds what). Errors are values, never exceptions, and an
// operation that returns an error has changed nothing unless its contract says otherwise.
//
// `Errc` plugs into <system_error>, so `std::error_code ec = Errc::busy;` works and
// `ec == std::errc::device_or_resource_busy` compares as the POSIX equivalent.
//
// API misuse (double kill, put below zero, get after release, ...) is reported through the same
// codes and additionally through `report_misuse()`, which aborts in PGMAP_DEBUG_INVARIANTS
// builds ("loud in debug, typed error in release") unless a test installed its own handler.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>

namespace pgmap {

enum class [[nodiscard]] Errc : int{
    ok = 0,
    invalid_argument,    // malformed request (zero length, bad flags, ...)
    out_of_range,        // pfn, offset or length outside the object
    unaligned,           // address, offset or length not aligned to what the object needs
    overlap,             // range overlaps an existing one
    busy,                // EBUSY: the object is in use and the caller asked not to wait
    timed_out,           // a bounded wait expired; see the holder report
    dead,                // the object is being torn down or was torn down (ENXIO-like)
    already_dead,        // kill/memunmap on an object that was already killed
    not_dead,            // resurrect/reinit of a live object
    underflow,           // put below zero
    released,            // get on an object whose count already reached zero
    not_supported,       // EOPNOTSUPP: e.g. a long-term pin on fsdax
    poisoned,            // memory failure recorded on the page
    no_memory,           // an allocation or mapping failed
    not_found,           // no such object (device file, pagemap at pfn, ...)
    system_error,        // an OS call failed; the message carries errno
    use_after_teardown,  // an access reached metadata that was already torn down (quarantine)
    interrupted,         // EINTR / ERESTARTSYS: an interruptible wait was interrupted
};

const std::error_category& error_category() noexcept;
std::error_code make_error_code(Errc e) noexcept;
const char* errc_name(Errc e) noexcept;

struct HolderReport;  // diagnostics.h

// A failed operation: the code, a human-readable message with the context (which pfn, which
// range), the errno when an OS call failed, and optionally who still holds the object.
class Error {
 public:
  Error(Errc code, std::string message, int sys_errno = 0)
      : code_(code), message_(std::move(message)), sys_errno_(sys_errno) {}
  Error(Errc code, std::string message, std::shared_ptr<const HolderReport> holders)
      : code_(code), message_(std::move(message)), holders_(std::move(holders)) {}

  Errc code() const noexcept { return code_; }
  const std::string& message() const noexcept { return message_; }
  int sys_errno() const noexcept { return sys_errno_; }
  const HolderReport* holders() const noexcept { return holders_.get(); }
  std::string to_string() const;

 private:
  Errc code_;
  std::string message_;
  int sys_errno_ = 0;
  std::shared_ptr<const HolderReport> holders_;
};

// Thrown only by Result<T>::value() on an error: reading a value that is not there is a
// programming error, not an expected outcome.
class BadResultAccess : public std::exception {
 public:
  explicit BadResultAccess(std::string what) : what_(std::move(what)) {}
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  std::string what_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT
  Result(Errc code, std::string message) : v_(std::in_place_index<1>, code, std::move(message)) {}

  bool ok() const noexcept { return v_.index() == 0; }
  explicit operator bool() const noexcept { return ok(); }
  Errc code() const noexcept { return ok() ? Errc::ok : std::get<1>(v_).code(); }

  T& value() & {
    check();
    return std::get<0>(v_);
  }
  const T& value() const& {
    check();
    return std::get<0>(v_);
  }
  T&& value() && {
    check();
    return std::get<0>(std::move(v_));
  }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const {
    if (ok()) throw BadResultAccess("pgmap::Result::error() on a value");
    return std::get<1>(v_);
  }

 private:
  void check() const {
    if (!ok())
      throw BadResultAccess("pgmap::Result::value() on error: " + std::get<1>(v_).to_string());
  }
  std::variant<T, Error> v_;
};

// Result<void>: success or an Error.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Error error) : error_(std::make_unique<Error>(std::move(error))) {}  // NOLINT
  Status(Errc code, std::string message) {
    if (code != Errc::ok) error_ = std::make_unique<Error>(code, std::move(message));
  }
  Status(const Status& o) : error_(o.error_ ? std::make_unique<Error>(*o.error_) : nullptr) {}
  Status& operator=(const Status& o) {
    error_ = o.error_ ? std::make_unique<Error>(*o.error_) : nullptr;
    return *this;
  }
  Status(Status&&) noexcept = default;
  Status& operator=(Status&&) noexcept = default;

  bool ok() const noexcept { return !error_; }
  explicit operator bool() const noexcept { return ok(); }
  Errc code() const noexcept { return error_ ? error_->code() : Errc::ok; }
  const Error& error() const {
    if (!error_) throw BadResultAccess("pgmap::Status::error() on success");
    return *error_;
  }
  std::string to_string() const { return error_ ? error_->to_string() : "ok"; }

 private:
  std::unique_ptr<Error> error_;
};

// ---- misuse reporting -------------------------------------------------------------------------

// Called on API misuse with the code that the call also returns and a description.
using MisuseHandler = void (*)(Errc code, const char* what);

// Reports misuse: runs the installed handler; with no handler, aborts with a message in
// PGMAP_DEBUG_INVARIANTS builds and does nothing otherwise (the caller returns the typed error).
void report_misuse(Errc code, const char* what) noexcept;

// Installs `h` (nullptr restores the default) and returns the previous handler. Thread-safe.
MisuseHandler set_misuse_handler(MisuseHandler h) noexcept;

// Number of misuse reports since process start (for tests and diagnostics).
std::uint64_t misuse_count() noexcept;

}  // namespace pgmap

template <>
struct std::is_error_code_enum<pgmap::Errc> : std::true_type {};
