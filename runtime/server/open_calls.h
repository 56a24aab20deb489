// The calls a service has open, held weakly (a call ends on its own): added as they start,
// ended all at once when the service closes, so that none waits for events that will never
// come. Shared by the gRPC service (its Generate sinks) and the HTTP one (its call queues).
#pragma once

#include <algorithm>
#include <memory>
#include <mutex>
#include <vector>

namespace sy {

template <typename Call>
class OpenCalls {
 public:
  // False once closed: the call must be refused.
  bool add(const std::shared_ptr<Call>& call) {
    std::lock_guard<std::mutex> lock(mu_);
    if (closed_) return false;
    if (calls_.size() >= prune_at_) {  // expired entries go as the list grows
      std::erase_if(calls_, [](const std::weak_ptr<Call>& w) { return w.expired(); });
      prune_at_ = std::max<size_t>(64, 2 * calls_.size());
    }
    calls_.push_back(call);
    return true;
  }
  // Refuses new calls from now on; returns the ones still alive, to be ended.
  std::vector<std::shared_ptr<Call>> close() {
    std::lock_guard<std::mutex> lock(mu_);
    closed_ = true;
    return alive_locked();
  }
  std::vector<std::shared_ptr<Call>> alive() const {
    std::lock_guard<std::mutex> lock(mu_);
    return alive_locked();
  }

 private:
  std::vector<std::shared_ptr<Call>> alive_locked() const {
    std::vector<std::shared_ptr<Call>> out;
    for (const auto& w : calls_)
      if (auto c = w.lock()) out.push_back(std::move(c));
    return out;
  }

  mutable std::mutex mu_;
  bool closed_ = false;
  std::vector<std::weak_ptr<Call>> calls_;
  size_t prune_at_ = 64;
};

}  // namespace sy
