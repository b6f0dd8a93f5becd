//go:build tools

// Package tools pins containerd for the test bed's arm64 node: built for arm64 and run under
// emulation, its CRI plugin pulls, unpacks and runs images for its own platform (linux/arm64).
package tools

import (
	_ "github.com/containerd/containerd/cmd/containerd"
)
