// The communicators of one rank: the world, its attention (tensor-parallel) group and its
// expert-parallel group, built once from a ParallelConfig.
#pragma once

#include <memory>

#include "parallel/communicator.h"
#include "parallel/layout.h"

namespace sy {

struct ParallelContext {
  ParallelConfig config;
  Communicator* world = nullptr;     // every rank (not owned)
  std::unique_ptr<Communicator> tp;  // ranks of this attention group, ordered by tp_rank
  std::unique_ptr<Communicator> ep;  // ranks of this expert group, ordered by ep_rank

  // Splits `world` (a collective: every rank must call it). config.world must equal its size.
  static std::unique_ptr<ParallelContext> create(const ParallelConfig& config, Communicator& world);
};

}  // namespace sy
