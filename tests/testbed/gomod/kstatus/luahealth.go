package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	lua "github.com/yuin/gopher-lua"
)

// Argo CD's health statuses; anything else a script returns is reported as Unknown.
var validStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

// luaHealth runs a health script as Argo CD runs a custom one from argocd-cm: gopher-lua without the
// standard libraries except package, base and table (no string, math or io unless useOpenLibs is set),
// a one-second limit, the object as the global `obj`, and a table {status, message} as the result.
func luaHealth(script string, object map[string]interface{}) (Health, error) {
	state := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer state.Close()
	for _, library := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		call := lua.P{Fn: state.NewFunction(library.open), Protect: true}
		if err := state.CallByParam(call, lua.LString(library.name)); err != nil {
			return Health{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	state.SetContext(ctx)
	state.SetGlobal("obj", toLua(state, object))
	if err := state.DoString(script); err != nil {
		return Health{}, fmt.Errorf("running the script: %w", err)
	}
	returned, ok := state.Get(-1).(*lua.LTable)
	if !ok {
		return Health{}, fmt.Errorf("expected a table from the script, not %s", state.Get(-1).Type())
	}
	health := Health{
		Status:  lua.LVAsString(returned.RawGetString("status")),
		Message: lua.LVAsString(returned.RawGetString("message")),
	}
	if !validStatuses[health.Status] {
		return Health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
	}
	return health, nil
}

// toLua converts an unstructured object into Lua values: maps and slices become tables, numbers LNumber.
func toLua(state *lua.LState, value interface{}) lua.LValue {
	switch converted := value.(type) {
	case bool:
		return lua.LBool(converted)
	case float64:
		return lua.LNumber(converted)
	case int64:
		return lua.LNumber(converted)
	case json.Number:
		return lua.LString(converted)
	case string:
		return lua.LString(converted)
	case []interface{}:
		array := state.CreateTable(len(converted), 0)
		for _, item := range converted {
			array.Append(toLua(state, item))
		}
		return array
	case map[string]interface{}:
		table := state.CreateTable(0, len(converted))
		for key, item := range converted {
			table.RawSetH(lua.LString(key), toLua(state, item))
		}
		return table
	}
	return lua.LNil
}
