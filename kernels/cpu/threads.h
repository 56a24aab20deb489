// The thread pool of a CPU rank: `--threads` workers (the caller is one of them) that split the
// output of the heavy kernels (matmul) between them.
#pragma once

#include <cstdint>
#include <functional>

namespace sy::cpu {

// Threads parallel_for uses, the caller included (>= 1; 1: everything runs on the caller).
// Changing it joins the old workers; call it between steps, not during one.
void set_num_threads(int n);
int num_threads();

// Calls fn(begin, end) on contiguous, disjoint ranges covering [0, n) (up to 4 per thread, each
// taken by whichever thread is free; fewer when n is small), and returns when all have. A call from
// inside fn runs inline. The first exception fn throws is rethrown here after every range has
// finished.
void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace sy::cpu
