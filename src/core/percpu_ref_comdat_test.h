// Shared by percpu_ref_test.cc and percpu_ref_comdat_test.cc: an inline function that is never
// inlined, so both translation units emit their own copy of it (a COMDAT group), the rseq
// critical sections of PercpuRef's fast path included, and the linker keeps one and discards the
// other. The sections' descriptors and abort handlers must be discarded with it (they are in the
// function's group); before they were, such a program did not link ("referenced in section
// `__rseq_cs' ... defined in discarded section").
#pragma once

#include "pgmap/core/percpu_ref.h"

namespace pgmap::comdat_test {

[[gnu::noinline]] inline bool get_put_out_of_line(PercpuRef& ref) {
  return ref.get() == Errc::ok && ref.put() == Errc::ok;
}

// Defined in percpu_ref_comdat_test.cc, which calls get_put_out_of_line `times` times.
bool get_put_from_other_unit(PercpuRef& ref, int times);

}  // namespace pgmap::comdat_test
