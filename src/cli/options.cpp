#include "cli/options.h"

#include <cstdio>
#include <sstream>
#include <stdexcept>

namespace snapmla::cli {

Options::Options(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    std::string word = argv[i];
    if (word.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument '" + word + "'");
    word = word.substr(2);
    const size_t eq = word.find('=');
    if (eq != std::string::npos) {
      values_[word.substr(0, eq)] = word.substr(eq + 1);
    } else if (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
      values_[word] = argv[++i];
    } else {
      values_[word] = "";
    }
  }
}

std::string Options::get(const std::string& name, const std::string& fallback) const {
  auto it = values_.find(name);
  return it == values_.end() ? fallback : it->second;
}

long Options::get_int(const std::string& name, long fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  try {
    size_t used = 0;
    long v = std::stol(it->second, &used);
    if (used != it->second.size()) throw std::invalid_argument("");
    return v;
  } catch (const std::exception&) {
    throw std::invalid_argument("--" + name + " expects an integer, got '" + it->second + "'");
  }
}

std::vector<long> Options::get_int_list(const std::string& name, const std::vector<long>& fallback) const {
  auto it = values_.find(name);
  if (it == values_.end()) return fallback;
  std::vector<long> out;
  std::stringstream ss(it->second);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      out.push_back(std::stol(item));
    } catch (const std::exception&) {
      throw std::invalid_argument("--" + name + " expects comma-separated integers, got '" + it->second + "'");
    }
  }
  return out;
}

void Options::reject_unknown(const std::vector<std::string>& known) const {
  for (const auto& [name, value] : values_) {
    bool ok = false;
    for (const auto& k : known) ok = ok || k == name;
    if (!ok) {
      std::string list;
      for (const auto& k : known) list += " --" + k;
      throw std::invalid_argument("unknown option --" + name + " (accepted:" + list + ")");
    }
  }
}

}  // namespace snapmla::cli

namespace snapmla::cli {

bool Options::handle_help(const std::string& usage, const std::vector<std::string>& known) const {
  if (has("help")) {
    std::fputs(usage.c_str(), stdout);
    return true;
  }
  reject_unknown(known);
  return false;
}

}  // namespace snapmla::cli
