package pluginhost

import (
	"reflect"
	"testing"
)

func TestFromPluginJSONRestoresIntegers(t *testing.T) {
	got := fromPluginJSON([]any{"read_buffer", 6.7108864e+07, "ratio", 0.5, "timestamp", "2026-11-26T05:47:23.908Z", "name", "kernel", "odd"})
	want := []any{"read_buffer", int64(67108864), "ratio", 0.5, "name", "kernel", "odd"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %#v\nwant %#v", got, want)
	}
}
