// The second translation unit of percpu_ref_test (see percpu_ref_comdat_test.h).
#include "core/percpu_ref_comdat_test.h"

namespace pgmap::comdat_test {

bool get_put_from_other_unit(PercpuRef& ref, int times) {
  bool ok = true;
  for (int i = 0; i < times; ++i)
    ok = get_put_out_of_line(ref) && ok;
  return ok;
}

}  // namespace pgmap::comdat_test
