// A small HTTP/1.1 server for rank 0's OpenAI-compatible front door (openai_service.h): one
// thread per connection up to a bound, keep-alive, request bodies by Content-Length or chunked,
// whole responses or chunked streams (server-sent events), and a way for a streaming handler to
// see that its client has gone (the peer's FIN or RST, polled between events).
//
// Why not a library: the one Debian packages (cpp-httplib 0.11) is built with a listen backlog
// of 5, which drops connections when 64 clients arrive at once, and cannot tell a handler that
// its client left until a write fails.
//
// Limits: request line + headers at most max_header_bytes (else 431), a body at most
// max_body_bytes (else 413, before any of it is read), at most max_connections open (the next
// one gets 503 and is closed), an idle keep-alive connection closes after idle_timeout_s, a
// request must arrive within read_timeout_s of its first byte, a write that cannot progress for
// write_timeout_s ends the connection.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace sy {

struct HttpLimits {
  size_t max_header_bytes = 16 << 10;           // request line and headers
  size_t max_body_bytes = 8 << 20;              // the body, after any chunked decoding
  int64_t max_connections = 512;                // open at once; past it 503 and close
  int64_t max_requests_per_connection = 10000;  // keep-alive requests before close
  double idle_timeout_s = 60;                   // keep-alive wait for the next request
  double read_timeout_s = 30;                   // from a request's first byte to its last
  double write_timeout_s = 60;                  // a write making no progress

  // Throws naming the offending field.
  void validate() const;
};

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string path;    // the target up to '?', percent-encoding left as sent
  std::string query;   // after '?', or empty
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased, in order
  std::string body;
  std::string peer;  // "address:port" of the client

  // The first header of that (lower-case) name, or empty.
  std::string_view header(std::string_view name) const;
};

// One response, whole or streamed. A handler must answer every request: send(), or
// begin_stream() then write()s and end_stream(); the server answers 500 for a handler that
// returns without doing so.
class HttpResponder {
 public:
  using Headers = std::vector<std::pair<std::string, std::string>>;

  void send(int status, std::string_view content_type, std::string_view body,
            const Headers& headers = {});
  // Starts a chunked response; false when the client has gone.
  bool begin_stream(int status, std::string_view content_type, const Headers& headers = {});
  // One chunk; false once the client has gone (the connection then closes).
  bool write(std::string_view data);
  void end_stream();
  // Whether the client has closed its end or reset the connection (never blocks).
  bool client_gone();
  // The client has gone: no (further) response; the connection closes.
  void abandon() {
    state_ = State::kDone;
    broken_ = true;
  }
  bool answered() const { return state_ != State::kNone; }

 private:
  friend class HttpServer;
  enum class State { kNone, kStreaming, kDone };
  HttpResponder(int fd, bool keep_alive, double write_timeout_s)
      : fd_(fd), keep_alive_(keep_alive), write_timeout_s_(write_timeout_s) {}
  bool write_all(std::string_view data);
  std::string head(int status, std::string_view content_type, const Headers& headers,
                   std::string_view length_header) const;

  int fd_;
  bool keep_alive_;
  double write_timeout_s_;
  State state_ = State::kNone;
  bool broken_ = false;  // a write failed: the connection is unusable
};

// The reason phrase of a status code ("Not Found").
const char* http_reason(int status);

class HttpServer {
 public:
  using Handler = std::function<void(const HttpRequest&, HttpResponder&)>;
  // The body of an error the server itself answers (bad request line, 413, 431, 503 over the
  // connection limit, a handler that threw): status and message to (content type, body).
  using ErrorBody = std::function<std::pair<std::string, std::string>(int, const std::string&)>;

  HttpServer(Handler handler, ErrorBody error_body, HttpLimits limits = {});
  ~HttpServer();  // stop(0) if still running
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds and listens on "host:port" (port 0: any free one) and starts accepting; returns the
  // port. Throws naming the address when it cannot.
  int start(const std::string& host_port);
  // Stops accepting, waits up to `grace_s` for the open requests to finish, then closes every
  // connection and joins its thread.
  void stop(double grace_s);

 private:
  void accept_loop();
  void serve_connection(int fd, std::string peer);
  // Reads one request; false to close the connection (after answering the error, if any).
  bool read_request(int fd, std::string& buffer, HttpRequest& request, bool& keep_alive,
                    bool first);
  // A chunked body into `body` (the limit applied as it grows).
  void read_chunked(int fd, std::string& buffer, std::string& body,
                    std::chrono::steady_clock::time_point deadline);
  void send_error(int fd, int status, const std::string& message, bool keep_alive);

  Handler handler_;
  ErrorBody error_body_;
  HttpLimits limits_;
  int listen_fd_ = -1;
  int wake_fd_[2] = {-1, -1};  // a pipe that wakes the accept loop at stop()
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};

  mutable std::mutex mu_;
  std::condition_variable idle_;  // the connection count went down
  std::set<int> connections_;     // open connection fds
  int64_t busy_ = 0;              // connections inside a request
};

}  // namespace sy
