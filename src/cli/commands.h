// Sub-commands of the `snapmla` tool; each parses its own arguments.
#pragma once

namespace snapmla::cli {

int run_demo(int argc, char** argv);
int run_bench(int argc, char** argv);
int run_kv_bench(int argc, char** argv);
int run_accuracy(int argc, char** argv);

}  // namespace snapmla::cli
