// The C++ example: the standard library at work (strings, vectors, streams), no exceptions
// (wasm32-wasi has none).
//
//   sshwasm run examples/hello.cpp -- one two

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char **argv) {
    std::vector<std::string> args(argv + 1, argv + argc);
    std::cout << "hello from C++" << std::endl;
    for (std::size_t i = 0; i < args.size(); ++i) {
        std::cout << "arg[" << i + 1 << "]=" << args[i] << std::endl;
    }
    return 0;
}
