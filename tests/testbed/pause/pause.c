/*
 * The pod sandbox process of the test bed's real node (registry.k8s.io/pause:3.10, built locally by
 * tests/testbed/images.py): it holds the pod's namespaces and does nothing else. As PID 1 of the pod
 * it reaps the zombies left to it and exits 0 on SIGINT or SIGTERM.
 *
 *   gcc -static -Os -o pause pause.c
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signo) {
  (void)signo;
  _exit(0);
}

static void reap(int signo) {
  int saved = errno;
  (void)signo;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

int main(int argc, char **argv) {
  struct sigaction action;

  if (argc > 1 && strcmp(argv[1], "-v") == 0) {
    puts("pause (edgemodel test bed) 3.10");
    return 0;
  }
  if (getpid() != 1) {
    fputs("pause: warning: not the first process of its PID namespace\n", stderr);
  }
  memset(&action, 0, sizeof(action));
  sigemptyset(&action.sa_mask);
  action.sa_handler = stop;
  if (sigaction(SIGINT, &action, NULL) < 0 || sigaction(SIGTERM, &action, NULL) < 0) {
    perror("pause: sigaction");
    return 1;
  }
  action.sa_handler = reap;
  action.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  if (sigaction(SIGCHLD, &action, NULL) < 0) {
    perror("pause: sigaction");
    return 2;
  }
  for (;;) {
    pause();
  }
  fputs("pause: error: infinite loop terminated\n", stderr);
  return 42;
}
