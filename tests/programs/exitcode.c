/* Exits with the code given as its first argument (default 0), after saying so on stderr. */

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int code = argc > 1 ? atoi(argv[1]) : 0;
    fprintf(stderr, "exiting with %d\n", code);
    return code;
}
