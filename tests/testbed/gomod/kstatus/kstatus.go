package main

import (
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

// kstatusHealth is status.Compute, the function Flux's health checks and kpt's status poller call.
func kstatusHealth(object *unstructured.Unstructured) (Health, error) {
	result, err := status.Compute(object)
	if err != nil {
		return Health{}, err
	}
	return Health{Status: result.Status.String(), Message: result.Message}, nil
}
