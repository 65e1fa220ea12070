package options

import (
	"encoding"
	"fmt"
	"math"
	"net/netip"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Decode fills the struct that out points to from raw options, the maps, lists and scalars
// that YAML produces. Field names come from `yaml:"name"` tags (`yaml:",inline"` for an
// embedded struct, `yaml:"-"` to skip); a field tagged `required:"true"` must be present.
// Unknown keys, wrong types and missing required keys are all collected, each with its key
// path under prefix. Values already in *out are the defaults and stay when a key is absent.
//
// Supported field types: strings, bools, integers and floats (range-checked), time.Duration
// ("5s"), netip.Addr and netip.Prefix, ByteSize ("64MiB"), anything implementing
// encoding.TextUnmarshaler, slices, maps with string keys, pointers, nested structs and `any`.
func Decode(raw map[string]any, out any, prefix string) FieldErrors {
	var errs FieldErrors
	v := reflect.ValueOf(out)
	if v.Kind() != reflect.Pointer || v.Elem().Kind() != reflect.Struct {
		errs.Add(prefix, "internal error: Decode needs a pointer to a struct, got %T", out)
		return errs
	}
	decodeStruct(raw, v.Elem(), prefix, &errs)
	return errs
}

var (
	durationType      = reflect.TypeFor[time.Duration]()
	textUnmarshalType = reflect.TypeFor[encoding.TextUnmarshaler]()
)

type fieldInfo struct {
	index    []int
	required bool
}

func structFields(t reflect.Type) map[string]fieldInfo {
	fields := map[string]fieldInfo{}
	var walk func(t reflect.Type, index []int)
	walk = func(t reflect.Type, index []int) {
		for i := range t.NumField() {
			f := t.Field(i)
			if !f.IsExported() {
				continue
			}
			tag := f.Tag.Get("yaml")
			name, opts, _ := strings.Cut(tag, ",")
			if name == "-" {
				continue
			}
			idx := append(append([]int(nil), index...), i)
			if opts == "inline" && f.Type.Kind() == reflect.Struct {
				walk(f.Type, idx)
				continue
			}
			if name == "" {
				name = strings.ToLower(f.Name)
			}
			fields[name] = fieldInfo{index: idx, required: f.Tag.Get("required") == "true"}
		}
	}
	walk(t, nil)
	return fields
}

func decodeStruct(raw map[string]any, v reflect.Value, path string, errs *FieldErrors) {
	fields := structFields(v.Type())
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fi, ok := fields[k]
		if !ok {
			errs.Add(Join(path, k), "unknown key%s", suggest(k, fields))
			continue
		}
		decodeValue(raw[k], v.FieldByIndex(fi.index), Join(path, k), errs)
	}
	names := make([]string, 0, len(fields))
	for n := range fields {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if fields[n].required {
			if val, ok := raw[n]; !ok || val == nil {
				errs.Add(Join(path, n), "required, but not set")
			}
		}
	}
}

// suggest names the known keys, closest first, so a typo is easy to fix.
func suggest(k string, fields map[string]fieldInfo) string {
	best, bestD := "", 3
	var all []string
	for n := range fields {
		all = append(all, n)
		if d := editDistance(k, n); d < bestD {
			best, bestD = n, d
		}
	}
	if best != "" {
		return fmt.Sprintf(" (did you mean %q?)", best)
	}
	sort.Strings(all)
	if len(all) == 0 {
		return " (this component takes no options)"
	}
	return " (known keys: " + strings.Join(all, ", ") + ")"
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// Describe names a raw option value for a message: `string "x"`, "a list", "nothing (null)".
func Describe(raw any) string {
	switch r := raw.(type) {
	case nil:
		return "nothing (null)"
	case string:
		return fmt.Sprintf("string %q", r)
	case bool:
		return fmt.Sprintf("boolean %v", r)
	case int, int64, uint64:
		return fmt.Sprintf("integer %v", r)
	case float64:
		return fmt.Sprintf("number %v", r)
	case []any:
		return "a list"
	case map[string]any:
		return "a map"
	}
	return fmt.Sprintf("%T", raw)
}

func decodeValue(raw any, v reflect.Value, path string, errs *FieldErrors) {
	t := v.Type()
	if raw == nil {
		// An explicit null leaves the default.
		return
	}
	if t == durationType {
		decodeDuration(raw, v, path, errs)
		return
	}
	if reflect.PointerTo(t).Implements(textUnmarshalType) && t.Kind() != reflect.Slice {
		decodeText(raw, v, path, errs)
		return
	}
	switch t.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			v.Set(reflect.New(t.Elem()))
		}
		decodeValue(raw, v.Elem(), path, errs)
	case reflect.Interface:
		v.Set(reflect.ValueOf(raw))
	case reflect.String, reflect.Bool, reflect.Float32, reflect.Float64:
		decodeScalar(raw, v, path, errs)
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		decodeInteger(raw, v, path, errs)
	case reflect.Slice, reflect.Map, reflect.Struct:
		decodeCollection(raw, v, path, errs)
	default:
		errs.Add(path, "internal error: cannot decode into %s", t)
	}
}

func decodeDuration(raw any, v reflect.Value, path string, errs *FieldErrors) {
	switch r := raw.(type) {
	case string:
		d, err := time.ParseDuration(r)
		if err != nil {
			errs.Add(path, "want a duration such as \"500ms\", \"30s\" or \"5m\", got %s", Describe(raw))
			return
		}
		v.SetInt(int64(d))
	case int:
		if r != 0 {
			errs.Add(path, "want a duration with a unit such as \"30s\", got %s", Describe(raw))
			return
		}
		v.SetInt(0)
	default:
		errs.Add(path, "want a duration such as \"30s\", got %s", Describe(raw))
	}
}

