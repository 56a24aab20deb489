// Formatting of sy::Error messages (see error.h).
#include "kernels/error.h"

#include <atomic>

namespace sy {
namespace {
std::atomic<int> g_rank{-1};
}  // namespace

void set_error_rank(int rank) {
  g_rank.store(rank);
}
int error_rank() {
  return g_rank.load();
}

namespace detail {

void fail(const char* file, int line, const char* expr, const std::string& message) {
  std::ostringstream out;
  out << message;
  out << " [";
  if (expr != nullptr) out << "check `" << expr << "` failed at ";
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  out << base << ":" << line;
  if (g_rank.load() >= 0) out << ", rank " << g_rank.load();
  out << "]";
  throw Error(out.str(), message);
}

}  // namespace detail
}  // namespace sy
