/* The pod sandbox ("pause") process for the test node's images: it holds the pod's namespaces and
 * does nothing else, as Kubernetes' own pause does. It sleeps until SIGINT or SIGTERM (then exits 0)
 * and, being PID 1 of a pod that shares its PID namespace, reaps the zombies it inherits.
 * Built statically (gcc -static -Os -s) so the image needs no C library. `pause -v` prints its name. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_exit_signal(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "-v") == 0) {
        puts("clusterfit-pause");
        return 0;
    }
    if (getpid() != 1) {
        /* Not fatal: Kubernetes' pause only warns too (for example when run by hand). */
        fputs("pause: warning: not running as PID 1\n", stderr);
    }
    struct sigaction exit_action = {.sa_handler = on_exit_signal};
    struct sigaction child_action = {.sa_handler = on_child, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &exit_action, NULL) < 0 || sigaction(SIGTERM, &exit_action, NULL) < 0 ||
        sigaction(SIGCHLD, &child_action, NULL) < 0) {
        perror("pause: sigaction");
        return 1;
    }
    for (;;) {
        pause();
    }
}
