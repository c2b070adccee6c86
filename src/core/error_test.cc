#include "pgmap/core/error.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "pgmap/core/diagnostics.h"

namespace pgmap {
namespace {

// Every enumerator, in declaration order (ok first).
const std::vector<Errc>& all_codes() {
  static const std::vector<Errc> codes = {Errc::ok,
                                          Errc::invalid_argument,
                                          Errc::out_of_range,
                                          Errc::unaligned,
                                          Errc::overlap,
                                          Errc::busy,
                                          Errc::timed_out,
                                          Errc::dead,
                                          Errc::already_dead,
                                          Errc::not_dead,
                                          Errc::underflow,
                                          Errc::released,
                                          Errc::not_supported,
                                          Errc::poisoned,
                                          Errc::no_memory,
                                          Errc::not_found,
                                          Errc::system_error,
                                          Errc::use_after_teardown};
  return codes;
}

TEST(ErrcTest, ImplicitErrorCodeUsesPgmapCategory) {
  std::error_code ec = Errc::busy;
  EXPECT_EQ(&ec.category(), &error_category());
  EXPECT_STREQ(ec.category().name(), "pgmap");
  EXPECT_EQ(ec.value(), static_cast<int>(Errc::busy));
  EXPECT_TRUE(static_cast<bool>(ec));
  EXPECT_EQ(ec.message(), "busy");
  EXPECT_EQ(make_error_code(Errc::timed_out), std::error_code(Errc::timed_out));
}

TEST(ErrcTest, OkIsFalsyErrorCode) {
  std::error_code ec = Errc::ok;
  EXPECT_FALSE(static_cast<bool>(ec));
  EXPECT_EQ(ec.value(), 0);
}

TEST(ErrcTest, ComparesToPosixEquivalents) {
  EXPECT_EQ(std::error_code(Errc::busy), std::errc::device_or_resource_busy);
  EXPECT_EQ(std::error_code(Errc::timed_out), std::errc::timed_out);
  EXPECT_EQ(std::error_code(Errc::invalid_argument), std::errc::invalid_argument);
  EXPECT_EQ(std::error_code(Errc::underflow), std::errc::invalid_argument);
  EXPECT_EQ(std::error_code(Errc::already_dead), std::errc::invalid_argument);
  EXPECT_EQ(std::error_code(Errc::out_of_range), std::errc::result_out_of_range);
  EXPECT_EQ(std::error_code(Errc::overlap), std::errc::file_exists);
  EXPECT_EQ(std::error_code(Errc::dead), std::errc::no_such_device_or_address);
  EXPECT_EQ(std::error_code(Errc::released), std::errc::no_such_device_or_address);
  EXPECT_EQ(std::error_code(Errc::not_supported), std::errc::operation_not_supported);
  EXPECT_EQ(std::error_code(Errc::poisoned), std::errc::io_error);
  EXPECT_EQ(std::error_code(Errc::no_memory), std::errc::not_enough_memory);
  EXPECT_EQ(std::error_code(Errc::not_found), std::errc::no_such_file_or_directory);

  // And not to unrelated ones.
  EXPECT_NE(std::error_code(Errc::busy), std::errc::timed_out);
  EXPECT_NE(std::error_code(Errc::timed_out), std::errc::device_or_resource_busy);
  EXPECT_NE(std::error_code(Errc::dead), std::errc::invalid_argument);
}

TEST(ErrcTest, DistinctCodesAreDistinctErrorCodes) {
  // Two codes mapping to the same POSIX condition are still different error_codes.
  EXPECT_NE(std::error_code(Errc::underflow), std::error_code(Errc::invalid_argument));
  EXPECT_NE(std::error_code(Errc::busy), std::make_error_code(std::errc::device_or_resource_busy));
}

TEST(ErrcTest, EveryCodeHasADistinctName) {
  std::vector<std::string> names;
  for (Errc e : all_codes()) {
    const char* n = errc_name(e);
    ASSERT_NE(n, nullptr);
    EXPECT_GT(std::strlen(n), 0u);
    EXPECT_STRNE(n, "unknown pgmap error") << static_cast<int>(e);
    EXPECT_EQ(std::error_code(e).message(), n);
    for (const std::string& seen : names)
      EXPECT_NE(seen, n);
    names.emplace_back(n);
  }
  EXPECT_STREQ(errc_name(Errc::ok), "ok");
  EXPECT_STREQ(errc_name(Errc::timed_out), "timed out");
  EXPECT_STREQ(errc_name(Errc::underflow), "put below zero");
  EXPECT_STREQ(errc_name(static_cast<Errc>(9999)), "unknown pgmap error");
}

TEST(ErrcTest, EveryNonOkCodeMapsToAGenericCondition) {
  for (Errc e : all_codes()) {
    std::error_condition cond = error_category().default_error_condition(static_cast<int>(e));
    if (e == Errc::ok) {
      EXPECT_FALSE(static_cast<bool>(cond));
    } else {
      EXPECT_EQ(&cond.category(), &std::generic_category()) << errc_name(e);
      EXPECT_NE(cond.value(), 0) << errc_name(e);
    }
  }
}

TEST(ErrorTest, Accessors) {
  Error e(Errc::out_of_range, "pfn 0x42 outside 0x100-0x200", EINVAL);
  EXPECT_EQ(e.code(), Errc::out_of_range);
  EXPECT_EQ(e.message(), "pfn 0x42 outside 0x100-0x200");
  EXPECT_EQ(e.sys_errno(), EINVAL);
  EXPECT_EQ(e.holders(), nullptr);
}

TEST(ErrorTest, ToStringHasNameMessageAndStrerror) {
  Error e(Errc::system_error, "open /dev/dax0.0", ENOENT);
  std::string s = e.to_string();
  EXPECT_NE(s.find("system error"), std::string::npos) << s;
  EXPECT_NE(s.find("open /dev/dax0.0"), std::string::npos) << s;
  EXPECT_NE(s.find(std::strerror(ENOENT)), std::string::npos) << s;
  EXPECT_EQ(s, std::string("system error: open /dev/dax0.0 (") + std::strerror(ENOENT) + ")");
}

TEST(ErrorTest, ToStringWithoutErrnoOrMessage) {
  EXPECT_EQ(Error(Errc::busy, "pagemap 3").to_string(), "busy: pagemap 3");
  EXPECT_EQ(Error(Errc::busy, "").to_string(), "busy");
  // errno 0 means "no OS error": no strerror text.
  std::string s = Error(Errc::dead, "x", 0).to_string();
  EXPECT_EQ(s.find('('), std::string::npos) << s;
}

TEST(ErrorTest, CarriesHolderReport) {
  auto report = std::make_shared<HolderReport>();
  report->object = "pagemap 0x100000-0x140000";
  report->total_busy = 2;
  Error e(Errc::timed_out, "drain", report);
  ASSERT_NE(e.holders(), nullptr);
  EXPECT_EQ(e.holders(), report.get());
  EXPECT_EQ(e.holders()->total_busy, 2u);
  EXPECT_EQ(e.sys_errno(), 0);
  Error copy = e;  // shares the report
  EXPECT_EQ(copy.holders(), report.get());
}

TEST(ResultTest, Value) {
  Result<int> r = 42;
  EXPECT_TRUE(r.ok());
  EXPECT_TRUE(static_cast<bool>(r));
  EXPECT_EQ(r.code(), Errc::ok);
  EXPECT_EQ(r.value(), 42);
  EXPECT_EQ(*r, 42);
  r.value() = 7;
  EXPECT_EQ(*r, 7);
  EXPECT_THROW((void)r.error(), BadResultAccess);
}

TEST(ResultTest, ArrowAndMove) {
  Result<std::string> r = std::string("hello");
  EXPECT_EQ(r->size(), 5u);
  const Result<std::string>& cr = r;
  EXPECT_EQ(cr->size(), 5u);
  EXPECT_EQ(*cr, "hello");
  std::string moved = std::move(r).value();
  EXPECT_EQ(moved, "hello");

  Result<std::unique_ptr<int>> p = std::make_unique<int>(5);
  std::unique_ptr<int> owned = *std::move(p);
  ASSERT_NE(owned, nullptr);
  EXPECT_EQ(*owned, 5);
}

TEST(ResultTest, Error) {
  Result<int> r(Errc::not_found, "no pagemap at pfn 0x10");
  EXPECT_FALSE(r.ok());
  EXPECT_FALSE(static_cast<bool>(r));
  EXPECT_EQ(r.code(), Errc::not_found);
  EXPECT_EQ(r.error().code(), Errc::not_found);
  EXPECT_EQ(r.error().message(), "no pagemap at pfn 0x10");

  Result<int> r2 = Error(Errc::system_error, "mmap", ENOMEM);
  EXPECT_EQ(r2.code(), Errc::system_error);
  EXPECT_EQ(r2.error().sys_errno(), ENOMEM);
}

TEST(ResultTest, ValueOnErrorThrowsWithTheError) {
  Result<int> r(Errc::busy, "pagemap 7 in use");
  EXPECT_THROW((void)r.value(), BadResultAccess);
  EXPECT_THROW((void)*r, BadResultAccess);
  const Result<int>& cr = r;
  EXPECT_THROW((void)cr.value(), BadResultAccess);
  EXPECT_THROW((void)std::move(r).value(), BadResultAccess);
  try {
    (void)cr.value();
    FAIL() << "value() on error did not throw";
  } catch (const BadResultAccess& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("pagemap 7 in use"), std::string::npos) << what;
    EXPECT_NE(what.find("busy"), std::string::npos) << what;
  }
  Result<std::string> s(Errc::dead, "gone");
  EXPECT_THROW((void)s->size(), BadResultAccess);
}

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_TRUE(static_cast<bool>(s));
  EXPECT_EQ(s.code(), Errc::ok);
  EXPECT_EQ(s.to_string(), "ok");
  EXPECT_THROW((void)s.error(), BadResultAccess);
  EXPECT_TRUE(Status(Errc::ok, "ignored").ok());
}

