#include "pgmap/core/rcu.h"

#include <urcu/urcu-memb.h>

namespace pgmap::rcu {
namespace {

// Registers the thread with liburcu on first use and unregisters it when the thread exits.
struct ThreadRegistration {
  bool registered = false;
  int depth = 0;
  void ensure() noexcept {
    if (!registered) {
      urcu_memb_register_thread();
      registered = true;
    }
  }
  ~ThreadRegistration() {
    if (registered) urcu_memb_unregister_thread();
  }
};

thread_local ThreadRegistration t_reg;

}  // namespace

void read_lock() noexcept {
  t_reg.ensure();
  ++t_reg.depth;
  urcu_memb_read_lock();
}

void read_unlock() noexcept {
  urcu_memb_read_unlock();
  --t_reg.depth;
}

bool in_read_section() noexcept { return t_reg.depth > 0; }

Errc synchronize() noexcept {
  if (in_read_section()) {
    report_misuse(Errc::invalid_argument, "rcu::synchronize() inside a read section");
    return Errc::invalid_argument;
  }
  urcu_memb_synchronize_rcu();
  return Errc::ok;
}

}  // namespace pgmap::rcu
