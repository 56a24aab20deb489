// The gRPC service of rank 0: switchyard.v1.Switchyard on gRPC's callback API, in front of the
// Engine.
//
// Generate is a server-streaming reactor. The request is converted to RequestParams and submitted
// to the Engine; the engine thread hands each event to the call's sink, which queues it and
// writes one message at a time (StartWrite, then the next in OnWriteDone). The last event ends
// the call with the status of its finish reason. A client that cancels, disconnects or runs past
// its deadline makes gRPC call OnCancel, which cancels the request in the engine.
//
// Lifetimes: gRPC owns the reactor until OnDone; the engine owns a shared reference to the sink
// until the request's last event. The sink outlives the reactor when the client goes away first,
// so it holds the reactor by a pointer that OnDone clears, under the sink's mutex, and no event
// touches a finished call.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "parallel/layout.h"
#include "runtime/engine/engine.h"
#include "runtime/formats/tokenizer.h"
#include "runtime/model/config.h"
#include "runtime/server/open_calls.h"
#include "switchyard/v1/switchyard.grpc.pb.h"

namespace sy {

namespace v1 = ::switchyard::v1;

inline constexpr const char* kServiceName = "switchyard.v1.Switchyard";

// ---- conversions (pure functions, tested on their own) -----------------------------------------

// GenerateRequest -> RequestParams: a text prompt is encoded (BOS first unless skip_bos); 0 means
// the default for max_tokens (16), top_p (1) and repetition_penalty (1); an absent seed becomes
// `default_seed`. Throws RequestError (kInvalidArgument, naming the field) for an empty prompt,
// text that is not UTF-8, or a token id outside the vocabulary. Everything else is validated by
// Engine::submit.
RequestParams request_params(const v1::GenerateRequest& request, const Tokenizer& tokenizer,
                             int64_t vocab_size, uint64_t default_seed,
                             std::optional<std::chrono::steady_clock::time_point> deadline);

// The n completions of one call: copies of `params`, completion i sampling with seed + i
// (wrapping), so that completion i gives the tokens of a call with n = 1 and that seed.
std::vector<RequestParams> completion_params(const RequestParams& params, int64_t n);

// The deadline of a call as a steady-clock time; none when the client set none.
std::optional<std::chrono::steady_clock::time_point> steady_deadline(
    std::chrono::system_clock::time_point deadline);

// One engine event as one streamed message (finish reason and usage on the last one only).
v1::GenerateResponse to_response(const RequestEvent& event);

// The status that ends a call whose last event is `event`: OK after stop or length, CANCELLED,
// DEADLINE_EXCEEDED, UNAVAILABLE or INTERNAL (with the event's error message).
grpc::Status finish_status(const RequestEvent& event);

// The gRPC status code of a refused submit.
grpc::StatusCode status_code(RequestError::Code code);

// The model, the layout of every rank and the context limit, as GetModelInfo returns them.
// `device` is the --device the ranks run on ("cpu" or "cuda").
v1::ModelInfo model_info(const std::string& model_path, const ModelConfig& config,
                         const ParallelConfig& parallel, int64_t context_limit,
                         const std::string& device = "cpu");

// ---- the service --------------------------------------------------------------------------------

class GenerateSink;

class Service final : public v1::Switchyard::CallbackService {
 public:
  // `tokenizer` must outlive the service. Generate and GetServerInfo answer UNAVAILABLE until
  // attach(); Tokenize, Detokenize and GetModelInfo work from the start.
  Service(const Tokenizer& tokenizer, v1::ModelInfo info);
  ~Service() override;

  // Requests go to `engine` from now on. The engine must stay alive until the server has shut
  // down.
  void attach(Engine* engine);
  // Refuses new Generate calls with UNAVAILABLE and ends every open stream with `status`
  // (after the pending messages): for when the engine has returned or failed, so that no call is
  // left waiting for an event that will never come.
  void close(const grpc::Status& status);
  // Generate calls that gRPC has not finished yet.
  int64_t n_open_streams() const;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetServerInfo(grpc::CallbackServerContext* context,
                                          const v1::GetServerInfoRequest* request,
                                          v1::ServerInfo* response) override;

 private:
  uint64_t random_seed();

  const Tokenizer& tokenizer_;
  const v1::ModelInfo info_;
  std::atomic<Engine*> engine_{nullptr};

  OpenCalls<GenerateSink> streams_;
  std::mutex mu_;
  std::mt19937_64 seeds_;  // seeds of requests that bring none (under mu_)
};

}  // namespace sy
