/* The C example: prints a greeting, then each argument after the program name.
 *
 *   sshwasm run examples/hello.c -- one two
 */

#include <stdio.h>

int main(int argc, char **argv) {
    printf("hello from C\n");
    for (int i = 1; i < argc; i++) {
        printf("arg[%d]=%s\n", i, argv[i]);
    }
    return 0;
}
