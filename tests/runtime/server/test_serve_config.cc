// ServeConfig: the flags of `switchyard serve`, a clear error naming each bad one, and the engine
// options it derives from them.
#include <gtest/gtest.h>

#include <string>

#include "runtime/server/serve_config.h"

namespace sy {
namespace {

TEST(ServeConfig, BadFlagsNameTheFlagAndOptionsFollowThem) {
  auto refusal = [](ServeConfig c) -> std::string {
    c.model = c.model.empty() ? "m" : c.model;
    try {
      c.validate();
    } catch (const Error& e) {
      return e.message();
    }
    return "";
  };
  ServeConfig c;
  EXPECT_EQ(refusal(c), "");
  c.max_running = 512;
  EXPECT_NE(refusal(c).find("--max-running 512 must be at most --max-batch-tokens 256"),
            std::string::npos);
  c = {};
  c.max_queue_requests = 0;
  EXPECT_NE(refusal(c).find("--max-queue-requests 0"), std::string::npos);
  c = {};
  c.max_completions = 0;
  EXPECT_NE(refusal(c).find("--max-completions 0 outside [1, 1024]"), std::string::npos);
  c.max_completions = 2000;
  EXPECT_NE(refusal(c).find("--max-completions 2000"), std::string::npos);
  c = {};
  c.block_size = 0;
  EXPECT_NE(refusal(c).find("--block-size 0"), std::string::npos);
  c = {};
  c.max_completions = 4;
  c.max_queue_requests = 9;
  c.prefix_caching = false;
  const EngineOptions o = c.engine_options();
  EXPECT_EQ(o.max_completions, 4);
  EXPECT_EQ(o.max_queue_requests, 9);
  EXPECT_FALSE(o.prefix_caching);
}

}  // namespace
}  // namespace sy
