// Does not compile, on purpose: wasm32-wasi has no C++ exceptions, so sshwasm builds with
// -fno-exceptions and a `throw` is an error rather than a link failure.

#include <stdexcept>

int main() {
    throw std::runtime_error("no exceptions here");
}
