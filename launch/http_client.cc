// The benchmark's HTTP client (see http_client.h).
#include "launch/http_client.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>

namespace sy::launch {
namespace {

// The body's bytes as they arrive (chunked or not), split into SSE events for a stream.
class BodyReader {
 public:
  BodyReader(bool chunked, bool events, const std::function<void(const std::string&)>* on_event,
             HttpResult& result)
      : chunked_(chunked), events_(events), on_event_(on_event), result_(result) {}

  // False once the body is complete (a chunked body's last chunk).
  bool feed(const char* data, size_t n) {
    if (!chunked_) {
      deliver(std::string(data, n));
      return true;
    }
    raw_.append(data, n);
    for (;;) {
      if (want_ == 0) {
        const size_t crlf = raw_.find("\r\n");
        if (crlf == std::string::npos) return true;
        want_ = std::strtoull(raw_.substr(0, crlf).c_str(), nullptr, 16) + 2;  // data, CRLF
        raw_.erase(0, crlf + 2);
        if (want_ == 2) return false;  // the last chunk
      }
      if (raw_.size() < want_) return true;
      deliver(raw_.substr(0, want_ - 2));
      raw_.erase(0, want_);
      want_ = 0;
    }
  }

 private:
  void deliver(const std::string& bytes) {
    if (!events_ || on_event_ == nullptr) {
      result_.body += bytes;
      return;
    }
    pending_ += bytes;
    for (size_t end; (end = pending_.find("\n\n")) != std::string::npos;) {
      const std::string event = pending_.substr(0, end);
      pending_.erase(0, end + 2);
      if (event.starts_with("data: ")) (*on_event_)(event.substr(6));
    }
  }

  bool chunked_;
  bool events_;
  const std::function<void(const std::string&)>* on_event_;
  HttpResult& result_;
  std::string raw_;      // chunked framing not yet decoded
  size_t want_ = 0;      // bytes of the current chunk and its CRLF still to come; 0: a size line
  std::string pending_;  // event text not yet ended by a blank line
};

int connect_to(const std::string& host_port, std::string& error) {
  const size_t colon = host_port.rfind(':');
  if (colon == std::string::npos) {
    error = "target '" + host_port + "' is not host:port";
    return -1;
  }
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host_port.substr(0, colon).c_str(),
                               host_port.substr(colon + 1).c_str(), &hints, &found);
  if (rc != 0) {
    error = gai_strerror(rc);
    return -1;
  }
  int fd = -1;
  for (addrinfo* a = found; a != nullptr && fd < 0; a = a->ai_next) {
    fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd >= 0 && ::connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
      error = std::strerror(errno);
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(found);
  if (fd >= 0) {
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  return fd;
}

std::string lower(std::string s) {
  for (char& c : s)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return s;
}

}  // namespace

HttpCall::~HttpCall() {
  const int fd = fd_.exchange(-1);
  if (fd >= 0) ::close(fd);
}

void HttpCall::cancel() {
  cancelled_.store(true);
  const int fd = fd_.load();
  if (fd >= 0) ::shutdown(fd, SHUT_RDWR);
}

HttpResult HttpCall::post(const std::string& host_port, const std::string& path,
                          const std::string& body,
                          const std::function<void(const std::string&)>& on_event) {
  const std::string head = "POST " + path + " HTTP/1.1\r\nHost: " + host_port +
                           "\r\nContent-Type: application/json\r\nConnection: close\r\n"
                           "Content-Length: " +
                           std::to_string(body.size()) + "\r\n\r\n" + body;
  return request(host_port, head, &on_event);
}

HttpResult HttpCall::get(const std::string& host_port, const std::string& path) {
  return request(
      host_port,
      "GET " + path + " HTTP/1.1\r\nHost: " + host_port + "\r\nConnection: close\r\n\r\n", nullptr);
}

HttpResult HttpCall::request(const std::string& host_port, const std::string& head,
                             const std::function<void(const std::string&)>* on_event) {
  HttpResult result;
  const int fd = connect_to(host_port, result.error);
  if (fd < 0) return result;
  fd_.store(fd);
  if (cancelled_.load()) ::shutdown(fd, SHUT_RDWR);
  for (size_t sent = 0; sent < head.size();) {
    const ssize_t n = ::send(fd, head.data() + sent, head.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      result.error = cancelled_.load() ? "cancelled" : "send failed";
      return result;
    }
    sent += static_cast<size_t>(n);
  }
  std::string in;
  char buf[16384];
  size_t header_end = std::string::npos;
  while ((header_end = in.find("\r\n\r\n")) == std::string::npos) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) {
      result.error = cancelled_.load() ? "cancelled" : "the connection closed before a response";
      return result;
    }
    in.append(buf, static_cast<size_t>(n));
  }
  const std::string headers = lower(in.substr(0, header_end));
  result.status = in.size() > 12 ? std::atoi(in.c_str() + 9) : 0;
  BodyReader reader(headers.find("transfer-encoding: chunked") != std::string::npos,
                    headers.find("text/event-stream") != std::string::npos, on_event, result);
  bool more = reader.feed(in.data() + header_end + 4, in.size() - header_end - 4);
  while (more) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) break;
    more = reader.feed(buf, static_cast<size_t>(n));
  }
  if (more && cancelled_.load()) {
    result.status = 0;
    result.error = "cancelled";
  }
  return result;
}

}  // namespace sy::launch