// decodeText decodes into a type that implements encoding.TextUnmarshaler.
func decodeText(raw any, v reflect.Value, path string, errs *FieldErrors) {
	t := v.Type()
	s, ok := scalarText(raw)
	if !ok {
		errs.Add(path, "want a %s, got %s", typeWord(t), Describe(raw))
		return
	}
	if err := v.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(s)); err != nil {
		errs.Add(path, "invalid %s %q: %s", typeWord(t), s, cleanErr(err))
	}
}

// decodeScalar decodes a string, a boolean or a floating-point number.
func decodeScalar(raw any, v reflect.Value, path string, errs *FieldErrors) {
	switch v.Kind() {
	case reflect.String:
		s, ok := raw.(string)
		if !ok {
			// Numbers and booleans written where a string is wanted are taken as written.
			if s2, ok2 := scalarText(raw); ok2 && !IsCollection(raw) {
				v.SetString(s2)
				return
			}
			errs.Add(path, "want a string, got %s", Describe(raw))
			return
		}
		v.SetString(s)
	case reflect.Bool:
		b, ok := raw.(bool)
		if !ok {
			errs.Add(path, "want true or false, got %s", Describe(raw))
			return
		}
		v.SetBool(b)
	default: // float
		switch r := raw.(type) {
		case float64:
			v.SetFloat(r)
		case int:
			v.SetFloat(float64(r))
		default:
			errs.Add(path, "want a number, got %s", Describe(raw))
		}
	}
}

// decodeInteger decodes a signed or unsigned integer, range-checked.
func decodeInteger(raw any, v reflect.Value, path string, errs *FieldErrors) {
	n, ok := toInt(raw)
	switch v.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		if !ok {
			errs.Add(path, "want an integer, got %s", Describe(raw))
			return
		}
		if v.OverflowInt(n) {
			errs.Add(path, "%d is out of range", n)
			return
		}
		v.SetInt(n)
	default:
		if !ok {
			errs.Add(path, "want a non-negative integer, got %s", Describe(raw))
			return
		}
		if n < 0 {
			errs.Add(path, "must not be negative, got %d", n)
			return
		}
		if v.OverflowUint(uint64(n)) {
			errs.Add(path, "%d is out of range (at most %d)", n, maxUint(v.Type()))
			return
		}
		v.SetUint(uint64(n))
	}
}

// decodeCollection decodes a list, a map with string keys, or a nested struct.
func decodeCollection(raw any, v reflect.Value, path string, errs *FieldErrors) {
	t := v.Type()
	switch t.Kind() {
	case reflect.Slice:
		list, ok := raw.([]any)
		if !ok {
			errs.Add(path, "want a list, got %s", Describe(raw))
			return
		}
		s := reflect.MakeSlice(t, len(list), len(list))
		for i, item := range list {
			decodeValue(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i), errs)
		}
		v.Set(s)
	case reflect.Map:
		m, ok := raw.(map[string]any)
		if !ok {
			errs.Add(path, "want a map, got %s", Describe(raw))
			return
		}
		if t.Key().Kind() != reflect.String {
			errs.Add(path, "internal error: map keys must be strings")
			return
		}
		if v.IsNil() {
			v.Set(reflect.MakeMapWithSize(t, len(m)))
		}
		for k, item := range m {
			ev := reflect.New(t.Elem()).Elem()
			decodeValue(item, ev, Join(path, k), errs)
			v.SetMapIndex(reflect.ValueOf(k).Convert(t.Key()), ev)
		}
	default: // struct
		m, ok := raw.(map[string]any)
		if !ok {
			errs.Add(path, "want a map of options, got %s", Describe(raw))
			return
		}
		decodeStruct(m, v, path, errs)
	}
}

// IsCollection reports whether a raw option value is a list or a map.
func IsCollection(raw any) bool {
	switch raw.(type) {
	case []any, map[string]any:
		return true
	}
	return false
}

func scalarText(raw any) (string, bool) {
	switch r := raw.(type) {
	case string:
		return r, true
	case int:
		return strconv.Itoa(r), true
	case int64:
		return strconv.FormatInt(r, 10), true
	case uint64:
		return strconv.FormatUint(r, 10), true
	case float64:
		return strconv.FormatFloat(r, 'g', -1, 64), true
	case bool:
		return strconv.FormatBool(r), true
	}
	return "", false
}

func toInt(raw any) (int64, bool) {
	switch r := raw.(type) {
	case int:
		return int64(r), true
	case int64:
		return r, true
	case uint64:
		if r > math.MaxInt64 {
			return 0, false
		}
		return int64(r), true
	case float64:
		if r == math.Trunc(r) && math.Abs(r) < 1<<53 {
			return int64(r), true
		}
	}
	return 0, false
}

func maxUint(t reflect.Type) uint64 {
	return math.MaxUint64 >> (64 - t.Bits())
}

func typeWord(t reflect.Type) string {
	switch t {
	case reflect.TypeFor[netip.Prefix]():
		return "prefix (such as 10.0.0.0/8 or fd00::/8)"
	case reflect.TypeFor[netip.Addr]():
		return "IP address"
	case reflect.TypeFor[ByteSize]():
		return "size (such as 64MiB)"
	}
	return strings.ToLower(t.Name())
}

func cleanErr(err error) string {
	s := err.Error()
	// netip errors repeat the input; keep the reason.
	if i := strings.LastIndex(s, "): "); i >= 0 {
		return s[i+3:]
	}
	return s
}
