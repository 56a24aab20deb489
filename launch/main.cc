// The switchyard program: `switchyard <subcommand> ...`.
//
//   make-tiny-model   write a seeded random Mixtral-architecture checkpoint (Hugging Face layout)
//   generate          run one prompt through a model and stream the generated text
//   serve             serve a model over gRPC from every rank of an MPI job
//   client            call a running server (generate, tokenize, detokenize, info, health)
//   bench MODE        measurements: all-to-all (the MoE dispatch exchange), engine (the ranks'
//                     throughput), serve (a load generator against a running server)
#include <cstdio>
#include <exception>
#include <string>

#include <CLI/CLI.hpp>

#include "launch/commands.h"
#include "parallel/mpi_env.h"
#ifdef SY_HAVE_NCCL
#include "parallel/nccl_communicator.h"
#endif

int main(int argc, char** argv) {
  CLI::App app{"switchyard: expert-parallel serving runtime for Mixtral-style MoE models"};
  app.require_subcommand(1);
  sy::launch::MakeTinyModelArgs tiny;
  sy::launch::add_make_tiny_model(app, tiny);
  sy::launch::GenerateArgs gen;
  sy::launch::add_generate(app, gen);
  sy::launch::ServeArgs serve;
  sy::launch::add_serve(app, serve);
  sy::launch::ClientArgs client;
  sy::launch::add_client(app, client);
  sy::launch::BenchArgs bench;
  sy::launch::add_bench(app, bench);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    if (app.got_subcommand("make-tiny-model")) return sy::launch::run_make_tiny_model(tiny);
    if (app.got_subcommand("generate")) return sy::launch::run_generate(gen);
    if (app.got_subcommand("serve")) return sy::launch::run_serve(serve);
    if (app.got_subcommand("client")) return sy::launch::run_client(app, client);
    if (app.got_subcommand("bench")) return sy::launch::run_bench(bench);
  } catch (const std::exception& e) {
    // Under MPI a failed rank ends the whole job, so no peer waits in a collective.
#ifdef SY_HAVE_NCCL
    sy::abort_nccl_communicators();
#endif
    return sy::MpiEnv::fail(e.what());
  }
  return 0;
}
