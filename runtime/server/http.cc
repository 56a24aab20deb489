// The HTTP/1.1 server (see http.h).
#include "runtime/server/http.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "kernels/error.h"

namespace sy {
namespace {

using Clock = std::chrono::steady_clock;

int millis(double seconds) {
  return static_cast<int>(std::clamp(seconds * 1000.0, 0.0, 2.0e9));
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r'))
    s.remove_suffix(1);
  return s;
}

// A decimal count of at most 18 digits; false for anything else.
bool parse_count(std::string_view s, uint64_t& out) {
  if (s.empty() || s.size() > 18) return false;
  out = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
    out = out * 10 + static_cast<uint64_t>(c - '0');
  }
  return true;
}

bool parse_hex(std::string_view s, uint64_t& out) {
  if (s.empty() || s.size() > 15) return false;
  out = 0;
  for (char c : s) {
    int v = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (v < 0) return false;
    out = out * 16 + static_cast<uint64_t>(v);
  }
  return true;
}

// An error of the request that ends it with `status` (and the connection with it).
struct BadRequest {
  int status;
  std::string message;
};

// Reads from `fd` into `buffer` until it holds at least `want` bytes. False on EOF, error or the
// deadline (a timeout throws 408 when `timeout_is_error`).
bool fill(int fd, std::string& buffer, size_t want, Clock::time_point deadline,
          const std::atomic<bool>& stopping) {
  char chunk[16384];
  while (buffer.size() < want) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left.count(), 200)));
    if (r < 0 && errno != EINTR) return false;
    if (stopping.load() && buffer.empty()) return false;
    if (r <= 0) continue;
    const ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n == 0) return false;
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      return false;
    }
    buffer.append(chunk, static_cast<size_t>(n));
  }
  return true;
}

}  // namespace

void HttpLimits::validate() const {
  SY_CHECK(max_header_bytes >= 1024, "http: max_header_bytes ", max_header_bytes,
           " must be at least 1024");
  SY_CHECK(max_body_bytes >= 1, "http: max_body_bytes must be at least 1");
  SY_CHECK(max_connections >= 1, "http: max_connections ", max_connections, " must be at least 1");
  SY_CHECK(max_requests_per_connection >= 1, "http: max_requests_per_connection ",
           max_requests_per_connection, " must be at least 1");
  SY_CHECK(idle_timeout_s > 0 && read_timeout_s > 0 && write_timeout_s > 0,
           "http: timeouts must be positive");
}

std::string_view HttpRequest::header(std::string_view name) const {
  for (const auto& [n, v] : headers)
    if (n == name) return v;
  return {};
}

const char* http_reason(int status) {
  switch (status) {
    case 100:
      return "Continue";
    case 200:
      return "OK";
    case 204:
      return "No Content";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 403:
      return "Forbidden";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 408:
      return "Request Timeout";
    case 411:
      return "Length Required";
    case 413:
      return "Payload Too Large";
    case 415:
      return "Unsupported Media Type";
    case 422:
      return "Unprocessable Entity";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    case 505:
      return "HTTP Version Not Supported";
    default:
      return "Unknown";
  }
}

// ---- HttpResponder ------------------------------------------------------------------------------

