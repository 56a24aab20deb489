// A minimal blocking HTTP/1.1 client for the benchmark's OpenAI endpoint (bench serve
// --endpoint openai): one request per connection, a whole response or a server-sent-event
// stream read chunk by chunk. Loopback and plain HTTP only; no redirects, no TLS.
#pragma once

#include <atomic>
#include <functional>
#include <string>

namespace sy::launch {

struct HttpResult {
  int status = 0;     // 0 when no response came (connection refused, reset, cancelled)
  std::string body;   // the whole body (for a stream: what was not an SSE event)
  std::string error;  // why there is no status
};

class HttpCall {
 public:
  HttpCall() = default;
  ~HttpCall();
  HttpCall(const HttpCall&) = delete;
  HttpCall& operator=(const HttpCall&) = delete;

  // POSTs `body` (JSON) to http://host_port/path; each SSE event's data ("data: X") goes to
  // `on_event` as it arrives. Blocks until the response ends.
  HttpResult post(const std::string& host_port, const std::string& path, const std::string& body,
                  const std::function<void(const std::string& data)>& on_event);
  // GET, the whole body.
  HttpResult get(const std::string& host_port, const std::string& path);
  // From another thread: ends the call (its post/get returns with status 0).
  void cancel();

 private:
  HttpResult request(const std::string& host_port, const std::string& head,
                     const std::function<void(const std::string& data)>* on_event);

  std::atomic<int> fd_{-1};
  std::atomic<bool> cancelled_{false};
};

}  // namespace sy::launch
