// Command gitops-health reports the health of a Kubernetes object the way GitOps tools compute it:
//
//	gitops-health kstatus [FILE]             kstatus (sigs.k8s.io/cli-utils), as Flux and kpt read status
//	gitops-health argocd-lua SCRIPT [FILE]   an Argo CD resource health check written in Lua
//
// The object is read as JSON or YAML from FILE, or from standard input when FILE is absent or "-".
// Each prints one JSON object, {"status": ..., "message": ...}, and exits 0; a script or object
// that cannot be evaluated exits 1 with the reason on standard error.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

// Health is what both evaluators print.
type Health struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	if err := run(os.Args[1:], os.Stdout); err != nil {
		fmt.Fprintf(os.Stderr, "gitops-health: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, out io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: gitops-health kstatus [FILE] | gitops-health argocd-lua SCRIPT [FILE]")
	}
	var health Health
	var err error
	switch args[0] {
	case "kstatus":
		var object *unstructured.Unstructured
		if object, err = readObject(optional(args[1:], 0)); err == nil {
			health, err = kstatusHealth(object)
		}
	case "argocd-lua":
		if len(args) < 2 {
			return fmt.Errorf("argocd-lua needs the script's path")
		}
		var script []byte
		if script, err = os.ReadFile(args[1]); err != nil {
			return err
		}
		var object *unstructured.Unstructured
		if object, err = readObject(optional(args[2:], 0)); err == nil {
			health, err = luaHealth(string(script), object.Object)
		}
	default:
		return fmt.Errorf("unknown evaluator %q (kstatus or argocd-lua)", args[0])
	}
	if err != nil {
		return err
	}
	return json.NewEncoder(out).Encode(health)
}

func optional(args []string, index int) string {
	if index < len(args) {
		return args[index]
	}
	return "-"
}

// readObject decodes one object from JSON or YAML the way client-go does (whole numbers become int64).
func readObject(path string) (*unstructured.Unstructured, error) {
	var data []byte
	var err error
	if path == "-" {
		data, err = io.ReadAll(os.Stdin)
	} else {
		data, err = os.ReadFile(path)
	}
	if err != nil {
		return nil, err
	}
	asJSON, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("reading the object: %w", err)
	}
	object := &unstructured.Unstructured{}
	if err := object.UnmarshalJSON(asJSON); err != nil {
		return nil, fmt.Errorf("reading the object from %s: %w", path, err)
	}
	return object, nil
}
