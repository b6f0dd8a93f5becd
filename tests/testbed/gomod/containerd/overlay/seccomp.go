// Replaces contrib/seccomp/seccomp.go of containerd in the test bed's arm64 build (see
// tests/testbed/binaries.py); the package's other files, its default profile among them, are containerd's.
//
// On the arm64 node every process of a container is qemu-user-static running the arm64 program: an
// amd64 program, whose system calls the seccomp filter (installed by runc, native) sees as amd64 ones.
// containerd's default profile for arm64 allows arm64's architecture-specific calls; the emulator needs
// the two that containerd's amd64 profile adds for amd64, arch_prctl (thread-local storage) and
// modify_ldt. WithDefaultProfile adds them; everything else is containerd's default profile.
package seccomp

import (
	"context"
	"encoding/json"
	"fmt"
	"os"

	"github.com/containerd/containerd/containers"
	"github.com/containerd/containerd/oci"
	"github.com/opencontainers/runtime-spec/specs-go"
)

// EmulatorSyscalls are the amd64-only system calls the emulator makes.
var EmulatorSyscalls = []string{"arch_prctl", "modify_ldt"}

// WithProfile sets the container's seccomp profile from a JSON file.
func WithProfile(profile string) oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
		text, err := os.ReadFile(profile)
		if err != nil {
			return fmt.Errorf("cannot load seccomp profile %q: %v", profile, err)
		}
		loaded := &specs.LinuxSeccomp{}
		if err := json.Unmarshal(text, loaded); err != nil {
			return fmt.Errorf("decoding seccomp profile failed %q: %v", profile, err)
		}
		s.Linux.Seccomp = loaded
		return nil
	}
}

// WithDefaultProfile sets containerd's default profile, with the emulator's system calls allowed.
func WithDefaultProfile() oci.SpecOpts {
	return func(_ context.Context, _ oci.Client, _ *containers.Container, s *specs.Spec) error {
		profile := DefaultProfile(s)
		profile.Syscalls = append(profile.Syscalls, specs.LinuxSyscall{Names: EmulatorSyscalls, Action: specs.ActAllow})
		s.Linux.Seccomp = profile
		return nil
	}
}