bool HttpResponder::write_all(std::string_view data) {
  if (broken_) return false;
  const auto deadline = Clock::now() + std::chrono::milliseconds(millis(write_timeout_s_));
  while (!data.empty()) {
    const ssize_t n = ::send(fd_, data.data(), data.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      data.remove_prefix(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      const auto left =
          std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
      pollfd p{fd_, POLLOUT, 0};
      if (left.count() > 0 && ::poll(&p, 1, static_cast<int>(left.count())) > 0 &&
          (p.revents & (POLLERR | POLLHUP)) == 0)
        continue;
    }
    broken_ = true;
    return false;
  }
  return true;
}

std::string HttpResponder::head(int status, std::string_view content_type, const Headers& headers,
                                std::string_view length_header) const {
  std::string h = "HTTP/1.1 " + std::to_string(status) + " " + http_reason(status) + "\r\n";
  if (!content_type.empty()) h += "Content-Type: " + std::string(content_type) + "\r\n";
  for (const auto& [name, value] : headers) h += name + ": " + value + "\r\n";
  h += length_header;
  h += keep_alive_ ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
  h += "\r\n";
  return h;
}

void HttpResponder::send(int status, std::string_view content_type, std::string_view body,
                         const Headers& headers) {
  SY_CHECK(state_ == State::kNone, "http: a response was already sent");
  state_ = State::kDone;
  std::string out = head(status, content_type, headers,
                         "Content-Length: " + std::to_string(body.size()) + "\r\n");
  out += body;
  write_all(out);
}

bool HttpResponder::begin_stream(int status, std::string_view content_type,
                                 const Headers& headers) {
  SY_CHECK(state_ == State::kNone, "http: a response was already sent");
  state_ = State::kStreaming;
  return write_all(head(status, content_type, headers, "Transfer-Encoding: chunked\r\n"));
}

bool HttpResponder::write(std::string_view data) {
  SY_CHECK(state_ == State::kStreaming, "http: write outside a stream");
  if (data.empty()) return !broken_;
  char size[32];
  std::snprintf(size, sizeof size, "%zx\r\n", data.size());
  std::string chunk = size;
  chunk += data;
  chunk += "\r\n";
  return write_all(chunk);
}

void HttpResponder::end_stream() {
  SY_CHECK(state_ == State::kStreaming, "http: end_stream outside a stream");
  state_ = State::kDone;
  write_all("0\r\n\r\n");
}

bool HttpResponder::client_gone() {
  if (broken_) return true;
  pollfd p{fd_, POLLIN | POLLRDHUP, 0};
  if (::poll(&p, 1, 0) <= 0) return false;
  if (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
  if (p.revents & POLLIN) {
    char c;
    // A pipelined next request is not a departure; end of file is.
    if (::recv(fd_, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0) return true;
  }
  return false;
}

// ---- HttpServer ---------------------------------------------------------------------------------

HttpServer::HttpServer(Handler handler, ErrorBody error_body, HttpLimits limits)
    : handler_(std::move(handler)), error_body_(std::move(error_body)), limits_(limits) {
  limits_.validate();
}

HttpServer::~HttpServer() {
  stop(0);
}

int HttpServer::start(const std::string& host_port) {
  SY_CHECK(listen_fd_ < 0, "http: already started");
  const size_t colon = host_port.rfind(':');
  SY_CHECK(colon != std::string::npos && colon + 1 < host_port.size(), "http: listen address '",
           host_port, "' is not host:port");
  std::string host = host_port.substr(0, colon);
  const std::string port = host_port.substr(colon + 1);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const int rc = ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port.c_str(), &hints, &found);
  SY_CHECK(rc == 0, "http: cannot resolve listen address '", host_port, "': ", gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr && listen_fd_ < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) {
      listen_fd_ = fd;
    } else {
      why = std::strerror(errno);
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  SY_CHECK(listen_fd_ >= 0, "http: cannot listen on ", host_port, ": ", why);
  sockaddr_storage bound{};
  socklen_t len = sizeof bound;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &len);
  const int bound_port = bound.ss_family == AF_INET6
                             ? ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port)
                             : ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  SY_CHECK(::pipe2(wake_fd_, O_CLOEXEC) == 0, "http: pipe: ", std::strerror(errno));
  acceptor_ = std::thread([this] { accept_loop(); });
  return bound_port;
}

void HttpServer::accept_loop() {
  while (!stopping_.load()) {
    pollfd p[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_[0], POLLIN, 0}};
    if (::poll(p, 2, -1) < 0) continue;
    if (p[1].revents != 0 || stopping_.load()) break;
    sockaddr_storage addr{};
    socklen_t len = sizeof addr;
    const int fd = ::accept4(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len, SOCK_CLOEXEC);
    if (fd < 0) continue;
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (addr.ss_family == AF_INET) {
      const auto* in = reinterpret_cast<sockaddr_in*>(&addr);
      ::inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
      port = ntohs(in->sin_port);
    } else if (addr.ss_family == AF_INET6) {
      const auto* in = reinterpret_cast<sockaddr_in6*>(&addr);
      ::inet_ntop(AF_INET6, &in->sin6_addr, host, sizeof host);
      port = ntohs(in->sin6_port);
    }
    std::string peer = std::string(host) + ":" + std::to_string(port);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (static_cast<int64_t>(connections_.size()) >= limits_.max_connections) {
        // Over the limit: answered at once, so that the client backs off instead of hanging.
        send_error(fd, 503,
                   "too many connections: the server holds at most " +
                       std::to_string(limits_.max_connections),
                   false);
        ::close(fd);
        continue;
      }
      connections_.insert(fd);
    }
    std::thread([this, fd, peer = std::move(peer)]() mutable {
      serve_connection(fd, std::move(peer));
    }).detach();
  }
}

void HttpServer::send_error(int fd, int status, const std::string& message, bool keep_alive) {
  HttpResponder r(fd, keep_alive, 1.0);
  auto [type, body] = error_body_(status, message);
  r.send(status, type, body);
}

