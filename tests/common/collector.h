// A RequestSink for tests: collects a request's tokens, text, logprobs and finish; wait() blocks
// until the last event (at most 60 s).
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "runtime/engine/engine.h"

namespace sy::test {

// Collects a request's events; thread-safe.
class Collector : public RequestSink {
 public:
  void on_event(RequestEvent e) override {
    std::lock_guard<std::mutex> lock(mu);
    tokens.insert(tokens.end(), e.token_ids.begin(), e.token_ids.end());
    text += e.text;
    for (auto& l : e.logprobs) logprobs.push_back(l);
    if (!e.prompt_logprobs.empty()) ++prompt_logprob_events;
    for (auto& l : e.prompt_logprobs) prompt_logprobs.push_back(l);
    if (e.finish != FinishReason::kNone) {
      finish = e.finish;
      usage = e.usage;
      done = true;
      cv.notify_all();
    }
  }
  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return done; }));
  }
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> tokens;
  std::vector<TokenLogprobs> logprobs;
  std::vector<TokenLogprobs> prompt_logprobs;
  int prompt_logprob_events = 0;  // events that carried prompt logprobs
  std::string text;
  FinishReason finish = FinishReason::kNone;
  Usage usage;
  bool done = false;
};

}  // namespace sy::test
