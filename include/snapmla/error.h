// Errors raised by snapmla name the offending argument, so a serving engine's
// log says which tensor was wrong instead of showing a crash or garbage.
#pragma once

#include <stdexcept>
#include <string>

namespace snapmla {

class Error : public std::runtime_error {
 public:
  // Produces "snapmla: argument 'q': expected dtype bfloat16, got float32".
  Error(std::string argument, const std::string& message);
  // Errors that are not about one argument (no GPU, CUDA failure...).
  explicit Error(const std::string& message);

  const std::string& argument() const { return argument_; }

 private:
  std::string argument_;
};

}  // namespace snapmla