namespace {

// The request line and headers (without the blank line) into `req`; whether the connection
// stays open after it.
bool parse_head(std::string_view head, HttpRequest& req) {
  const size_t line_end = head.find("\r\n");
  std::string_view line = head.substr(0, line_end);
  const size_t sp1 = line.find(' ');
  const size_t sp2 = line.rfind(' ');
  if (sp1 == std::string_view::npos || sp2 == sp1 || sp1 == 0)
    throw BadRequest{400, "malformed request line"};
  req = HttpRequest{};
  req.method = std::string(line.substr(0, sp1));
  std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
  const std::string_view version = line.substr(sp2 + 1);
  if (version != "HTTP/1.1" && version != "HTTP/1.0")
    throw BadRequest{505, "unsupported HTTP version"};
  if (target.empty() || target.front() != '/') throw BadRequest{400, "malformed request target"};
  const size_t q = target.find('?');
  req.path = std::string(target.substr(0, q));
  if (q != std::string_view::npos) req.query = std::string(target.substr(q + 1));
  std::string_view rest = line_end == std::string_view::npos ? "" : head.substr(line_end + 2);
  while (!rest.empty()) {
    const size_t e = rest.find("\r\n");
    std::string_view h = rest.substr(0, e);
    rest = e == std::string_view::npos ? "" : rest.substr(e + 2);
    const size_t colon = h.find(':');
    if (colon == std::string_view::npos || colon == 0) throw BadRequest{400, "malformed header"};
    req.headers.emplace_back(lower(h.substr(0, colon)), std::string(trim(h.substr(colon + 1))));
  }
  const std::string connection = lower(req.header("connection"));
  return version == "HTTP/1.1" ? connection.find("close") == std::string::npos
                               : connection.find("keep-alive") != std::string::npos;
}

}  // namespace

bool HttpServer::read_request(int fd, std::string& buffer, HttpRequest& req, bool& keep_alive,
                              bool first) {
  // Wait for the first byte (the keep-alive idle time), then the whole request (read timeout).
  const auto idle_until =
      Clock::now() +
      std::chrono::milliseconds(millis(first ? limits_.read_timeout_s : limits_.idle_timeout_s));
  if (!fill(fd, buffer, 1, idle_until, stopping_)) return false;
  const auto deadline = Clock::now() + std::chrono::milliseconds(millis(limits_.read_timeout_s));
  size_t end;
  while ((end = buffer.find("\r\n\r\n")) == std::string::npos) {
    if (buffer.size() > limits_.max_header_bytes)
      throw BadRequest{431, "the request line and headers exceed " +
                                std::to_string(limits_.max_header_bytes) + " bytes"};
    if (!fill(fd, buffer, buffer.size() + 1, deadline, stopping_)) {
      if (Clock::now() >= deadline) throw BadRequest{408, "the request did not arrive in time"};
      return false;
    }
  }
  if (end > limits_.max_header_bytes)
    throw BadRequest{431, "the request line and headers exceed " +
                              std::to_string(limits_.max_header_bytes) + " bytes"};
  keep_alive = parse_head(std::string_view(buffer.data(), end), req);
  buffer.erase(0, end + 4);

  const std::string te = lower(req.header("transfer-encoding"));
  const std::string_view cl = req.header("content-length");
  if (lower(req.header("expect")) == "100-continue" && buffer.empty() &&
      (!te.empty() || !cl.empty())) {
    // Checked first: a body over the limit is refused without asking for it.
    uint64_t length = 0;
    if (te.empty() && parse_count(cl, length) && length > limits_.max_body_bytes)
      throw BadRequest{413, "the request body of " + std::to_string(length) +
                                " bytes exceeds the limit of " +
                                std::to_string(limits_.max_body_bytes)};
    static constexpr std::string_view kContinue = "HTTP/1.1 100 Continue\r\n\r\n";
    ::send(fd, kContinue.data(), kContinue.size(), MSG_NOSIGNAL);
  }
  if (!te.empty()) {
    if (te != "chunked") throw BadRequest{501, "unsupported transfer-encoding '" + te + "'"};
    read_chunked(fd, buffer, req.body, deadline);
  } else if (!cl.empty()) {
    uint64_t length = 0;
    if (!parse_count(cl, length)) throw BadRequest{400, "malformed content-length"};
    if (length > limits_.max_body_bytes)
      throw BadRequest{413, "the request body of " + std::to_string(length) +
                                " bytes exceeds the limit of " +
                                std::to_string(limits_.max_body_bytes)};
    if (!fill(fd, buffer, length, deadline, stopping_))
      throw BadRequest{408, "the request body did not arrive in time"};
    req.body = buffer.substr(0, length);
    buffer.erase(0, length);
  }
  return true;
}

