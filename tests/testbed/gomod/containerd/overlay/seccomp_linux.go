// Replaces pkg/seccomp/seccomp_linux.go of containerd in the test bed's arm64 build (go build -overlay,
// see tests/testbed/binaries.py); the package's other files are containerd's own.
//
// containerd asks the kernel whether it supports seccomp filters with prctl(PR_SET_SECCOMP), where
// EINVAL means no. Under qemu-user, which runs this arm64 containerd on an amd64 machine, that call
// never reaches the kernel: the emulator answers EINVAL itself, so that a program cannot filter the
// emulator's own system calls. The kernel's own answer is also in /proc/self/status, which the
// emulator passes through: a "Seccomp_filters:" line where CONFIG_SECCOMP_FILTER is set (Linux 5.9+).
// The filters themselves are installed by runc, which runs natively.
package seccomp

import (
	"bufio"
	"os"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

var (
	supported     bool
	supportedOnce sync.Once
)

func isEnabled() bool {
	supportedOnce.Do(func() {
		supported = unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, 0, 0, 0) != unix.EINVAL ||
			kernelListsFilters()
	})
	return supported
}

// kernelListsFilters reports whether /proc/self/status has a Seccomp_filters line.
func kernelListsFilters() bool {
	status, err := os.Open("/proc/self/status")
	if err != nil {
		return false
	}
	defer status.Close()
	lines := bufio.NewScanner(status)
	for lines.Scan() {
		if strings.HasPrefix(lines.Text(), "Seccomp_filters:") {
			return true
		}
	}
	return false
}
