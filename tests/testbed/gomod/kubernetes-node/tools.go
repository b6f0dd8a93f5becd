//go:build tools

// Package tools pins the node commands (kubelet, kube-proxy) the test bed's real node runs,
// from the same Kubernetes release as the control plane.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