TEST(StatusTest, ErrorAndCopy) {
  Status s(Errc::busy, "pfn 0x1000 pinned");
  EXPECT_FALSE(s.ok());
  EXPECT_EQ(s.code(), Errc::busy);
  EXPECT_EQ(s.error().message(), "pfn 0x1000 pinned");
  EXPECT_EQ(s.to_string(), "busy: pfn 0x1000 pinned");

  Status copy(s);  // deep copy: independent Error object
  EXPECT_EQ(copy.code(), Errc::busy);
  EXPECT_EQ(copy.error().message(), "pfn 0x1000 pinned");
  EXPECT_NE(&copy.error(), &s.error());

  Status assigned;
  assigned = s;
  EXPECT_EQ(assigned.code(), Errc::busy);
  EXPECT_NE(&assigned.error(), &s.error());
  assigned = Status();
  EXPECT_TRUE(assigned.ok());
  EXPECT_EQ(s.code(), Errc::busy);  // the source is untouched

  Status ok_copy(assigned);
  EXPECT_TRUE(ok_copy.ok());
}

TEST(StatusTest, Move) {
  Status s = Error(Errc::timed_out, "drain", ETIMEDOUT);
  const Error* addr = &s.error();
  Status moved(std::move(s));
  EXPECT_EQ(moved.code(), Errc::timed_out);
  EXPECT_EQ(&moved.error(), addr);  // moved, not copied
  EXPECT_EQ(moved.error().sys_errno(), ETIMEDOUT);

  Status target;
  target = std::move(moved);
  EXPECT_EQ(target.code(), Errc::timed_out);
  EXPECT_EQ(&target.error(), addr);
}

