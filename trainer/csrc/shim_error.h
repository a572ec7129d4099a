// How the autograd shims (linear_accum.cpp, swiglu.cpp) hand a C++ failure
// to Rust: `guarded` runs the body, turns every exception into a non-zero
// return and writes its message, without libtorch's C++ backtrace and
// NUL-terminated, into the caller's buffer.
#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace sigma_shim {

inline void set_err(char* err, size_t len, const char* what) {
  if (len == 0) return;
  std::strncpy(err, what, len - 1);
  err[len - 1] = '\0';
}

template <class F>
int guarded(char* err, size_t len, F&& body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    set_err(err, len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_err(err, len, e.what());
  } catch (...) {
    set_err(err, len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace sigma_shim
