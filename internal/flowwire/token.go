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
	ErrTokenTooLong   = errors.New("token expires further ahead than the receiver's max_token_lifetime")
)

// TokenCheck is what VerifyAuthorizationLimits found: the payload when the value parsed (for
// logs that say who was refused), and the error, nil when the token is good.
type TokenCheck struct {
	Payload string
	Err     error
}

// VerifyAuthorization checks an `authorization` metadata value against secrets (any one may
// have signed it, so that secrets can be rotated) and the expiry in its payload.
func VerifyAuthorization(value string, secrets [][]byte, now time.Time) error {
	return VerifyAuthorizationLimits(value, secrets, now, 0).Err
}

// VerifyAuthorizationLimits is VerifyAuthorization that also refuses a token expiring more
// than maxLifetime after now (0: no limit): a token valid for years is a leaked credential
// waiting to happen, whoever signed it.
func VerifyAuthorizationLimits(value string, secrets [][]byte, now time.Time, maxLifetime time.Duration) TokenCheck {
	if value == "" {
		return TokenCheck{Err: ErrTokenMissing}
	}
	const prefix = "bearer "
	if len(value) < len(prefix) || !strings.EqualFold(value[:len(prefix)], prefix) {
		return TokenCheck{Err: ErrTokenMalformed}
	}
	// A base64 signature has no '.', so the first one separates it from the payload.
	sig, payload, ok := strings.Cut(strings.TrimSpace(value[len(prefix):]), ".")
	if !ok || sig == "" || payload == "" {
		return TokenCheck{Err: ErrTokenMalformed}
	}
	expiry, err := strconv.ParseInt(payload, 10, 64)
	if err != nil {
		return TokenCheck{Err: ErrTokenMalformed}
	}
	c := TokenCheck{Payload: payload}
	got, err := base64.StdEncoding.DecodeString(sig)
	if err != nil {
		c.Err = ErrTokenMalformed
		return c
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
	switch {
	case !matched:
		c.Err = ErrTokenSignature
	case now.Unix() >= expiry:
		c.Err = fmt.Errorf("%w at %s", ErrTokenExpired, time.Unix(expiry, 0).UTC().Format(time.RFC3339))
	case maxLifetime > 0 && expiry > now.Add(maxLifetime).Unix():
		c.Err = fmt.Errorf("%w (%s): it expires at %s", ErrTokenTooLong, maxLifetime, expiryText(expiry))
	}
	return c
}

func expiryText(unix int64) string {
	t := time.Unix(unix, 0).UTC()
	if t.Year() > 9999 {
		return strconv.FormatInt(unix, 10) + " (Unix time)"
	}
	return t.Format(time.RFC3339)
}
