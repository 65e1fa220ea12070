package flowwire

import (
	"errors"
	"strings"
	"testing"
	"time"
)

func TestToken(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	old, cur := []byte("old-secret"), []byte("current-secret")
	secrets := [][]byte{cur, old}
	tok := MintToken(old, now.Add(time.Hour))
	if err := VerifyAuthorization(tok.Authorization(), secrets, now); err != nil {
		t.Fatalf("token signed with a rotated-out secret still in the list: %v", err)
	}
	cases := map[string]struct {
		value string
		want  error
	}{
		"missing":              {"", ErrTokenMissing},
		"not bearer":           {"Basic abc", ErrTokenMalformed},
		"no dot":               {"Bearer abc", ErrTokenMalformed},
		"payload not a number": {"Bearer " + tok.Signature + ".tomorrow", ErrTokenMalformed},
		"wrong secret":         {MintToken([]byte("other"), now.Add(time.Hour)).Authorization(), ErrTokenSignature},
		"expired":              {MintToken(cur, now.Add(-time.Second)).Authorization(), ErrTokenExpired},
		"tampered payload":     {"Bearer " + tok.Signature + "." + "9999999999", ErrTokenSignature},
	}
	for name, c := range cases {
		if err := VerifyAuthorization(c.value, secrets, now); !errors.Is(err, c.want) {
			t.Errorf("%s: err = %v, want %v", name, err, c.want)
		}
	}
	// The NetBird form: "Bearer <signature>.<payload>".
	if got, want := tok.Authorization(), "Bearer "+tok.Signature+"."+tok.Payload; got != want {
		t.Errorf("Authorization() = %q, want %q", got, want)
	}
}

func FuzzVerifyAuthorization(f *testing.F) {
	now := time.Unix(1_800_000_000, 0)
	secret := []byte("fuzz-secret")
	f.Add(MintToken(secret, now.Add(time.Hour)).Authorization())
	f.Add("Bearer .")
	f.Add("bearer abc.123")
	f.Add("")
	f.Fuzz(func(t *testing.T, value string) {
		err := VerifyAuthorization(value, [][]byte{secret}, now)
		if err == nil {
			// Accepted: it must be exactly a token this secret signs, unexpired.
			sig, payload, _ := strings.Cut(strings.TrimSpace(value[len("Bearer "):]), ".")
			if sig != sign(secret, payload) {
				t.Fatalf("accepted %q with a signature that is not the secret's", value)
			}
		}
	})
}
