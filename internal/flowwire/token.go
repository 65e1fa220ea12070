package flowwire

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Token is the credential a client presents: a payload and its signature, as a NetBird
// management server hands them out. flowpipe's tokens have a Unix expiry time in decimal as
// payload and base64(HMAC-SHA256(secret, payload)) as signature.
type Token struct {
	Payload   string
	Signature string
}

// MintToken makes a token that expires at expiry, signed with secret.
func MintToken(secret []byte, expiry time.Time) Token {
	payload := strconv.FormatInt(expiry.Unix(), 10)
	return Token{Payload: payload, Signature: sign(secret, payload)}
}

func sign(secret []byte, payload string) string {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(payload))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// Authorization is the value of the `authorization` metadata a client sends:
// "Bearer <signature>.<payload>", the order NetBird's client uses.
func (t Token) Authorization() string {
	return "Bearer " + t.Signature + "." + t.Payload
}

// Errors of VerifyAuthorization; the receiver counts refusals by these reasons.
var (
	ErrTokenMissing   = errors.New("no authorization bearer token")
	ErrTokenMalformed = errors.New("malformed bearer token (want Bearer <signature>.<payload>)")
	ErrTokenSignature = errors.New("token signature does not match any configured secret")
	ErrTokenExpired   = errors.New("token expired")
)

// VerifyAuthorization checks an `authorization` metadata value against secrets (any one may
// have signed it, so that secrets can be rotated) and the expiry in its payload.
func VerifyAuthorization(value string, secrets [][]byte, now time.Time) error {
	if value == "" {
		return ErrTokenMissing
	}
	const prefix = "bearer "
	if len(value) < len(prefix) || !strings.EqualFold(value[:len(prefix)], prefix) {
		return ErrTokenMalformed
	}
	// A base64 signature has no '.', so the first one separates it from the payload.
	sig, payload, ok := strings.Cut(strings.TrimSpace(value[len(prefix):]), ".")
	if !ok || sig == "" || payload == "" {
		return ErrTokenMalformed
	}
	expiry, err := strconv.ParseInt(payload, 10, 64)
	if err != nil {
		return ErrTokenMalformed
	}
	got, err := base64.StdEncoding.DecodeString(sig)
	if err != nil {
		return ErrTokenMalformed
	}
	matched := false
	for _, s := range secrets {
		m := hmac.New(sha256.New, s)
		m.Write([]byte(payload))
		if hmac.Equal(got, m.Sum(nil)) {
			matched = true
			break
		}
	}
	if !matched {
		return ErrTokenSignature
	}
	if now.Unix() >= expiry {
		return fmt.Errorf("%w at %s", ErrTokenExpired, time.Unix(expiry, 0).UTC().Format(time.RFC3339))
	}
	return nil
}
