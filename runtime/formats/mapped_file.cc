// A read-only file mapping (see mapped_file.h).
#include "runtime/formats/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

#include "kernels/error.h"

namespace sy {

namespace {

std::string errno_text(int err) {
  return std::error_code(err, std::generic_category()).message();
}

}  // namespace

MappedFile::MappedFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  SY_CHECK(fd >= 0, "cannot open ", path, ": ", errno_text(errno));
  struct stat st;
  const bool stat_ok = ::fstat(fd, &st) == 0;
  const int stat_errno = errno;
  if (!stat_ok || !S_ISREG(st.st_mode) || st.st_size == 0) {
    ::close(fd);
    SY_CHECK(stat_ok, "cannot stat ", path, ": ", errno_text(stat_errno));
    SY_CHECK(S_ISREG(st.st_mode), path, ": not a regular file");
    return;  // empty: size() 0, nothing mapped
  }
  size_ = static_cast<uint64_t>(st.st_size);
  map_ = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_errno = errno;
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    SY_FAIL("cannot map ", path, ": ", errno_text(map_errno));
  }
}

MappedFile::~MappedFile() {
  if (map_ != nullptr) ::munmap(map_, size_);
}

}  // namespace sy
