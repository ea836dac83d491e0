/* abort_before_ready: calls abort() (SIGABRT) before sending the ready byte. */
#include <stdlib.h>

int main(void) {
  abort();
}
