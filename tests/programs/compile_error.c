/* Does not compile, on purpose: a name that was never declared. */

#include <stdio.h>

int main(void) {
    printf("%d\n", undeclared_answer);
    return 0;
}
