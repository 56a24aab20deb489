// One error type and the checking macros used everywhere in switchyard.
//
// SY_CHECK(cond, parts...) throws sy::Error with the failed expression, file:line, the rank (once
// the MPI environment has set it) and the streamed message parts. It is never compiled out: these
// checks guard untrusted input (checkpoints, requests) as well as programming errors.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace sy {

// what() is the message followed by where it was raised ("[check `x` failed at f.cc:12, rank 0]");
// message() is the message alone, for clients that should not see source locations.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message), message_(message) {}
  Error(const std::string& what, const std::string& message)
      : std::runtime_error(what), message_(message) {}
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

// The rank printed in error messages; -1 until the parallel environment sets it.
void set_error_rank(int rank);
int error_rank();

namespace detail {

template <typename... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

[[noreturn]] void fail(const char* file, int line, const char* expr, const std::string& message);

}  // namespace detail
}  // namespace sy

#define SY_CHECK(cond, ...)                                                             \
  do {                                                                                  \
    if (!(cond)) [[unlikely]]                                                           \
      ::sy::detail::fail(__FILE__, __LINE__, #cond, ::sy::detail::concat(__VA_ARGS__)); \
  } while (0)

#define SY_FAIL(...) \
  ::sy::detail::fail(__FILE__, __LINE__, nullptr, ::sy::detail::concat(__VA_ARGS__))