// ---- misuse reporting ---------------------------------------------------------------------------

std::atomic<int> g_calls{0};
std::atomic<Errc> g_last_code{Errc::ok};
std::mutex g_last_what_mu;
std::string g_last_what;  // guarded by g_last_what_mu: the handler may run on any thread

void counting_handler(Errc code, const char* what) {
  g_calls.fetch_add(1);
  g_last_code.store(code);
  std::lock_guard<std::mutex> lock(g_last_what_mu);
  g_last_what = what;
}

std::string last_what() {
  std::lock_guard<std::mutex> lock(g_last_what_mu);
  return g_last_what;
}

void other_handler(Errc, const char*) {}

class MisuseTest : public ::testing::Test {
 protected:
  void SetUp() override {
    g_calls = 0;
    g_last_code.store(Errc::ok);
    {
      std::lock_guard<std::mutex> lock(g_last_what_mu);
      g_last_what.clear();
    }
    previous_ = set_misuse_handler(&counting_handler);
  }
  void TearDown() override { EXPECT_EQ(set_misuse_handler(previous_), &counting_handler); }
  MisuseHandler previous_ = nullptr;
};

TEST_F(MisuseTest, HandlerReceivesCodeAndText) {
  std::uint64_t before = misuse_count();
  report_misuse(Errc::underflow, "put below zero on ref 3");
  EXPECT_EQ(g_calls.load(), 1);
  EXPECT_EQ(g_last_code.load(), Errc::underflow);
  EXPECT_EQ(last_what(), "put below zero on ref 3");
  EXPECT_EQ(misuse_count(), before + 1);

  report_misuse(Errc::already_dead, "double kill");
  EXPECT_EQ(g_calls.load(), 2);
  EXPECT_EQ(g_last_code.load(), Errc::already_dead);
  EXPECT_EQ(misuse_count(), before + 2);
}

