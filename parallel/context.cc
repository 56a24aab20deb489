// Communicators of one rank (see context.h).
#include "parallel/context.h"

#include "kernels/error.h"

namespace sy {

std::unique_ptr<ParallelContext> ParallelContext::create(const ParallelConfig& config,
                                                         Communicator& world) {
  SY_CHECK(config.world == world.size() && config.rank == world.rank(), "parallel config for rank ",
           config.rank, " of ", config.world, " used on rank ", world.rank(), " of ", world.size());
  auto ctx = std::make_unique<ParallelContext>();
  ctx->config = config;
  ctx->world = &world;
  ctx->tp = world.split(config.tp_group(), config.tp_rank());
  ctx->ep = world.split(config.ep_group(), config.ep_rank());
  return ctx;
}

}  // namespace sy
