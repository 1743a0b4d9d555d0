#include <cstdio>
#include <cstring>
#include <exception>

#include "cli/commands.h"
#include "snapmla/snapmla.h"

namespace {

struct Command {
  const char* name;
  int (*run)(int, char**);
  const char* summary;
};

const Command kCommands[] = {
    {"demo", snapmla::cli::run_demo,
     "one realistic decode step (DeepSeek-V3 shape) in both cache formats, with the fp8 error"},
    {"bench", snapmla::cli::run_bench,
     "time the decode kernels on the FlashMLA anchor configs (GPU), bf16 and fp8 side by side"},
    {"kv-bench", snapmla::cli::run_kv_bench,
     "time the cache write and gather-dequantize kernels (GPU)"},
    {"accuracy", snapmla::cli::run_accuracy,
     "compare KV-cache quantization schemes' decode error on realistic synthetic caches"},
};

void print_help() {
  std::printf(
      "snapmla %s - FP8 MLA decode for NVIDIA Hopper\n\n"
      "usage: snapmla <command> [options]   (snapmla <command> --help for its options)\n\ncommands:\n",
      snapmla::kVersion);
  for (const Command& c : kCommands) std::printf("  %-10s %s\n", c.name, c.summary);
  std::printf("\nbuilt with CUDA: %s; Hopper GPU present: %s\n", snapmla::built_with_cuda() ? "yes" : "no",
              snapmla::hopper_available() ? "yes" : "no");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    print_help();
    return argc < 2 ? 2 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) {
    std::printf("snapmla %s\n", snapmla::kVersion);
    return 0;
  }
  for (const Command& c : kCommands) {
    if (std::strcmp(argv[1], c.name) != 0) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "snapmla %s: %s\n", c.name, e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "snapmla: unknown command '%s' (see snapmla --help)\n", argv[1]);
  return 2;
}
