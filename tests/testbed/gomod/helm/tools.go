//go:build tools

// Package tools pins the Helm command the test bed builds (helm.sh/helm/v3/cmd/helm).
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
