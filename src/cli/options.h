// A tiny "--name value" / "--flag" parser shared by the sub-commands.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace snapmla::cli {

class Options {
 public:
  // Parses argv[1..]; throws std::invalid_argument on a stray positional word.
  Options(int argc, char** argv);
  bool has(const std::string& name) const { return values_.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback) const;
  long get_int(const std::string& name, long fallback) const;
  std::vector<long> get_int_list(const std::string& name, const std::vector<long>& fallback) const;
  // Throws on options nobody asked for (typos), listing the accepted ones.
  void reject_unknown(const std::vector<std::string>& known) const;
  // Prints `usage` and returns true when --help was given; otherwise rejects
  // options outside `known` and returns false. Every sub-command starts with it.
  bool handle_help(const std::string& usage, const std::vector<std::string>& known) const;

 private:
  std::map<std::string, std::string> values_;
};

}  // namespace snapmla::cli