void HttpServer::read_chunked(int fd, std::string& buffer, std::string& body,
                              Clock::time_point deadline) {
  // A line of the body (chunk size or trailer) up to its CRLF, within `limit` bytes.
  auto line = [&](size_t limit, const char* what) {
    size_t crlf;
    while ((crlf = buffer.find("\r\n")) == std::string::npos)
      if (buffer.size() > limit || !fill(fd, buffer, buffer.size() + 1, deadline, stopping_))
        throw BadRequest{400, what};
    return crlf;
  };
  for (;;) {
    const size_t crlf = line(64, "malformed chunk size");
    std::string_view size_text = std::string_view(buffer).substr(0, crlf);
    size_text = size_text.substr(0, size_text.find(';'));
    uint64_t size = 0;
    if (!parse_hex(trim(size_text), size)) throw BadRequest{400, "malformed chunk size"};
    if (body.size() + size > limits_.max_body_bytes)
      throw BadRequest{
          413, "the request body exceeds " + std::to_string(limits_.max_body_bytes) + " bytes"};
    buffer.erase(0, crlf + 2);
    if (size == 0) break;
    if (!fill(fd, buffer, size + 2, deadline, stopping_))
      throw BadRequest{408, "the request body did not arrive in time"};
    if (buffer.compare(size, 2, "\r\n") != 0) throw BadRequest{400, "malformed chunked body"};
    body.append(buffer, 0, size);
    buffer.erase(0, size + 2);
  }
  // Trailers (ignored) up to the empty line.
  for (size_t e; (e = line(limits_.max_header_bytes, "malformed chunked body")) != 0;)
    buffer.erase(0, e + 2);
  buffer.erase(0, 2);
}

void HttpServer::serve_connection(int fd, std::string peer) {
  std::string buffer;
  bool linger = false;  // an error left the request unread: drain it before closing
  for (int64_t n = 0; n < limits_.max_requests_per_connection && !stopping_.load(); ++n) {
    HttpRequest request;
    bool keep_alive = false;
    try {
      if (!read_request(fd, buffer, request, keep_alive, n == 0)) break;
    } catch (const BadRequest& e) {
      send_error(fd, e.status, e.message, false);
      linger = true;
      break;
    }
    request.peer = peer;
    keep_alive = keep_alive && n + 1 < limits_.max_requests_per_connection;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++busy_;
    }
    HttpResponder responder(fd, keep_alive, limits_.write_timeout_s);
    try {
      handler_(request, responder);
      if (!responder.answered()) {
        responder.send(500, "", "");
      } else if (responder.state_ == HttpResponder::State::kStreaming) {
        responder.end_stream();
      }
    } catch (const std::exception& e) {
      if (!responder.answered()) {
        auto [type, body] = error_body_(500, e.what());
        responder.send(500, type, body);
      } else {
        responder.broken_ = true;  // a half-sent response: only closing can end it
      }
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      --busy_;
    }
    idle_.notify_all();
    if (!keep_alive || responder.broken_) break;
  }
  ::shutdown(fd, SHUT_WR);
  // Closing with unread input makes the kernel reset the connection, and a client still
  // sending (an oversize body) would lose the error response: read and drop what it sends, a
  // bounded while, until it closes its end.
  if (linger) {
    char scratch[16384];
    const auto until = Clock::now() + std::chrono::seconds(2);
    size_t dropped = 0;
    while (Clock::now() < until && dropped < (size_t{64} << 20)) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 100) <= 0) continue;
      const ssize_t n = ::recv(fd, scratch, sizeof scratch, 0);
      if (n <= 0) break;
      dropped += static_cast<size_t>(n);
    }
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    connections_.erase(fd);
    idle_.notify_all();
  }
  ::close(fd);  // after the erase: the number may be reused at once
}

void HttpServer::stop(double grace_s) {
  if (listen_fd_ < 0) return;
  stopping_.store(true);
  const char wake = 1;
  [[maybe_unused]] ssize_t w = ::write(wake_fd_[1], &wake, 1);
  if (acceptor_.joinable()) acceptor_.join();
  ::close(listen_fd_);
  listen_fd_ = -1;
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait_for(lock, std::chrono::milliseconds(millis(grace_s)), [&] { return busy_ == 0; });
  // Whatever is still open is woken: reads and writes on it fail and its thread ends.
  for (int fd : connections_) ::shutdown(fd, SHUT_RDWR);
  idle_.wait(lock, [&] { return connections_.empty(); });
  ::close(wake_fd_[0]);
  ::close(wake_fd_[1]);
}

}  // namespace sy