TEST_F(MisuseTest, SetReturnsPreviousHandler) {
  EXPECT_EQ(set_misuse_handler(&other_handler), &counting_handler);
  report_misuse(Errc::busy, "to the other handler");
  EXPECT_EQ(g_calls.load(), 0);  // counting_handler no longer installed
  EXPECT_EQ(set_misuse_handler(&counting_handler), &other_handler);
  report_misuse(Errc::busy, "back");
  EXPECT_EQ(g_calls.load(), 1);
}

TEST_F(MisuseTest, CountIncreasesAcrossThreads) {
  std::uint64_t before = misuse_count();
  constexpr int kThreads = 2;
  constexpr int kEach = 100;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([] {
      for (int i = 0; i < kEach; ++i)
        report_misuse(Errc::released, "get after release");
    });
  }
  for (auto& t : threads)
    t.join();
  EXPECT_EQ(misuse_count(), before + kThreads * kEach);
  EXPECT_EQ(g_calls.load(), kThreads * kEach);
}

#ifndef PGMAP_DEBUG_INVARIANTS
TEST(MisuseDefaultTest, WithoutHandlerReleaseBuildOnlyCounts) {
  MisuseHandler prev = set_misuse_handler(nullptr);
  std::uint64_t before = misuse_count();
  report_misuse(Errc::not_dead, "resurrect of a live ref");  // must not abort
  EXPECT_EQ(misuse_count(), before + 1);
  EXPECT_EQ(set_misuse_handler(prev), nullptr);
}
#else
TEST(MisuseDefaultDeathTest, WithoutHandlerDebugBuildAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        set_misuse_handler(nullptr);
        report_misuse(Errc::not_dead, "resurrect of a live ref");
      },
      "API misuse \\(not dead\\): resurrect of a live ref");
}
#endif

}  // namespace
}  // namespace pgmap
